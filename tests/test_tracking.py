"""MLflow tracking from the Tune driver: real Ray, a real SQLite store and a real `mlflow server`."""

from __future__ import annotations

import math
import os
import pickle
import shutil
import sys
import tempfile
import time

import pytest

import helpers

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

ray = pytest.importorskip("ray")
from mlflow import MlflowClient  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from tune_dynsdpb.errors import UserError  # noqa: E402
from tune_dynsdpb.tracking import (  # noqa: E402
    SweepTracker,
    check_tracking_uri,
    default_artifact_location,
    default_tracking_uri,
)

pytestmark = pytest.mark.slow
ITERS = 4


def toy(config):
    """Reports ITERS results; x == -1 raises at step 2, x == -2 reports a dynsdpb_failure,
    a `gate` file that does not exist makes step 2 raise (for the restore test)."""
    x = config["x"]
    for i in range(ITERS):
        if i == 2 and (x == -1 or ("gate" in config and not os.path.exists(config["gate"]))):
            raise ValueError(f"boom at x={x}")
        if i == 1 and x == -2:
            tune.report({"eval_accuracy": float("nan"), "step": i, "dynsdpb_failure": "non-finite loss"})
            return
        tune.report({"eval_accuracy": x * (i + 1) / ITERS, "step": i, "alpha_mean": 0.5 + i,
                     "loss": float("inf") if i == 0 else 1.0 / (i + 1), "final": i == ITERS - 1})


@pytest.fixture(scope="module")
def ray_session():
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths max ~107 chars
    # Workers cannot import this test module: ship `toy` and its globals by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TensorBoard files: faster
        ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    shutil.rmtree(tmp, ignore_errors=True)


def run_arm(tracker, method, storage, space, scheduler=None, max_failures=0, concurrent=1):
    tracker.start_arm(method)
    tuner = Tuner(
        toy,
        param_space=space,
        tune_config=TuneConfig(metric="eval_accuracy", mode="max", scheduler=scheduler, reuse_actors=True,
                               max_concurrent_trials=concurrent),  # 1: ASHA decisions are deterministic
        run_config=RunConfig(name=method, storage_path=str(storage),
                             callbacks=[tracker.trial_callback(method)], verbose=0,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    grid = tuner.fit()
    tracker.finish_arm(method)
    return grid


def by_x(runs):
    return {float(r.data.params["x"]): r for r in runs}


def test_sqlite_sweep_structure_statuses_metrics(ray_session, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    uri = default_tracking_uri(out)
    assert uri == f"sqlite:///{out.resolve()}/mlflow.db" and uri.startswith("sqlite:////")
    check_tracking_uri(uri)
    tr = SweepTracker(uri, "exp", "sw1", artifact_location=default_artifact_location(out))
    parent = tr.start_sweep({"task": "sst2", "budget": {"trials": 3, "epochs": 1}}, tags={"who": "test"})

    asha = ASHAScheduler(max_t=ITERS, grace_period=1, reduction_factor=2)
    # Descending x, one at a time: the 2nd and 3rd trial fall below the 1st at rung 1.
    grid = run_arm(tr, "vanilla", tmp_path / "ray", {"x": tune.grid_search([0.9, 0.5, 0.1])}, asha)
    run_arm(tr, "dynsdpb", tmp_path / "ray", {"x": tune.grid_search([0.7, -1, -2])}, max_failures=1,
            concurrent=2)
    best = grid.get_best_result()
    best_run = tr.find_trial_run("vanilla", best.metrics["trial_id"])
    tr.record_best("vanilla", best_run, best.config, "eval_accuracy", best.metrics["eval_accuracy"])
    tr.finish_sweep()

    c = MlflowClient(uri)
    exp = c.get_experiment(tr.experiment_id)
    assert exp.name == "exp" and exp.artifact_location == default_artifact_location(out)
    p = c.get_run(parent)
    assert p.info.status == "FINISHED"
    assert p.data.tags["tune_dynsdpb.role"] == "sweep" and p.data.tags["who"] == "test"
    assert p.data.params["budget.trials"] == "3" and p.data.params["task"] == "sst2"
    arms = {m: c.get_run(tr.start_arm(m)) for m in ("vanilla", "dynsdpb")}
    for m, a in arms.items():
        assert a.data.tags["mlflow.parentRunId"] == parent and a.data.tags["tune_dynsdpb.arm"] == m
        assert a.data.tags["tune_dynsdpb.role"] == "arm"

    van, dyn = by_x(tr.trial_runs("vanilla")), by_x(tr.trial_runs("dynsdpb"))
    assert len(tr.trial_runs()) == 6 and set(van) == {0.9, 0.5, 0.1} and set(dyn) == {0.7, -1, -2}
    for m, runs in (("vanilla", van), ("dynsdpb", dyn)):
        for r in runs.values():
            assert r.data.tags["mlflow.parentRunId"] == arms[m].info.run_id
            assert r.data.tags["tune_dynsdpb.role"] == "trial" and r.data.tags["ray.trial_id"]

    assert van[0.9].info.status == "FINISHED"
    for x in (0.5, 0.1):
        assert van[x].info.status == "KILLED", x
        assert van[x].data.tags["tune_dynsdpb.stopped_by"] == "scheduler"
    assert "tune_dynsdpb.stopped_by" not in van[0.9].data.tags
    assert dyn[0.7].info.status == "FINISHED"
    assert dyn[-1].info.status == "FAILED"
    assert dyn[-1].data.tags["tune_dynsdpb.error"] == "ValueError: boom at x=-1"
    assert dyn[-1].data.tags["tune_dynsdpb.retries"] == "1"  # max_failures=1: one retry first
    assert dyn[-2].info.status == "FAILED" and dyn[-2].data.tags["tune_dynsdpb.failure"] == "non-finite loss"

    hist = c.get_metric_history(van[0.9].info.run_id, "eval_accuracy")
    assert sorted((m.step, m.value) for m in hist) == [(i, 0.9 * (i + 1) / ITERS) for i in range(ITERS)]
    assert [m.step for m in c.get_metric_history(van[0.5].info.run_id, "eval_accuracy")] == [0]
    loss = sorted((m.step, m.value) for m in c.get_metric_history(dyn[0.7].info.run_id, "loss"))
    assert loss[0][1] >= 1.7e308 and loss[1] == (1, 0.5)  # MLflow's SQL store clamps inf to max float
    nan = [m.value for m in c.get_metric_history(dyn[-2].info.run_id, "eval_accuracy") if m.step == 1]
    assert len(nan) == 1 and math.isnan(nan[0])
    metrics = van[0.9].data.metrics
    assert metrics["final"] == 1.0 and metrics["alpha_mean"] == 3.5 and "training_iteration" in metrics
    assert not {"pid", "timestamp", "done"} & set(metrics)

    p = c.get_run(parent)
    assert p.data.metrics["best_vanilla_eval_accuracy"] == pytest.approx(0.9)
    assert p.data.tags["best.vanilla.run_id"] == van[0.9].info.run_id
    assert '"x": 0.9' in p.data.tags["best.vanilla.config"]
    a = c.get_run(arms["vanilla"].info.run_id)
    assert a.data.metrics["best_eval_accuracy"] == pytest.approx(0.9)
    assert a.data.tags["best.run_id"] == van[0.9].info.run_id


class FakeTrial:
    def __init__(self, trial_id, config, last_result=None):
        self.trial_id, self.config, self.last_result = trial_id, config, last_result or {}

    def __str__(self):
        return f"toy_{self.trial_id}"


def test_resume_reuses_runs(tmp_path):
    uri = default_tracking_uri(tmp_path)
    t1 = SweepTracker(uri, "exp", "sw2", default_artifact_location(tmp_path))
    parent, arm = t1.start_sweep({"a": 1}), t1.start_arm("dlb")
    cb = t1.trial_callback("dlb")
    trial = FakeTrial("abc_00000", {"x": 1, "nested": {"lr": 0.1}, "obj": object()})
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_result(0, [trial], trial, {"eval_accuracy": 0.5, "training_iteration": 1, "config": {}})
    cb.on_trial_recover(0, [trial], trial)
    t1.finish_arm("dlb", "FAILED")
    t1.finish_sweep("FAILED")

    # The driver restarts: a new tracker, and the callback as Tuner.restore unpickles it.
    t2 = SweepTracker(uri, "exp", "sw2", default_artifact_location(tmp_path))
    assert t2.start_sweep({"a": 1, "b": 2}) == parent and t2.start_arm("dlb") == arm
    cb2 = pickle.loads(pickle.dumps(cb))
    cb2.on_trial_start(0, [trial], trial)
    cb2.on_trial_recover(0, [trial], trial)
    trial.last_result = {"final": True}
    cb2.on_trial_complete(0, [trial], trial)

    runs = t2.trial_runs("dlb")
    assert len(runs) == 1 and len(t2.trial_runs()) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "toy_abc_00000"
    assert r.data.params["nested.lr"] == "0.1" and "obj" not in r.data.params
    assert r.data.tags["tune_dynsdpb.retries"] == "2"
    c = MlflowClient(uri)
    assert c.get_run(parent).info.status == "RUNNING" and c.get_run(parent).data.params["b"] == "2"
    assert len(c.search_runs([t2.experiment_id])) == 3


def test_tuner_restore_reuses_trial_run(ray_session, tmp_path):
    uri, gate = default_tracking_uri(tmp_path), tmp_path / "gate"
    tr = SweepTracker(uri, "exp", "sw3", default_artifact_location(tmp_path))
    tr.start_sweep({})
    run_arm(tr, "dlb", tmp_path / "ray", {"x": 0.3, "gate": str(gate)})
    (first,) = tr.trial_runs("dlb")
    assert first.info.status == "FAILED" and "boom" in first.data.tags["tune_dynsdpb.error"]

    gate.touch()  # the "bug" is fixed; restart the driver and resume the errored trial
    tr2 = SweepTracker(uri, "exp", "sw3")
    tr2.start_sweep({})
    tr2.start_arm("dlb")
    # resume_errored keeps the trial id (restart_errored would make a new trial, hence a new run).
    Tuner.restore(str(tmp_path / "ray" / "dlb"), toy, resume_errored=True).fit()
    (again,) = tr2.trial_runs("dlb")
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    steps = {m.step for m in MlflowClient(uri).get_metric_history(again.info.run_id, "eval_accuracy")}
    assert steps == set(range(ITERS))


def test_sweep_through_mlflow_server(ray_session, mlflow_server, tmp_path):
    check_tracking_uri(mlflow_server)
    tr = SweepTracker(mlflow_server, "srv-exp", "sw4")
    parent = tr.start_sweep({"task": "rte"})
    run_arm(tr, "vanilla", tmp_path / "ray", {"x": tune.grid_search([0.2, 0.4])}, concurrent=2)
    tr.finish_sweep()
    runs = tr.trial_runs("vanilla")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    c = MlflowClient(mlflow_server)
    assert c.get_run(parent).info.status == "FINISHED"
    hist = c.get_metric_history(runs[0].info.run_id, "loss")
    assert len(hist) == ITERS and min(hist, key=lambda m: m.step).value >= 1.7e308


def test_check_tracking_uri_errors(tmp_path):
    port = helpers.free_port()  # bound then released: nothing listens there
    t0 = time.time()
    with pytest.raises(UserError, match=f"http://127.0.0.1:{port}") as e:
        check_tracking_uri(f"http://127.0.0.1:{port}", timeout=2)
    assert time.time() - t0 < 5 and "\n" not in str(e.value)
    bad = f"sqlite:///{tmp_path}/missing/dir/mlflow.db"
    with pytest.raises(UserError, match="missing/dir"):
        check_tracking_uri(bad)
    with pytest.raises(UserError, match="file:"):
        check_tracking_uri(f"file:{tmp_path}/mlruns")
    check_tracking_uri(f"sqlite:///{tmp_path}/ok.db")
