"""The storage path end to end, on a local folder and on a real S3 (SeaweedFS from the venv's
``weed`` binary): sweep -> compare -> export on both, a sweep taken over from the storage path
alone into a new folder, the storage preflight (wrong key, missing bucket, endpoint down), and an
MLflow artifact store that fails during ``compare`` (a real ``mlflow server`` whose artifact folder
is taken away, then given back).

The CLI runs as a subprocess wherever Ray starts, so the trial workers inherit the ``AWS_*``
variables of the driver, as on a machine where they are set; the storage module is tested directly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import guards
import helpers
from sweeps import check_tree, client_for, spec_file
from tune_dynsdpb import storage

ROOT = Path(__file__).resolve().parents[1]
ACCESS, SECRET, BUCKET = "tdsTESTKEY", "tdsTESTSECRET", "tds-test"


# -- the driver's lease on a storage path (fast: refused before Ray starts) --------------------------
def test_a_second_driver_on_a_leased_storage_path_exits_2_and_a_stale_lease_is_taken_over(tmp_path, capsys):
    from tune_dynsdpb.cli import main
    from tune_dynsdpb.state import LEASE_FILE, LEASE_TTL_S, hold_lease

    where = tmp_path / "storage"
    where.mkdir()
    lease = where / LEASE_FILE
    lease.write_text(json.dumps({"host": "other-machine", "pid": 4242, "heartbeat": time.time()}))
    spec = spec_file(tmp_path, tmp_path / "model", name="leased", methods=["dlb"], num_samples=1)
    code = main(["sweep", str(spec), "--storage-path", str(where), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    import re

    assert code == 2 and len(err) == 1 and re.fullmatch(
        re.escape(f"tune-dynsdpb: error: --storage-path: {where} is in use by the tune-dynsdpb driver on "
                  "other-machine (pid 4242, heartbeat ") + r"\d+" + re.escape(
            f" s ago); a driver silent for {LEASE_TTL_S:.0f} s is taken over"), err[0]), err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert json.loads(lease.read_text())["host"] == "other-machine"  # the other driver's lease untouched

    lease.write_text(json.dumps({"host": "other-machine", "pid": 4242, "heartbeat": time.time() - LEASE_TTL_S - 1}))
    with hold_lease(str(where)):  # silent for longer than the TTL: taken over
        assert json.loads(lease.read_text())["pid"] == os.getpid()
    assert not lease.exists()  # given back at the end


# -- the storage module on a local folder (fast) ---------------------------------------------------
def test_the_journal_is_mirrored_whenever_tune_saves_the_experiment_state(tmp_path):
    """Tune saves the searchers' state, then asks each callback for its state, then syncs both to the
    storage path: the journal mirrored at that moment is at least as new as the stored searchers
    (a driver SIGKILLed between a searcher's new trial and that trial's start, then resumed from
    storage, once found a searcher whose Optuna trial its journal lacked: 'Record does not exist.')."""
    from ray.tune.callback import CallbackList

    from tune_dynsdpb.state import JOURNAL_FILE
    from tune_dynsdpb.tuning import JournalMirror

    local, remote = tmp_path / "optuna.journal", tmp_path / "storage"
    remote.mkdir()
    local.write_text('{"op_code": 0}\n')
    JournalMirror.current = (str(local), str(remote))
    try:
        CallbackList([JournalMirror()]).save_to_dir(str(tmp_path / "staging"))  # as TuneController.save_to_dir
        assert (remote / JOURNAL_FILE).read_text() == local.read_text()
        local.write_text(local.read_text() + '{"op_code": 4}\n')  # a new trial; the next save carries it
        CallbackList([JournalMirror()]).save_to_dir(str(tmp_path / "staging"))
        assert (remote / JOURNAL_FILE).read_text() == local.read_text()
    finally:
        JournalMirror.current = None


def test_storage_functions_on_a_local_folder(tmp_path):
    root = str(tmp_path / "store")
    assert not storage.is_uri(root) and storage.is_uri("s3://b/x") and not storage.is_uri("file:///x")
    assert storage.join("s3://b/x/", "sweep", "a") == "s3://b/x/sweep/a"
    assert storage.join("s3://b/x?endpoint_override=h", "y") == "s3://b/x/y?endpoint_override=h"
    assert storage.redact("s3://KEY:SECRET@b/x") == "s3://KEY:***@b/x" and storage.redact(root) == root
    assert storage.to_uri("b/x/sweep", "s3://b/x") == "s3://b/x/sweep" and storage.to_uri("/a/b", "/a") == "/a/b"
    storage.check_storage(root)  # not there yet: its parent is checked, nothing is made
    assert not os.path.exists(root)
    storage.write_text(storage.join(root, "a", "f.json"), '{"x": 1}')
    assert storage.read_text(storage.join(root, "a", "f.json")) == '{"x": 1}'
    assert storage.list_dir(root) == {"a": True} and storage.is_dir(storage.join(root, "a"))
    assert storage.find(root, "f.json") == [str(tmp_path / "store" / "a" / "f.json")]
    assert storage.size(root) == 8
    storage.check_storage(root)
    assert storage.list_dir(root) == {"a": True}  # the probe is gone
    with storage.local_copy(storage.join(root, "a")) as local:
        assert local == str(tmp_path / "store" / "a")
    storage.rmtree(storage.join(root, "a"))
    storage.rmtree(storage.join(root, "a"))  # nothing there: nothing to do
    assert storage.list_dir(root) == {}
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="is not a folder"):
        storage.check_storage(str(tmp_path / "file" / "sub"))


def test_within_and_mirror(tmp_path, capsys):
    """Whether the storage path lies in the sweep folder (then nothing is mirrored and no lease is
    held), and a mirror: the file copied, or one warning line when the storage path cannot take it."""
    out = tmp_path / "out"
    (out / "ray").mkdir(parents=True)
    (tmp_path / "link").symlink_to(out)
    assert storage.within(str(out / "ray"), out) and storage.within(str(out), out)
    assert storage.within(str(tmp_path / "link" / "ray"), out)  # the same folder through a symlink
    assert not storage.within(str(tmp_path / "outside"), out) and not storage.within(str(tmp_path / "out2"), out)
    assert not storage.within("s3://bucket/out", out)
    (out / "j.txt").write_text("journal")
    assert storage.mirror(str(tmp_path / "store"), "j.txt", local=out / "j.txt")
    assert storage.mirror(str(tmp_path / "store"), "s.json", text="{}")
    assert (tmp_path / "store" / "j.txt").read_text() == "journal" and (tmp_path / "store" / "s.json").read_text() == "{}"
    (tmp_path / "file").write_text("x")  # a storage path under a file cannot take anything
    assert not storage.mirror(str(tmp_path / "file"), "s.json", text="{}")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tune-dynsdpb: warning: cannot mirror s.json to "), err


def test_a_state_whose_journal_cannot_be_mirrored_is_not_mirrored_either(tmp_path, capsys):
    """The stored journal is never older than the stored state: when the journal's mirror fails,
    the state's is not written (the local state is)."""
    from tune_dynsdpb.state import JOURNAL_FILE, STATE_FILE, SweepState

    out, store = tmp_path / "out", tmp_path / "store"
    out.mkdir()
    (out / JOURNAL_FILE).write_text("journal")
    (store / JOURNAL_FILE).mkdir(parents=True)  # the journal cannot be written there
    state = SweepState(sweep_id="s", spec={}, spec_path="f.yaml", methods=["dlb"], num_samples=1, tracking_uri="t",
                       model_path="m", created=0.0, storage_path=str(store), tasks={})
    state.save(out, journal=True)
    assert (out / STATE_FILE).is_file() and not (store / STATE_FILE).exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tune-dynsdpb: warning: cannot mirror {JOURNAL_FILE} to "), err
    (store / JOURNAL_FILE).rmdir()
    state.save(out, journal=True)  # the storage back: both go up
    assert (store / JOURNAL_FILE).read_text() == "journal" and (store / STATE_FILE).is_file()


# -- SeaweedFS ------------------------------------------------------------------------------------
def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports() -> list[int]:
    """Four ports whose gRPC twins (port + 10000) are free too, all below 55535."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 45000, 10)
        ports = [base + i for i in range(4)]
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free ports for SeaweedFS")


def start_weed(folder: Path, ports: list[int] | None = None):
    """``weed server`` with S3 on 127.0.0.1 (its own process group); returns (process, ports)."""
    folder.mkdir(parents=True, exist_ok=True)
    ident = {"identities": [{"name": "tester", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
                             "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (folder / "identities.json").write_text(json.dumps(ident))
    ports = ports or _ports()
    s3, master, volume, filer = ports
    weed = str(Path(sys.executable).parent / "weed")
    cmd = [weed, "server", f"-dir={folder}", "-ip=127.0.0.1", "-s3", f"-s3.port={s3}",
           f"-s3.config={folder / 'identities.json'}", f"-master.port={master}", f"-volume.port={volume}",
           f"-filer.port={filer}", "-volume.max=64", "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-master.telemetry=false"]
    with open(folder / "weed.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, ports


def kill_group(proc) -> None:
    """SeaweedFS ignores SIGTERM/SIGINT: SIGKILL to its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                        region_name="us-east-1")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real S3 (SeaweedFS) for the session, with one bucket made here (the product never makes one)."""
    folder = tmp_path_factory.mktemp("seaweedfs")
    proc, ports = start_weed(folder)
    endpoint = f"http://127.0.0.1:{ports[0]}"
    client = s3_client(endpoint)
    deadline = time.time() + 120
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:  # not up yet
            if proc.poll() is not None or time.time() > deadline:
                kill_group(proc)
                pytest.fail("SeaweedFS did not start:\n" + (folder / "weed.log").read_text()[-3000:])
            time.sleep(0.5)
    yield {"endpoint": endpoint, "client": client}
    kill_group(proc)
    remove_weed_sockets(ports)


def remove_weed_sockets(ports: list[int]) -> None:
    """weed's unix sockets (one per gRPC service, always in /tmp), left behind by SIGKILL."""
    for port in [*ports, *(p + 10000 for p in ports)]:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


def s3_env(endpoint: str, key: str = ACCESS, secret: str = SECRET) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3(seaweedfs, monkeypatch):
    """The S3 variables set for this test (and for the subprocesses it starts)."""
    env = s3_env(seaweedfs["endpoint"])
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**seaweedfs, "env": env}


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def cli(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    base = {**os.environ, "RAY_TMPDIR": guards.short_dir(), "RAY_AUTH_MODE": "disabled",
            **(env or {})}
    return subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=base)


# -- the preflight ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong key", "missing bucket", "endpoint down"])
def test_bad_storage_exits_2_with_one_line_before_any_mlflow_run(s3, tiny_bert, data_dir, tmp_path, case):
    env, uri = dict(s3["env"]), f"s3://{BUCKET}/bad-{uuid.uuid4().hex[:6]}"
    cause = {"wrong key": "ACCESS_DENIED", "missing bucket": "bucket 'no-such-bucket' does not exist",
             "endpoint down": "NETWORK_CONNECTION"}[case]
    if case == "wrong key":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "missing bucket":
        uri = "s3://no-such-bucket/x"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{helpers.free_port()}"
    spec = spec_file(tmp_path, tiny_bert, name="bad", methods=["dlb"], num_samples=1)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    start = time.monotonic()
    proc = cli("sweep", spec, "--data-dir", data_dir, "--output-dir", out, "--storage-path", uri,
               "--tracking-uri", f"sqlite:///{db}", "--no-progress", env=env, timeout=120)
    took = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("tune-dynsdpb: error: --storage-path: ") and uri in lines[0], lines[0]
    assert cause in lines[0] and "not-the-secret" not in lines[0], lines[0]
    assert took < 60, took
    assert not db.exists() and not out.exists()  # no MLflow store, no run, no folder left
    assert "no-such-bucket" not in [b["Name"] for b in s3["client"].list_buckets()["Buckets"]]  # never made


# -- sweep -> compare -> export, local and S3 ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_sweep_compare_export_on_a_storage_path(seaweedfs, tiny_bert, data_dir, tmp_path, monkeypatch, where):
    from tune_dynsdpb.cli import main
    from tune_dynsdpb.state import open_sweep

    env = {}
    if where == "s3":
        env = s3_env(seaweedfs["endpoint"])
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        prefix = f"flow-{uuid.uuid4().hex[:6]}"
        uri = f"s3://{BUCKET}/{prefix}"
    else:
        uri = str(tmp_path / "storage")  # outside the sweep folder: mirrored like a remote one
    spec = spec_file(tmp_path, tiny_bert, name=f"flow{where}", methods=["vanilla", "dlb"], num_samples=2)
    out = tmp_path / "out"
    swept = cli("sweep", spec, "--data-dir", data_dir, "--output-dir", out, "--storage-path", uri, "--no-progress",
                env=env)
    assert swept.returncode == 0, swept.stderr[-3000:]
    state = open_sweep(out)
    assert state.storage_path == uri and state.status == "finished"
    check_tree(client_for(f"sqlite:///{out}/mlflow.db"), f"flow{where}", ["rte"], ["vanilla", "dlb"], 2)
    for arm in state.arms.values():
        assert arm.best is not None and arm.best.checkpoint.startswith(uri + "/sweep/train_dynsdpb_")
        assert storage.is_dir(arm.best.checkpoint)
    # the state is mirrored, the lease is gone, each trial kept one checkpoint (the one pruner)
    assert json.loads(storage.read_text(storage.join(uri, "sweep.json")))["status"] == "finished"
    assert storage.is_file(storage.join(uri, "optuna.journal"))
    assert not storage.exists(storage.join(uri, "driver.lease"))
    trials = [n for n, d in storage.list_dir(storage.join(uri, "sweep")).items() if d and n.startswith("train_")]
    assert len(trials) == 4
    for t in trials:
        ckpts = [n for n in storage.list_dir(storage.join(uri, "sweep", t)) if n.startswith("checkpoint_")]
        assert len(ckpts) == 1, (t, ckpts)
    optimizer = storage.find(storage.join(uri, "sweep"), "optimizer.pt")
    assert len(optimizer) == 2 and all(any(f.startswith(a.best.checkpoint) for a in state.arms.values())
                                       for f in optimizer)
    if where == "s3":
        assert keys(seaweedfs["client"], f"{prefix}/sweep/")
        assert not (out / "ray").exists()

    compared = cli("compare", out, "--seeds", "1", env=env)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert (out / "report-epochs" / "report.html").is_file()
    assert not [f for f in storage.find(storage.join(uri, "finals-epochs"), "model.safetensors")]  # no models kept

    assert main(["export", str(out), "--name", f"flow-{where}"]) == 0
    from mlflow import MlflowClient

    registry = MlflowClient(f"sqlite:///{out}/mlflow.db", registry_uri=f"sqlite:///{out}/mlflow.db")
    versions = registry.search_model_versions(f"name = 'flow-{where}'")
    assert {v.tags["tune_dynsdpb.arm"] for v in versions} == {"vanilla", "dlb"}


# -- a driver replaced: the sweep taken over from the storage path alone -------------------------------
def _start_mlflow(folder: Path):
    """A real ``mlflow server`` (SQLite, artifacts proxied to ``folder/art``); returns (proc, url)."""
    port = helpers.free_port()
    (folder / "art").mkdir(parents=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{folder}/s.db", "--artifacts-destination", str(folder / "art"),
           "--workers", "1"]
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            kill_group(proc)
            pytest.fail("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
        time.sleep(0.5)


@pytest.mark.slow
def test_a_sweep_resumed_from_the_storage_path_alone_then_compared_through_a_failing_artifact_store(
        s3, tiny_bert, data_dir, tmp_path):
    """The driver's folder is lost mid-sweep: ``sweep --resume --storage-path URI --output-dir NEW``
    continues it into an empty NEW, and again into a missing one; then ``compare NEW`` runs while
    the MLflow server's artifact store fails (exit 1, one line, the report and finals stay on disk),
    and once the store is back the same command uploads the report without training again;
    ``export NEW`` registers the models from S3."""
    from tune_dynsdpb.cli import main
    from tune_dynsdpb.state import open_sweep

    server, url = _start_mlflow(tmp_path / "mlflow")
    try:
        env = {**s3["env"], "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
        uri = f"s3://{BUCKET}/resume-{uuid.uuid4().hex[:6]}"
        name = "moved"
        spec = spec_file(tmp_path, tiny_bert, name=name, methods=["dlb", "dynsdpb"], num_samples=2, grace_period=4,
                         params={"common": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                            "num_train_epochs": 2, "per_device_train_batch_size": 16}})
        old = tmp_path / "old"
        first = subprocess.Popen(
            [sys.executable, "-m", "tune_dynsdpb.cli", "sweep", str(spec), "--data-dir", str(data_dir),
             "--output-dir", str(old), "--storage-path", uri, "--tracking-uri", url, "--no-progress"],
            env={**os.environ, **env, "RAY_TMPDIR": guards.short_dir(),
                 "RAY_AUTH_MODE": "disabled"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            helpers.wait_for_finished_trials(old, first)
            os.kill(first.pid, signal.SIGINT)
            assert first.wait(timeout=180) == 130, first.stderr.read()[-2000:]
        finally:
            kill_group(first)
        assert json.loads(storage.read_text(storage.join(uri, "sweep.json")))["status"] == "interrupted"
        import shutil
        shutil.rmtree(old)  # the driver's machine is gone

        empty = tmp_path / "new-empty"
        empty.mkdir()
        resumed = cli("sweep", "--resume", "--storage-path", uri, "--output-dir", empty, "--no-progress", env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (empty / "sweep.json").is_file() and (empty / "optuna.journal").is_file()
        check_tree(client_for(url), name, ["rte"], ["dlb", "dynsdpb"], 2)  # exactly the budget, no trial twice
        new = tmp_path / "new-missing"
        again = cli("sweep", "--resume", "--storage-path", uri, "--output-dir", new, "--no-progress", env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        state = open_sweep(new)
        assert state.status == "finished" and all(a.started == 2 for a in state.arms.values())
        check_tree(client_for(url), name, ["rte"], ["dlb", "dynsdpb"], 2)

        # compare NEW while the artifact store fails: the server's artifact folder is a file now
        art = tmp_path / "mlflow" / "art"
        art.rename(art.with_name("art.away"))
        art.write_text("not a folder")
        failed = cli("compare", new, "--seeds", "1", env=env)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1 and len(lines) == 1, failed.stderr[-3000:]
        assert lines[0].startswith("tune-dynsdpb: error: MLflow artifact store mlflow-artifacts:"), lines[0]
        assert "run the same command again" in lines[0] and str(new / "report-epochs") in lines[0]
        report = new / "report-epochs"
        assert (report / "report.html").is_file() and (report / "finals.json").is_file()
        finals = [r.info.run_id for r in client_for(url).search_runs(
            [client_for(url).get_experiment_by_name(name).experiment_id],
            "tags.`tune_dynsdpb.arm` = 'finals-epochs' and tags.`tune_dynsdpb.role` = 'trial'")]
        assert len(finals) == 2
        art.unlink()
        art.with_name("art.away").rename(art)  # the store is back
        start = time.monotonic()
        retried = cli("compare", new, "--seeds", "1", env=env)
        assert retried.returncode == 0, retried.stderr[-3000:]
        assert time.monotonic() - start < 60  # uploads only: no Ray, no finals trained again
        c = client_for(url)
        parent = state.parent_run_id
        assert {Path(a.path).name for a in c.list_artifacts(parent, "report-epochs")} >= {"report.html",
                                                                                         "finals.json"}
        again_finals = c.search_runs([c.get_experiment_by_name(name).experiment_id],
                                     "tags.`tune_dynsdpb.arm` = 'finals-epochs' and tags.`tune_dynsdpb.role` = 'trial'")
        assert sorted(r.info.run_id for r in again_finals) == sorted(finals)
        refused = cli("compare", new, "--seeds", "1", env=env)  # everything is up: the report is done
        assert refused.returncode == 2 and "already exists" in refused.stderr

        from mlflow import MlflowClient

        # export NEW while the artifact store fails: one line, exit 1, nothing registered, the sweep untouched
        art.rename(art.with_name("art.away"))
        art.write_text("not a folder")
        failed = cli("export", new, "--name", "moved", "--tracking-uri", url, env=env)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1 and len(lines) == 1, failed.stderr[-3000:]
        assert lines[0].startswith("tune-dynsdpb: error: MLflow artifact store of ") and \
            "nothing was registered: run the same command again" in lines[0], lines[0]
        assert not MlflowClient(url, registry_uri=url).search_model_versions("name = 'moved'")
        assert all(storage.is_dir(a.best.checkpoint) for a in open_sweep(new).arms.values())
        art.unlink()
        art.with_name("art.away").rename(art)  # the store is back: the same command registers every arm

        assert main(["export", str(new), "--name", "moved", "--tracking-uri", url]) == 0
        versions = MlflowClient(url, registry_uri=url).search_model_versions("name = 'moved'")
        assert {v.tags["tune_dynsdpb.arm"] for v in versions} == {"dlb", "dynsdpb"}
    finally:
        kill_group(server)
