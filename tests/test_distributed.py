"""trainables.distributed: one Tune trial = one 2-worker gloo DDP TorchTrainer run (real Ray)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def ddp_loop(config: dict) -> None:
    """Runs on each Ray Train worker: a tiny DDP regression, 1 report per step."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainables.distributed import get_resume_checkpoint, report

    torch.set_num_threads(1)
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(100 + rank)  # different init and data per rank: DDP must sync them
    model = torch.nn.Linear(4, 1)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=config["lr"])
    start, resumed_from = 0, -1
    resume = get_resume_checkpoint()
    if resume:
        state = torch.load(os.path.join(resume, "state.pt"))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = resumed_from = state["step"] + 1
    for step in range(start, config["steps"]):
        x = torch.randn(16, 4)
        loss = ((ddp(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        synced = all(torch.equal(g, gathered[0]) for g in gathered)
        fail_marker = config.get("fail_once_at")
        if fail_marker and step == 1 and not os.path.exists(fail_marker):
            dist.barrier()
            if rank == 0:
                Path(fail_marker).touch()
            raise RuntimeError("injected failure")
        metrics = {"loss": loss.item(), "step": step, "world_size": world,
                   "params_synced": float(synced), "resumed_from": resumed_from}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                           os.path.join(tmp, "state.pt"))
            report(metrics, checkpoint_dir=tmp if rank == 0 else None)
        time.sleep(config.get("sleep", 0))


def ddp_trainable(config: dict) -> None:
    """The Tune function trainable: only a driver for the TorchTrainer."""
    from trainables.distributed import run_ddp_trial

    run_ddp_trial(ddp_loop, config, num_workers=2, use_gpu=False, cpus_per_worker=1, name="t")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix sockets live under it
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    # Tune's trial actor, the Train controller and the workers import this module by name
    # (cloudpickle pickles module-level functions by reference): give them tests/ and the root.
    pythonpath = os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, _temp_dir=tmp, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath,
                                       # the Train controller polls worker reports every 2 s
                                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def _tuner(config, storage, name, *, stop=None, max_failures=0, callbacks=()):
    from ray import tune

    from trainables.distributed import create_trial_resources, max_concurrent_ddp_trials

    resources = create_trial_resources(cpus_per_trial=2, gpus_per_trial=0, workers_per_trial=2)
    assert isinstance(resources, tune.PlacementGroupFactory)
    return tune.Tuner(
        tune.with_resources(ddp_trainable, resources),
        param_space=config,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_ddp_trials(2, 0)),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), stop=stop, verbose=0,
                                  callbacks=list(callbacks),
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )


def test_trial_resources_helpers():
    from ray import tune

    from trainables.distributed import (create_trial_resources, max_concurrent_ddp_trials,
                                        worker_resources)

    assert create_trial_resources(0.5, 0.25, 1) == {"cpu": 0.5, "gpu": 0.25}
    pgf = create_trial_resources(8, 4, 4)
    assert isinstance(pgf, tune.PlacementGroupFactory)
    assert pgf.bundles[0].get("CPU", 0) == 0 and pgf.bundles[0].get("GPU", 0) == 0
    assert worker_resources(8, 4, 4) == (2, 1)
    assert max_concurrent_ddp_trials(2, 1, total_cpus=8, total_gpus=3) == 3
    assert max_concurrent_ddp_trials(4, 0, total_cpus=2, total_gpus=0) == 1


def _wait_all_cpus_free(ray, total=2, timeout_s=20):
    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.25)
    return ray.available_resources().get("CPU", 0)


def test_ddp_trials_forward_results_checkpoints_and_stop(ray_cluster, tmp_path):
    """2 trials x 3 results. Trial "steps=3" ends on its own; trial "steps=50" is stopped by Tune
    after its 3rd result while its workers are still training (as ASHA would)."""
    import torch
    from ray import tune

    seen = []

    class Recorder(tune.Callback):  # stands in for the Tune-level MLflow callback
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append((trial.config["steps"], result["step"]))

    config = {"lr": 0.02, "steps": tune.grid_search([3, 50]), "sleep": 0.2}
    results = _tuner(config, tmp_path, "ddp", stop={"training_iteration": 3},
                     callbacks=[Recorder()]).fit()
    assert results.num_errors == 0 and len(results) == 2
    for res in results:
        df = res.metrics_dataframe
        assert list(df["step"]) == [0, 1, 2]
        assert (df["world_size"] == 2).all() and (df["params_synced"] == 1.0).all()
        assert res.checkpoint is not None
        with res.checkpoint.as_directory() as d:
            assert torch.load(os.path.join(d, "state.pt"))["step"] == 2
    assert sorted(seen) == [(3, 0), (3, 1), (3, 2), (50, 0), (50, 1), (50, 2)]
    # the Train-side run dirs (and their checkpoint copies) are gone once Tune has its own
    assert not [p for p in Path(tmp_path).rglob("checkpoint_*") if "ddp_runs" in str(p)]
    # the stopped trial's TorchTrainer was aborted: its workers gave their CPUs back
    assert _wait_all_cpus_free(ray_cluster) == 2, "DDP workers still hold CPUs"


def test_ddp_trial_restores_from_tune_checkpoint(ray_cluster, tmp_path):
    """A worker fails once at step 1; Tune retries the trial from its step-0 checkpoint."""
    config = {"lr": 0.02, "steps": 3, "fail_once_at": str(tmp_path / "failed_once")}
    results = _tuner(config, tmp_path, "restore", max_failures=1).fit()
    assert results.num_errors == 0 and (tmp_path / "failed_once").exists()
    df = results[0].metrics_dataframe
    assert list(df["step"])[-2:] == [1, 2] and list(df["resumed_from"])[-1] == 1
    assert results[0].checkpoint is not None
    assert _wait_all_cpus_free(ray_cluster) == 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-x"]))
