"""Bad input and faults, one row of docs/reliability.md each: the exact line the user sees, the
exit status, and that nothing half-written is left behind.

The CLI runs in-process (``cli.main``). Most rows fail before any trial: they need no Ray, or only
the session's Ray (``ray_session``) for the checks that ask it. Rows covered by other test files are
named in docs/reliability.md and not repeated here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from sweeps import spec_dict
from tune_dynsdpb.cli import main

E = "tune-dynsdpb: error: "


@pytest.fixture(autouse=True)
def own_token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TUNE_DYNSDPB_CACHE", str(tmp_path_factory.getbasetemp() / "reliability-cache"))


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def rejected(capsys, argv, line: str, code: int = 2) -> None:
    """Exit status ``code`` and exactly ``line`` (one line) on stderr."""
    got, _, err = cli(capsys, *argv)
    assert (got, err) == (code, E + line + "\n")


def write_spec(tmp_path: Path, model: Path, name="rel", **kw) -> Path:
    spec = spec_dict(model, name=name, methods=kw.pop("methods", ["dlb"]), num_samples=kw.pop("num_samples", 1),
                     **kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def nothing_left(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert not list(tmp_path.glob(f".{out.name}.partial-*"))


# ============================================================================ train
def train_args(data_dir, model, out, *extra):
    return ["train", "--task", "rte", "--data-dir", data_dir, "--model", model, "--output-dir", out,
            "--batch-size", "8", "--epochs", "1", "--max-length", "32", *extra]


def test_train_unknown_task_lists_the_known_ones(data_dir, tiny_bert, tmp_path, capsys):
    from tune_dynsdpb.data import list_tasks

    out = tmp_path / "out"
    argv = train_args(data_dir, tiny_bert, out)
    argv[argv.index("rte")] = "glue-nope"
    rejected(capsys, argv, f"unknown task 'glue-nope' (known: {', '.join(list_tasks())})")
    nothing_left(tmp_path, out)


def test_train_output_dir_is_a_file(data_dir, tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("mine")
    rejected(capsys, train_args(data_dir, tiny_bert, out), f"--output-dir: {out} exists and is not empty")
    assert out.read_text() == "mine"


def test_train_output_dir_under_a_file(data_dir, tiny_bert, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    rejected(capsys, train_args(data_dir, tiny_bert, out), f"--output-dir: cannot create {out.parent}: File exists")


# A folder that is not writable even for root (the tests may run as root, for whom chmod changes
# nothing): /proc/sys, read-only by the kernel. Skipped where there is none.
READ_ONLY = Path("/proc/sys")
needs_read_only = pytest.mark.skipif(not READ_ONLY.is_dir() or os.access(READ_ONLY, os.W_OK),
                                     reason="no folder here that is read-only for this user")


@needs_read_only
def test_train_unwritable_parent(data_dir, tiny_bert, tmp_path, capsys):
    rejected(capsys, train_args(data_dir, tiny_bert, READ_ONLY / "out"), f"--output-dir: {READ_ONLY} is not writable")
    assert not (READ_ONLY / "out").exists()


# ============================================================================ sweep files (before anything runs)
def _set(d: dict, dotted: str, value) -> dict:
    node, *_ = d, None
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[parts[-1]] = value
    return d


SPEC_CASES = {  # id: (edit of the spec dict, the line after "<file>: ")
    "unknown key": (lambda d: _set(d, "bogus", 1), "bogus: unknown key"),
    "inverted range": (lambda d: _set(d, "params.common.learning_rate", {"low": 1e-2, "high": 1e-4}),
                       "params.common.learning_rate: empty or inverted range: low (0.01) must be < high (0.0001)"),
    "task listed twice": (lambda d: d.update(tasks=[{"task": "rte"}, {"task": "rte"}]) or d.pop("task"),
                          "tasks.1.task: task 'rte' is listed twice"),
    "unknown per-task key": (lambda d: d.update(tasks=[{"task": "rte", "learning_rate": 1e-3}]) or d.pop("task"),
                             "tasks.0.learning_rate: unknown key"),
    "time_budget_s 0": (lambda d: _set(d, "budget.time_budget_s", 0), "budget.time_budget_s: Input should be "
                                                                         "greater than 0"),
    "distill_warmup 1": (lambda d: d.update(methods=["dlb_warmup"]) or _set(
        d, "params.dlb_warmup.distill_warmup", {"low": 0.1, "high": 1.0}),
        "params.dlb_warmup.distill_warmup: distill_warmup must be in (0, 1) (got 1.0)"),
    "odd batch, dlb": (lambda d: _set(d, "params.common.per_device_train_batch_size", 15),
                       "params.common.per_device_train_batch_size: dlb/dynsdpb split each batch in two halves: every "
                       "batch size must be even and >= 2 (for a range: even low and an even step)"),
    "alpha0 < 0": (lambda d: _set(d, "params.dlb.alpha0", {"low": -0.5, "high": 1.0}),
                   "params.dlb.alpha0: alpha0 must be >= 0 (got -0.5)"),
    "name ../..": (lambda d: _set(d, "name", "../.."),
                   "name: '../..': use letters, digits, '.', '_' and '-' (it names folders), starting with a letter "
                   "or digit"),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_sweep_file_rejected(case, tiny_bert, data_dir, tmp_path, capsys):
    edit, line = SPEC_CASES[case]
    d = spec_dict(tiny_bert, name="rel", methods=["dlb"], num_samples=1)
    edit(d)
    path = tmp_path / "rel.yaml"
    path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    got, _, err = cli(capsys, "sweep", path, "--data-dir", data_dir, "--output-dir", out, "--no-progress")
    assert got == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{E}{path}: {line}"), err
    nothing_left(tmp_path, out)


def test_sweep_file_malformed_yaml(tiny_bert, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nparams:\n  common: [\n")
    out = tmp_path / "out"
    rejected(capsys, ["sweep", path, "--output-dir", out],
             f"{path}: line 4: malformed YAML: while parsing a flow node expected the node content, but found "
             "'<stream end>'")
    nothing_left(tmp_path, out)


def test_sweep_file_missing(tmp_path, capsys):
    rejected(capsys, ["sweep", tmp_path / "nowhere.yaml", "--output-dir", tmp_path / "out"],
             f"{tmp_path / 'nowhere.yaml'}: file not found")


def test_set_unknown_key_and_malformed_item(tiny_bert, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_bert)
    out = tmp_path / "out"
    rejected(capsys, ["sweep", path, "--output-dir", out, "--set", "budget.num_sample=3"],
             f"{path} (with --set/--methods/--num-samples): budget.num_sample: unknown key")
    rejected(capsys, ["sweep", path, "--output-dir", out, "--set", "budget.num_samples"],
             "--set: 'budget.num_samples': expected key=value (e.g. budget.num_samples=16)")
    rejected(capsys, ["sweep", path, "--output-dir", out, "--set", "model.path=x"],
             "--set: model: is a value, not a section")
    rejected(capsys, ["sweep", path, "--output-dir", out, "--num-samples", "0"], "--num-samples: must be >= 1 (got 0)")
    rejected(capsys, ["sweep", path, "--output-dir", out, "--methods", "sdpb"],
             f"{path} (with --set/--methods/--num-samples): methods.0: unknown method 'sdpb' "
             "(valid: vanilla, dlb, dlb_warmup, dynsdpb, pbt)")
    nothing_left(tmp_path, out)


# ============================================================================ the output folder
def test_sweep_output_dir_is_a_file(tiny_bert, tmp_path, capsys):
    path, out = write_spec(tmp_path, tiny_bert), tmp_path / "out"
    out.write_text("mine")
    rejected(capsys, ["sweep", path, "--output-dir", out], f"--output-dir: {out} is a file")
    assert out.read_text() == "mine"


def test_sweep_output_dir_not_empty_without_a_sweep(tiny_bert, tmp_path, capsys):
    path, out = write_spec(tmp_path, tiny_bert), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rejected(capsys, ["sweep", path, "--output-dir", out],
             f"--output-dir: {out} is not empty and holds no sweep; pick a new folder")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@needs_read_only
def test_sweep_unwritable_output_dir(tiny_bert, tmp_path, capsys):
    """An existing output folder nobody may write into (see READ_ONLY)."""
    path = write_spec(tmp_path, tiny_bert)
    empty = [Path(d) for d, dirs, files in os.walk(READ_ONLY) if not dirs and not files and not os.access(d, os.W_OK)]
    if not empty:
        pytest.skip(f"no empty folder under {READ_ONLY}")
    out = empty[0]  # e.g. /proc/sys/fs/binfmt_misc
    rejected(capsys, ["sweep", path, "--output-dir", out], f"--output-dir: {out} is not writable")
    assert not any(out.iterdir())


def test_sweep_output_dir_under_a_file(tiny_bert, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_bert)
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    rejected(capsys, ["sweep", path, "--output-dir", out], f"--output-dir: cannot create {out}: Not a directory")


def fake_sweep(out: Path, model: Path, data_dir: Path, methods=("dlb",), num_samples=1, data_hash="stale",
               tracking_uri: str | None = None):
    """A sweep folder as an interrupted driver leaves it (sweep.json only, no trial yet)."""
    from tune_dynsdpb.search_space import parse_search_space
    from tune_dynsdpb.state import SweepState, TaskState

    spec = parse_search_space(spec_dict(model, name="fake", methods=list(methods), num_samples=num_samples))
    state = SweepState(sweep_id="fake0", spec=spec.model_dump(mode="json", by_alias=True),
                       spec_path=str(out / "fake.yaml"), methods=list(methods), num_samples=num_samples,
                       tracking_uri=tracking_uri or f"sqlite:///{out}/mlflow.db", model_path=str(model),
                       storage_path=str(out / "ray"), created=0.0, status="interrupted",
                       tasks={"rte": TaskState(name="rte", metric="eval_accuracy", mode="max", data_dir=str(data_dir),
                                               data_hash=data_hash)})
    for m in methods:
        state.arm("rte", m)
    out.mkdir(parents=True)
    state.save(out)
    return state


def test_corrupt_sweep_json(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text("{not json")
    rejected(capsys, ["sweep", "--resume", "--output-dir", out],
             f"{out / 'sweep.json'}: corrupt sweep state: Expecting property name enclosed in double quotes: "
             "line 1 column 2 (char 1)")
    (out / "sweep.json").write_text(json.dumps({"version": 2, "sweep_id": "x"}))
    rejected(capsys, ["sweep", "--resume", "--output-dir", out], f"{out / 'sweep.json'}: corrupt sweep state: spec: "
                                                                 "Field required")
    rejected(capsys, ["sweep", "--output-dir", out, tmp_path / "any.yaml"], f"{tmp_path / 'any.yaml'}: file not found")


def test_resume_without_a_sweep(tmp_path, capsys):
    rejected(capsys, ["sweep", "--resume", "--output-dir", tmp_path], f"{tmp_path}: holds no sweep (no sweep.json)")
    rejected(capsys, ["sweep", "--resume"], "--resume: needs --output-dir of the interrupted sweep")
    rejected(capsys, ["sweep", "--output-dir", tmp_path],
             "sweep: give a sweep file (e.g. search_spaces/quickstart.yaml)")
    assert not any(tmp_path.iterdir())


def test_resume_with_other_num_samples_or_methods(tiny_bert, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    fake_sweep(out, tiny_bert, data_dir)
    before = (out / "sweep.json").read_text()
    rejected(capsys, ["sweep", "--resume", "--output-dir", out, "--num-samples", "3"],
             "--num-samples: 3 conflicts with the saved sweep's 1; drop it to resume, or start a new sweep")
    rejected(capsys, ["sweep", "--resume", "--output-dir", out, "--methods", "dlb", "dynsdpb"],
             "--methods: ['dlb', 'dynsdpb'] conflicts with the saved sweep's ['dlb']; drop it to resume, "
             "or start a new sweep")
    rejected(capsys, ["sweep", write_spec(tmp_path, tiny_bert), "--output-dir", out],
             f"--output-dir: {out} already holds a sweep; pass --resume to continue it")
    rejected(capsys, ["sweep", "--resume", "--output-dir", out, "--set", "seed=1"],
             "--resume: continues the saved sweep file; give no sweep file or --set")
    assert (out / "sweep.json").read_text() == before


def test_resume_with_the_same_store_and_data_given_again(tiny_bert, data_dir, tmp_path, capsys, monkeypatch):
    """The tracking URI with the password a new sweep moved out of it, and the data folder written
    relative to another working directory, name what the sweep saved: no conflict (the resume goes
    on to the store, which is down here). Another host is still a conflict."""
    import helpers

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = helpers.free_port()
    out = tmp_path / "out"
    fake_sweep(out, tiny_bert, data_dir, tracking_uri=f"http://127.0.0.1:{port}")
    before = (out / "sweep.json").read_text()
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(data_dir)
    assert not Path(relative).is_absolute() and Path(relative).resolve() == data_dir.resolve()
    code, stdout, err = cli(capsys, "sweep", "--resume", "--output-dir", out, "--no-progress", "--data-dir", relative,
                            "--tracking-uri", f"http://alice:s3cret-pw@127.0.0.1:{port}")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{E}MLflow tracking URI http://127.0.0.1:{port} is not usable: "), err
    assert "s3cret" not in err + stdout
    rejected(capsys, ["sweep", "--resume", "--output-dir", out, "--tracking-uri", f"http://alice:pw@127.0.0.2:{port}"],
             f"--tracking-uri: 'http://127.0.0.2:{port}' conflicts with the saved sweep's 'http://127.0.0.1:{port}'; drop it to resume, "
             "or start a new sweep")
    assert (out / "sweep.json").read_text() == before


@pytest.mark.parametrize("held", ["sweep.json", "sweep"])
def test_a_new_sweep_refuses_a_storage_path_that_holds_another(held, tiny_bert, data_dir, tmp_path, capsys):
    """A new sweep on a storage path where another sweep's state or Tune experiment lies would
    overwrite them (and a resume of the other would restore the new one's experiment)."""
    store = tmp_path / "store"
    (store / "sweep").mkdir(parents=True)
    if held == "sweep.json":
        (store / "sweep").rmdir()
        (store / "sweep.json").write_text("{}")
    path, out = write_spec(tmp_path, tiny_bert), tmp_path / "out"
    rejected(capsys, ["sweep", path, "--data-dir", data_dir, "--output-dir", out, "--storage-path", store,
                      "--no-progress"],
             f"--storage-path: {store} already holds a sweep; continue it with --resume --storage-path {store}, "
             "or give another path")
    assert not out.exists() and sorted(p.name for p in store.iterdir()) == [held]


def test_a_new_sweep_saves_its_data_folder_absolute(tmp_path, monkeypatch):
    """``--data-dir ../shared/data`` (the README's) and a sweep file's relative ``data_dir`` are
    saved absolute, so compare, export and --resume find the data from any working directory."""
    from types import SimpleNamespace

    from tune_dynsdpb.search_space import parse_search_space
    from tune_dynsdpb.state import create_state

    monkeypatch.chdir(tmp_path)
    spec = parse_search_space({**spec_dict(tmp_path / "model", name="rel", methods=["dlb"]), "data_dir": "from-file"})
    task = SimpleNamespace(metric="eval_accuracy", mode="max", spec=spec.task_specs()[0],
                           task=SimpleNamespace(source="rte"), train=[0], eval=[0], data_hash="h", baseline=None,
                           truncation={}, job=SimpleNamespace(model_path=str(tmp_path / "model")))
    for given, saved in (("../data", tmp_path.parent / "data"), (None, tmp_path / "from-file")):
        state = create_state(spec, {"rte": task}, spec_path="rel.yaml", tracking_uri="sqlite://",
                             storage_path=str(tmp_path / "ray"), data_dir=given)
        assert state.tasks["rte"].data_dir == str(saved)


@pytest.mark.slow  # starts Ray or a server
def test_resume_after_the_data_changed(ray_session, tiny_bert, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    fake_sweep(out, tiny_bert, data_dir, data_hash="0" * 64)
    before = (out / "sweep.json").read_text()
    rte = data_dir / "glue" / "RTE"
    rejected(capsys, ["sweep", "--resume", "--output-dir", out, "--no-progress"],
             f"{rte / 'train.tsv'}, {rte / 'dev.tsv'}: the data of task rte changed since the sweep started; "
             "resume with the same data, or start a new sweep")
    assert (out / "sweep.json").read_text() == before
    assert not (out / "mlflow.db").exists() and not (out / "ray").exists()


# ============================================================================ checks against data, model, Ray, MLflow
def sweep_fails_cleanly(capsys, tmp_path, argv, line):
    """A new sweep that fails its set-up exits 2 with ``line`` and leaves no folder behind (it can
    be run again with the same --output-dir)."""
    out = tmp_path / "out"
    rejected(capsys, ["sweep", *argv, "--output-dir", out, "--no-progress"], line)
    nothing_left(tmp_path, out)


@pytest.mark.slow  # starts Ray or a server
def test_metric_typo_lists_the_valid_names(ray_session, tiny_bert, data_dir, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_bert, metric="acuracy")
    sweep_fails_cleanly(capsys, tmp_path, [path, "--data-dir", data_dir],
                        f"{path}: metric: 'acuracy' is not reported by task 'rte' (valid: accuracy, loss)")


@pytest.mark.slow  # starts Ray
def test_a_failed_set_up_leaves_a_given_empty_folder_empty(ray_session, tiny_bert, data_dir, tmp_path, capsys):
    """The same failure into an --output-dir that existed (empty): the folder stays, empty again
    (its lock file, cache and MLflow store gone), so the same command works next time."""
    path = write_spec(tmp_path, tiny_bert, metric="acuracy")
    out = tmp_path / "given"
    out.mkdir()
    rejected(capsys, ["sweep", path, "--data-dir", data_dir, "--output-dir", out, "--no-progress"],
             f"{path}: metric: 'acuracy' is not reported by task 'rte' (valid: accuracy, loss)")
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == []


def test_metric_loss_gets_mode_min(tiny_bert, data_dir, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_bert, metric="loss")
    code, out, err = cli(capsys, "validate", path, "--data-dir", data_dir)
    assert code == 0, err
    assert re.search(r"^  rte: 64 train / 32 eval from .*; eval_loss \(min\), trivial baseline [\d.]+; one training "
                     r"step ran$", out, re.M), out


PREFLIGHT = {  # --set item: what the one training step says
    "training.optim=adamw_nope": "a training step with the dlb arm's first point fails: ValueError: ",
    "training.lr_scheduler_type=cosine_nope": "a training step with the dlb arm's first point fails: ValueError: ",
}


@pytest.mark.parametrize("item", list(PREFLIGHT))
def test_preflight_rejects_what_would_fail_every_trial(item, tiny_bert, data_dir, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_bert)
    code, _, err = cli(capsys, "validate", path, "--data-dir", data_dir, "--set", item)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{E}{path}: task rte: {PREFLIGHT[item]}"), err
    assert item.split("=")[1] in err, err


def test_fp16_on_cpu_is_accepted(tiny_bert, data_dir, tmp_path, capsys):
    """transformers >= 5 runs fp16 on a CPU (autocast): not an error, the step runs."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out, err = cli(capsys, "validate", write_spec(tmp_path, tiny_bert), "--data-dir", data_dir,
                         "--set", "training.fp16=true")
    assert code == 0 and "one training step ran" in out, err


def test_lora_target_modules_the_model_lacks(tiny_bert, data_dir, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_bert, lora={"r": 4, "target_modules": ["q_proj"]})
    code, _, err = cli(capsys, "validate", path, "--data-dir", data_dir)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{E}{path}: task rte: cannot build the model: NoMatchingPeftModuleError: No modules were "
                          "targeted for adaptation."), err


@pytest.mark.slow  # starts Ray or a server
def test_resources_no_node_can_meet(ray_session, tiny_bert, data_dir, tmp_path, capsys):
    import ray

    cpus = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive"))
    path = write_spec(tmp_path, tiny_bert, resources={"cpus_per_trial": 64})
    sweep_fails_cleanly(capsys, tmp_path, [path, "--data-dir", data_dir],
                        f"{path}: resources: a trial needs 1 worker(s) of 64 CPU / 0 GPU but the cluster's largest "
                        f"node has {cpus:g} CPU / 0 GPU")


def test_unreachable_tracking_uri_never_echoes_the_password(tiny_bert, data_dir, tmp_path, capsys, monkeypatch):
    import helpers

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)  # put back afterwards (the sweep sets the first two)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = helpers.free_port()
    path = write_spec(tmp_path, tiny_bert)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "sweep", path, "--data-dir", data_dir, "--output-dir", out, "--no-progress",
                            "--tracking-uri", f"http://alice:s3cret-pw@127.0.0.1:{port}")
    assert code == 2 and err.count("\n") == 1, err
    # the password moved to MLFLOW_TRACKING_PASSWORD before the URI was used: the URI shown has none
    assert err.startswith(f"{E}MLflow tracking URI http://127.0.0.1:{port} is not usable: API request to "
                          f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search failed with exception "), err
    assert "s3cret" not in err + stdout
    nothing_left(tmp_path, out)


# ============================================================================ compare / export
def test_compare_and_export_without_a_finished_trial(tiny_bert, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    fake_sweep(out, tiny_bert, data_dir)
    rejected(capsys, ["compare", out], f"{out}: task rte of the sweep has no finished trial")
    rejected(capsys, ["export", out, "--name", "never"],
             f"{out}: task rte of the sweep has no finished trial; nothing to export")
    assert not (out / "mlflow.db").exists() and not list(out.glob("report-*"))


def test_export_out_not_empty(tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rejected(capsys, ["export", "--model", "models:/x@champion", "--out", out,
                      "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], f"--out: {out} exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def registry(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/registry.db"
    return uri, MlflowClient(uri, registry_uri=uri)


def hand_written_model(folder: Path, model: Path, **flavor) -> Path:
    """An MLmodel file written by hand over tiny_bert's files, in MLflow's transformers layout."""
    shutil.copytree(model, folder / "model", ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special*"))
    tok = folder / "components" / "tokenizer"
    tok.mkdir(parents=True)
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, tok / f.name)
    conf = {"task": "text-classification", "instance_type": "TextClassificationPipeline",
            "pipeline_model_type": "BertForSequenceClassification", "model_binary": "model",
            "components": ["tokenizer"], "tokenizer_type": "BertTokenizer", "framework": "pt", **flavor}
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": {
        "python_function": {"loader_module": "mlflow.transformers", "python_version": "3"}, "transformers": conf}}))
    return folder


def register(client, name: str, source: Path) -> None:
    client.create_registered_model(name)
    v = client.create_model_version(name, source=str(source))
    client.set_registered_model_alias(name, "champion", v.version)


EXPORT_REFUSALS = {  # id: (registered name, MLmodel transformers-flavor fields, config.json keys, the refusal)
    "model class outside transformers": ("evil-model", {"pipeline_model_type": "evilpkg.Evil"}, {},
                                         "model class 'evilpkg.Evil' is not in the transformers package"),
    "tokenizer class outside transformers": ("evil-tok", {"tokenizer_type": "evilpkg.Evil"}, {},
                                             "tokenizer class 'evilpkg.Evil' is not in the transformers package"),
    "pipeline class outside transformers": ("evil-pipe", {"instance_type": "Evil"}, {},
                                            "pipeline class 'Evil' is not in the transformers package"),
    "a tokenizer as the model class": ("not-a-model", {"pipeline_model_type": "AutoTokenizer"}, {},
                                       "model class 'AutoTokenizer' is not in the transformers package"),
    "auto_map": ("automap", {}, {"auto_map": {"AutoModelForSequenceClassification": "modeling_evil.Evil"}},
                 "config.json asks for code shipped with the model (auto_map)"),
    "weights on the hub": ("hub", {"model_binary": None, "source_model_name": "someone/model"}, {},
                           "holds no model weights (it would load them from 'someone/model' on the hub)"),
    "PEFT adapter": ("adapter", {"peft_adaptor": "peft"}, {},
                     "its transformers flavor loads a PEFT adapter over a base model outside the artifacts "
                     "(peft_adaptor)"),
}


@pytest.fixture(scope="module")
def refused_models(tiny_bert, tmp_path_factory):
    """One registry holding a model version for every EXPORT_REFUSALS case, and a package
    ``evilpkg`` on ``sys.path`` whose import writes a marker file: (tracking URI, marker)."""
    root = tmp_path_factory.mktemp("refused")
    pkg = root / "pkgs"
    (pkg / "evilpkg").mkdir(parents=True)
    marker = root / "imported"
    (pkg / "evilpkg" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass Evil:\n    pass\n")
    uri, client = registry(root)
    for name, flavor, config_keys, _ in EXPORT_REFUSALS.values():
        folder = hand_written_model(root / name, tiny_bert, **flavor)
        if config_keys:
            config = folder / "model" / "config.json"
            config.write_text(json.dumps({**json.loads(config.read_text()), **config_keys}))
        register(client, name, folder)
    sys.path.insert(0, str(pkg))
    try:
        yield uri, marker
    finally:
        sys.path.remove(str(pkg))


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refuses_to_load(case, refused_models, tmp_path, capsys):
    """The registry is trusted for weights, never for code: a model version whose MLmodel names a
    class of another package, whose config asks for code shipped with the model, or whose weights
    lie outside its artifacts is refused, nothing is written, and no other package is imported."""
    name, _, _, refusal = EXPORT_REFUSALS[case]
    uri, marker = refused_models
    out = tmp_path / "hf"
    rejected(capsys, ["export", "--model", f"models:/{name}@champion", "--out", out, "--tracking-uri", uri],
             f"--model: models:/{name}@champion: {refusal}; refusing to load it")
    assert not marker.exists() and "evilpkg" not in sys.modules
    nothing_left(tmp_path, out)


def test_export_writes_a_model_logged_by_mlflow(tiny_bert, tmp_path, capsys):
    """The real layout of ``mlflow.transformers.log_model`` passes the checks and loads back."""
    import mlflow
    import transformers

    from tune_dynsdpb.tracking import fluent_tracking

    uri, client = registry(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny_bert))
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    # its own experiment with artifacts under tmp_path: the default one's would go to ./mlruns
    exp_id = client.create_experiment("logged", artifact_location=(tmp_path / "artifacts").as_uri())
    with fluent_tracking(uri), mlflow.start_run(experiment_id=exp_id):
        info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok},
                                             task="text-classification", name="m",
                                             pip_requirements=["transformers", "torch"])
        client.create_registered_model("real")  # the registry resolves the source with the current tracking URI
        v = client.create_model_version("real", source=info.model_uri, model_id=info.model_id)
        client.set_registered_model_alias("real", "champion", v.version)
    out = tmp_path / "hf"
    code, stdout, err = cli(capsys, "export", "--model", "models:/real@champion", "--out", out, "--tracking-uri", uri)
    assert code == 0, err
    assert stdout == f"models:/real@champion -> {out}\n"
    pipe = transformers.pipeline("text-classification", model=str(out))
    expected = transformers.pipeline("text-classification", model=model, tokenizer=tok)("a good movie")
    assert pipe("a good movie") == expected


def test_export_rollback_restores_only_its_own_aliases(tmp_path):
    """An export that fails after setting aliases puts back only the aliases that still point at
    its own versions: one a concurrent export moved since stays where that export put it."""
    from tune_dynsdpb.tracking import Registry

    uri, c = registry(tmp_path)
    _rollback = Registry(c).rollback
    src = tmp_path / "src"
    src.mkdir()
    c.create_registered_model("m")
    v = [c.create_model_version("m", source=str(src)).version for _ in range(5)]  # 1, 2 before; 3, 4 ours; 5 theirs
    c.set_registered_model_alias("m", "champion", v[0])
    c.set_registered_model_alias("m", "best-dlb", v[1])
    before = {"champion": str(v[0]), "best-dlb": str(v[1])}
    c.set_registered_model_alias("m", "champion", v[2])   # ours
    c.set_registered_model_alias("m", "best-dlb", v[4])   # moved by the concurrent export
    c.set_registered_model_alias("m", "best-vanilla", v[3])  # ours, new
    _rollback("m", [str(v[2]), str(v[3])], before, existed=True)
    aliases = {k: str(x) for k, x in c.get_registered_model("m").aliases.items()}
    assert aliases == {"champion": str(v[0]), "best-dlb": str(v[4])}
    assert sorted(int(x.version) for x in c.search_model_versions("name = 'm'")) == [int(v[0]), int(v[1]), int(v[4])]

    # a model this export created, into which a concurrent export registered a version: kept
    c.create_registered_model("n")
    ours, theirs = (c.create_model_version("n", source=str(src)).version for _ in range(2))
    _rollback("n", [str(ours)], {}, existed=False)
    assert [x.version for x in c.search_model_versions("name = 'n'")] == [theirs]
    _rollback("n", [str(theirs)], {}, existed=False)  # nothing left in it: the model goes
    assert not c.search_registered_models("name = 'n'")


# ============================================================================ a sweep whose arm has no scored trial
@pytest.mark.slow
def test_sweep_with_a_diverged_arm_exits_1(ray_session, tiny_bert, data_dir, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_bert, name="div", grace_period=2,
                      params={"common": {"learning_rate": 1.0e6, "num_train_epochs": 1,
                                         "per_device_train_batch_size": 16}, "dlb": {"alpha0": 1.0, "tau0": 3.0}})
    out = tmp_path / "out"
    code, _, err = cli(capsys, "sweep", path, "--data-dir", data_dir, "--output-dir", out, "--no-progress")
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("tune-dynsdpb")]
    assert len(lines) == 1 and re.fullmatch(r"tune-dynsdpb: no scored trial: rte/dlb: 1 of 1 trials failed: training "
                                            r"diverged: non-finite \w+ at step \d+", lines[0]), err
    assert json.loads((out / "sweep.json").read_text())["status"] == "finished"


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_a_reused_trial_actor_hands_freed_memory_back():
    """Tune runs each trial of a reused actor in a new thread, and glibc keeps what a finished
    thread freed; ``release_memory`` (called when every trial ends) returns it to the OS."""
    import threading

    from trainables.dynsdpb import release_memory

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    kept = []

    def trial():
        blocks = [bytearray(b"x" * 100_000) for _ in range(3000)]  # 300 MB below the mmap threshold
        kept.extend(blocks[::100])  # a few survivors pin the heap's top, as a trial's leftovers do
        del blocks

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    held = rss()
    release_memory()
    assert held - rss() > 200 * 2**20


def test_every_row_names_tests_that_exist():
    """Each row of docs/reliability.md names its tests as ``file::test`` (``rel::`` is this file,
    a bare ``[param]`` repeats the previous test); every one of them is a test function here."""
    import ast

    root = Path(__file__).resolve().parent
    rows = [line for line in (root.parent / "docs" / "reliability.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 69
    defined: dict[str, set] = {}
    missing = []
    for line in rows:
        last = line.rstrip(" |").rsplit("|", 1)[-1]
        refs = re.findall(r"([\w]+)::(test_\w+)", last)
        assert refs, line[:80]
        for module, test in refs:
            module = "test_reliability" if module == "rel" else module
            if module not in defined:
                tree = ast.parse((root / f"{module}.py").read_text())
                defined[module] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            if test not in defined[module]:
                missing.append((line.split("|")[1].strip(), f"{module}::{test}"))
    assert not missing
