"""``DynSDPBConfig`` and ``DynSDPBTrainer``: the method as a drop-in ``transformers.Trainer``.

The trainer changes three things and nothing else:

1. the training DataLoader follows :class:`PreviousBatchSampler` (dlb/dynsdpb only), and every
   batch carries its sample ids;
2. ``compute_loss`` adds the consistency term of :mod:`tune_dynsdpb.losses` to the model's own
   loss, with targets from a :class:`SoftTargetCache` filled by the previous micro-batch;
3. checkpoints also hold the cache, so a resumed run continues the same chain.

``method="vanilla"`` takes the stock Trainer path untouched: it is the baseline.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .errors import UserError
from .losses import consistency_term
from .sampler import PreviousBatchSampler, SoftTargetCache

logger = logging.get_logger(__name__)
SAMPLE_IDS = "dynsdpb_sample_ids"  # batch key for the ids; popped before the model sees the batch
STATE_FILE = "dynsdpb_state_rank{rank}.pt"
STAT_NAMES = ("ce_loss", "consistency_loss", "alpha_mean", "alpha_min", "alpha_max",
              "tau_mean", "tau_min", "tau_max", "u_mean", "c_mean")


@dataclass
class DynSDPBConfig(TrainingArguments):
    """``TrainingArguments`` plus the method's knobs. See ``docs/method.md`` for the equations."""

    method: Literal["vanilla", "dlb", "dynsdpb"] = field(
        default="dynsdpb", metadata={"help": "vanilla: plain fine-tuning; dlb: static alpha0/tau0; dynsdpb: adaptive"})
    alpha0: float = field(default=1.0, metadata={"help": "consistency weight (>= 0)"})
    tau0: float = field(default=3.0, metadata={"help": "distillation temperature (> 0)"})
    lambda_alpha: float = field(default=1.0, metadata={"help": "dynsdpb: alpha = alpha0 * c^lambda_alpha (>= 0)"})
    lambda_tau: float = field(default=0.5, metadata={"help": "dynsdpb: tau = tau0 * (1 + lambda_tau * u) (> -1)"})
    granularity: Literal["sample", "batch"] = field(
        default="sample", metadata={"help": "dynsdpb: per-sample alpha/tau, or from batch means of u and c"})
    tau_range: tuple[float, float] = field(default=(0.05, 20.0), metadata={"help": "clamp range for tau"})
    grad_norm_log_steps: int = field(
        default=0, metadata={"help": "log per-layer gradient norms every N optimizer steps (0: off)"})

    def __post_init__(self):
        super().__post_init__()
        check_method_args(self)


def check_method_args(args: Any) -> None:
    """Range checks shared by the config and the CLI; raises a one-line UserError naming the field."""
    def bad(name: str, rule: str) -> UserError:
        return UserError(f"{name}: {rule} (got {getattr(args, name)!r})")

    if args.method not in ("vanilla", "dlb", "dynsdpb"):
        raise bad("method", "must be one of vanilla, dlb, dynsdpb")
    if args.method != "vanilla" and (args.per_device_train_batch_size < 2 or args.per_device_train_batch_size % 2):
        raise bad("per_device_train_batch_size", f"must be even and >= 2 for method '{args.method}'")
    if not args.alpha0 >= 0:
        raise bad("alpha0", "must be >= 0")
    if not args.tau0 > 0:
        raise bad("tau0", "must be > 0")
    if not args.lambda_alpha >= 0:
        raise bad("lambda_alpha", "must be >= 0")
    if not args.lambda_tau > -1:
        raise bad("lambda_tau", "must be > -1")
    if args.granularity not in ("sample", "batch"):
        raise bad("granularity", "must be 'sample' or 'batch'")
    lo, hi = args.tau_range
    if not 0 < lo <= args.tau0 <= hi:
        raise UserError(f"tau_range: must satisfy 0 < low <= tau0 <= high (got {args.tau_range!r}, tau0={args.tau0})")


class TrainingDiverged(RuntimeError):
    """Placeholder until the divergence checks land (method branch)."""


class _WithSampleIds(Dataset):
    """Adds each row's index under ``SAMPLE_IDS``; keeps ``__getitems__`` for batched reads."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], SAMPLE_IDS: i}

    def __getitems__(self, indices):
        rows = (self.dataset.__getitems__(indices) if hasattr(self.dataset, "__getitems__")
                else [self.dataset[i] for i in indices])
        return [{**row, SAMPLE_IDS: i} for row, i in zip(rows, indices)]


class _SampleIdCollator:
    """Wraps any collator: takes the ids out before it runs and puts them back as a tensor."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        ids = torch.tensor([f.pop(SAMPLE_IDS) for f in features], dtype=torch.long)
        batch = self.collator(features)
        batch[SAMPLE_IDS] = ids
        return batch


def _target_rows(output: torch.Tensor, labels: torch.Tensor, causal_lm: bool):
    """The rows the loss compares: one per sample, or one per target token of a causal LM.

    Returns (rows, row_labels, counts): rows (M, C); row_labels (M,); counts (K,) target tokens
    per sample for causal LMs, else None. Causal LMs predict token j+1 at position j.
    """
    if not causal_lm:
        return output, labels, None
    logits, targets = output[:, :-1], labels[:, 1:]
    mask = targets != -100
    return logits[mask], targets[mask], mask.sum(1)


def layer_of(param_name: str) -> str:
    """Groups parameters for the gradient-norm log: ``layer_3``, or ``embeddings`` / ``head``."""
    m = re.search(r"\.(?:layer|layers|h|blocks)\.(\d+)\.", param_name)
    if m:
        return f"layer_{int(m.group(1)):02d}"
    return "embeddings" if "embed" in param_name or "wte" in param_name or "wpe" in param_name else "head"


class _GradNormLogger(TrainerCallback):
    """Every N optimizer steps, logs the gradient norm of each layer (before clipping is applied
    by the optimizer step). One device-to-host copy per logged step, nothing on the others."""

    def __init__(self, trainer: "DynSDPBTrainer", every: int):
        self.trainer, self.every, self.groups = trainer, every, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if (state.global_step + 1) % self.every:
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if self.groups is None:
            self.groups = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self.groups.setdefault(layer_of(name), []).append(p)
        names = sorted(self.groups)
        sq = torch.stack([sum((p.grad.detach().float().square().sum() for p in self.groups[n] if p.grad is not None),
                              torch.zeros((), device=args.device)) for n in names])
        norms = sq.sqrt().tolist()
        self.trainer.log({f"grad_norm/{n}": v for n, v in zip(names, norms)})


class DynSDPBTrainer(Trainer):
    """``transformers.Trainer`` with DLB / DynSDPB self-distillation from the previous mini-batch.

    Use it exactly like ``Trainer`` with ``args=DynSDPBConfig(...)``. Works for sequence
    classification (num_labels >= 2), regression (num_labels == 1) and causal LMs (token level,
    also behind a peft LoRA adapter). One link of the chain is one micro-batch, so gradient
    accumulation, fp16/bf16 autocast, resume and DDP all keep the chain intact.
    """

    args: DynSDPBConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DynSDPBConfig):
            raise TypeError("DynSDPBTrainer needs args=DynSDPBConfig(...)")
        self.soft_targets = SoftTargetCache()
        # Running sums of STAT_NAMES (min/max: running extrema), then steps with a term, then steps.
        self._stats = torch.zeros(len(STAT_NAMES) + 2)
        self._stats_reset()
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft adapter
        self._causal_lm = type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self._regression = not self._causal_lm and getattr(base.config, "num_labels", 2) == 1
        if self.args.grad_norm_log_steps > 0:
            self.add_callback(_GradNormLogger(self, self.args.grad_norm_log_steps))
        if not self._causal_lm:
            # Classification/regression heads return a per-batch mean and ignore num_items_in_batch,
            # yet accept **kwargs. The stock Trainer would then count items for them, sum micro-batch
            # means under gradient accumulation and, under DDP, multiply the loss by the number of
            # processes (as if it had been divided by the item count of all ranks): CE would weigh
            # world_size times more against the consistency term than on one process. Say the model
            # takes no loss kwargs: every method's loss is then a per-micro-batch mean, averaged over
            # the micro-batches by the Trainer and over the ranks by DDP.
            self.model_accepts_loss_kwargs = False
            if getattr(self, "loss_is_scaled_for_ga", None) is None:
                self.loss_is_scaled_for_ga = False

    # -- data --------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self.args.method == "vanilla":
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        import datasets

        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler = PreviousBatchSampler(
            len(dataset), self._train_batch_size, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            num_replicas=self.args.world_size, rank=self.args.process_index)
        loader = DataLoader(
            _WithSampleIds(dataset), batch_size=self._train_batch_size, sampler=sampler, drop_last=False,
            collate_fn=_SampleIdCollator(collator), num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory, persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor)
        loader = self.accelerator.prepare(loader)
        # accelerate would deal whole batches out round-robin across ranks and break every rank's
        # chain; the sampler is rank-aware already, so make accelerate's shard a pass-through.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and hasattr(shard, "num_processes"):
            shard.num_processes, shard.process_index = 1, 0
        return loader

    # -- loss --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop(SAMPLE_IDS, None)
        if ids is None or self.args.method == "vanilla" or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        output = outputs["logits"]
        if self._regression:
            output = output.reshape(-1)
        half = ids.shape[0] // 2
        rows_now, labels_now, counts_now = _target_rows(output[:half], labels[:half], self._causal_lm)
        targets = self.soft_targets.get(ids[:half], counts_now)
        rows_new, _, counts_new = _target_rows(output[half:], labels[half:], self._causal_lm)
        self.soft_targets.put(ids[half:], rows_new, counts_new)
        if targets is None:  # the very first step: nothing to distil from yet
            self._stats_add(ce, None, num_items_in_batch)
            return (ce, outputs) if return_outputs else ce
        a = self.args
        term = consistency_term(rows_now, targets, labels_now, method=a.method, alpha0=a.alpha0, tau0=a.tau0,
                                lambda_alpha=a.lambda_alpha, lambda_tau=a.lambda_tau, granularity=a.granularity,
                                tau_range=tuple(a.tau_range), regression=self._regression)
        cons = term.loss
        # The model's loss may already be normalised over the whole accumulated batch (it then
        # skips the Trainer's division by the accumulation steps); the term is a per-micro-batch
        # mean, so divide it here in that case to weigh it the same at every accumulation setting.
        if self._loss_is_scaled(num_items_in_batch):
            cons = cons / self.current_gradient_accumulation_steps
        self._stats_add(ce, term, num_items_in_batch)
        loss = ce + cons
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether the model's loss is already normalised over the whole accumulated batch (the
        Trainer's own rule in ``training_step``)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # -- logging -----------------------------------------------------------------------------
    def _stats_reset(self) -> None:
        self._stats.zero_()
        self._stats[[3, 6]] = float("inf")    # alpha_min, tau_min
        self._stats[[4, 7]] = float("-inf")   # alpha_max, tau_max
        self._stats_device = None

    def _stats_add(self, ce: torch.Tensor, term, num_items_in_batch) -> None:
        # Tensors only, no .item(): a host sync per step would stall GPU training.
        if self._stats_device is None:
            self._stats_device = self._stats.to(ce.device)
        s = self._stats_device
        # a CE normalised over the accumulated batch is a fraction of the micro-batch's own mean
        scale = self.current_gradient_accumulation_steps if self._loss_is_scaled(num_items_in_batch) else 1
        s[0] += ce.detach().float() * scale
        s[-1] += 1
        if term is not None:
            s[1] += term.loss.detach()
            s[2] += term.alpha.mean()
            s[3] = torch.minimum(s[3], term.alpha.min())
            s[4] = torch.maximum(s[4], term.alpha.max())
            s[5] += term.tau.mean()
            s[6] = torch.minimum(s[6], term.tau.min())
            s[7] = torch.maximum(s[7], term.tau.max())
            s[8] += term.u.mean()
            s[9] += term.c.mean()
            s[10] += 1  # steps that had a consistency term (all but the first)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats_device is not None and self.args.method != "vanilla":
            s = self._stats_device
            if self.args.world_size > 1 and torch.distributed.is_initialized():
                s = s.clone()
                sums = s[[0, 1, 2, 5, 8, 9, 10, 11]]
                torch.distributed.all_reduce(sums)
                s[[0, 1, 2, 5, 8, 9, 10, 11]] = sums
                for i, op in ((3, "MIN"), (6, "MIN"), (4, "MAX"), (7, "MAX")):
                    v = s[i:i + 1].clone()
                    torch.distributed.all_reduce(v, op=getattr(torch.distributed.ReduceOp, op))
                    s[i] = v[0]
            s = s.tolist()
            steps, distil_steps = s[-1], s[10]
            logs["ce_loss"] = s[0] / max(steps, 1)
            if distil_steps:
                logs.update({"consistency_loss": s[1] / distil_steps, "alpha_mean": s[2] / distil_steps,
                             "alpha_min": s[3], "alpha_max": s[4], "tau_mean": s[5] / distil_steps,
                             "tau_min": s[6], "tau_max": s[7], "u_mean": s[8] / distil_steps,
                             "c_mean": s[9] / distil_steps})
            self._stats_reset()
        super().log(logs, start_time)

    # -- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.method == "vanilla":
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"cache": self.soft_targets.state_dict(), "batch_size": self._train_batch_size,
                    "world_size": self.args.world_size},
                   os.path.join(folder, STATE_FILE.format(rank=self.args.process_index)))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.args.method == "vanilla":
            return
        path = os.path.join(resume_from_checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.exists(path):
            # e.g. a vanilla checkpoint, or a rank whose files stayed on another node: the chain
            # restarts, and this rank's next step goes without a consistency term.
            logger.warning("%s: no %s; starting with an empty soft-target cache", resume_from_checkpoint,
                           os.path.basename(path))
            return
        state = torch.load(path, weights_only=True)
        if state["batch_size"] != self._train_batch_size or state["world_size"] != self.args.world_size:
            raise UserError(f"{path}: saved with batch size {state['batch_size']} on {state['world_size']} "
                            f"process(es); resuming with {self._train_batch_size} on {self.args.world_size} "
                            "would break the previous-batch chain")
        self.soft_targets.load_state_dict(state["cache"])
