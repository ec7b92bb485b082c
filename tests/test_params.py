"""tune_dynsdpb.params is the one home of the method's parameters: the config and the CLI follow it."""

import dataclasses
import math
import re

import pytest

from tune_dynsdpb import params
from tune_dynsdpb.cli import FLAGS, build_parser, main
from tune_dynsdpb.errors import UserError
from tune_dynsdpb.trainer import DynSDPBConfig


def test_methods():
    assert params.METHODS == ("vanilla", "dlb", "dlb_warmup", "dynsdpb", "pbt")
    assert params.PAIRED_METHODS == {"dlb", "dlb_warmup", "dynsdpb", "pbt"}
    assert params.DEFAULT_METHOD == "dynsdpb"


def test_the_table():
    p = params.PARAMS
    assert set(p) == {"alpha0", "tau0", "lambda_alpha", "lambda_tau", "granularity", "tau_range", "distill_warmup",
                      "schedule"}
    assert {n: x.default for n, x in p.items()} == {
        "alpha0": 1.0, "tau0": 3.0, "lambda_alpha": 1.0, "lambda_tau": 0.5, "granularity": "sample",
        "tau_range": (0.05, 20.0), "distill_warmup": 0.25, "schedule": ()}
    assert {n: p[n].rule for n in ("alpha0", "tau0", "lambda_tau", "distill_warmup")} == {
        "alpha0": ">= 0", "tau0": "> 0", "lambda_tau": "> -1", "distill_warmup": "in (0, 1)"}
    assert p["granularity"].choices == ("sample", "batch")
    assert params.methods_using("distill_warmup") == ("dlb_warmup",)
    assert params.methods_using("lambda_alpha") == ("dynsdpb",)
    assert {p[n].flag for n in p} == {"--alpha0", "--tau0", "--lambda-alpha", "--lambda-tau", "--granularity",
                                      "--tau-range", "--distill-warmup", "--schedule"}
    assert params.methods_using("schedule") == ("dlb", "pbt")


@pytest.mark.parametrize("name,value,problem", [
    ("alpha0", 0.0, None), ("alpha0", -0.1, "must be >= 0 (got -0.1)"), ("alpha0", math.nan, "must be a finite number (got nan)"),
    ("alpha0", True, "must be a number >= 0 (got True)"), ("tau0", 0, "must be > 0 (got 0)"),
    ("lambda_tau", -1.0, "must be > -1 (got -1.0)"), ("lambda_tau", -0.99, None),
    ("granularity", "token", "must be one of sample, batch (got 'token')"), ("granularity", "batch", None),
    ("tau_range", (0.1, 10.0), None), ("tau_range", (2.0, 1.0), "must have LOW <= HIGH (got (2.0, 1.0))"),
    ("tau_range", (0.0, 1.0), "must have both ends > 0 (got (0.0, 1.0))"),
    ("distill_warmup", 0.99, None), ("distill_warmup", 1.0, "must be in (0, 1) (got 1.0)"),
    ("method", "dlb_warmup", None), ("method", "kd", "must be one of vanilla, dlb, dlb_warmup, dynsdpb, pbt (got 'kd')"),
    ("max_steps", -1, None), ("max_steps", 0, "must be -1 (unset) or an integer >= 1 (got 0)"),
    ("num_train_epochs", 0.0, "must be > 0 (got 0.0)"), ("per_device_train_batch_size", 2.5, "must be an integer >= 1 (got 2.5)"),
])
def test_check_value(name, value, problem):
    assert params.check_value(name, value) == problem


def test_check_values_and_cross_rules():
    assert params.check_values({"method": "dlb", "per_device_train_batch_size": 3}) == \
        ("per_device_train_batch_size", "must be even and >= 2 for method 'dlb' (got 3)")
    assert params.check_values({"method": "vanilla", "per_device_train_batch_size": 3}) is None
    assert params.check_values({"tau0": 30.0, "tau_range": (0.05, 20.0)})[0] == "tau_range"
    assert params.check_values({"alpha0": 1.0, "unknown": object()}) is None


def test_config_and_flags_derive_from_the_table():
    fields = {f.name: f for f in dataclasses.fields(DynSDPBConfig)}
    for name, p in params.PARAMS.items():
        assert fields[name].default == p.default
        assert fields[name].metadata["help"].startswith(p.help)
        assert FLAGS[name] == p.flag
    a = build_parser().parse_args(["train", "--task", "rte", "--model", "m", "--output-dir", "o"])
    for name, p in params.PARAMS.items():
        assert getattr(a, name) == p.default
    assert a.method == params.DEFAULT_METHOD


def run_train(capsys, tmp_path, data_dir, *extra):
    """`train` up to its first checks: the model folder does not exist, so passing the method
    checks ends at '--model: no such model folder'."""
    code = main(["train", "--task", "rte", "--data-dir", str(data_dir), "--model", str(tmp_path / "no-model"),
                 "--output-dir", str(tmp_path / "out"), "--batch-size", "8", *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def alpha0_at_least_half(monkeypatch):
    """A changed bound in params.py, and only there."""
    monkeypatch.setitem(params.PARAMS, "alpha0", dataclasses.replace(params.PARAMS["alpha0"], low=0.5))


def test_a_changed_bound_is_followed_by_the_config(alpha0_at_least_half, tmp_path):
    with pytest.raises(UserError, match=r"^alpha0: must be >= 0.5 \(got 0.2\)$"):
        DynSDPBConfig(output_dir=str(tmp_path), alpha0=0.2, report_to=[])
    DynSDPBConfig(output_dir=str(tmp_path), alpha0=0.5, report_to=[])


def test_a_changed_bound_is_followed_by_the_cli(alpha0_at_least_half, data_dir, tmp_path, capsys):
    code, err = run_train(capsys, tmp_path, data_dir, "--alpha0", "0.2")
    assert (code, err) == (2, "tune-dynsdpb: error: --alpha0: must be >= 0.5 (got 0.2)\n")
    code, err = run_train(capsys, tmp_path, data_dir, "--alpha0", "0.5")
    assert code == 2 and err.startswith("tune-dynsdpb: error: --model: no such model folder")


def test_a_changed_bound_is_followed_by_the_sweep_schema(alpha0_at_least_half, tmp_path):
    import sweeps
    from tune_dynsdpb.search_space import parse_search_space

    spec = sweeps.spec_dict(tmp_path, methods=["dlb"])
    spec["params"]["dlb"]["alpha0"] = {"low": 0.2, "high": 2.0}
    with pytest.raises(UserError, match=r"^f.yaml: params.dlb.alpha0: alpha0 must be >= 0.5 \(got 0.2\)$"):
        parse_search_space(spec, "f.yaml")
    spec["params"]["dlb"]["alpha0"] = {"low": 0.5, "high": 2.0}
    assert parse_search_space(spec, "f.yaml").params.dlb.alpha0.low == 0.5


def test_a_loosened_bound_is_followed_too(monkeypatch, data_dir, tmp_path, capsys):
    """Negative alpha0 is normally rejected; with the bound moved in params.py both accept it."""
    code, err = run_train(capsys, tmp_path, data_dir, "--alpha0=-0.5")
    assert err.startswith("tune-dynsdpb: error: --alpha0: must be >= 0 ")
    monkeypatch.setitem(params.PARAMS, "alpha0", dataclasses.replace(params.PARAMS["alpha0"], low=-1.0))
    assert DynSDPBConfig(output_dir=str(tmp_path), alpha0=-0.5, report_to=[]).alpha0 == -0.5
    code, err = run_train(capsys, tmp_path, data_dir, "--alpha0=-0.5")
    assert err.startswith("tune-dynsdpb: error: --model: no such model folder")


def test_the_docs_table_lists_every_parameter_as_params_defines_it():
    """docs/method.md's table of knobs: a row per parameter, with params.py's default and rule."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    rows = {m[0]: (m[1].strip(), m[2].strip()) for m in re.findall(r"^\| `(\w+)` \|([^|]*)\|(.*)\|$", text, re.M)}
    for name, p in params.PARAMS.items():
        assert name in rows, f"docs/method.md has no row for {name}"
        default, allowed = rows[name]
        want = f"`{p.default}`" if p.type is str else "`()`" if p.default == () else str(p.default)
        assert default == want, (name, default, want)
        if p.choices is not None:
            assert all(f"`{c}`" in allowed for c in p.choices), (name, allowed)
        elif p.type in (float, int):
            rule = p.rule.removeprefix("in ").replace(">=", "≥").replace("<=", "≤").replace("-", "−")
            assert allowed.startswith(rule), (name, allowed, rule)
