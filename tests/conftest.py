import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

# No hub: every failing hub call would otherwise wait 20-40 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")  # the HF Trainer's own MLflow callback: we log ourselves
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

import guards  # noqa: E402
import helpers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Fixtures that start Ray or a server: a test that uses one must be marked slow (checked at collection).
SLOW_FIXTURES = {"ray_session", "mlflow_server", "tiny_sweep"}


def pytest_collection_modifyitems(config, items):
    """A test that uses a fixture starting Ray or a server must be marked slow: the run stops here."""
    bad = [f"{item.nodeid} (uses {', '.join(sorted(SLOW_FIXTURES & set(item.fixturenames)))})" for item in items
           if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if bad:
        raise pytest.UsageError("tests that start Ray or a server must be marked slow:\n  " + "\n  ".join(bad))


_GUARD: list = []


@pytest.fixture(scope="session", autouse=True)
def _session_guard(tmp_path_factory):
    """Every temporary file under pytest's basetemp; nothing written into the checkout or the
    shared temp dir (guards.WriteGuard); fails the session's last test otherwise."""
    basetemp = tmp_path_factory.getbasetemp()
    mp = pytest.MonkeyPatch()
    for k, v in guards.session_env(basetemp).items():
        mp.setenv(k, v)
    mp.setattr(tempfile, "tempdir", os.environ["TMPDIR"])
    guard = guards.WriteGuard(ROOT, basetemp)
    guard.active = True
    _GUARD.append(guard)
    yield guard
    guard.active = False
    mp.undo()
    guards.remove_ray_temp_dir()
    failures, warnings = guard.problems()
    for w in warnings:
        print("\nwarning: " + w, file=sys.stderr)
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture(autouse=True)
def _name_the_test(request):
    if _GUARD:
        _GUARD[0].current = request.node.nodeid
    yield


@pytest.fixture(autouse=True)
def _fast_lane_guard(request):
    """Fast-lane tests (not marked slow) start no Ray and no server (guards.FastLaneGuard)."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    with guards.FastLaneGuard(request.node.nodeid) as guard:
        yield
    guard.check()


MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _mlflow_uris() -> dict:
    """The MLflow URIs a later test (and every process it starts) would inherit: the variables,
    and, once MLflow is imported, its process-wide tracking and registry URIs."""
    got = {k: os.environ.get(k) for k in MLFLOW_URI_VARIABLES}
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        got.update(tracking=mlflow.get_tracking_uri(), registry=mlflow.get_registry_uri())
    return got


@pytest.fixture(autouse=True)
def _mlflow_uris_put_back(request):
    """A test leaves the MLflow URIs as it found them. (One that did not, a ``monkeypatch.delenv``
    of a variable MLflow itself had set, pointed every later test's registry at a deleted store.)"""
    before = _mlflow_uris()
    yield
    after = _mlflow_uris()
    changed = {k: (before.get(k), v) for k, v in after.items() if k in before and before[k] != v}
    if changed:
        for k in MLFLOW_URI_VARIABLES:  # put them back, so that one leak fails one test
            if before[k] is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = before[k]
        pytest.fail(f"{request.node.nodeid} changed MLflow's URIs and left them so (before, after): {changed}",
                    pytrace=False)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return helpers.write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), num_labels=2)


@pytest.fixture(scope="session")
def tiny_bert3(tmp_path_factory) -> Path:
    return helpers.write_tiny_bert(tmp_path_factory.mktemp("tiny_bert3"), num_labels=3)


@pytest.fixture(scope="session")
def tiny_bert_regression(tmp_path_factory) -> Path:
    return helpers.write_tiny_bert(tmp_path_factory.mktemp("tiny_bert_reg"), num_labels=1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return helpers.write_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return helpers.write_glue_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifacts), shared by the session."""
    d, port = tmp_path_factory.mktemp("mlflow-server"), helpers.free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{d}/s.db", "--artifacts-destination", str(d / "art"),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    with open(d / "server.log", "wb") as log:
        # its own process group: teardown stops the server and every worker it forked
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=d, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    def healthy():
        if proc.poll() is not None:
            return True  # ended: reported below
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        helpers.wait_for(healthy, 120, "the mlflow server")
    finally:
        if proc.poll() is not None or not healthy():
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is not None:
        pytest.fail("mlflow server did not start:\n" + (d / "server.log").read_text()[-3000:])
    yield url
    helpers.stop_process_group(proc)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs), its files in a short tmp dir (unix socket
    paths are limited to ~107 characters); the environment is put back afterwards."""
    import ray

    tmp = guards.ray_temp_dir()
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", tmp)
    mp.setenv("RAY_AUTH_MODE", "disabled")
    helpers.init_ray(tmp)
    yield
    ray.shutdown()
    mp.undo()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sweep(ray_session, tiny_bert, data_dir, tmp_path_factory):
    """One finished sweep shared by the tests that only read it (and by compare/export): two tasks
    (rte scored by eval loss, so seeds differ; sst2 by accuracy) x three arms x two trials."""
    import sweeps
    from tune_dynsdpb.sweep import run_sweep

    root = tmp_path_factory.mktemp("tiny-sweep")
    spec = sweeps.spec_file(root, tiny_bert, name="tiny", tasks=[{"task": "rte", "metric": "loss"}, "sst2"])
    state = run_sweep(spec, output_dir=root / "out", data_dir=str(data_dir), progress=False)
    return root / "out", state
