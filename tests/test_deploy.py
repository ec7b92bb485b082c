"""The deployment forms (deploy/, docs/deploy.md, the README, the local cluster's printed command)
hold together with the code, without starting anything:

- every file parses: the YAML files with yaml.safe_load, the Dockerfile instruction by instruction;
- every `tune-dynsdpb` command in them parses with the real CLI parser (``cli.build_parser()``), and
  every flag it uses is spelled out in full (argparse would accept an abbreviation);
- every `local-cluster.sh` command parses with the local cluster's own parser;
- every environment variable they name exists. The rule: a name is known when
  (a) our code reads it (it appears in tune_dynsdpb/, trainables/ or scripts/), or
  (b) it appears in the Python source of the installed library that reads it (Ray, MLflow,
      botocore, transformers, huggingface_hub, datasets), or
  (c) the same file defines it and expands it (`ENV`/`ARG`, `export NAME=`, an `environment:` entry,
      the compose file's example.env), or, for the docs, a deploy file defines it (a build
      argument); a name a file only sets (an `env:` entry, an export) must be read by (a), (b), (d),
  (d) it is read by a program that is not a Python package here: the short table NON_PYTHON below,
      each with who reads it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAMLS = [DEPLOY / "ray-cluster.yaml", DEPLOY / "kuberay-rayjob.yaml", DEPLOY / "mlflow" / "compose.yaml"]
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = [ROOT / "docs" / "deploy.md", ROOT / "README.md"]
SUBCOMMANDS = ("train", "sweep", "validate", "compare", "export")

NON_PYTHON = {  # (d): name -> who reads it
    "PATH": "the shell", "HOME": "the shell", "PWD": "the shell",
    "DEBIAN_FRONTEND": "apt (Debian)", "PIP_NO_CACHE_DIR": "pip's PIP_<OPTION> environment",
    "PYTHONUNBUFFERED": "the Python interpreter",
    "POSTGRES_USER": "the postgres image", "POSTGRES_PASSWORD": "the postgres image", "POSTGRES_DB": "the postgres image",
    "MINIO_ROOT_USER": "the minio image", "MINIO_ROOT_PASSWORD": "the minio image",
}
LIBRARIES = ("ray", "mlflow", "botocore", "transformers", "huggingface_hub", "datasets")


# -- extraction -----------------------------------------------------------------------------------

def code_blocks(md: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", md, flags=re.S | re.M)


def texts_of(path: Path) -> list[str]:
    """The text in which commands and variables are looked for: a markdown file's code blocks; a
    YAML file's raw text (comments hold examples) and every string value (folded scalars whole)."""
    text = path.read_text()
    if path.suffix == ".md":
        return code_blocks(text)
    if path.suffix == ".yaml":
        out = [text]

        def walk(x):
            if isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
            elif isinstance(x, str):
                out.append(x)
        walk(yaml.safe_load(text))
        return out
    return [text]


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def commands_in(text: str, program: str, words=SUBCOMMANDS) -> list[list[str]]:
    """Each `program SUBCOMMAND ...` in ``text`` as argv (without the program), up to the end of
    its shell command (an operator, a closing quote when it starts inside quotes, a comment)."""
    found = []
    pat = re.compile(rf"(?<![\w/.-]){re.escape(program)}\s+({'|'.join(words)})\b")
    for line in logical_lines(text):
        for m in pat.finditer(line):
            before, rest = line[:m.start()], line[m.start():]
            quote = next((q for q in "\"'`" if before.count(q) % 2 == 1), None)
            if quote:  # e.g. ray exec cfg.yaml "cd x && tune-dynsdpb sweep ..."
                rest = rest.split(quote, 1)[0]
            lex = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            argv = []
            for tok in lex:
                if tok and set(tok) <= set("();<>|&"):
                    break
                argv.append(tok)
            found.append([expand(a) for a in argv[1:]])
    return found


def expand(arg: str) -> str:
    """Shell variables stand for some value: any value does for parsing."""
    return re.sub(r"\$\{\w+(:-[^}]*)?\}|\$\w+", "X", arg)


def all_sources() -> list[Path]:
    return [*YAMLS, DOCKERFILE, *DOCS]


def cli_help(sub: str) -> str:
    from tune_dynsdpb.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser().parse_args([sub, "--help"])
    return buf.getvalue()


def check_cli_command(argv: list[str], where: str) -> None:
    from tune_dynsdpb.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{where}: `tune-dynsdpb {' '.join(argv)}` does not parse: {err.getvalue()}") from e
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cli_help(argv[0])))
    for a in argv:
        name = a.split("=", 1)[0]
        if name.startswith("--"):
            assert name in flags, f"{where}: `tune-dynsdpb {argv[0]}` has no flag {name} (abbreviated?)"


# -- the files parse ------------------------------------------------------------------------------

def test_yaml_files_parse_and_hold_what_they_are_for():
    cluster, rayjob, compose = (yaml.safe_load(p.read_text()) for p in YAMLS)
    # ray up: a head type among the node types, setup that installs this package, token auth on
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert any("pip install" in c and "tune-dynsdpb" in c for c in cluster["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(cluster[k]) for k in ("head_start_ray_commands",
                                                                         "worker_start_ray_commands"))
    # KubeRay: a RayJob whose entrypoint is a sweep on S3 storage with an MLflow server
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    entry = rayjob["spec"]["entrypoint"]
    assert entry.startswith("tune-dynsdpb sweep ") and "--storage-path s3://" in entry and "--tracking-uri http" in entry
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # compose: MLflow on PostgreSQL with S3 artifacts, served by the server
    services = compose["services"]
    assert {"postgres", "mlflow"} <= set(services)
    cmd = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql" in cmd and "--artifacts-destination s3://" in cmd
    assert "--serve-artifacts" in cmd


def _containers(node) -> list[dict]:
    """Every container of a Kubernetes manifest (head and worker groups alike)."""
    if isinstance(node, dict):
        return [node] if "image" in node else [c for v in node.values() for c in _containers(v)]
    return [c for v in node for c in _containers(v)] if isinstance(node, list) else []


def test_every_node_gets_what_the_trial_actors_need():
    """experiment.WORKER_ENV is the one home of what trial actors need in their environment (a local
    Ray's workers inherit it from the driver); each form that starts nodes sets every entry, with
    its value: the Dockerfile, every container of the RayJob, the ray up nodes, the local cluster."""
    from tune_dynsdpb.experiment import WORKER_ENV

    env = {}
    for w, rest in dockerfile_instructions():
        if w == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(rest) if "=" in kv)
    cluster, rayjob = (yaml.safe_load(p.read_text()) for p in YAMLS[:2])
    pods = [{e["name"]: str(e.get("value")) for e in c.get("env", [])} for c in _containers(rayjob)]
    setup = " ".join(cluster["setup_commands"])
    local = (ROOT / "scripts" / "local_cluster.py").read_text()
    assert WORKER_ENV and len(pods) >= 2
    for key, value in WORKER_ENV.items():
        assert env.get(key) == value, ("Dockerfile", key)
        assert all(p.get(key) == value for p in pods), ("RayJob", key, pods)
        assert f"{key}={value}" in setup, ("ray up", key)
        assert f'env.setdefault("{key}", "{value}")' in local, ("local cluster", key)


DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "CMD", "ENTRYPOINT",
                       "EXPOSE", "LABEL", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    out = []
    for line in logical_lines(DOCKERFILE.read_text()):
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word, rest.strip()))
    return out


def test_dockerfile_instructions():
    instr = dockerfile_instructions()
    assert all(w in DOCKER_INSTRUCTIONS for w, _ in instr), [w for w, _ in instr if w not in DOCKER_INSTRUCTIONS]
    words = [w for w, _ in instr]
    assert set(words[:words.index("FROM")]) <= {"ARG"}  # only ARGs before FROM
    args = {rest.split("=")[0] for w, rest in instr if w == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX_URL"} <= args
    assert dict(instr)["FROM"] == "${BASE_IMAGE}"  # the CPU or CUDA base is a build argument
    runs = " ".join(rest for w, rest in instr if w == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and 'pip install -c constraints.txt ".[' in runs
    # every COPY source exists in the build context (the checkout)
    for w, rest in instr:
        if w == "COPY":
            *srcs, _ = rest.split()
            assert all((ROOT / s).exists() for s in srcs), rest


# -- commands -------------------------------------------------------------------------------------

def all_cli_commands() -> list[tuple[str, list[str]]]:
    out = []
    for p in all_sources():
        for text in texts_of(p):
            out += [(p.relative_to(ROOT).as_posix(), argv) for argv in commands_in(text, "tune-dynsdpb")]
    return out


def test_every_tune_dynsdpb_command_parses_with_the_real_cli():
    cmds = all_cli_commands()
    where = {w for w, _ in cmds}
    assert {"deploy/ray-cluster.yaml", "deploy/kuberay-rayjob.yaml", "docs/deploy.md", "README.md"} <= where, where
    for w, argv in cmds:
        check_cli_command(argv, w)


def test_every_local_cluster_command_parses():
    sys.path.insert(0, str(ROOT / "scripts"))
    import local_cluster

    n = 0
    for p in DOCS:
        for text in texts_of(p):
            for argv in commands_in(text, "scripts/local-cluster.sh", ("up", "down", "status", "env")):
                n += 1
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    try:
                        local_cluster.build_parser().parse_args(argv)
                    except SystemExit as e:
                        raise AssertionError(f"{p.name}: local-cluster.sh {' '.join(argv)}: {err.getvalue()}") from e
    assert n >= 3


def test_the_local_clusters_printed_command_parses(capsys):
    """What `local-cluster.sh up` prints: the exports and the one command that runs the quickstart."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import local_cluster

    st = {"dir": "/tmp/x", "bucket": "b", "access_key": "k", "secret_key": "s",
          "ports": {"s3": 1, "mlflow": 2, "ray": 3}}
    local_cluster.print_env(st)
    out = capsys.readouterr().out
    (argv,) = commands_in(out.replace("# tune-dynsdpb", "tune-dynsdpb"), "tune-dynsdpb")
    check_cli_command(argv, "local-cluster.sh up")
    assert argv[argv.index("--storage-path") + 1] == "s3://b/ray"
    exported = re.findall(r"^export (\w+)=", out, flags=re.M)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
            "MLFLOW_S3_ENDPOINT_URL", "RAY_AUTH_TOKEN_PATH"} <= set(exported)
    unknown_env_vars({"local-cluster.sh up": set(exported)}, defined={})


# -- environment variables ------------------------------------------------------------------------

VAR_REF = re.compile(r"\$\{?([A-Z][A-Z0-9_]+)")
VAR_DEF = [re.compile(p, re.M) for p in (r"\bexport\s+([A-Z][A-Z0-9_]+)=", r"^\s*ENV\s+([A-Z][A-Z0-9_]+)=",
                                         r"^\s*([A-Z][A-Z0-9_]+)=", r"(?:^|[\s;&'\"])([A-Z][A-Z0-9_]+)=\S")]


def env_names(path: Path) -> tuple[set, set]:
    """(names used, names defined) in a file."""
    used, defined = set(), set()
    texts = texts_of(path)
    for text in texts:
        used |= set(VAR_REF.findall(text))
        for pat in VAR_DEF:
            defined |= set(pat.findall(text))
        if path.name == "Dockerfile":
            for line in logical_lines(text):  # ENV A=1 \ B=2 (continued)
                if line.strip().startswith("ENV "):
                    defined |= set(re.findall(r"([A-Z][A-Z0-9_]+)=", line))
    if path.suffix == ".yaml":
        def walk(x):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == "env" and isinstance(v, list):
                        defined.update(e["name"] for e in v if isinstance(e, dict) and "name" in e)
                    elif k == "environment" and isinstance(v, dict):
                        defined.update(v)
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(yaml.safe_load(path.read_text()))
    used |= defined
    return used, defined


def in_sources(names: set, dirs: list[Path]) -> set:
    """The names that occur in the .py/.sh files under ``dirs`` (one grep)."""
    if not names:
        return set()
    out = subprocess.run(["grep", "-rhoF", "--include=*.py", "--include=*.sh", *(f"-e{n}" for n in sorted(names)),
                          *map(str, dirs)], capture_output=True, text=True)
    found = set(out.stdout.split())
    return {n for n in names if n in found}


def unknown_env_vars(used_by_file: dict, defined: dict) -> None:
    names = set().union(*used_by_file.values()) - set(NON_PYTHON)
    ours = in_sources(names, [ROOT / "tune_dynsdpb", ROOT / "trainables", ROOT / "scripts"])
    libs = [Path(importlib.util.find_spec(m).submodule_search_locations[0]) for m in LIBRARIES
            if importlib.util.find_spec(m)]
    theirs = in_sources(names - ours, libs)
    bad = {w: sorted(u - ours - theirs - set(NON_PYTHON) - defined.get(w, set())) for w, u in used_by_file.items()}
    bad = {w: b for w, b in bad.items() if b}
    assert not bad, f"environment variables nobody reads: {bad}"


@pytest.mark.slow  # greps the installed libraries' sources (~6 s): not the fast lane
def test_every_environment_variable_named_exists():
    used_by_file, defined = {}, {}
    example_env = DEPLOY / "mlflow" / "example.env"
    for p in all_sources():
        if p.name == "README.md":  # the README's "Scale out" section (the rest is other helpers' text)
            text = p.read_text()
            section = text.split("## Scale out", 1)[1].split("\n## ", 1)[0] if "## Scale out" in text else ""
            used = set(VAR_REF.findall("\n".join(code_blocks(section))))
            used_by_file[p.name], defined[p.name] = used, set()
            continue
        used, d = env_names(p)
        if p.name == "compose.yaml":
            d |= set(re.findall(r"^([A-Z][A-Z0-9_]+)=", example_env.read_text(), flags=re.M))
        used_by_file[p.name], defined[p.name] = used, d
    # A name this file defines and also expands ($NAME) is its own (compose's .env settings); a name
    # it only sets (an `env:` entry, an export) must be read by someone.
    own = {}
    for p in all_sources():
        if p.name != "README.md":
            own[p.name] = defined[p.name] & set(VAR_REF.findall("\n".join(texts_of(p))))
    # the docs may name what the deploy files define (a build argument, the compose file's settings)
    for doc in ("deploy.md", "README.md"):
        own[doc] = own.get(doc, set()) | set().union(*(defined[p.name] for p in (*YAMLS, DOCKERFILE)))
    unknown_env_vars(used_by_file, own)
