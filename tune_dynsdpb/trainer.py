"""``DynSDPBConfig`` and ``DynSDPBTrainer``: the method as a drop-in ``transformers.Trainer``.

The trainer changes four things and nothing else:

1. the training DataLoader follows :class:`PreviousBatchSampler` (dlb/dlb_warmup/dynsdpb), and
   every batch carries its sample ids;
2. ``compute_loss`` adds the consistency term of :mod:`tune_dynsdpb.losses` to the model's own
   loss, with targets from a :class:`SoftTargetCache` filled by the previous micro-batch
   (``dlb_warmup``: not before ``distill_warmup * max_steps`` steps; ``dlb``/``pbt``: alpha and tau
   from the ``schedule`` at the current step, when one is given);
3. checkpoints also hold the cache, so a resumed run continues the same chain, and (dlb/pbt)
   the schedule followed so far; a ``pbt`` run restored with a new alpha0/tau0 (PBT's exploit)
   follows them from the checkpoint's step on;
4. a non-finite loss, gradient norm or eval loss raises :class:`TrainingDiverged` when it is
   logged, instead of being filtered out of the logs.

``method="vanilla"`` takes the stock Trainer loss and batches: it is the baseline (its CE is
still tracked for the logs and the divergence check).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Dataset
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .errors import UserError
from .losses import consistency_term
from .params import (DEFAULT_METHOD, METHOD_HELP, PARAMS, SCHEDULED, Granularity, Method, Schedule, alpha_tau_at,
                     check_distinct, check_values, continue_schedule, effective_schedule, normalize_schedule)
from .sampler import PreviousBatchSampler, SoftTargetCache

logger = logging.get_logger(__name__)
SAMPLE_IDS = "dynsdpb_sample_ids"  # batch key for the ids; popped before the model sees the batch
STATE_FILE = "dynsdpb_state_rank{rank}.pt"
SCHEDULE_FILE = "dynsdpb_schedule.json"  # in a dlb/pbt checkpoint: [[step, alpha, tau], ...] followed up to it
STAT_NAMES = ("ce_loss", "consistency_loss", "alpha_mean", "alpha_min", "alpha_max",
              "tau_mean", "tau_min", "tau_max", "u_mean", "c_mean")
# Slots of the running statistics: STAT_NAMES, then steps that had a term, then all steps. The
# _min/_max slots hold running extrema (reduced with MIN/MAX across ranks), every other slot a sum.
_SLOT = {name: i for i, name in enumerate((*STAT_NAMES, "distil_steps", "steps"))}
_MIN = [_SLOT["alpha_min"], _SLOT["tau_min"]]
_MAX = [_SLOT["alpha_max"], _SLOT["tau_max"]]
_SUMS = [i for i in _SLOT.values() if i not in _MIN + _MAX]
# what one step adds: without a term (CE, steps), with one (CE, the term's sums, both counters)
_STEP_ADD = [_SLOT["ce_loss"], _SLOT["steps"]]
_TERM_ADD = [_SLOT[k] for k in ("ce_loss", "consistency_loss", "alpha_mean", "tau_mean", "u_mean", "c_mean",
                                "distil_steps", "steps")]


def _param_field(name: str):
    """A dataclass field whose default and help come from :mod:`tune_dynsdpb.params`."""
    p = PARAMS[name]
    return field(default=p.default, metadata={"help": f"{p.help} ({p.rule})"})


@dataclass
class DynSDPBConfig(TrainingArguments):
    """``TrainingArguments`` plus the method's knobs. See ``docs/method.md`` for the equations.

    The knobs, their defaults and their bounds are defined once, in :mod:`tune_dynsdpb.params`.
    ``logging_nan_inf_filter`` is always off: a diverged run must not be logged as a finite loss
    (the trainer raises :class:`TrainingDiverged` instead).
    """

    method: Method = field(default=DEFAULT_METHOD, metadata={"help": METHOD_HELP})
    alpha0: float = _param_field("alpha0")
    tau0: float = _param_field("tau0")
    lambda_alpha: float = _param_field("lambda_alpha")
    lambda_tau: float = _param_field("lambda_tau")
    granularity: Granularity = _param_field("granularity")
    tau_range: tuple[float, float] = _param_field("tau_range")
    distill_warmup: float = _param_field("distill_warmup")
    schedule: Schedule = _param_field("schedule")
    grad_norm_log_steps: int = field(
        default=0, metadata={"help": "log per-layer gradient norms every N optimizer steps (0: off)"})

    def __post_init__(self):
        super().__post_init__()
        if self.logging_nan_inf_filter:
            # The stock filter logs the previous loss in place of a NaN/inf one (and costs a host
            # sync per step): a diverged run would look fine. We detect divergence instead.
            self.logging_nan_inf_filter = False
        check_method_args(self)
        self.schedule = normalize_schedule(self.schedule)


def check_method_args(args: Any) -> None:
    """The checks of :mod:`tune_dynsdpb.params` on a config (or any object with its fields);
    raises a one-line UserError naming the field."""
    values = {name: getattr(args, name) for name in PARAMS if hasattr(args, name)}
    values["method"] = args.method
    values["per_device_train_batch_size"] = args.per_device_train_batch_size
    if isinstance(values.get("tau_range"), list):
        values["tau_range"] = tuple(values["tau_range"])
    if values.get("schedule") is None:
        values["schedule"] = ()
    bad = check_values(values)
    if bad:
        raise UserError(f"{bad[0]}: {bad[1]}")


class TrainingDiverged(RuntimeError):
    """A non-finite training loss (CE or consistency term), gradient norm or eval loss.

    ``what`` names the quantity (``ce_loss``, ``consistency_loss``, ``loss``, ``train_loss``,
    ``grad_norm``, ``eval_loss``...), ``step`` is the optimizer step it was logged at. The message
    is ``training diverged: non-finite <what> at step <step>``.
    """

    def __init__(self, what: str, step: int):
        self.what, self.step = what, int(step)
        super().__init__(f"training diverged: non-finite {what} at step {self.step}")

    def __reduce__(self):  # picklable across Ray workers
        return type(self), (self.what, self.step)


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


def _is_causal_lm(model) -> bool:
    """Whether ``model`` is (a subclass of) the class ``AutoModelForCausalLM`` builds for its
    config, looked up in transformers' public auto mapping."""
    config = type(getattr(model, "config", None))
    return config in MODEL_FOR_CAUSAL_LM_MAPPING and isinstance(model, MODEL_FOR_CAUSAL_LM_MAPPING[config])


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
        self._stats = torch.zeros(len(_SLOT))  # see _SLOT
        self._slots: dict[str, torch.Tensor] = {}
        self._one: torch.Tensor | None = None
        self._stats_reset()
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft adapter
        self._causal_lm = _is_causal_lm(base)
        self._regression = not self._causal_lm and getattr(base.config, "num_labels", 2) == 1
        bad = check_distinct(self.args.method, {"lambda_alpha": self.args.lambda_alpha,
                                                "lambda_tau": self.args.lambda_tau}, regression=self._regression)
        if bad:  # the config could not tell: it does not know the head
            raise UserError(f"{bad[0]}: {bad[1]}")
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
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler = PreviousBatchSampler(
            len(dataset), self.args.train_batch_size, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            num_replicas=self.args.world_size, rank=self.args.process_index)
        loader = DataLoader(
            _WithSampleIds(dataset), batch_size=self.args.train_batch_size, sampler=sampler, drop_last=False,
            collate_fn=_SampleIdCollator(collator), num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory, persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor)
        # Accelerator.prepare would deal whole batches out round-robin across the ranks and break
        # every rank's chain. The sampler is rank-aware already, so the loader is prepared as for
        # one process (no batch sharding, no RNG sync), only placing batches on this rank's device.
        acc = self.accelerator
        return prepare_data_loader(loader, acc.device, num_processes=1, process_index=0,
                                   put_on_device=acc.device_placement, non_blocking=acc.non_blocking,
                                   use_stateful_dataloader=acc.use_stateful_dataloader)

    # -- loss --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop(SAMPLE_IDS, None)
        if ids is None or self.args.method == "vanilla" or not model.training:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:  # vanilla: track CE too, for the logs and the divergence check
                self._stats_add((out[0] if return_outputs else out), None, num_items_in_batch)
            return out
        labels = inputs["labels"]
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        output = outputs["logits"]
        if self._regression:
            output = output.reshape(-1)
        half = ids.shape[0] // 2
        rows_now, labels_now, counts_now = _target_rows(output[:half], labels[:half], self._causal_lm)
        targets = self.soft_targets.get(ids[:half], counts_now)
        rows_new, _, counts_new = _target_rows(output[half:], labels[half:], self._causal_lm)
        self.soft_targets.put(ids[half:], rows_new, counts_new)  # also during dlb_warmup's warm-up: the chain goes on
        if targets is None or self._in_distill_warmup():
            # the very first step has nothing to distil from; dlb_warmup's warm-up trusts no prediction yet
            self._stats_add(ce, None, num_items_in_batch)
            return (ce, outputs) if return_outputs else ce
        a = self.args
        alpha0, tau0 = alpha_tau_at(a.schedule, self.state.global_step, a.alpha0, a.tau0)  # (no schedule: a.alpha0, a.tau0)
        term = consistency_term(rows_now, targets, labels_now, method="dlb" if a.method == "pbt" else a.method,
                                alpha0=alpha0, tau0=tau0,
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

    def _in_distill_warmup(self) -> bool:
        """dlb_warmup: the term is off while ``global_step < distill_warmup * max_steps``."""
        a = self.args
        return a.method == "dlb_warmup" and self.state.global_step < a.distill_warmup * self.state.max_steps

    def _loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether the model's loss is already normalised over the whole accumulated batch (the
        Trainer's own rule in ``training_step``)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # -- logging -----------------------------------------------------------------------------
    def _stats_reset(self) -> None:
        self._stats.zero_()
        self._stats[_MIN] = float("inf")
        self._stats[_MAX] = float("-inf")
        self._stats_device = None

    def _stats_add(self, ce: torch.Tensor, term, num_items_in_batch) -> None:
        # Tensors only, no .item(): a host sync per step would stall GPU training. A few whole-
        # vector ops rather than one indexed update per slot: on a GPU each op is a kernel launch.
        if self._stats_device is None:
            self._stats_device = self._stats.to(ce.device)
        if self._one is None or self._one.device != ce.device:  # the slot indices, once per device
            self._slots = {k: torch.tensor(v, device=ce.device) for k, v in
                           (("step", _STEP_ADD), ("term", _TERM_ADD), ("min", _MIN), ("max", _MAX))}
            self._one = torch.ones((), device=ce.device)
        s, slots = self._stats_device, self._slots
        # a CE normalised over the accumulated batch is a fraction of the micro-batch's own mean
        scale = self.current_gradient_accumulation_steps if self._loss_is_scaled(num_items_in_batch) else 1
        ce = ce.detach().float().mean() * scale  # (a vector under DataParallel: one loss per GPU)
        if term is None or term.alpha.numel() == 0:  # no term, or no target token among the reused rows
            s.index_add_(0, slots["step"], torch.stack([ce, self._one]))
            return
        alpha_min, alpha_max = torch.aminmax(term.alpha)
        tau_min, tau_max = torch.aminmax(term.tau)
        means = torch.stack([term.alpha, term.tau, term.u, term.c]).mean(1)  # alpha, tau, u, c: (N,) each
        # distil_steps: steps that had a consistency term (all but the first)
        s.index_add_(0, slots["term"], torch.cat([torch.stack([ce, term.loss.detach().float()]), means,
                                                  torch.stack([self._one, self._one])]))
        s.index_copy_(0, slots["min"], torch.minimum(s[slots["min"]], torch.stack([alpha_min, tau_min])))
        s.index_copy_(0, slots["max"], torch.maximum(s[slots["max"]], torch.stack([alpha_max, tau_max])))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats_device is not None:
            s = self._stats_device
            if self.args.world_size > 1 and torch.distributed.is_initialized():
                s = s.clone()
                for slots, op in ((_SUMS, "SUM"), (_MIN, "MIN"), (_MAX, "MAX")):
                    v = s[slots].clone()
                    torch.distributed.all_reduce(v, op=getattr(torch.distributed.ReduceOp, op))
                    s[slots] = v
            v = dict(zip(_SLOT, s.tolist()))
            logs["ce_loss"] = v["ce_loss"] / max(v["steps"], 1)
            if v["distil_steps"]:
                extrema = {n: v[n] for n in ("alpha_min", "alpha_max", "tau_min", "tau_max")}
                means = {n: v[n] / v["distil_steps"] for n in STAT_NAMES[1:] if n not in extrema}
                logs.update({**means, **extrema})
            self._stats_reset()
        super().log(logs, start_time)
        # After the stock log, so the history and the callbacks still see the non-finite value.
        self._check_finite(logs)

    def _check_finite(self, logs: dict[str, float]) -> None:
        """Raises :class:`TrainingDiverged` for a non-finite loss, gradient norm or eval loss.

        Works on values that are already on the host for the log: no extra synchronisation.
        ``logging_nan_inf_filter`` is off (see DynSDPBConfig), so ``loss`` is the true mean.
        """
        for key in ("ce_loss", "consistency_loss", "loss", "train_loss", "grad_norm", "eval_loss"):
            v = logs.get(key)
            if isinstance(v, (int, float)) and not math.isfinite(v):
                self._close_progress_bars()
                raise TrainingDiverged(key, self.state.global_step)

    def _close_progress_bars(self) -> None:
        """Training ends here: finish tqdm's open bars, so whatever reports the error starts on a
        line of its own (the Trainer closes them only on a normal end)."""
        for cb in self.callback_handler.callbacks:
            for name in ("training_bar", "prediction_bar"):
                bar = getattr(cb, name, None)
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
                    setattr(cb, name, None)

    # -- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.method == "vanilla":
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"cache": self.soft_targets.state_dict(), "batch_size": self.args.train_batch_size,
                    "world_size": self.args.world_size},
                   os.path.join(folder, STATE_FILE.format(rank=self.args.process_index)))
        if self.args.method in SCHEDULED and self.args.process_index == 0:
            with open(os.path.join(folder, SCHEDULE_FILE), "w") as f:
                json.dump([list(e) for e in self.schedule_so_far()], f)

    def schedule_so_far(self) -> Schedule:
        """The (step, alpha, tau) schedule this run follows, from step 0 (dlb/pbt)."""
        a = self.args
        return effective_schedule(a.schedule, a.alpha0, a.tau0)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.args.method == "vanilla":
            return
        self._continue_schedule(resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.exists(path):
            # e.g. a vanilla checkpoint, or a rank whose files stayed on another node: the chain
            # restarts, and this rank's next step goes without a consistency term.
            logger.warning("%s: no %s; starting with an empty soft-target cache", resume_from_checkpoint,
                           os.path.basename(path))
            return
        state = torch.load(path, weights_only=True)
        if state["batch_size"] != self.args.train_batch_size or state["world_size"] != self.args.world_size:
            raise UserError(f"{path}: saved with batch size {state['batch_size']} on {state['world_size']} "
                            f"process(es); resuming with {self.args.train_batch_size} on {self.args.world_size} "
                            "would break the previous-batch chain")
        self.soft_targets.load_state_dict(state["cache"])

    def _continue_schedule(self, checkpoint: str) -> None:
        """A pbt run given no schedule is a member of a PBT population: restored (a retry, or PBT's
        exploit of another member's checkpoint with a mutated config), it keeps the checkpoint's
        schedule up to the checkpoint's step and follows its own config's alpha0/tau0 from there,
        so the next checkpoint carries the lineage's whole schedule. A run given a schedule
        (dlb, or pbt replaying a learned schedule) keeps it."""
        a = self.args
        path = os.path.join(checkpoint, SCHEDULE_FILE)
        if a.method != "pbt" or a.schedule or not os.path.exists(path):
            return
        with open(path) as f:
            past = json.load(f)
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            step = int(json.load(f)["global_step"])
        a.schedule = continue_schedule(past, step, a.alpha0, a.tau0)
