"""One Ray Tune trial = one multi-worker Ray Train V2 ``TorchTrainer`` run (DDP).

Ray 2.60 runs Train V2 (``RAY_TRAIN_V2_ENABLED`` defaults on; set to ``"1"`` here if unset): no
Trainer inside a ``Tuner``; a Tune *function trainable* builds a ``TorchTrainer`` and calls
``fit()``. A Train ``UserCallback.after_report`` (run by the Train controller) relays each worker
report through a queue to the trial, which calls ``ray.tune.report``::

  Tuner driver: ASHA, Tune callbacks (MLflow), CheckpointConfig, FailureConfig
    | results ^
  Tune trial actor [PGF bundle: 0 CPU, 0 GPU]                   run_ddp_trial()
    |- thread "ddp-fit": TorchTrainer.fit() --> TrainController actor [0 CPU, owned by trial]
    |                                             |- own placement group, 1 bundle per worker:
    |                                             |    RayTrainWorker rank 0..N-1 {CPU c, GPU g}
    |                                             '- _ForwardToTune.after_report --> Queue(1) actor
    '- trial thread: Queue.get --> ray.tune.report(rank-0 metrics, tune.Checkpoint copy)
  _Reaper [detached, 0 CPU]: removes the workers' placement group once the Queue actor is gone

Resources: the workers' placement group is the controller's, never the trial's, so worker bundles
in the trial's PlacementGroupFactory would be reserved twice (a small cluster hangs): multi-worker
trials get a CPU/GPU-free bundle and ``TuneConfig(max_concurrent_trials=max_concurrent_ddp_trials())``.
Checkpoints: uploaded by the workers to the Train run's storage (default: a local temp dir; use a
shared ``storage_path`` on multi-node), copied into Tune's storage by ``ray.tune.report``, then
deleted, so Tune's ``CheckpointConfig`` rules; Tune's ``FailureConfig`` retries from
``ray.tune.get_checkpoint()``, which workers read via :func:`get_resume_checkpoint`.
Stopping (ASHA): ``ray.tune.report`` raises ``SystemExit`` and we ``abort()`` the controller, but
Tune may kill the trial first: controller and workers die with it (owner fate-sharing), their
placement group lives on until the job ends (V2's own cleaner needs the state API of ``ray[default]``).
"""

import contextlib
import functools
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray import tune  # noqa: E402
from ray.util.placement_group import get_current_placement_group, remove_placement_group  # noqa: E402
from ray.util.queue import Empty, Queue  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

V2 = hasattr(ray.train, "UserCallback")  # exported only when Train V2 is enabled
_RESUME: dict[str, Any] = {}  # in each worker process: the Tune checkpoint to resume from


class _ForwardToTune(ray.train.UserCallback if V2 else object):
    """Runs in the Train controller: hands rank 0's metrics and the checkpoint to the trial."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):  # the handle lets the trial abort
        self.queue.put((dict(metrics[0]), checkpoint, ray.get_runtime_context().current_actor))


@ray.remote(num_cpus=0, max_concurrency=2)
class _Reaper:
    """Detached: removes the workers' placement group once ``sentinel`` (the trial's Queue actor)
    is gone (trial ended, stopped or killed), then the trial's node-local folders, then exits."""

    pg = None

    def watch(self, pg) -> None:
        self.pg = pg

    def run(self, sentinel, dirs: list[str]) -> None:
        while True:
            try:
                ray.get(sentinel.qsize.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:
                pass
            time.sleep(1)
        with contextlib.suppress(Exception):  # (the controller may have removed it already)
            if self.pg is not None:
                remove_placement_group(self.pg)
        for d in dirs:  # the workers are gone now, so nothing writes there any more
            shutil.rmtree(d, ignore_errors=True)
        ray.actor.exit_actor()


def _worker_main(train_loop: Callable[[dict], None], resume: Any, reaper: Any, config: dict) -> None:
    if ray.train.get_context().get_world_rank() == 0:
        ray.get(reaper.watch.remote(get_current_placement_group()))
    _RESUME.update(checkpoint=resume, dir=None)
    train_loop(config)


def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
    """Inside ``train_loop``, on EVERY rank equally often (``ray.train.report`` is a barrier): Tune
    gets rank 0's metrics. For DDP pass ``checkpoint_dir`` on rank 0 only (given dirs are merged)."""
    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def get_resume_checkpoint() -> str | None:
    """Inside ``train_loop``: a local directory with the checkpoint to resume from, or None."""
    ckpt = _RESUME.get("checkpoint")
    if ckpt is not None and _RESUME["dir"] is None:
        local = type(ckpt.filesystem).__name__ == "LocalFileSystem" and os.path.isdir(ckpt.path)
        _RESUME["dir"] = ckpt.path if local else ckpt.to_directory()
    return _RESUME.get("dir")


def run_ddp_trial(train_loop: Callable[[dict], None], config: dict, *, num_workers: int,
                  use_gpu: bool, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                  name: str | None = None, storage_path: str | None = None, scratch_dirs: tuple[str, ...] = ()) -> None:
    """Call INSIDE a Tune function trainable: run ``train_loop(config)`` (a module-level function)
    on ``num_workers`` Ray Train workers (gloo on CPU, NCCL on GPU), forwarding each :func:`report`
    to ``ray.tune.report``. Raises what ``TorchTrainer.fit()`` raises if training fails.
    ``scratch_dirs``: folders on this node that the workers write to; they are removed once the
    workers are gone, also when Tune stopped or killed the trial before its own cleanup ran."""
    if not V2:
        raise RuntimeError("run_ddp_trial needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED or set it to 1")
    from ray.train.torch import TorchTrainer  # here: torch's Ray Train integration, only when a DDP trial runs

    ctx = tune.get_context()
    run_name = f"{name or 'ddp'}-{ctx.get_trial_id()}-{uuid.uuid4().hex[:6]}"  # fresh: no V2 auto-resume
    # Not under get_trial_dir(): on one node that is the driver's staging dir, copied to storage.
    own_dir = None if storage_path else tempfile.mkdtemp(prefix=f"tune-ddp-{ctx.get_trial_id()}-")
    storage_path = storage_path or own_dir
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker or 1} if use_gpu else {})}
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    # On this node (for own_dir), outside the trial's placement group (Tune removes it at the end).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    reaper = _Reaper.options(lifetime="detached", scheduling_strategy=here).remote()
    reaper.run.remote(queue.actor, [d for d in (own_dir, *scratch_dirs) if d])
    trainer = TorchTrainer(
        functools.partial(_worker_main, train_loop, tune.get_checkpoint(), reaper),
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=run_name, storage_path=storage_path,
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
        if thread.is_alive() and controller is not None:  # stopped by Tune (e.g. reused actor)
            ref, deadline = controller.abort.remote(), time.monotonic() + 30
            while time.monotonic() < deadline and not ray.wait([ref], timeout=0)[0]:
                with contextlib.suppress(Empty):  # the controller may be blocked in queue.put
                    queue.get(timeout=0.2)
            thread.join(timeout=10)
        queue.shutdown()  # also tells the reaper to go
        if own_dir and not thread.is_alive():  # Tune holds copies of the checkpoints
            shutil.rmtree(own_dir, ignore_errors=True)


def _forward(metrics: dict, ckpt: Any) -> None:
    tune.report(metrics, checkpoint=None if ckpt is None else tune.Checkpoint(ckpt.path, ckpt.filesystem))
    if ckpt is not None:  # Tune has its own copy now
        with contextlib.suppress(Exception):
            ckpt.filesystem.delete_dir(ckpt.path)


def create_trial_resources(cpus_per_trial: float, gpus_per_trial: float, workers_per_trial: int):
    """What ``tune.with_resources`` needs: ``{"cpu", "gpu"}`` (fractions allowed) when the trial
    trains in its own process (one worker, at most one GPU); else a CPU/GPU-free driver bundle, as
    the DDP workers (one per worker or per GPU) get their own resources from Ray Train."""
    if workers_per_trial <= 1 and gpus_per_trial <= 1:
        return {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    return tune.PlacementGroupFactory([{"CPU": 0, "memory": 1 << 20}])  # no empty bundles: 1 MiB


def max_concurrent_ddp_trials(cpus_per_trial: float, gpus_per_trial: float,
                              total_cpus: float | None = None, total_gpus: float | None = None) -> int:
    """How many multi-worker trials fit at once (default totals: ``ray.cluster_resources()``)."""
    res = ray.cluster_resources() if total_cpus is None or total_gpus is None else {}
    have = {"CPU": res.get("CPU", 0) if total_cpus is None else total_cpus,
            "GPU": res.get("GPU", 0) if total_gpus is None else total_gpus}
    fits = [int(have[k] // need) for k, need in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)) if need > 0]
    return max(1, min(fits, default=1))
