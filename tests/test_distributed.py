"""trainables.distributed's contract with Tune, on real Ray: one Tune trial = one 2-worker gloo
DDP TorchTrainer run. The loop here is a minimal DDP regression, so that each property below is
checked exactly (every worker's report reaches Tune, parameters stay in sync, a retry starts from
the last checkpoint, a stopped trial frees its workers and files). The real ``DynSDPBTrainer`` on
the same path (2 DDP workers as one trial of a real sweep, crashing once and resuming from its
checkpoint) is ``tests/test_sweep.py::test_two_worker_trial_inside_tune``; the trainer's DDP
semantics under ``torch.distributed.run`` are ``tests/test_ddp.py``.

One Tuner run (module fixture) with 2 trials, each a 2-worker DDP run of ``ddp_loop``:
  * "steps=3": its workers fail once at step 1; Tune retries the trial from its step-0 checkpoint;
  * "steps=50": stopped by Tune after its 3rd result while its workers still train (as ASHA would).
Each trial uses 2 x 0.5 CPU, so both run at once on a 2-CPU Ray.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CPUS_PER_WORKER = 0.5


def ddp_loop(config: dict) -> None:
    """Runs on each Ray Train worker: a tiny DDP regression, one report (+ checkpoint) per step."""
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
        fail_marker = config.get("fail_once_at")
        if fail_marker and step == 1 and not os.path.exists(fail_marker):
            dist.barrier()
            if rank == 0:
                Path(fail_marker).touch()
            raise RuntimeError("injected failure")
        x = torch.randn(16, 4)
        loss = ((ddp(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        metrics = {"loss": loss.item(), "step": step, "world_size": world,
                   "params_synced": float(all(torch.equal(g, gathered[0]) for g in gathered)),
                   "resumed_from": resumed_from}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                           os.path.join(tmp, "state.pt"))
            report(metrics, checkpoint_dir=tmp if rank == 0 else None)
        time.sleep(config.get("sleep", 0))


def ddp_trainable(config: dict) -> None:
    """The Tune function trainable: only a driver for the TorchTrainer."""
    from trainables.distributed import run_ddp_trial

    run_ddp_trial(ddp_loop, config, num_workers=2, use_gpu=False,
                  cpus_per_worker=CPUS_PER_WORKER, name="t")


def _train_dirs(trial_id: str) -> list:
    """The Train run storage run_ddp_trial made for the trial (a local temp dir by default)."""
    return list(Path(tempfile.gettempdir()).glob(f"tune-ddp-{trial_id}-*"))


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The session's Ray (conftest), whose workers can import this module."""
    import ray

    return ray


@pytest.fixture(scope="module")
def experiment(ray_cluster, tmp_path_factory):
    from ray import tune

    from trainables.distributed import create_trial_resources, max_concurrent_ddp_trials

    storage = tmp_path_factory.mktemp("ddp_tune")
    seen = []

    class Recorder(tune.Callback):  # stands in for the Tune-level MLflow callback
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append((trial.config["steps"], result["step"]))

    def stop(trial_id, result):  # stop "steps=50" while its workers are still training
        return result["config"]["steps"] == 50 and result["training_iteration"] >= 3

    marker = str(storage / "failed_once")
    cpus_per_trial = 2 * CPUS_PER_WORKER
    resources = create_trial_resources(cpus_per_trial, 0, workers_per_trial=2)
    tuner = tune.Tuner(
        tune.with_resources(ddp_trainable, resources),
        param_space={"lr": 0.02, "sleep": 0.2, "steps": tune.grid_search([3, 50]),
                     "fail_once_at": tune.sample_from(
                         lambda spec: marker if spec.config.steps == 3 else None)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent_ddp_trials(cpus_per_trial, 0)),
        run_config=tune.RunConfig(name="ddp", storage_path=str(storage), stop=stop, verbose=0,
                                  callbacks=[Recorder()],
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    by_steps = {r.config["steps"]: r for r in results}
    return {"results": results, "by_steps": by_steps, "seen": seen, "marker": marker}


def test_trial_resources_helpers():
    from ray import tune

    from trainables.distributed import create_trial_resources, max_concurrent_ddp_trials

    assert create_trial_resources(0.5, 0.25, 1) == {"cpu": 0.5, "gpu": 0.25}
    pgf = create_trial_resources(8, 4, 4)
    assert isinstance(pgf, tune.PlacementGroupFactory)
    assert pgf.bundles[0].get("CPU", 0) == 0 and pgf.bundles[0].get("GPU", 0) == 0
    assert max_concurrent_ddp_trials(2, 1, total_cpus=8, total_gpus=3) == 3
    assert max_concurrent_ddp_trials(4, 0, total_cpus=2, total_gpus=0) == 1


def test_every_worker_report_reaches_tune_with_a_checkpoint(experiment):
    import torch

    results = experiment["results"]
    assert results.num_errors == 0 and len(results) == 2
    # every report, including the failed attempt's step 0, reached Tune's callbacks ...
    assert sorted(experiment["seen"]) == [(3, 0), (3, 1), (3, 2), (50, 0), (50, 1), (50, 2)]
    for res in results:  # ... and the trials' results (a retried trial's log may restart)
        df = res.metrics_dataframe
        expected = [0, 1, 2] if res.config["steps"] == 50 else [1, 2]
        assert list(df["step"])[-len(expected):] == expected
        assert (df["world_size"] == 2).all() and (df["params_synced"] == 1.0).all()
        assert res.checkpoint is not None
        with res.checkpoint.as_directory() as d:
            assert torch.load(os.path.join(d, "state.pt"))["step"] == 2


def test_failed_trial_resumes_from_tune_checkpoint(experiment):
    assert os.path.exists(experiment["marker"])  # attempt 1 reported step 0, then failed
    df = experiment["by_steps"][3].metrics_dataframe
    assert list(df["resumed_from"])[-2:] == [1, 1]  # attempt 2 started from the step-0 checkpoint


def test_stopped_and_finished_trials_leave_nothing_behind(experiment, ray_cluster):
    trial_ids = [r.metrics["trial_id"] for r in experiment["results"]]
    deadline = time.time() + 20
    while time.time() < deadline:  # _Reaper needs a moment after the stopped trial died
        free = ray_cluster.available_resources().get("CPU", 0)
        if free == 2 and not any(map(_train_dirs, trial_ids)):
            break
        time.sleep(0.25)
    assert ray_cluster.available_resources().get("CPU", 0) == 2, "DDP workers still hold CPUs"
    assert not any(map(_train_dirs, trial_ids)), "Train run dirs left behind"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-x"]))
