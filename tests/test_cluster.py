"""Sweeps on real multi-process Ray clusters: a head started by `ray start` in another process
(token authentication, as a user joins a cluster), and a 3-node `ray.cluster_utils.Cluster` that
loses a node mid-sweep. Each runs its driver in a subprocess, apart from the session's Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import guards
import helpers
from sweeps import check_tree, client_for, spec_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def token_head(tmp_path):
    """`ray start --head` in its own process group, with token authentication on; torn down by
    killing that group (never `ray stop`, which would stop every Ray on the machine)."""
    port, token = helpers.free_port(), "a" * 32
    temp = guards.short_dir("h")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(tmp_path)}
    proc = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--block",
                             f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    def up():
        if proc.poll() is not None:
            pytest.fail("ray start failed: " + proc.stderr.read()[-2000:])
        if not list(Path(temp).glob("session_*/sockets/raylet*")):
            return False
        with socket.create_connection(("127.0.0.1", port), timeout=1):  # its GCS takes connections
            return True

    helpers.wait_for(up, 120, "the Ray head to take connections")
    yield f"127.0.0.1:{port}", token
    helpers.stop_process_group(proc, timeout=30, leader=True)


def test_joining_a_token_cluster_started_in_another_process(token_head, tiny_bert, data_dir, tmp_path):
    address, token = token_head
    spec = spec_file(tmp_path, tiny_bert, name="join", methods=["dlb"], num_samples=1, grace_period=2)
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    cmd = [sys.executable, "-m", "tune_dynsdpb.cli", "sweep", str(spec), "--data-dir", str(data_dir),
           "--ray-address", address, "--no-progress"]
    # without the token: one line saying what to set, exit 2, no trial
    no = subprocess.run([*cmd, "--output-dir", str(tmp_path / "no")], capture_output=True, text=True, timeout=300,
                        env={**base, "HOME": str(home)})
    assert no.returncode == 2, no.stderr[-2000:]
    line = no.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tune-dynsdpb: error: --ray-address: cannot join Ray at '{address}': ")
    assert line.endswith("; if the cluster uses token authentication (Ray's default), set RAY_AUTH_TOKEN (or "
                         "~/.ray/auth_token) to the head's token (`ray get-auth-token` on the head)")
    assert not (tmp_path / "no").exists()
    # with the token in RAY_AUTH_TOKEN (and RAY_AUTH_MODE unset): the sweep runs on that cluster
    yes = subprocess.run([*cmd, "--output-dir", str(tmp_path / "yes")], capture_output=True, text=True, timeout=600,
                         env={**base, "HOME": str(home), "RAY_AUTH_TOKEN": token})
    assert yes.returncode == 0, yes.stderr[-3000:]
    state = json.loads((tmp_path / "yes" / "sweep.json").read_text())
    assert state["arms"]["rte/dlb"]["counts"] == {"FINISHED": 1}


NODE_LOSS = """
import json, sys, threading, time
import psutil
from pathlib import Path
sys.path.insert(0, {tests!r})
import ray
from ray.cluster_utils import Cluster
import sweeps
from tune_dynsdpb.sweep import run_sweep

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
out = Path({out!r})
removed, ended = [], threading.Event()

def training_on(node):
    # the node's worker processes, and whether one of them is inside a trial's `train` call: Ray
    # titles a busy actor "ray::Class.method" and an idle one "ray::Class"
    workers = psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True)
    titles = []
    for w in workers:
        try:
            titles.append(" ".join(w.cmdline()))
        except psutil.Error:  # gone meanwhile
            pass
    return workers, any(t.startswith("ray::ImplicitFunc.train") for t in titles)

def remove_a_node():
    # once some trial has checkpoints to come back from, and a trial is training on a node that
    # is not the head, that node goes (SIGKILL, no draining), and the trial with it
    deadline = time.time() + 300
    while time.time() < deadline and not ended.is_set():
        started = any(len(list(d.glob("checkpoint_*"))) >= 2 for d in out.glob("ray/sweep/train_*"))
        if started:
            for node in nodes:
                workers, busy = training_on(node)
                if busy:
                    cluster.remove_node(node, allow_graceful=False)
                    gone_by = time.time() + 10  # the node's workers notice their raylet is gone and exit
                    while any(w.is_running() for w in workers) and time.time() < gone_by:
                        time.sleep(0.1)
                    removed.append({{"workers_left": sum(w.is_running() for w in workers)}})
                    return
        time.sleep(0.05)

remover = threading.Thread(target=remove_a_node, daemon=True)
remover.start()
try:
    state = run_sweep(sweeps.spec_file(Path({root!r}), {model!r}, name="nodes", methods=["dlb", "dynsdpb"],
                                       num_samples=3, grace_period=20, params={{"common": {{"learning_rate": 1e-3,
                                       "num_train_epochs": 10, "per_device_train_batch_size": 4}}}}),
                      output_dir=out, data_dir={data!r}, progress=False)
    print(json.dumps({{"removed": removed, "alive": sum(n["Alive"] for n in ray.nodes())}}), flush=True)
finally:
    # The driver leaves before its cluster goes. Left to the interpreter's exit, the Cluster's
    # per-node atexit hooks (registered after `import ray`'s own, so run before it) kill the head's
    # raylet while this driver is still connected to it; the driver then fails to recover the
    # objects it put there (tune.with_parameters' jobs and data) and its core worker, finding its
    # plasma store gone, ends the process with exit status 1 -- after the sweep has finished.
    ended.set()
    remover.join(timeout=60)
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_node_lost_mid_sweep_costs_retries_not_budget(tiny_bert, data_dir, tmp_path):
    """3 nodes, one removed while trials run on it: its trials come back from their checkpoints on
    the other nodes, and the sweep ends with exactly its budget and no duplicated runs."""
    out = tmp_path / "out"
    code = NODE_LOSS.format(tests=str(ROOT / "tests"), root=str(tmp_path), model=str(tiny_bert), out=str(out),
                            data=str(data_dir))
    env = {**os.environ, "RAY_TMPDIR": guards.short_dir("c"), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=840, env=env)
    noise = ("Loading weights", "Writing model shards", "(raylet)", "pid=")
    assert proc.returncode == 0, "\n".join(ln for ln in proc.stderr.splitlines() if not any(n in ln for n in noise))[-4000:]
    info = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"removed"')))
    assert len(info["removed"]) == 1 and info["removed"][0]["workers_left"] == 0, info  # died with their node
    client = client_for(f"sqlite:///{out}/mlflow.db")
    runs = check_tree(client, "nodes", ["rte"], ["dlb", "dynsdpb"], 3)
    assert all(r.info.status == "FINISHED" for r in runs["trial"])
    retried = {r.data.tags["ray.trial_id"]: int(r.data.tags.get("tune_dynsdpb.retries", 0)) for r in runs["trial"]}
    assert sum(retried.values()) >= 1, retried  # the killed trial came back
