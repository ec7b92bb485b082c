"""`tune-dynsdpb sweep` end to end: real Ray, real Optuna, real MLflow (SQLite and a real server),
real signals. One shared multi-task sweep (conftest ``tiny_sweep``) feeds the read-only tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import guards
import helpers
from sweeps import check_tree, client_for, runs_by_role, spec_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


# -- the shared sweep ---------------------------------------------------------------------------
def test_multi_task_sweep_tree_state_and_checkpoints(tiny_sweep):
    from tune_dynsdpb.state import open_sweep

    out, _ = tiny_sweep
    state = open_sweep(out)
    assert state.status == "finished" and list(state.tasks) == ["rte", "sst2"]
    assert state.tasks["rte"].metric == "eval_loss" and state.tasks["rte"].mode == "min"
    assert state.tasks["sst2"].metric == "eval_accuracy" and state.tasks["sst2"].mode == "max"
    client = client_for(f"sqlite:///{out}/mlflow.db")
    runs = check_tree(client, "tiny", ["rte", "sst2"], ["vanilla", "dlb", "dynsdpb"], 2)
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for arm in state.arms.values():
        assert arm.started == 2 and sum(arm.counts.values()) == 2
        assert arm.best is not None
        trials = [r for r in runs["trial"] if r.data.tags["tune_dynsdpb.task"] == arm.task
                  and r.data.tags["tune_dynsdpb.arm"] == arm.method]
        metric, mode = state.tasks[arm.task].metric, state.tasks[arm.task].mode
        pick = max if mode == "max" else min
        best = pick(pick(m.value for m in client.get_metric_history(r.info.run_id, metric)) for r in trials)
        assert arm.best.score == pytest.approx(best)
        assert arm.best.run_id in {r.info.run_id for r in trials}
        assert Path(arm.best.checkpoint).is_dir()
    # each trial keeps one checkpoint; only each arm's best keeps its optimizer state
    trial_dirs = list((out / "ray" / "sweep").glob("train_dynsdpb_*"))
    assert len(trial_dirs) == 12
    for d in trial_dirs:
        assert len(list(d.glob("checkpoint_*"))) == 1, d
        # Tune's JSON log only: no TensorBoard events or CSV beside MLflow (sweep.create_loggers)
        assert (d / "result.json").stat().st_size > 0 and not list(d.glob("events.out.tfevents*")), d
        assert not (d / "progress.csv").exists(), d
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ  # scoped to the sweep's fit
    with_optimizer = {p.parent for p in (out / "ray" / "sweep").rglob("optimizer.pt")}
    bests = {Path(a.best.checkpoint) for a in state.arms.values()}
    owners = [{b for b in bests if b == d or b in d.parents} for d in with_optimizer]
    assert all(len(o) == 1 for o in owners), owners  # every optimizer state lies in one arm's best...
    assert set().union(*owners) == bests and len(with_optimizer) == len(state.arms)  # ...and each best has one
    assert state.disk_bytes and state.disk_bytes > 0


def test_optuna_studies_hold_one_trial_per_tune_trial(tiny_sweep):
    import optuna

    from tune_dynsdpb.searching import create_journal_storage, study_name
    from tune_dynsdpb.state import open_sweep

    out, _ = tiny_sweep
    state = open_sweep(out)
    client = client_for(f"sqlite:///{out}/mlflow.db")
    storage = create_journal_storage(str(out / "optuna.journal"))
    for arm in state.arms.values():
        study = optuna.load_study(study_name=study_name("tiny", (arm.task, arm.method)), storage=storage)
        trials = study.get_trials()
        runs = [r for r in runs_by_role(client, "tiny")["trial"] if r.data.tags["tune_dynsdpb.task"] == arm.task
                and r.data.tags["tune_dynsdpb.arm"] == arm.method]
        assert len(trials) == len(runs) == 2
        mode = state.tasks[arm.task].mode
        # same parameters, and the study's value is the trial's last objective (the signed metric)
        by_params = {tuple(sorted((k, round(float(v), 9)) for k, v in t.params.items())): t for t in trials}
        for r in runs:
            searched = {k: round(float(r.data.params[k]), 9) for k in trials[0].params}
            t = by_params[tuple(sorted(searched.items()))]
            last = r.data.metrics[state.tasks[arm.task].metric]
            if t.state == optuna.trial.TrialState.COMPLETE:
                assert t.value == pytest.approx(last if mode == "max" else -last)


def test_summary_names_the_trivial_baseline(tiny_sweep, capsys):
    from tune_dynsdpb.state import open_sweep
    from tune_dynsdpb.console import print_summary

    out, _ = tiny_sweep
    print_summary(open_sweep(out), out)
    text = capsys.readouterr().out
    assert "vs trivial baseline" in text and "majority 0.5" in text
    assert "optuna-dashboard" in text and "mlflow ui --backend-store-uri sqlite:///" in text


# -- interleaving: arms share the cluster -------------------------------------------------------
INTERLEAVE = """
import json, sys, ray
sys.path.insert(0, {tests!r})
import sweeps
from tune_dynsdpb.sweep import run_sweep
ray.init(num_cpus=6, _temp_dir={tmp!r}, include_dashboard=False, log_to_driver=False)
from pathlib import Path
run_sweep(sweeps.spec_file(Path({root!r}), {model!r}, name="mix", num_samples=2, grace_period=2),
          output_dir={out!r}, data_dir={data!r}, progress=False)
"""


def test_arms_run_at_the_same_time_on_six_slots(tiny_bert, data_dir, tmp_path):
    """On a local Ray with 6 CPU slots, trials of different arms overlap in time."""
    out = tmp_path / "out"
    code = INTERLEAVE.format(tests=str(ROOT / "tests"), tmp=guards.short_dir(),
                             root=str(tmp_path), model=str(tiny_bert), out=str(out), data=str(data_dir))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_for(f"sqlite:///{out}/mlflow.db")
    spans = []
    for r in runs_by_role(client, "mix")["trial"]:  # from the trial's own clock: report time - time in the trial
        last = max(client.get_metric_history(r.info.run_id, "time_total_s"), key=lambda m: m.timestamp)
        spans.append((r.data.tags["tune_dynsdpb.arm"], last.timestamp - 1000 * last.value, last.timestamp))
    overlapping = {(a, b) for a, s1, e1 in spans for b, s2, e2 in spans if a != b and s1 < e2 and s2 < e1}
    # one Tuner per arm in sequence (the old design) never overlaps two arms; which pairs overlap
    # here depends on when each trial actor finished starting on 2 busy cores
    assert overlapping, spans


# -- faults: crashes, divergence, signals ---------------------------------------------------------
def kill_on_first_checkpoint(monkeypatch, tmp_path, target: str) -> Path:
    """A real crash in the sweep's own Tuner, through Ray Tune's RAY_TUNE_CALLBACKS (tests/faults.py):
    once Tune holds a trial's first checkpoint, ``target`` is SIGKILLed. Returns the token file,
    which is gone once the crash was delivered."""
    import faults

    token = tmp_path / "kill.token"
    token.write_text("")
    monkeypatch.setenv("RAY_TUNE_CALLBACKS", faults.ENV)
    monkeypatch.setenv("KILL_TOKEN", str(token))
    monkeypatch.setenv("KILL_TARGET", target)
    return token


def test_crash_is_retried_from_its_checkpoint(ray_session, tiny_bert, data_dir, tmp_path, monkeypatch):
    """A trial process killed after its first checkpoint: the sweep's Tuner retries it from there."""
    from faults import killed
    from tune_dynsdpb.sweep import run_sweep

    token = kill_on_first_checkpoint(monkeypatch, tmp_path, "trial")
    out = tmp_path / "sweep"
    # grace_period = max_t: ASHA stops nothing, so every status below comes from the fault
    state = run_sweep(spec_file(tmp_path, tiny_bert, name="crash", methods=["dynsdpb"], grace_period=2),
                      output_dir=out, data_dir=str(data_dir), progress=False)
    assert len(killed(token)) == 1  # the fault was delivered
    client = client_for(f"sqlite:///{out}/mlflow.db")
    runs = runs_by_role(client, "crash")["trial"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (retried,) = [r for r in runs if int(r.data.tags.get("tune_dynsdpb.retries", 0)) >= 1]
    steps = [m.step for m in client.get_metric_history(retried.info.run_id, "step")]
    assert steps == sorted(set(steps)) and retried.data.metrics["final"] == 1.0  # continued, not from step 0
    assert state.arms["rte/dynsdpb"].counts == {"FINISHED": 2}


def stopped_sweep(tmp_path, tiny_bert, data_dir, name: str, sig, num_samples: int, **extra):
    """A sweep of dlb and dynsdpb trials of 4 epochs x 2 evaluations, none stopped early (so it
    outlasts its first trial), whose driver gets ``sig`` once a trial has finished; returns
    (output folder, environment, exit status, stderr)."""
    spec = spec_file(tmp_path, tiny_bert, name=name, methods=["dlb", "dynsdpb"], num_samples=num_samples,
                     grace_period=8, params={"common": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                                        "num_train_epochs": 4, "per_device_train_batch_size": 16}},
                     **extra)
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_TMPDIR": guards.short_dir(), "RAY_AUTH_MODE": "disabled"}
    proc = helpers.start_sweep(spec, data_dir, out, env)
    try:
        helpers.wait_for_finished_trials(out, proc)
    finally:
        code, err = helpers.signal_driver(proc, sig)
    return out, env, code, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_driver_stopped_then_resumed_runs_exactly_the_budget(tiny_bert, data_dir, tmp_path, sig):
    """Stop the driver mid-sweep (Ctrl-C; SIGTERM as from Slurm or Kubernetes; SIGKILL), resume:
    exactly the budget of trial runs per (task, arm), none RUNNING, no trial id twice, no metric
    step logged twice. SIGINT and SIGTERM stop cleanly (exit 130, the resume line)."""
    name = f"stop{sig.value}"
    out, env, code, err = stopped_sweep(tmp_path, tiny_bert, data_dir, name, sig, num_samples=3)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 130, err[-2000:]
        assert "continue it with tune-dynsdpb sweep --resume" in err
        assert json.loads((out / "sweep.json").read_text())["status"] == "interrupted"
    resumed = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", "--resume", "--output-dir",
                              str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # --no-progress (a job's log): no live table, but the header and the summary
    assert "model " in resumed.stdout and "rte: best per arm" in resumed.stdout and "MLflow: experiment" in resumed.stdout
    assert "┃ running ┃" not in resumed.stdout
    check_tree(client_for(f"sqlite:///{out}/mlflow.db"), name, ["rte"], ["dlb", "dynsdpb"], 3)
    state = json.loads((out / "sweep.json").read_text())
    assert state["status"] == "finished"
    assert all(a["started"] == 3 for a in state["arms"].values())


def test_a_time_budget_ends_the_sweep_and_a_resume_gets_only_the_time_left(tiny_bert, data_dir, tmp_path):
    """``budget.time_budget_s`` ends a sweep that has trials left (exit 0, finished, not "unfinished").
    Stopped by Ctrl-C first and resumed, Tune brings its time stopper back with the time that was left:
    the resume ends when that is spent, as finished (before, the resume measured the whole budget
    from its own start, called the sweep unfinished and stopped as interrupted, at every resume)."""
    out, env, code, err = stopped_sweep(tmp_path, tiny_bert, data_dir, "timed", signal.SIGINT, num_samples=50,
                                        budget={"time_budget_s": 30})
    assert code == 130, err[-2000:]  # stopped before its time was up
    resumed = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", "--resume", "--output-dir",
                              str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "unfinished" not in resumed.stderr
    state = json.loads((out / "sweep.json").read_text())
    assert state["status"] == "finished"
    assert 0 < sum(a["started"] for a in state["arms"].values()) < 100  # the time ran out, not the trials
    # a finished sweep resumed again (a job's retry): nothing runs, nothing is logged again
    before = {p: p.read_bytes() for p in (out / "sweep.json", out / "mlflow.db")}
    again = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", "--resume", "--output-dir", str(out),
                            "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep timed: finished; nothing to resume" in again.stdout and "rte: best per arm" in again.stdout
    assert {p: p.read_bytes() for p in before} == before


def test_two_worker_trial_inside_tune(ray_session, tiny_bert, data_dir, tmp_path, monkeypatch):
    """The real trainer on 2 DDP workers (gloo) as one Tune trial, one of whose workers is killed
    after the trial's first checkpoint: Tune retries it from that checkpoint, and it ends at the
    single-run step."""
    from faults import killed
    from tune_dynsdpb.sweep import run_sweep

    token = kill_on_first_checkpoint(monkeypatch, tmp_path, "train-worker")
    out = tmp_path / "sweep"
    # 4 epochs: the kill after the first checkpoint (step 2) lands with 14 of 16 steps to go (at 1
    # epoch, a loaded machine could finish the last 2 steps before the signal: no failure, no retry)
    spec = spec_file(tmp_path, tiny_bert, name="ddp", methods=["dynsdpb"], num_samples=1, grace_period=8,
                     resources={"cpus_per_trial": 2, "workers_per_trial": 2},
                     params={"common": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                        "num_train_epochs": 4, "per_device_train_batch_size": 16}})
    work_folders = set(Path(tempfile.gettempdir()).glob("dynsdpb-ddp-*"))
    state = run_sweep(spec, output_dir=out, data_dir=str(data_dir), progress=False)
    assert len(killed(token)) == 1  # one worker was killed
    assert state.arms["rte/dynsdpb"].best is not None
    client = client_for(f"sqlite:///{out}/mlflow.db")
    (run,) = runs_by_role(client, "ddp")["trial"]
    consistency = [m.value for m in client.get_metric_history(run.info.run_id, "consistency_loss")]
    assert run.info.status == "FINISHED" and max(consistency) > 0  # (late in training it is ~0)
    assert int(run.data.tags["tune_dynsdpb.retries"]) == 1
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step")]
    assert steps == sorted(set(steps)), steps  # continued from its checkpoint: no step logged twice
    # 64 train samples over 2 ranks, B/2 = 8 new ones per rank and step: 4 steps per epoch, each
    # passing 16 samples on each of the 2 ranks (sample-passes count both workers)
    assert run.data.metrics["step"] == 4 * 4 and run.data.metrics["sample_passes"] == 4 * 4 * 16 * 2
    # the DDP work folder goes: the trial removes it, and the reaper again once the workers are gone
    # (a worker still saving could recreate it after the trial's own removal)
    deadline = time.time() + 60
    while set(Path(tempfile.gettempdir()).glob("dynsdpb-ddp-*")) - work_folders and time.time() < deadline:
        time.sleep(1)
    assert set(Path(tempfile.gettempdir()).glob("dynsdpb-ddp-*")) - work_folders == set()


# -- the output folder ----------------------------------------------------------------------------
def test_a_second_driver_on_the_same_folder_exits_2(tiny_bert, data_dir, tmp_path):
    spec = spec_file(tmp_path, tiny_bert, name="lock", methods=["dlb"], num_samples=2, grace_period=2)
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_TMPDIR": guards.short_dir(), "RAY_AUTH_MODE": "disabled"}
    first = subprocess.Popen([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", str(spec), "--data-dir",
                              str(data_dir), "--output-dir", str(out), "--no-progress"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "sweep.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        second = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", "--resume", "--output-dir",
                                 str(out)], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip() == f"tune-dynsdpb: error: --output-dir: {out} is in use by another " \
                                        "tune-dynsdpb driver"
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        first.wait()


def test_a_password_in_the_tracking_uri_is_stored_printed_and_logged_nowhere(mlflow_server, tiny_bert, data_dir,
                                                                             tmp_path):
    """A sweep against a real `mlflow server` with `http://user:password@host`: the password reaches
    MLflow through MLFLOW_TRACKING_PASSWORD only; no file of the output folder (Tune's pickles
    included), no MLflow record and no console line holds it."""
    secret = "s3cr3t-Pa55w0rd"
    uri = mlflow_server.replace("http://", f"http://alice:{secret}@")
    spec = spec_file(tmp_path, tiny_bert, name="secret", methods=["dlb"], num_samples=1, grace_period=2)
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_TMPDIR": guards.short_dir(), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", str(spec), "--data-dir", str(data_dir),
                           "--output-dir", str(out), "--tracking-uri", uri], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secret not in proc.stdout + proc.stderr
    assert mlflow_server in proc.stdout  # the summary names the store, without the password
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) > 20 and any(f.name == "tuner.pkl" for f in files)
    assert [f for f in files if secret.encode() in f.read_bytes()] == []
    client = client_for(mlflow_server)
    exp = client.get_experiment_by_name("secret")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 4  # sweep, task, arm, trial
    records = json.dumps([{"params": r.data.params, "tags": r.data.tags} for r in runs]) + json.dumps(exp.tags)
    assert secret not in records
