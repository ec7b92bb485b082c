"""One Ray Tune trial = one multi-worker Ray Train (V2) ``TorchTrainer`` run.

Ray 2.60 runs Ray Train V2 (``RAY_TRAIN_V2_ENABLED`` defaults to on; this module sets it to
``"1"`` if unset and refuses to run under V1). V2 no longer lets a Trainer be passed to a
``Tuner``: a Tune *function trainable* is the "driver" that builds a ``TorchTrainer`` and
calls ``fit()``. Worker reports come back through a Train ``UserCallback`` that runs in the
Train controller; we relay them over a ``ray.util.queue.Queue`` to the Tune trial, which
calls ``ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint(...))`` for each one::

    Tuner driver ──(result stream: ASHA, MLflow callback, CheckpointConfig)──┐
                                                                             │
    Tune trial actor  [PGF head bundle: 0 CPU]       run_ddp_trial()  ◄──────┘
      ├─ thread "ddp-fit": TorchTrainer.fit() ──► TrainController actor [0 CPU, same node]
      │                                             ├─ own placement group:
      │                                             │    RayTrainWorker rank 0 {CPU c, GPU g}
      │                                             │    RayTrainWorker rank 1 {CPU c, GPU g}
      │                                             │    (torch.distributed: gloo / nccl)
      │                                             └─ _ForwardToTune.after_report(metrics[0], ckpt)
      │                                                     │ queue.put
      └─ trial thread: queue.get ─► ray.tune.report(m, checkpoint=copy) ◄─┘

Resources: the V2 controller reserves the workers' bundles in a placement group of *its own*;
a Tune PlacementGroupFactory cannot be shared with it. Listing the worker bundles in the trial's
PGF would reserve them twice (and deadlock a small cluster), so :func:`create_trial_resources`
gives multi-worker trials a head bundle with no CPU/GPU, and Tune's concurrency must be capped
with ``TuneConfig(max_concurrent_trials=...)`` (see :func:`max_concurrent_ddp_trials`).

Checkpoints: workers upload to the Train run's storage (default: under the trial's working
directory; pass a shared ``storage_path`` on multi-node clusters); the trial copies each into
Tune's storage via ``ray.tune.report`` and deletes the Train-side copy, so Tune's
``CheckpointConfig`` governs retention. Failures are retried by Tune (``FailureConfig``), which
restarts the trial from ``ray.tune.get_checkpoint()``; workers read it with
:func:`get_resume_checkpoint`.

Stopping: when Tune stops a trial (ASHA), the blocked ``ray.tune.report`` raises ``SystemExit``;
we then ``abort()`` the controller (which kills its workers and placement group). The
controller is also owned by the trial actor, so it dies with it in any case.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
import time
import uuid
from typing import Any, Callable

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray import tune  # noqa: E402
from ray.train.v2._internal.constants import is_v2_enabled  # noqa: E402
from ray.util.queue import Empty, Queue  # noqa: E402

# A placement-group bundle may not be empty; 1 MiB of "memory" keeps the driver bundle at 0 CPU.
_DRIVER_BUNDLE = {"CPU": 0, "memory": 1 << 20}
_RESUME: dict[str, Any] = {}  # per worker process: the Tune checkpoint to resume from


class _ForwardToTune(ray.train.UserCallback if is_v2_enabled() else object):
    """Runs in the Train controller; hands rank 0's metrics + the persisted checkpoint over."""

    def __init__(self, queue: Queue):
        self._queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        controller = ray.get_runtime_context().current_actor
        self._queue.put((dict(metrics[0]), checkpoint, controller))


def _worker_main(train_loop: Callable[[dict], None], resume: Any, config: dict) -> None:
    _RESUME.clear()
    _RESUME["checkpoint"] = resume
    train_loop(config)


def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
    """Inside ``train_loop``: report ``metrics`` (and optionally a checkpoint directory).

    Every rank must call it the same number of times (``ray.train.report`` is a barrier); the
    metrics of rank 0 are what Tune sees. For DDP pass ``checkpoint_dir`` on rank 0 only (the
    directories of all ranks that pass one are merged into one checkpoint).
    """
    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def get_resume_checkpoint() -> str | None:
    """Inside ``train_loop``: a local directory holding the checkpoint to resume from, or None."""
    ckpt = _RESUME.get("checkpoint")
    if ckpt is None:
        return None
    if "cached" not in _RESUME:
        local = type(ckpt.filesystem).__name__ == "LocalFileSystem" and os.path.isdir(ckpt.path)
        _RESUME["cached"] = ckpt.path if local else ckpt.to_directory()
    return _RESUME["cached"]


def run_ddp_trial(train_loop: Callable[[dict], None], config: dict, *, num_workers: int,
                  use_gpu: bool, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                  name: str | None = None, storage_path: str | None = None) -> None:
    """Call INSIDE a Tune function trainable: run ``train_loop(config)`` on ``num_workers`` Ray
    Train workers (torch.distributed set up by Ray: gloo on CPU, NCCL on GPU) and forward each
    :func:`report` to ``ray.tune.report``. ``train_loop`` must be importable by the workers
    (module-level function). Raises what ``TorchTrainer.fit()`` raises if training fails."""
    if not is_v2_enabled():
        raise RuntimeError("run_ddp_trial needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED or set it to 1")
    from ray.train.torch import TorchTrainer

    ctx = tune.get_context()
    run_name = f"{name or 'ddp'}-{ctx.get_trial_id()}-{uuid.uuid4().hex[:6]}"
    own_storage = storage_path is None
    storage_path = storage_path or os.path.join(ctx.get_trial_dir(), "ddp_runs")
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker or 1
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        functools.partial(_worker_main, train_loop, tune.get_checkpoint()),
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            # A fresh run name: V2 would otherwise resume a run dir left by an earlier attempt.
            name=run_name, storage_path=storage_path,
            callbacks=[_ForwardToTune(queue)]),
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ddp-fit", daemon=True)
    thread.start()
    controller = None
    try:
        while True:
            try:
                metrics, ckpt, controller = queue.get(timeout=0.5)
            except Empty:
                if thread.is_alive() or not queue.empty():
                    continue
                break
            _forward(metrics, ckpt)
        if "error" in outcome:
            raise outcome["error"]
    finally:
        if thread.is_alive() and controller is not None:  # stopped by Tune (or errored here)
            _abort(controller, queue)
            thread.join(timeout=10)
        queue.shutdown()
        if own_storage and not thread.is_alive():  # Train-side leftovers (Tune has its copies)
            shutil.rmtree(os.path.join(storage_path, run_name), ignore_errors=True)


def _abort(controller: Any, queue: Queue, timeout_s: float = 30) -> None:
    """Aborts the Train run (workers + placement group). The controller may be blocked in a
    ``queue.put`` from our callback, so keep draining the queue until ``abort()`` has run."""
    ref, deadline = controller.abort.remote(), time.monotonic() + timeout_s
    while time.monotonic() < deadline and not ray.wait([ref], timeout=0.2)[0]:
        try:
            queue.get_nowait()
        except Empty:
            pass
    try:
        ray.get(ref, timeout=0)
    except Exception:  # noqa: BLE001 - abort() ends in exit_actor -> RayActorError
        pass


def _forward(metrics: dict, ckpt: Any) -> None:
    if ckpt is None:
        tune.report(metrics)
        return
    tune.report(metrics, checkpoint=tune.Checkpoint(ckpt.path, ckpt.filesystem))
    try:  # Tune now holds its own copy; CheckpointConfig decides what is kept
        ckpt.filesystem.delete_dir(ckpt.path)
    except Exception:  # noqa: BLE001 - best effort
        pass


def create_trial_resources(cpus_per_trial: float, gpus_per_trial: float, workers_per_trial: int):
    """What ``tune.with_resources`` needs for one trial.

    ``workers_per_trial <= 1``: the trial process trains itself -> ``{"cpu": .., "gpu": ..}``
    (fractions allowed). Otherwise the trial is only a driver and its workers get their own
    placement group (``cpus_per_trial / workers_per_trial`` CPUs and ``gpus_per_trial /
    workers_per_trial`` GPUs each, see :func:`worker_resources`), so the trial reserves a
    CPU/GPU-free bundle; cap concurrency with :func:`max_concurrent_ddp_trials`.
    """
    if workers_per_trial <= 1:
        return {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    return tune.PlacementGroupFactory([dict(_DRIVER_BUNDLE)])


def worker_resources(cpus_per_trial: float, gpus_per_trial: float, workers_per_trial: int):
    """``(cpus_per_worker, gpus_per_worker)`` when a trial's budget is split across its workers."""
    n = max(1, workers_per_trial)
    return cpus_per_trial / n, gpus_per_trial / n


def max_concurrent_ddp_trials(cpus_per_trial: float, gpus_per_trial: float,
                              total_cpus: float | None = None, total_gpus: float | None = None) -> int:
    """How many trials fit the cluster at once (Tune cannot see the workers' reservations)."""
    res = ray.cluster_resources() if total_cpus is None or total_gpus is None else {}
    cpus = res.get("CPU", 0) if total_cpus is None else total_cpus
    gpus = res.get("GPU", 0) if total_gpus is None else total_gpus
    fits = [int(cpus // cpus_per_trial)] if cpus_per_trial > 0 else []
    fits += [int(gpus // gpus_per_trial)] if gpus_per_trial > 0 else []
    return max(1, min(fits)) if fits else 1
