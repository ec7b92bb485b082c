"""A stand-in for ``trainables.dynsdpb.train_dynsdpb``: reports like the real trial, sleeps instead of training.

It has the real trainable's signature, ``(config, jobs, data)``, so the driver's own
``experiment.create_trainable(spec, tasks, trainable=standin_trainable)`` wraps it (data by
reference through ``tune.with_parameters``, resources from the spec). ``jobs[task]`` is a
:class:`Shape` instead of a ``Job``: how long a trial takes, how often it reports, how large its
checkpoints are. Nothing here imports torch or touches CUDA.

Each report carries the keys of :mod:`tune_dynsdpb.results` (``objective``, ``task``, ``method``,
``step``, ``sample_passes``, ``final``), the eval metrics (``eval_accuracy``, ``eval_loss``, ...)
and the training log of ``DynSDPBTrainer`` (``loss``, ``ce_loss``, ``consistency_loss``,
``alpha_*``, ``tau_*``, ``u_mean``, ``c_mean``, ...), with a checkpoint directory of
``checkpoint_kib`` KiB. The objective is a smooth function of the searched parameters (best near
``learning_rate`` 2e-4, ``tau0`` 3, ``alpha0`` 1), rising over the reports, plus a little
per-trial noise, so TPE and ASHA have signal. A retry resumes at the step of the last checkpoint,
like the real trainable.

For the benchmark each report also carries the trial's own timestamps: ``standin_t0`` (the
trial function was entered, ``time.time()``), ``standin_t`` (the report was made) and
``standin_busy_s`` (seconds since ``standin_t0``), and ``standin_gpu_ids`` (what
``ray.get_gpu_ids()`` gave the trial; logical GPUs are fine, nothing uses them).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from tune_dynsdpb import results as R  # the key names; no torch (the package loads it on first use)




@dataclass(frozen=True)
class Shape:
    """The shape of every stand-in trial of one task."""

    seconds: float = 10.0        # a trial that runs to the end sleeps this long in all
    reports: int = 10            # evaluations (Tune reports) of a full trial
    checkpoint_kib: int = 64     # size of the checkpoint written with every report
    metric: str = "eval_accuracy"
    samples_per_step: int = 16
    steps_per_report: int = 8


def quality(config: dict) -> float:
    """The score a trial converges to: best 0.9 at lr 2e-4, tau0 3, alpha0 1, rates 0.5/0."""
    lr = float(config.get("learning_rate", 2e-4))
    q = 0.9 - 0.06 * (math.log10(lr) - math.log10(2e-4)) ** 2
    if "tau0" in config:
        q -= 0.004 * (float(config["tau0"]) - 3.0) ** 2
    if "alpha0" in config:
        q -= 0.02 * (float(config["alpha0"]) - 1.0) ** 2
    if "lambda_alpha" in config:
        q -= 0.01 * (float(config["lambda_alpha"]) - 0.5) ** 2
    if "lambda_tau" in config:
        q -= 0.01 * float(config["lambda_tau"]) ** 2
    q += {"vanilla": 0.0, "dlb": 0.01, "dlb_warmup": 0.012, "dynsdpb": 0.015}.get(config.get(R.METHOD), 0.0)
    return max(0.5, q)


def _noise(config: dict, k: int) -> float:
    key = repr(sorted((str(a), str(b)) for a, b in config.items())) + f"/{k}"
    return (int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5) * 0.01


def standin_report(config: dict, shape: Shape, k: int, t0: float) -> dict:
    """Report ``k`` (1-based) of a trial with ``config``: the real trainable's keys and values
    of a plausible size."""
    method = config[R.METHOD]
    step = k * shape.steps_per_report
    frac = k / shape.reports
    acc = 0.5 + (quality(config) - 0.5) * (1.0 - math.exp(-3.0 * frac)) + _noise(config, k)
    ce = 0.7 * (1.0 - 0.6 * frac)
    out = {
        # the training log (DynSDPBTrainer.log)
        "loss": ce * 1.1, "grad_norm": 3.0 - 2.0 * frac, "learning_rate": float(config.get("learning_rate", 2e-4))
        * (1.0 - frac), "epoch": frac, "ce_loss": ce,
        # the eval metrics (Trainer.evaluate)
        "eval_loss": 1.0 - acc * 0.6, shape.metric: acc, "eval_runtime": 0.5, "eval_samples_per_second": 128.0,
        "eval_steps_per_second": 4.0,
        # the result contract
        R.TASK: config[R.TASK], R.METHOD: method, R.STEP: step, R.SAMPLE_PASSES: step * shape.samples_per_step,
        R.FINAL: k >= shape.reports, R.OBJECTIVE: acc,
    }
    if method != "vanilla":
        out.update({"consistency_loss": 0.2 * frac, "alpha_mean": float(config.get("alpha0", 1.0)),
                    "alpha_min": 0.1, "alpha_max": 1.5, "tau_mean": float(config.get("tau0", 3.0)),
                    "tau_min": 1.0, "tau_max": 5.0, "u_mean": 0.4, "c_mean": 0.6})
    now = time.time()
    out.update({"standin_t0": t0, "standin_t": now, "standin_busy_s": now - t0})
    return out


def _write_checkpoint(folder: str, kib: int, k: int) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.bin"), "wb") as f:
        f.write(os.urandom(min(kib, 64) * 1024) * max(1, kib // 64) if kib else b"")
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        f.write(f'{{"global_step": {k}}}')


def standin_trainable(config: dict, jobs: dict, data: dict | None = None) -> None:
    """The Tune function trainable (wrap with ``tune.with_parameters(jobs=..., data=...)``, as
    ``experiment.create_trainable`` does): sleeps ``shape.seconds / shape.reports`` before each
    of ``shape.reports`` reports."""
    import ray
    from ray import tune

    t0 = time.time()
    shape: Shape = jobs[config[R.TASK]]
    gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry: continue after the last reported checkpoint
        with checkpoint.as_directory() as d, open(os.path.join(d, "trainer_state.json")) as f:
            start = int(f.read().split(":")[1].strip(" }"))
    per_report = shape.seconds / shape.reports
    with tempfile.TemporaryDirectory(prefix="standin-") as work:
        for k in range(start + 1, shape.reports + 1):
            time.sleep(per_report)
            folder = os.path.join(work, f"checkpoint-{k}")
            _write_checkpoint(folder, shape.checkpoint_kib, k)
            result = standin_report(config, shape, k, t0)
            result["standin_gpu_ids"] = gpus
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
            shutil.rmtree(folder, ignore_errors=True)


__all__ = ["Shape", "standin_trainable", "standin_report", "quality"]
