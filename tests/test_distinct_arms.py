"""Issue 20, item 3: no warm start, default or search space makes one arm train exactly another
arm (dynsdpb at both rates 0 is dlb; dlb_warmup with no warm-up is dlb)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from tune_dynsdpb import params
from tune_dynsdpb.errors import UserError
from tune_dynsdpb.search_space import DEFAULT_POINTS, load_search_space, parse_search_space
from tune_dynsdpb.search_space import pbt_replays_dlb
from tune_dynsdpb.searching import create_points_to_evaluate, tie_notes

ROOT = Path(__file__).parent.parent
SHIPPED = sorted(ROOT.glob("search_spaces/*.yaml")) + sorted(ROOT.glob("benchmarks/real/*.yaml"))
BASE = {"name": "t", "task": "rte", "model": "m", "methods": ["dlb", "dlb_warmup", "dynsdpb"]}


def is_duplicate(method: str, config: dict) -> bool:
    """Whether a trial config would train exactly another arm."""
    get = lambda k: config.get(k, params.PARAMS[k].default)  # noqa: E731
    if method == "dynsdpb":
        return get("lambda_alpha") == 0 and get("lambda_tau") == 0
    if method == "dlb_warmup":
        return get("distill_warmup") == 0
    return False


def error(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        parse_search_space(raw, "f.yaml")
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_warm_starts_and_fixed_values_never_duplicate_an_arm(path):
    spec = load_search_space(path)  # passes the duplicate check
    for method in spec.methods:
        fixed = {k: v for k, v in spec.params.arm(method).items() if not hasattr(v, "low") and not hasattr(v, "choices")}
        for point in create_points_to_evaluate(spec, method) or [{}]:
            assert not is_duplicate(method, {**fixed, **point}), (path.name, method, point)


def test_defaults_and_default_warm_starts_are_each_arm_itself():
    assert not is_duplicate("dynsdpb", DEFAULT_POINTS["dynsdpb"])
    assert not is_duplicate("dlb_warmup", DEFAULT_POINTS["dlb_warmup"])
    assert not is_duplicate("dynsdpb", {}) and not is_duplicate("dlb_warmup", {})  # the config defaults
    assert params.check_values({"method": "dynsdpb", "lambda_alpha": 0.0, "lambda_tau": 0.0}) == (
        "lambda_tau", "lambda_alpha = lambda_tau = 0 makes dynsdpb train exactly dlb; give it a non-zero rate")
    assert params.check_values({"method": "dynsdpb", "lambda_alpha": 0.0, "lambda_tau": 0.3}) is None
    assert params.check_value("distill_warmup", 0.0) == "must be in (0, 1) (got 0.0)"


def test_the_trainer_config_refuses_a_disguised_dlb(tmp_path):
    from tune_dynsdpb.trainer import DynSDPBConfig

    with pytest.raises(UserError, match="lambda_tau: lambda_alpha = lambda_tau = 0"):
        DynSDPBConfig(output_dir=str(tmp_path), use_cpu=True, method="dynsdpb", lambda_alpha=0.0, lambda_tau=0.0)
    with pytest.raises(UserError, match=r"distill_warmup: must be in \(0, 1\)"):
        DynSDPBConfig(output_dir=str(tmp_path), use_cpu=True, method="dlb_warmup", distill_warmup=0.0)


@pytest.mark.parametrize("dyn, points, message", [
    ({"lambda_alpha": 0.0, "lambda_tau": 0.0}, None, "params.dynsdpb: lambda_alpha and lambda_tau can both be 0"),
    ({"lambda_alpha": {"low": 0.0, "high": 1.0}, "lambda_tau": {"choices": [0.0, 0.5]}}, None,
     "params.dynsdpb: lambda_alpha and lambda_tau can both be 0"),
    ({"lambda_alpha": {"low": -0.0, "high": 1.0, "step": 0.5}, "lambda_tau": {"low": -0.5, "high": 0.5, "step": 0.25}},
     None, "params.dynsdpb: lambda_alpha and lambda_tau can both be 0"),
    ({"lambda_alpha": 0.0, "lambda_tau": {"low": -0.5, "high": 0.0}}, None,
     "params.dynsdpb: lambda_alpha and lambda_tau can both be 0"),
    ({"lambda_alpha": {"low": 0.0, "high": 1.0}, "lambda_tau": {"low": -0.5, "high": 0.5}},
     {"dynsdpb": [{"lambda_alpha": 0.0, "lambda_tau": 0.0}]}, "points_to_evaluate.dynsdpb.0: both rates 0"),
])
def test_a_file_that_can_train_dlb_as_dynsdpb_is_refused(dyn, points, message):
    raw = {**BASE, "params": {"dynsdpb": dyn}, **({"points_to_evaluate": points} if points else {})}
    assert message in error(raw)


def test_ranges_that_cannot_hit_both_zero_pass():
    ok = [{"lambda_alpha": {"low": 0.0, "high": 1.0}, "lambda_tau": {"low": -0.5, "high": 0.5}},  # inner 0: p = 0
          {"lambda_alpha": 0.0},                                       # λτ keeps its default 0.5
          {"lambda_alpha": {"low": 0.1, "high": 1.0}, "lambda_tau": 0.0}]
    for dyn in ok:
        parse_search_space({**BASE, "params": {"dynsdpb": dyn}}, "f.yaml")
    # a file without dynsdpb is not checked for it
    parse_search_space({**BASE, "methods": ["dlb"], "params": {"dynsdpb": {"lambda_alpha": 0, "lambda_tau": 0}}},
                       "f.yaml")


def test_the_cli_sweep_refuses_a_duplicating_file_with_exit_2(tmp_path, capsys):
    import yaml

    from tune_dynsdpb.cli import main

    f = tmp_path / "dup.yaml"
    f.write_text(yaml.safe_dump({**BASE, "params": {"dlb_warmup": {"distill_warmup": {"low": 0.0, "high": 0.5}}}}))
    code = main(["sweep", str(f), "--output-dir", str(tmp_path / "out")])  # refused before Ray starts
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x]
    assert lines[-1].endswith("params.dlb_warmup.distill_warmup: distill_warmup must be in (0, 1) (got 0.0)"), err
    assert not (tmp_path / "out").exists()


def test_on_a_regression_task_lambda_alpha_alone_keeps_dynsdpb_from_dlb(tiny_bert_regression, tmp_path, capsys):
    """A regression term has no tau (``losses.consistency_term``): lambda_alpha = 0 is exactly dlb there,
    whatever lambda_tau is. Refused by the rule, by the trainer (which knows the head) and, for a sweep
    file with a regression task, before any training (``validate``; a sweep does the same)."""
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification

    from tune_dynsdpb.cli import main
    from tune_dynsdpb.losses import consistency_term
    from tune_dynsdpb.trainer import DynSDPBConfig, DynSDPBTrainer

    z_now, z_prev, y = torch.randn(6), torch.randn(6), torch.randn(6)
    rates = {"alpha0": 0.7, "tau0": 2.5, "regression": True}
    dyn = consistency_term(z_now, z_prev, y, method="dynsdpb", lambda_alpha=0.0, lambda_tau=0.8, **rates)
    assert torch.equal(dyn.loss, consistency_term(z_now, z_prev, y, method="dlb", **rates).loss)  # the premise

    values = {"lambda_alpha": 0.0, "lambda_tau": 0.8}
    assert params.check_distinct("dynsdpb", values) is None  # classification: tau still adapts
    assert params.check_distinct("dynsdpb", values, regression=True) == (
        "lambda_alpha", "lambda_alpha = 0 on a regression task makes dynsdpb train exactly dlb (its term has no tau); "
                        "give it a non-zero rate")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_regression)
    args = DynSDPBConfig(output_dir=str(tmp_path / "t"), use_cpu=True, method="dynsdpb", report_to=[], **values)
    with pytest.raises(UserError, match="^lambda_alpha: lambda_alpha = 0 on a regression task"):
        DynSDPBTrainer(model=model, args=args)

    import sweeps
    from helpers import write_glue_dir

    data = write_glue_dir(tmp_path / "data")
    raw = sweeps.spec_dict(tiny_bert_regression, name="reg", methods=["dlb", "dynsdpb"], tasks=["stsb"])
    f = tmp_path / "reg.yaml"
    f.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["validate", str(f), "--data-dir", str(data)]) == 2
    assert capsys.readouterr().err == (
        f"tune-dynsdpb: error: {f}: params.dynsdpb.lambda_alpha: can be 0, which on the regression task stsb trains "
        "exactly dlb (its term has no tau): keep it off 0 (e.g. {low: 0.1, high: 2.0})\n")
    raw["params"]["dynsdpb"]["lambda_alpha"] = {"low": 0.1, "high": 1.0}
    f.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(f), "--data-dir", str(data)]) == 0


def test_tie_notes_say_why_two_arms_score_the_same():
    best = lambda m, **c: SimpleNamespace(score=0.8075, config={"method": m, "task": "sst2", **c})  # noqa: E731
    scored = {"dlb": best("dlb", alpha0=1.0, tau0=3.0, learning_rate=1e-4),
              "dlb_warmup": best("dlb_warmup", alpha0=1.0, tau0=3.0, learning_rate=1e-4, distill_warmup=0.25),
              "dynsdpb": SimpleNamespace(score=0.81, config={"method": "dynsdpb"})}
    state = SimpleNamespace(tasks={"sst2": SimpleNamespace(eval_size=400, metric="eval_accuracy")},
                            scored=lambda task: scored)
    (line,) = tie_notes(state)
    assert line.startswith("sst2: dlb, dlb_warmup tie at 0.8075 with different methods and distill_warmup")
    assert "400 eval samples" in line and "1/400" in line


def test_a_pbt_winner_that_pbt_never_perturbed_and_started_at_dlbs_best_is_said_to_be_dlbs_run():
    """The real protocol's CB row: the population's best member was in the upper quarter at the
    perturbation point (never perturbed) and started from dlb's best point (both studies are seeded
    alike), so its replay is dlb's run. The summary says so instead of "different runs"."""
    common = {"task": "cb", "learning_rate": 2.6e-4, "alpha0": 1.93, "tau0": 3.18}
    dlb = SimpleNamespace(score=0.6964, config={"method": "dlb", **common}, schedule=None)
    same = SimpleNamespace(score=0.6964, config={"method": "pbt", **common}, schedule=[[0, 1.93, 3.18]])
    state = lambda pbt: SimpleNamespace(tasks={"cb": SimpleNamespace(eval_size=56, metric="eval_accuracy")},  # noqa: E731
                                        scored=lambda task: {"dlb": dlb, "pbt": pbt})
    (line,) = tie_notes(state(same))
    assert line == ("cb: dlb, pbt tie at 0.6964: pbt's winning member was never perturbed and started from dlb's "
                    "best config: it trained dlb's run, so the two score the same by construction")
    perturbed = SimpleNamespace(score=0.6964, config={"method": "pbt", **common, "alpha0": 2.0},
                                schedule=[[0, 1.93, 3.18], [16, 2.0, 3.18]])
    (line,) = tie_notes(state(perturbed))
    assert line.startswith("cb: dlb, pbt tie at 0.6964 with different methods and alpha0: different runs")
    assert not pbt_replays_dlb({**common, "method": "pbt", "learning_rate": 1e-4}, [[0, 1.93, 3.18]],
                               {**common, "method": "dlb"})  # another learning rate: another run
    assert not pbt_replays_dlb(same.config, [[0, 1.93, 3.18]], None)
