"""MLflow tracking from the Tune driver: the pure URI functions, the writer against a real server
that drops out, and the run tree of a real sweep (real trainable, real Ray, real divergence)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import threading
import time

import pytest
import yaml
from mlflow import MlflowClient

import helpers
from tune_dynsdpb import results as R
from tune_dynsdpb.errors import UserError
from tune_dynsdpb.tracking import (ATTEMPT, KIND_TRAINING, TAG_ATTEMPTS, TAG_KIND, SweepTracker, _Writer,
                                   check_tracking_uri, default_artifact_location, default_tracking_uri, metrics_of,
                                   redact_uri, use_tracking_uri)

ROLE, PARENT, TASK, ARM = "tune_dynsdpb.role", "mlflow.parentRunId", "tune_dynsdpb.task", "tune_dynsdpb.arm"


# -- URIs and credentials --------------------------------------------------------------------------
@pytest.mark.parametrize("uri,shown", [
    ("https://user:pw@host", "https://user:***@host"),
    ("https://user:p%40ss@mlflow.example.com:8443/path?x=1", "https://user:***@mlflow.example.com:8443/path?x=1"),
    ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("postgresql+psycopg2://mlflow:s3cret@db/mlflow", "postgresql+psycopg2://mlflow:***@db/mlflow"),
    ("https://user:pw@[::1]:5000", "https://user:***@[::1]:5000"),
    ("https://my_token_abc@host", "https://***@host"),  # the user name is the token: all of it hidden
    ("https://host:5000", "https://host:5000"),
    ("http://alice@host", "http://alice@host"),  # a plain user name is no secret
    ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown


def test_use_tracking_uri_moves_http_credentials_to_mlflows_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # monkeypatch puts the environment back afterwards
    assert use_tracking_uri("https://alice:p%40ss@host:5000/mlflow") == "https://host:5000/mlflow"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    db = "postgresql://mlflow:s3cret@db:5432/mlflow"
    assert use_tracking_uri(db) == db  # database drivers read them in the URI: kept, only shown redacted
    assert use_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ and "MLFLOW_TRACKING_PASSWORD" not in os.environ


@pytest.mark.parametrize("before", [None, "sqlite:///{tmp}/before.db"])
def test_fluent_tracking_puts_back_what_was_set_never_a_resolved_default(before, tmp_path, monkeypatch):
    """After the block, MLflow's fluent state is what it was: unset stays unset (a later
    ``MlflowClient(uri)`` then registers into ``uri``, not into ``./mlflow.db``), a set URI comes back.
    (MLflow's setters export ``MLFLOW_*_URI``; this test puts both back itself: monkeypatch would
    restore a variable that MLflow set after the test began.)"""
    import mlflow

    from tune_dynsdpb.tracking import fluent_tracking

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    outside = {k: os.environ.pop(k, None) for k in keys}
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    try:
        if before:
            before = before.format(tmp=tmp_path)
            mlflow.set_tracking_uri(before)
            mlflow.set_registry_uri(before)
        with fluent_tracking(f"sqlite:///{tmp_path}/inside.db"):
            pass
        assert mlflow.is_tracking_uri_set() == bool(before)
        assert os.environ.get("MLFLOW_REGISTRY_URI") == before
        if before:
            assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == before
        else:
            other = f"sqlite:///{tmp_path}/other.db"
            MlflowClient(other).create_registered_model("m")
            assert MlflowClient(other, registry_uri=other).get_registered_model("m").name == "m"
            assert not (tmp_path / "mlflow.db").exists()
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for k, v in outside.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def test_check_tracking_uri_unwritable_sqlite_folder(tmp_path):
    check_tracking_uri(default_tracking_uri(tmp_path))
    check_tracking_uri("sqlite:///:memory:")
    for folder in ("/proc/sys", str(tmp_path / "missing" / "dir")):  # /proc/sys: not writable, even for root
        with pytest.raises(UserError) as e:
            check_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        assert str(e.value) == (f"MLflow tracking URI sqlite:///{folder}/mlflow.db: folder {folder} does not "
                                "exist or is not writable")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError) as e:
        check_tracking_uri(f"sqlite:///{tmp_path}/a_file/mlflow.db")
    assert str(e.value) == (f"MLflow tracking URI sqlite:///{tmp_path}/a_file/mlflow.db: folder {tmp_path}/a_file "
                            "does not exist or is not writable")


def test_check_tracking_uri_unreachable_server_never_echoes_the_password(monkeypatch):
    port = helpers.free_port()  # bound then released: nothing listens there
    uri, shown = f"http://bob:s3cret@127.0.0.1:{port}", f"http://bob:***@127.0.0.1:{port}"
    t0 = time.time()
    with pytest.raises(UserError) as e:  # MLflow's own retries outlast the timeout
        check_tracking_uri(uri, timeout=2)
    assert time.time() - t0 < 5
    assert str(e.value) == f"MLflow tracking URI {shown} did not answer within 2 s"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # now the connection error itself comes back
    with pytest.raises(UserError) as e:
        check_tracking_uri(uri, timeout=30)
    msg = str(e.value)
    assert msg.startswith(f"MLflow tracking URI {shown} is not usable: ") and len(msg) > len(shown) + 40, msg
    assert "s3cret" not in msg and "\n" not in msg, msg


# -- the writer: a real server that drops out for a while ------------------------------------------
class Plug:
    """A TCP forwarder in front of a server; ``pull()`` cuts every connection and refuses new ones
    until ``push()``: the server is unreachable meanwhile, as on a network blip."""

    def __init__(self, target_port: int):
        self.target, self.up, self.conns = target_port, True, []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def pull(self):
        self.up = False
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns = []

    def push(self):
        self.up = True

    def close(self):
        self.pull()
        self.listener.close()


class FakeTrial:
    def __init__(self, trial_id, config, last_result=None):
        self.trial_id, self.config, self.last_result = trial_id, config, last_result or {}


@pytest.mark.slow  # starts Ray or a server
def test_writer_survives_a_briefly_unreachable_server(mlflow_server, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # let the writer's own retries do the work
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    plug = Plug(int(mlflow_server.rsplit(":", 1)[1]))
    uri = f"http://127.0.0.1:{plug.port}"
    try:
        tracker = SweepTracker(uri, "writer-blip", "blip1")
        tracker.start_sweep({"x": 1})
        cb = tracker.trial_callback([("rte", "dlb")])
        trial = FakeTrial("blip_00000", {R.TASK: "rte", R.METHOD: "dlb", "learning_rate": 1e-3})
        cb.on_trial_start(0, [trial], trial)
        cb.on_trial_result(0, [trial], trial, {R.STEP: 1, "eval_accuracy": 0.1, "training_iteration": 1})
        assert cb.flush(timeout=60)

        plug.pull()
        caplog.set_level(logging.WARNING, logger="tune_dynsdpb.tracking")
        for step in range(2, 8):  # queued while nothing gets through; Tune's loop is never held
            t0 = time.time()
            cb.on_trial_result(0, [trial], trial, {R.STEP: step, "eval_accuracy": step / 10,
                                                   "training_iteration": step})
            assert time.time() - t0 < 0.5
        trial.last_result = {R.FINAL: True, R.STEP: 7}
        cb.on_trial_complete(0, [trial], trial)
        helpers.wait_for(lambda: any("MLflow write failed" in r.getMessage() for r in caplog.records), 60,
                         "the writer to meet the outage")
        assert not cb.flush(timeout=0.1)  # still waiting for the server
        plug.push()
        assert cb.flush(timeout=120)
    finally:
        plug.close()
    assert any("MLflow write failed" in r.getMessage() for r in caplog.records), "the outage was never seen"
    c = MlflowClient(mlflow_server)  # straight to the server: the plug is gone
    (run,) = c.search_runs([tracker.experiment_id], "tags.`tune_dynsdpb.role` = 'trial'")
    assert run.info.status == "FINISHED" and run.info.run_name == "rte · dlb · trial 1"
    hist = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "eval_accuracy"))
    assert hist == [(s, s / 10) for s in range(1, 8)]  # every queued metric, once


def test_resume_reuses_runs(tmp_path):
    uri = default_tracking_uri(tmp_path)
    t1 = SweepTracker(uri, "exp", "sw2", default_artifact_location(tmp_path))
    parent = t1.start_sweep({"a": 1})
    arm = t1.start_arm("rte", "dlb")
    cb = t1.trial_callback([("rte", "dlb")])
    trial = FakeTrial("abc_00000", {R.TASK: "rte", R.METHOD: "dlb", "x": 1, "nested": {"lr": 0.1}, "obj": object()})
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_result(0, [trial], trial, {"eval_accuracy": 0.5, R.STEP: 3, "training_iteration": 1, "config": {}})
    cb.on_trial_recover(0, [trial], trial)
    assert cb.flush(60)
    t1.finish_sweep("FAILED")

    # The driver restarts: a new tracker, and the callback as Tuner.restore unpickles it.
    t2 = SweepTracker(uri, "exp", "sw2", default_artifact_location(tmp_path))
    assert t2.start_sweep({"a": 1, "b": 2}) == parent and t2.start_arm("rte", "dlb") == arm
    cb2 = pickle.loads(pickle.dumps(cb))
    cb2.on_trial_start(0, [trial], trial)
    cb2.on_trial_result(0, [trial], trial, {"eval_accuracy": 0.7, R.STEP: 3, "training_iteration": 1})  # re-reported
    cb2.on_trial_result(0, [trial], trial, {"eval_accuracy": 0.8, R.STEP: 6, "training_iteration": 2})
    trial.last_result = {R.FINAL: True}
    cb2.on_trial_complete(0, [trial], trial)
    assert cb2.flush(60)

    (r,) = t2.trial_runs("rte", "dlb")
    assert len(t2.trial_runs()) == 1
    assert r.info.status == "FINISHED" and r.info.run_name == "rte · dlb · trial 1"
    assert r.data.params["nested.lr"] == "0.1" and "obj" not in r.data.params
    c = MlflowClient(uri)
    hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "eval_accuracy"))
    assert hist == [(3, 0.5), (3, 0.7), (6, 0.8)]  # step 3 ran again: logged again, never dropped
    attempts = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, ATTEMPT))
    assert attempts == [(3, 1.0), (3, 2.0), (6, 2.0)] and r.data.tags[TAG_ATTEMPTS] == "2"
    c = MlflowClient(uri)
    assert c.get_run(parent).info.status == "RUNNING" and c.get_run(parent).data.params["b"] == "2"
    assert len(c.search_runs([t2.experiment_id])) == 4  # sweep, task, arm, trial


def _history(client, run_id, key):
    """(step, value) in the order logged (MLflow keeps each batch's order within a timestamp)."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


@pytest.mark.parametrize("batched", [False, True], ids=["one report per write", "reports merged in one batch"])
def test_a_repeated_step_is_logged_as_a_new_attempt_never_dropped(tmp_path, caplog, batched):
    """Trial A continues from its checkpoint after a retry (steps 2, 4 | 6, 8): one attempt, every
    step once. Trial B restarts from step 0 (2, 4 | 2, 4, 6, 8): both runs of steps 2 and 4 are
    logged, each report carries its attempt, the run is tagged with 2 attempts, and a warning says
    so. ``batched``: every report is queued before the writer thread starts, so they reach MLflow
    merged into one ``log_batch`` per run, and the restart must be seen inside the batch."""
    uri = default_tracking_uri(tmp_path)
    tracker = SweepTracker(uri, "attempts", "att1")
    tracker.start_sweep({})
    group = ("rte", "dynsdpb")
    writer = _Writer(uri, tracker.experiment_id, "att1", {group: tracker.arm_run(*group)}, start=not batched)
    caplog.set_level(logging.WARNING, logger="tune_dynsdpb.tracking")
    reported = {"A": [2, 4, 6, 8], "B": [2, 4, 2, 4, 6, 8]}
    for trial, steps in reported.items():
        writer.put(("start", trial, group, {"x": "1"}))
        for i, step in enumerate(steps):
            _, metrics = metrics_of({R.STEP: step, "eval_loss": 10.0 * i + step}, 1_000_000 + i)
            writer.put(("metrics", (trial, group), metrics, step))
    if batched:
        writer.thread.start()
    assert writer.flush(60)
    c = MlflowClient(uri)
    runs = {r.data.tags["ray.trial_id"]: r for r in tracker.trial_runs()}
    a, b = runs["A"], runs["B"]
    assert _history(c, a.info.run_id, "eval_loss") == [(2, 2.0), (4, 14.0), (6, 26.0), (8, 38.0)]
    assert [v for _, v in _history(c, a.info.run_id, ATTEMPT)] == [1.0] * 4 and TAG_ATTEMPTS not in a.data.tags
    assert _history(c, b.info.run_id, "eval_loss") == [(2, 2.0), (4, 14.0), (2, 22.0), (4, 34.0), (6, 46.0),
                                                       (8, 58.0)]
    assert _history(c, b.info.run_id, ATTEMPT) == [(2, 1.0), (4, 1.0), (2, 2.0), (4, 2.0), (6, 2.0), (8, 2.0)]
    assert b.data.tags[TAG_ATTEMPTS] == "2"
    (warning,) = [r.getMessage() for r in caplog.records if "again" in r.getMessage()]
    assert warning == ("trial B reports step 2 again (it had reached step 4): it restarted from an earlier point; "
                       "logging its steps again as attempt 2")


class CountingClient(MlflowClient):
    """The real client, counting its ``log_batch`` calls per run and their sizes."""

    def __init__(self, uri):
        super().__init__(uri)
        self.batches: dict[str, list[tuple[int, int, int]]] = {}

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kw):
        self.batches.setdefault(run_id, []).append((len(metrics), len(params), len(tags)))
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kw)


def test_the_writer_sends_one_batch_per_run_per_turn(tmp_path):
    """Eight trials report 20 times each, in turn as Tune's trials do, and end: one turn writes each
    run's params, 160 reports' metrics and end tag as one ``log_batch`` per run (not one per
    report). A run with more than MLflow's limits per batch (150 params, 1000 metrics) gets the
    fewest batches within them. A flush ends a turn's wait at once; the next turn is one more
    batch per run."""
    uri = default_tracking_uri(tmp_path)
    tracker = SweepTracker(uri, "turns", "turn1")
    tracker.start_sweep({})
    group = ("rte", "dlb")
    writer = _Writer(uri, tracker.experiment_id, "turn1", {group: tracker.arm_run(*group)}, start=False,
                     turn_s=3600.0)  # only a flush ends a turn's wait
    writer.client = client = CountingClient(uri)
    trials = [f"t{i}" for i in range(8)]
    for t in trials:
        writer.put(("start", t, group, {"learning_rate": "0.001", "seed": "0"}))
    writer.put(("start", "big", group, {f"p{i}": str(i) for i in range(150)}))
    for step in range(1, 21):
        for t in trials:
            _, metrics = metrics_of({R.STEP: step, "eval_accuracy": step / 100, "loss": 1.0 / step}, 1_000_000 + step)
            writer.put(("metrics", (t, group), metrics, step))
    for step in range(1, 41):  # 24 keys + attempt = 25 metrics per report: 1000 in all
        _, metrics = metrics_of({R.STEP: step, **{f"m{k}": float(k) for k in range(23)}}, 1_000_000 + step)
        writer.put(("metrics", ("big", group), metrics, step))
    for t in [*trials, "big"]:
        writer.put(("end", t, group, {"tune_dynsdpb.stopped_by": "scheduler"}, "KILLED"))
    writer.thread.start()
    t0 = time.monotonic()
    assert writer.flush(60) and time.monotonic() - t0 < 60

    runs = {r.data.tags["ray.trial_id"]: r for r in tracker.trial_runs()}
    assert set(runs) == {*trials, "big"}
    for t in trials:
        run = runs[t]
        assert client.batches[run.info.run_id] == [(20 * 4, 2, 1)]  # step, eval_accuracy, loss, attempt
        assert run.info.status == "KILLED" and run.data.params == {"learning_rate": "0.001", "seed": "0"}
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == \
            [(s, s / 100) for s in range(1, 21)]
    big = client.batches[runs["big"].info.run_id]
    assert big == [(899, 100, 1), (101, 50, 0)]  # within 1000 metrics, 100 params/tags, 1000 in all
    assert len(runs["big"].data.params) == 150 and runs["big"].data.tags["tune_dynsdpb.stopped_by"] == "scheduler"
    assert len(client.get_metric_history(runs["big"].info.run_id, "m22")) == 40

    for t in trials[:2]:  # a second turn, right after the first: the flush ends the hour's wait
        writer.put(("metrics", (t, group), metrics_of({R.STEP: 21, "loss": 0.01}, 2_000_000)[1], 21))
        writer.put(("metrics", (t, group), metrics_of({R.STEP: 22, "loss": 0.01}, 2_000_001)[1], 22))
    t0 = time.monotonic()
    assert writer.flush(60) and time.monotonic() - t0 < 60
    assert [len(client.batches[runs[t].info.run_id]) for t in trials] == [2, 2, 1, 1, 1, 1, 1, 1]


# -- a real sweep ----------------------------------------------------------------------------------
DIVERGED = re.compile(r"training diverged: non-finite \S+ at step \d+")


def sweep_file(tmp_path, model, name, tasks, methods, points) -> str:
    """Two trials per (task, arm), one trial at a time, so ASHA's decisions are fixed. rte is scored
    by its eval loss, so two learning rates never tie at the first rung."""
    spec = {
        "name": name, "model": str(model), "max_length": 32, "methods": methods, "seed": 0,
        "tasks": [{"task": "rte", "metric": "loss"}, {"task": "sst2"}][:tasks],
        "budget": {"num_samples": 2, "evals_per_epoch": 2, "grace_period": 1, "reduction_factor": 2,
                   "max_concurrent": 1},
        "resources": {"cpus_per_trial": 1},
        "params": {"common": {"learning_rate": {"choices": [1e-3, 1e-6, 0.1, 1e6]}, "num_train_epochs": 2,
                              "per_device_train_batch_size": 16}},
        "points_to_evaluate": {m: [{"learning_rate": lr} for lr in lrs] for m, lrs in points.items()},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def sweep(tmp_path_factory, tiny_bert, data_dir, name, **kw):
    from tune_dynsdpb.state import EXPERIMENT
    from tune_dynsdpb.sweep import run_sweep

    tmp = tmp_path_factory.mktemp(name)
    out = tmp / "sweep"
    state = run_sweep(sweep_file(tmp, tiny_bert, name, **kw), output_dir=out, data_dir=str(data_dir),
                      progress=False)
    return state, f"sqlite:///{out}/mlflow.db", out / "ray" / EXPERIMENT


@pytest.fixture(scope="module")
def real_sweep(ray_session, tiny_bert, data_dir, tmp_path_factory):
    """Two tasks x two arms x two trials; rte's second vanilla trial (lr 0.1) is clearly the weaker one."""
    return sweep(tmp_path_factory, tiny_bert, data_dir, "trk", tasks=2, methods=["vanilla", "dlb"],
                 points={"vanilla": [1e-6, 0.1], "dlb": [1e-3, 1e-3]})


def trial_runs(uri, name):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    return c.search_runs([exp.experiment_id], "tags.`tune_dynsdpb.role` = 'trial'", max_results=1000)


@pytest.mark.slow  # starts Ray or a server
def test_real_sweep_run_tree(real_sweep):
    state, uri, _ = real_sweep
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("trk")
    assert exp.tags[TAG_KIND] == KIND_TRAINING
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags[ROLE], []).append(r)
    assert sorted(by_role) == ["arm", "sweep", "task", "trial"]
    (top,) = by_role["sweep"]
    assert top.info.run_name == "trk" and top.info.status == "FINISHED"
    tasks = {r.data.tags[TASK]: r for r in by_role["task"]}
    assert sorted(tasks) == ["rte", "sst2"]
    assert all(r.data.tags[PARENT] == top.info.run_id and r.info.run_name == name for name, r in tasks.items())
    arms = {(r.data.tags[TASK], r.data.tags[ARM]): r for r in by_role["arm"]}
    assert sorted(arms) == [("rte", "dlb"), ("rte", "vanilla"), ("sst2", "dlb"), ("sst2", "vanilla")]
    for (task, arm), r in arms.items():
        assert r.data.tags[PARENT] == tasks[task].info.run_id and r.info.run_name == f"{task} · {arm}"
    trials = by_role["trial"]
    ids = [r.data.tags["ray.trial_id"] for r in trials]
    assert len(trials) == 8 and len(set(ids)) == 8  # none duplicated
    for group, arm_run in arms.items():
        mine = [r for r in trials if (r.data.tags[TASK], r.data.tags[ARM]) == group]
        assert all(r.data.tags[PARENT] == arm_run.info.run_id for r in mine)
        assert sorted(r.info.run_name for r in mine) == [f"{group[0]} · {group[1]} · trial {i}" for i in (1, 2)]
        assert all(r.data.params["method"] == group[1] and r.data.params["task"] == group[0] for r in mine)


def check_statuses_follow_classify(state, uri, name, experiment) -> dict:
    from ray.tune import ExperimentAnalysis

    tune_trials = {t.trial_id: t for t in ExperimentAnalysis(str(experiment)).trials}
    trials = trial_runs(uri, name)
    assert set(tune_trials) == {r.data.tags["ray.trial_id"] for r in trials}
    status_of = {R.Outcome.FINISHED: "FINISHED", R.Outcome.STOPPED: "KILLED", R.Outcome.FAILED: "FAILED"}
    seen = {}
    for r in trials:
        t = tune_trials[r.data.tags["ray.trial_id"]]
        outcome = R.classify(t.last_result, t.status == "ERROR")
        assert r.info.status == status_of[outcome], (r.info.run_name, r.info.status, outcome)
        seen.setdefault(outcome, []).append(r)
        tags = r.data.tags
        assert ("tune_dynsdpb.stopped_by" in tags) == (outcome is R.Outcome.STOPPED)
        assert ("tune_dynsdpb.failure" in tags) == (outcome is R.Outcome.FAILED)
        if outcome is R.Outcome.FINISHED:
            assert r.data.metrics["final"] == 1.0 and "objective" in r.data.metrics
    for key, arm in state.arms.items():  # the sweep state's counts come from the same rule
        mine = [r for r in trials if f"{r.data.tags[TASK]}/{r.data.tags[ARM]}" == key]
        assert arm.counts == {o: sum(r.info.status == status_of[R.Outcome(o)] for r in mine) for o in arm.counts}
        assert sum(arm.counts.values()) == len(mine) == 2
    return seen


@pytest.mark.slow  # starts Ray or a server
def test_real_sweep_statuses_follow_classify(real_sweep):
    seen = check_statuses_follow_classify(*real_sweep[:2], "trk", real_sweep[2])
    # rte's second vanilla trial (lr 0.1) loses to the first (lr 1e-6) at the first rung: ASHA stops it
    (killed,) = seen[R.Outcome.STOPPED]
    assert killed.info.run_name == "rte · vanilla · trial 2" and killed.data.params["learning_rate"] == "0.1"
    assert killed.data.tags["tune_dynsdpb.stopped_by"] == "scheduler"
    assert len(seen[R.Outcome.FINISHED]) == 7 and R.Outcome.FAILED not in seen
    state = real_sweep[0]
    assert all(arm.best is not None for arm in state.arms.values())
    assert state.arms["rte/vanilla"].best.config["learning_rate"] == 1e-6


@pytest.mark.slow  # starts Ray or a server
def test_real_sweep_diverging_trial_is_failed_and_never_best(ray_session, tiny_bert, data_dir, tmp_path_factory):
    """dlb's first trial has a learning rate of 1e6: it really diverges (non-finite loss)."""
    state, uri, experiment = sweep(tmp_path_factory, tiny_bert, data_dir, "div", tasks=1, methods=["dlb"],
                                   points={"dlb": [1e6, 1e-3]})
    seen = check_statuses_follow_classify(state, uri, "div", experiment)
    (failed,) = seen[R.Outcome.FAILED]
    assert failed.info.run_name == "rte · dlb · trial 1" and failed.data.params["learning_rate"] == "1000000.0"
    assert DIVERGED.fullmatch(failed.data.tags["tune_dynsdpb.failure"]), failed.data.tags["tune_dynsdpb.failure"]
    assert "tune_dynsdpb.error" not in failed.data.tags  # a reported failure, not a crash
    arm = state.arms["rte/dlb"]
    assert arm.counts.get("FAILED") == 1 and len(arm.failures) == 1 and DIVERGED.fullmatch(arm.failures[0])
    assert arm.best is not None and arm.best.config["learning_rate"] == 1e-3  # the other trial
    assert arm.best.run_id != failed.info.run_id


def test_writes_a_killed_driver_had_queued_are_backfilled_from_result_json(tmp_path, caplog):
    """A driver SIGKILLed with writes queued: trial A's run is complete, B's has steps 2 and 4 and is
    still RUNNING, C has no run (Tune had ended both). After the resumed experiment, ``backfill``
    reads each trial's ``result.json`` (as Tune's results point to it): B gets steps 6 and 8 and its
    end, C a run with all four steps; A is left alone; every step once, a warning for B and C."""
    from types import SimpleNamespace

    import pyarrow.fs

    uri = default_tracking_uri(tmp_path)
    tracker = SweepTracker(uri, "backfill", "bf1")
    tracker.start_sweep({})
    group = ("rte", "dlb")
    tracker.start_arm(*group)
    config = {R.TASK: "rte", R.METHOD: "dlb", "learning_rate": 0.001}

    def rows(trial):
        return [{R.STEP: s, "eval_loss": 1.0 / s, "trial_id": trial, "training_iteration": i + 1, "config": config,
                 R.FINAL: s == 8, "done": s == 8} for i, s in enumerate([2, 4, 6, 8])]

    killed = _Writer(uri, tracker.experiment_id, "bf1", {group: tracker.arm_run(*group)})
    for trial, upto in (("A", 4), ("B", 2)):
        killed.put(("start", trial, group, {"learning_rate": "0.001"}))
        for r in rows(trial)[:upto]:
            killed.put(("metrics", (trial, group), metrics_of(r, 1_000_000)[1], r[R.STEP]))
    killed.put(("end", "A", group, {}, "FINISHED"))
    assert killed.flush(60)

    grid = []
    for trial in "ABC":
        folder = tmp_path / "ray" / f"train_{trial}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows(trial)))
        grid.append(SimpleNamespace(metrics=rows(trial)[-1], config=config, error=None, path=str(folder),
                                    filesystem=pyarrow.fs.LocalFileSystem()))
    caplog.set_level(logging.WARNING, logger="tune_dynsdpb.tracking")
    tracker.trial_callback([group]).backfill(grid)  # the resumed driver's own writer

    c = MlflowClient(uri)
    runs = {r.data.tags["ray.trial_id"]: r for r in tracker.trial_runs()}
    assert set(runs) == {"A", "B", "C"}
    for trial, run in runs.items():
        assert run.info.status == "FINISHED", trial
        assert [m.step for m in sorted(c.get_metric_history(run.info.run_id, R.STEP), key=lambda m: m.step)] == \
            [2, 4, 6, 8], trial
        assert TAG_ATTEMPTS not in run.data.tags
    assert runs["C"].data.params["learning_rate"] == "0.001" and runs["C"].info.run_name == "rte · dlb · trial 3"
    warned = sorted(r.getMessage().split(":")[0] for r in caplog.records if "result.json" in r.getMessage())
    assert warned == ["trial B", "trial C"]
