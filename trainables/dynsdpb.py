"""The Ray Tune trainable: a trial config in, ``DynSDPBTrainer`` run, evaluations out to Tune.

It adapts and does nothing else. The config names its (task, method) group and the searched
parameters; the task's :class:`Job` (fixed settings) and tokenized data arrive by reference from
the driver (``tune.with_parameters``), never re-tokenized here. Every evaluation goes to
``ray.tune.report`` with the checkpoint the Trainer saved right after it, under the keys of
:mod:`tune_dynsdpb.results`; a retry resumes from ``ray.tune.get_checkpoint()``. A run that
diverges (:class:`~tune_dynsdpb.trainer.TrainingDiverged`) ends with a last report that carries
the reason under ``results.FAILURE``, so the trial is FAILED and never an arm's best.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from ray import tune
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from tune_dynsdpb import results as R
from tune_dynsdpb.run import create_trainer, load_model
from tune_dynsdpb.trainer import DynSDPBConfig, TrainingDiverged


@dataclass
class Job:
    """What every trial of one task shares (the sweep file's fixed settings for that task)."""

    model_path: str
    task: Any                      # tune_dynsdpb.data.Task (its raw data are small)
    metric: str                    # e.g. "eval_accuracy"
    mode: str = "max"              # of ``metric``; the reports' OBJECTIVE is signed by it
    evals_per_epoch: int = 1
    seed: int = 0
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    workers_per_trial: int = 1
    lora: dict | None = None
    training: dict = field(default_factory=dict)    # extra fixed TrainingArguments

    @property
    def distributed(self) -> bool:
        return self.workers_per_trial > 1 or self.gpus_per_trial > 1

    @property
    def world_size(self) -> int:
        return max(self.workers_per_trial, int(self.gpus_per_trial)) if self.distributed else 1


def steps_per_epoch(n_train: int, batch: int, method: str, world_size: int = 1, accumulation: int = 1) -> int:
    """Optimizer steps in one epoch. dlb-style methods take B/2 new samples per step (the other
    half is the previous step's), and the previous-batch stream pads each rank's shard to whole halves."""
    new_per_step = (batch if method == "vanilla" else batch // 2) * world_size * accumulation
    return max(1, math.ceil(n_train / new_per_step))


def eval_interval(n_train: int, config: dict, job: Job) -> int:
    """Steps between evaluations: ceil, so a finished trial never exceeds ASHA's max_t reports."""
    accumulation = int(job.training.get("gradient_accumulation_steps", 1))
    steps = steps_per_epoch(n_train, int(config["per_device_train_batch_size"]), config[R.METHOD], job.world_size,
                            accumulation)
    return max(1, math.ceil(steps / job.evals_per_epoch))


class _TuneReporter(TrainerCallback):
    """Evaluate+save on the same steps; report each evaluation with its checkpoint."""

    def __init__(self, report: Callable[[dict, str | None], None], job: Job, group: dict, samples_per_step: int):
        self.report, self.job, self.group, self.samples_per_step = report, job, group, samples_per_step
        self.eval_metrics: dict = {}
        self.train_log: dict = {}

    def on_step_end(self, args, state, control, **kw):
        # always log, evaluate and checkpoint at the very end: without the log, a last step that is
        # not a multiple of logging_steps would be reported with the previous log's training stats
        if state.global_step >= state.max_steps:
            control.should_log = control.should_evaluate = control.should_save = True

    def on_log(self, args, state, control, logs=None, **kw):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "loss" not in logs:  # per-layer gradient norms come in logs of their own: keep the latest
            self.train_log.update({k: v for k, v in logs.items() if k.startswith("grad_norm/")})
            return
        grads = {k: v for k, v in self.train_log.items() if k.startswith("grad_norm/")}
        self.train_log = {**grads, **logs}

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.eval_metrics = dict(metrics or {})

    def on_save(self, args, state, control, **kw):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        result = self.result(state, final=state.global_step >= state.max_steps)
        if os.path.isdir(folder):  # (rank 0's folder; other ranks report without one)
            with open(os.path.join(folder, R.CHECKPOINT_RESULT), "w") as f:
                json.dump({k: result[k] for k in (R.OBJECTIVE, R.STEP) if k in result}, f)
        self.report(result, folder)

    def fail(self, state, reason: str) -> None:
        """The last report of a run that diverged: it carries the reason, and no checkpoint."""
        self.report(self.result(state, final=True, failure=reason), None)

    def result(self, state, final: bool, failure: str | None = None) -> dict:
        out = {**self.train_log, **self.eval_metrics, **self.group, R.STEP: state.global_step,
               "epoch": state.epoch or 0.0, R.SAMPLE_PASSES: state.global_step * self.samples_per_step, R.FINAL: final}
        score = self.eval_metrics.get(self.job.metric)
        if failure is not None:
            out[R.FAILURE] = failure
        else:  # a score that is not finite (e.g. a correlation of constant predictions) is the worst
            out[R.OBJECTIVE] = R.objective(score, self.job.mode) if R.finite(score) else float("-inf")
        return out


def fit(config: dict, job: Job, train_dataset, eval_dataset, report: Callable[[dict, str | None], None],
        resume_from: str | None, output_dir: str, world_size: int = 1) -> None:
    """Runs one trial's fine-tune. Shared by the single-process and the Ray Train (DDP) paths."""
    params = dict(config)
    group = {R.TASK: params.pop(R.TASK), R.METHOD: params.pop(R.METHOD)}
    batch = int(params.pop("per_device_train_batch_size"))
    every = eval_interval(len(train_dataset), {**config, "per_device_train_batch_size": batch}, job)
    kwargs = dict(per_device_eval_batch_size=max(batch, 32), logging_steps=every, disable_tqdm=True,
                  use_cpu=job.gpus_per_trial == 0, seed=job.seed)
    kwargs.update(params)
    kwargs.update(job.training)
    args = DynSDPBConfig(
        output_dir=output_dir, method=group[R.METHOD], per_device_train_batch_size=batch, eval_strategy="steps",
        eval_steps=every, save_strategy="steps", save_steps=every, save_total_limit=1, report_to=[],
        ddp_backend="gloo" if job.gpus_per_trial == 0 and world_size > 1 else None, **kwargs)
    accumulation = int(job.training.get("gradient_accumulation_steps", 1))
    reporter = _TuneReporter(report, job, group, batch * accumulation * world_size)
    model, tokenizer = load_model(job.model_path, job.task, lora=job.lora, seed=args.seed)
    trainer = create_trainer(job.task, model, tokenizer, train_dataset, eval_dataset, args, callbacks=[reporter])
    trainer.remove_callback(PrinterCallback)  # the reports carry the logs; nothing for a console
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except TrainingDiverged as e:  # a failed trial, not a crash to retry: report why and end
        reporter.fail(trainer.state, str(e))


def train_dynsdpb(config: dict, jobs: dict[str, Job], data: dict[str, tuple]) -> None:
    """The Tune function trainable (wrap with ``tune.with_parameters(jobs=..., data=...)``):
    ``jobs[task]`` and ``data[task] = (train, eval)`` for the config's ``task``."""
    job = jobs[config[R.TASK]]
    train_dataset, eval_dataset = data[config[R.TASK]]
    if job.distributed:  # (Ray Train: 0.5 s to import, and only DDP trials need it)
        from .distributed import run_ddp_trial  # here: see the line above
        work = tempfile.mkdtemp(prefix="dynsdpb-ddp-")  # shared by the ranks of this node
        try:
            run_ddp_trial(_ddp_loop, {"config": config, "job": job, "train": train_dataset, "eval": eval_dataset,
                                      "work": work}, num_workers=job.world_size, use_gpu=job.gpus_per_trial > 0,
                          cpus_per_worker=job.cpus_per_trial / job.world_size,
                          gpus_per_worker=job.gpus_per_trial / job.world_size if job.gpus_per_trial else 0,
                          scratch_dirs=(work,))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    torch.set_num_threads(max(1, int(job.cpus_per_trial)))  # Ray leaves reused workers with a wrong count

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    try:
        with tempfile.TemporaryDirectory(prefix="dynsdpb-trial-") as work:
            resume = None
            checkpoint = tune.get_checkpoint()
            if checkpoint is not None:  # a retry: continue from the last reported checkpoint
                resume = checkpoint.to_directory(os.path.join(work, "restored"))
                resume = shutil.copytree(resume, os.path.join(work, "out", f"checkpoint-{_step_of(resume)}"))
            fit(config, job, train_dataset, eval_dataset, report, resume, os.path.join(work, "out"))
    finally:
        release_memory()


def release_memory() -> None:
    """Hands the finished trial's freed heap back to the OS. Tune reuses the actor for the next
    trial, in a new thread; glibc keeps what a thread freed in that thread's arena, so without this
    a reused actor grew by about its peak (1.5 GB for MiniLM at length 256) with every trial, to
    8 GB after six trials of the real-data sweep. No-op where libc has no ``malloc_trim``."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


def _step_of(checkpoint_dir: str) -> int:
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        return int(json.load(f)["global_step"])


def _ddp_loop(payload: dict) -> None:
    """Runs on each Ray Train worker; rank 0 reports."""
    from .distributed import get_resume_checkpoint, report  # here: Ray Train, 0.5 s to import, only DDP trials need it

    torch.set_num_threads(1)
    resume = get_resume_checkpoint()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    os.makedirs(payload["work"], exist_ok=True)

    def rank0_report(metrics: dict, checkpoint_dir: str | None) -> None:
        report(metrics, checkpoint_dir if rank == 0 else None)

    fit(payload["config"], payload["job"], payload["train"], payload["eval"], rank0_report, resume,
        os.path.join(payload["work"], "out"), world_size=world)


__all__ = ["Job", "train_dynsdpb", "fit", "steps_per_epoch", "eval_interval"]
