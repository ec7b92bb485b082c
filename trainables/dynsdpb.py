"""The Ray Tune trainable: a trial config in, ``DynSDPBTrainer`` run, evaluations out to Tune.

It adapts and does nothing else. The config becomes a :class:`DynSDPBConfig`; every evaluation
goes to ``ray.tune.report`` with the checkpoint the Trainer saved right after it; a retry
resumes from ``ray.tune.get_checkpoint()``. The tokenized data arrive by reference from the
driver (``tune.with_parameters``), never re-tokenized here.

Each report carries the eval metrics, the latest training log (losses, alpha/tau/u/c stats),
``step``, ``sample_passes`` (forward+backward sample count) and ``final``: True only on the
report after the last training step, which tells a trial that ran to its end from one the
scheduler stopped. A non-finite training loss ends the trial with ``dynsdpb_failure`` set.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from tune_dynsdpb.run import create_trainer, load_model
from tune_dynsdpb.trainer import DynSDPBConfig

# One-shot fault tokens for the fault-tolerance tests: the first trial to remove the file gets the
# fault, so exactly one trial crashes (and its retry does not) or goes NaN.
CRASH_TOKEN = "TUNE_DYNSDPB_CRASH_TOKEN"  # path; crash after the first checkpoint
NAN_TOKEN = "TUNE_DYNSDPB_NAN_TOKEN"      # path; poison the loss from the second step


@dataclass
class Job:
    """What every trial of a sweep shares (fixed settings from the sweep file)."""

    model_path: str
    task: Any                      # tune_dynsdpb.data.Task (its raw data are small)
    metric: str                    # e.g. "eval_accuracy"
    evals_per_epoch: int = 1
    seed: int = 0
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    workers_per_trial: int = 1
    lora: dict | None = None
    training: dict = field(default_factory=dict)  # extra fixed TrainingArguments


def _claim(env_var: str) -> bool:
    path = os.environ.get(env_var)
    if not path:
        return False
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


class _TuneReporter(TrainerCallback):
    """Evaluate+save on the same steps; report each evaluation with its checkpoint."""

    def __init__(self, report: Callable[[dict, str | None], None], metric: str, samples_per_step: int):
        self.report, self.metric, self.samples_per_step = report, metric, samples_per_step
        self.eval_metrics: dict = {}
        self.train_log: dict = {}
        self.failed: str | None = None
        self.poison = _claim(NAN_TOKEN)
        self.crash = not self.poison and _claim(CRASH_TOKEN)  # one fault per trial

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:  # always evaluate and checkpoint at the very end
            control.should_evaluate = control.should_save = True

    def on_log(self, args, state, control, logs=None, **kw):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "loss" not in logs:  # per-layer gradient norms come in logs of their own: keep the latest
            self.train_log.update({k: v for k, v in logs.items() if k.startswith("grad_norm/")})
            return
        grads = {k: v for k, v in self.train_log.items() if k.startswith("grad_norm/")}
        self.train_log = {**grads, **logs}
        if self.poison and state.global_step >= 2:
            self.train_log["loss"] = float("nan")
        if not math.isfinite(self.train_log["loss"]):
            self.failed = f"non-finite training loss ({self.train_log['loss']}) at step {state.global_step}"
            control.should_training_stop = True
            self.report({**self._result(state, final=True), self.metric: float("nan"),
                         "dynsdpb_failure": self.failed}, None)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.eval_metrics = dict(metrics or {})

    def on_save(self, args, state, control, **kw):
        if self.failed:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.report(self._result(state, final=state.global_step >= state.max_steps), folder)
        if self.crash:
            raise RuntimeError("injected crash (fault-tolerance test)")

    def _result(self, state, final: bool) -> dict:
        return {**self.train_log, **self.eval_metrics, "step": state.global_step, "epoch": state.epoch or 0.0,
                "sample_passes": state.global_step * self.samples_per_step, "final": final}


def fit(config: dict, job: Job, train_dataset, eval_dataset, report: Callable[[dict, str | None], None],
        resume_from: str | None, output_dir: str, world_size: int = 1) -> None:
    """Runs one trial's fine-tune. Shared by the single-process and the Ray Train (DDP) paths."""
    params = dict(config)
    method = params.pop("method")
    batch = int(params.pop("per_device_train_batch_size"))
    accumulation = int(job.training.get("gradient_accumulation_steps", 1))
    steps_per_epoch = max(1, math.ceil(len(train_dataset) / (batch * world_size * accumulation)))
    if method != "vanilla":  # the previous-batch stream pads each rank's shard to whole halves
        steps_per_epoch = max(1, math.ceil(len(train_dataset) / (batch // 2 * world_size * accumulation)))
    # ceil: at most evals_per_epoch reports per epoch, so a finished trial never exceeds ASHA's max_t
    eval_every = max(1, math.ceil(steps_per_epoch / job.evals_per_epoch))
    kwargs = dict(per_device_eval_batch_size=max(batch, 32), logging_steps=eval_every, disable_tqdm=True,
                  use_cpu=job.gpus_per_trial == 0, seed=job.seed)
    kwargs.update(params)
    kwargs.update(job.training)
    args = DynSDPBConfig(
        output_dir=output_dir, method=method, per_device_train_batch_size=batch, eval_strategy="steps",
        eval_steps=eval_every, save_strategy="steps", save_steps=eval_every, save_total_limit=1, report_to=[],
        ddp_backend="gloo" if job.gpus_per_trial == 0 and world_size > 1 else None, **kwargs)
    model, tokenizer = load_model(job.model_path, job.task, lora=job.lora, seed=args.seed)
    reporter = _TuneReporter(report, job.metric, batch * accumulation * world_size)
    trainer = create_trainer(job.task, model, tokenizer, train_dataset, eval_dataset, args, callbacks=[reporter])
    trainer.train(resume_from_checkpoint=resume_from)


def train_dynsdpb(config: dict, job: Job, train_dataset, eval_dataset) -> None:
    """The Tune function trainable (wrap with ``tune.with_parameters``)."""
    from ray import tune

    if job.workers_per_trial > 1 or job.gpus_per_trial > 1:
        from .distributed import run_ddp_trial
        workers = max(job.workers_per_trial, int(job.gpus_per_trial))
        work = tempfile.mkdtemp(prefix="dynsdpb-ddp-")  # shared by the ranks of this node
        run_ddp_trial(_ddp_loop, {"config": config, "job": job, "train": train_dataset, "eval": eval_dataset,
                                  "work": work}, num_workers=workers, use_gpu=job.gpus_per_trial > 0,
                      cpus_per_worker=job.cpus_per_trial / workers,
                      gpus_per_worker=job.gpus_per_trial / workers if job.gpus_per_trial else 0)
        return
    torch.set_num_threads(max(1, int(job.cpus_per_trial)))  # Ray leaves reused workers with a wrong count

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    with tempfile.TemporaryDirectory(prefix="dynsdpb-trial-") as work:
        resume = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:  # a retry: continue from the last reported checkpoint
            resume = checkpoint.to_directory(os.path.join(work, "restored"))
            step = _step_of(resume)
            resume = shutil.copytree(resume, os.path.join(work, "out", f"checkpoint-{step}"))
        fit(config, job, train_dataset, eval_dataset, report, resume, os.path.join(work, "out"))


def _step_of(checkpoint_dir: str) -> int:
    import json
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        return int(json.load(f)["global_step"])


def _ddp_loop(payload: dict) -> None:
    """Runs on each Ray Train worker; rank 0 reports."""
    import torch.distributed as dist

    from .distributed import get_resume_checkpoint, report

    torch.set_num_threads(1)
    resume = get_resume_checkpoint()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    os.makedirs(payload["work"], exist_ok=True)

    def rank0_report(metrics: dict, checkpoint_dir: str | None) -> None:
        report(metrics, checkpoint_dir if rank == 0 else None)

    fit(payload["config"], payload["job"], payload["train"], payload["eval"], rank0_report, resume,
        os.path.join(payload["work"], "out"), world_size=world)


__all__ = ["Job", "train_dynsdpb", "fit"]
