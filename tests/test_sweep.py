"""`tune-dynsdpb sweep` end to end: real Ray, real Optuna, real MLflow (SQLite and a real server)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import helpers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def spec_file(tmp_path: Path, model: Path, name="e2e", methods=("vanilla", "dlb", "dynsdpb"), num_samples=3,
              grace_period=1, **extra) -> Path:
    spec = {
        "name": name, "task": "rte", "model": str(model), "max_length": 32, "methods": list(methods), "seed": 0,
        "budget": {"num_samples": num_samples, "evals_per_epoch": 2, "grace_period": grace_period,
                   "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1},
        "params": {
            "common": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "num_train_epochs": 1,
                       "per_device_train_batch_size": 16},
            "dlb": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0}},
            "dynsdpb": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0},
                        "lambda_alpha": {"low": 0.0, "high": 1.0}, "lambda_tau": {"low": 0.0, "high": 1.0}},
        },
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def ray_session():
    import ray
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp
    ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def client_for(uri):
    from mlflow import MlflowClient
    return MlflowClient(uri)


def runs_by_role(client, experiment_name):
    exp = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = {"sweep": [], "arm": [], "trial": []}
    for r in runs:
        out[r.data.tags["tune_dynsdpb.role"]].append(r)
    return out


def check_sweep_tracking(client, name, methods, budget):
    runs = runs_by_role(client, name)
    (parent,) = runs["sweep"]
    assert parent.info.status == "FINISHED"
    arms = {r.data.tags["tune_dynsdpb.arm"]: r for r in runs["arm"]}
    assert set(arms) == set(methods)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in arms.values())
    for method in methods:
        trials = [r for r in runs["trial"] if r.data.tags["tune_dynsdpb.arm"] == method]
        assert len(trials) == budget
        assert len({r.data.tags["ray.trial_id"] for r in trials}) == budget  # none duplicated
        assert all(r.data.tags["mlflow.parentRunId"] == arms[method].info.run_id for r in trials)
        for r in trials:
            assert r.info.status in {"FINISHED", "KILLED"}
            finished = r.data.metrics.get("final") == 1.0
            assert (r.info.status == "FINISHED") == finished, (r.info.status, r.data.metrics.get("final"))
            assert "eval_accuracy" in r.data.metrics and r.data.params["method"] == method
            if method != "vanilla":
                for key in ("consistency_loss", "alpha_mean", "alpha_min", "alpha_max", "tau_mean", "tau_min",
                            "tau_max", "u_mean", "c_mean"):
                    assert key in r.data.metrics, key
        # the best-per-arm record on the parent is the best score any of the arm's trials reported
        best = max(max(m.value for m in client.get_metric_history(r.info.run_id, "eval_accuracy")) for r in trials)
        assert parent.data.metrics[f"best_{method}_eval_accuracy"] == pytest.approx(best)
        best_run = parent.data.tags[f"best.{method}.run_id"]
        assert best_run in {r.info.run_id for r in trials}
        assert max(m.value for m in client.get_metric_history(best_run, "eval_accuracy")) == pytest.approx(best)
    return runs


def test_sweep_three_arms_into_sqlite(ray_session, tiny_bert, data_dir, tmp_path):
    from tune_dynsdpb.sweep import run_sweep
    out = tmp_path / "sweep"
    results = run_sweep(spec_file(tmp_path, tiny_bert), output_dir=out, data_dir=str(data_dir), progress=False)
    assert [r.method for r in results] == ["vanilla", "dlb", "dynsdpb"]
    uri = f"sqlite:///{out}/mlflow.db"
    check_sweep_tracking(client_for(uri), "e2e", ["vanilla", "dlb", "dynsdpb"], 3)
    state = json.loads((out / "sweep.json").read_text())
    assert all(arm["status"] == "done" for arm in state["arms"].values())
    # only the best checkpoint survives per trial
    for trial_dir in (out / "ray").glob("*/train_dynsdpb_*"):
        assert len(list(trial_dir.glob("checkpoint_*"))) <= 1
    # dynsdpb trials record the DynSDPB state file in their checkpoints
    assert list((out / "ray" / "dynsdpb").glob("*/checkpoint_*/dynsdpb_state_rank0.pt"))


def test_sweep_against_a_real_mlflow_server(ray_session, mlflow_server, tiny_bert, data_dir, tmp_path):
    from tune_dynsdpb.sweep import run_sweep
    run_sweep(spec_file(tmp_path, tiny_bert, name="server"), output_dir=tmp_path / "sweep", data_dir=str(data_dir),
              tracking_uri=mlflow_server, progress=False)
    check_sweep_tracking(client_for(mlflow_server), "server", ["vanilla", "dlb", "dynsdpb"], 3)
    assert not (tmp_path / "sweep" / "mlflow.db").exists()


def test_crash_is_retried_from_checkpoint_and_nan_fails_only_its_trial(ray_session, tiny_bert, data_dir, tmp_path,
                                                                       monkeypatch):
    """One trial gets a crash after its first checkpoint, another a NaN loss; the sweep goes on."""
    from tune_dynsdpb.sweep import run_sweep
    crash, nan = tmp_path / "crash.token", tmp_path / "nan.token"
    crash.write_text("")
    nan.write_text("")
    # Ray's workers are already running: the tokens reach them through the trial's env. Tune's
    # trainable processes read os.environ at claim time, so set it in the Ray job's runtime env.
    import ray
    ray.shutdown()
    monkeypatch.setenv("TUNE_DYNSDPB_CRASH_TOKEN", str(crash))
    monkeypatch.setenv("TUNE_DYNSDPB_NAN_TOKEN", str(nan))
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    out = tmp_path / "sweep"
    # grace_period = max_t: ASHA stops nothing, so every status below comes from the faults
    run_sweep(spec_file(tmp_path, tiny_bert, name="faults", methods=["dynsdpb"], grace_period=2),
              output_dir=out, data_dir=str(data_dir), progress=False)
    assert not crash.exists() and not nan.exists()  # both faults were delivered
    runs = runs_by_role(client_for(f"sqlite:///{out}/mlflow.db"), "faults")["trial"]
    assert len(runs) == 3
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and "non-finite" in failed[0].data.tags["tune_dynsdpb.failure"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 2
    retried = [r for r in finished if int(r.data.tags.get("tune_dynsdpb.retries", 0)) >= 1]
    assert len(retried) == 1
    # the retry continued from the checkpoint: it reported steps after the first one, not from 0 again
    steps = [m.step for m in client_for(f"sqlite:///{out}/mlflow.db").get_metric_history(retried[0].info.run_id,
                                                                                        "eval_accuracy")]
    assert steps == sorted(set(steps)) and retried[0].data.metrics["final"] == 1.0


def test_interrupt_and_resume_runs_exactly_the_budget(tiny_bert, data_dir, tmp_path):
    """Ctrl-C the sweep mid-way, resume it: every budgeted trial has exactly one MLflow run.
    (Tune returns early on SIGINT; the arm must not be taken as done.)"""
    spec = spec_file(tmp_path, tiny_bert, name="resume", methods=["dlb", "dynsdpb"], num_samples=3)
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp")}
    cmd = [sys.executable, "-m", "tune_dynsdpb.cli", "sweep", str(spec), "--data-dir", str(data_dir),
           "--output-dir", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    uri = f"sqlite:///{out}/mlflow.db"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # wait until some trials have finished
            time.sleep(2)
            if proc.poll() is not None:
                pytest.fail("the sweep ended before it could be interrupted")
            try:
                done = [r for r in runs_by_role(client_for(uri), "resume")["trial"] if r.info.status == "FINISHED"]
            except Exception:
                continue
            if len(done) >= 2:
                break
        else:
            pytest.fail("no trial finished in time")
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            assert proc.wait(timeout=120) == 130
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind
            except ProcessLookupError:
                pass
            proc.wait()
    state = json.loads((out / "sweep.json").read_text())
    assert [a["status"] for a in state["arms"].values()].count("done") < 2
    code = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", "--resume", "--output-dir", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr[-3000:]
    check_sweep_tracking(client_for(uri), "resume", ["dlb", "dynsdpb"], 3)


def test_two_worker_trial_inside_tune(ray_session, tiny_bert, data_dir, tmp_path):
    from tune_dynsdpb.sweep import run_sweep
    out = tmp_path / "sweep"
    spec = spec_file(tmp_path, tiny_bert, name="ddp", methods=["dynsdpb"], num_samples=1,
                     resources={"cpus_per_trial": 2, "workers_per_trial": 2})
    (result,) = run_sweep(spec, output_dir=out, data_dir=str(data_dir), progress=False)
    assert result.score is not None
    (run,) = runs_by_role(client_for(f"sqlite:///{out}/mlflow.db"), "ddp")["trial"]
    assert run.info.status == "FINISHED" and run.data.metrics["consistency_loss"] > 0
    # 2 ranks x 16 samples per step: sample-passes count both workers
    assert run.data.metrics["sample_passes"] == run.data.metrics["step"] * 32


# -- bad input: rejected before any trial starts -------------------------------------------------
def cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", *argv], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def assert_rejected(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("tune-dynsdpb: error:") and "Traceback" not in proc.stderr
    for n in needles:
        assert n in line, (n, line)


def test_rejects_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nparams: [unclosed\n")
    assert_rejected(cli(str(bad)), "bad.yaml")


def test_rejects_unknown_method(tiny_bert, data_dir, tmp_path):
    assert_rejected(cli(str(spec_file(tmp_path, tiny_bert)), "--methods", "dlb", "sdpb", "--data-dir",
                        str(data_dir), "--output-dir", str(tmp_path / "o")), "sdpb")


def test_rejects_inverted_range(tiny_bert, tmp_path):
    spec = spec_file(tmp_path, tiny_bert)
    text = spec.read_text().replace("high: 4.0", "high: 0.5", 1)
    spec.write_text(text)
    assert_rejected(cli(str(spec)), "tau0")


def test_rejects_resources_no_node_has(tiny_bert, data_dir, tmp_path):
    spec = spec_file(tmp_path, tiny_bert, resources={"cpus_per_trial": 1, "gpus_per_trial": 1})
    proc = cli(str(spec), "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "o"),
               env={"RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp")})
    assert_rejected(proc, "resources", "GPU")
    assert not list((tmp_path / "o").glob("ray/*"))


def test_rejects_unreachable_tracking_uri(tiny_bert, data_dir, tmp_path):
    proc = cli(str(spec_file(tmp_path, tiny_bert)), "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "o"),
               "--tracking-uri", f"http://127.0.0.1:{helpers.free_port()}")
    assert_rejected(proc, "127.0.0.1")


def test_rejects_data_folder_without_the_task(tiny_bert, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert_rejected(cli(str(spec_file(tmp_path, tiny_bert)), "--data-dir", str(empty), "--output-dir",
                        str(tmp_path / "o")), "RTE")


def test_rejects_resume_without_a_sweep(tmp_path):
    assert_rejected(cli("--resume", "--output-dir", str(tmp_path)), "holds no sweep")
