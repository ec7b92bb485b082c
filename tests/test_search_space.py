"""Sweep files: the shipped ones validate and sample inside their spaces; bad ones fail in one line."""

import random
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from tune_dynsdpb.errors import UserError
from tune_dynsdpb.search_space import (Choices, Range, SweepSpec, config_name, create_define_by_run,
                                       create_points_to_evaluate, create_scheduler, create_searcher,
                                       load_search_space, resolve_metric)

ROOT = Path(__file__).parent.parent
# every sweep file we ship: the user-facing ones and the real-data benchmark protocol
SHIPPED = sorted(ROOT.glob("search_spaces/*.yaml")) + sorted(ROOT.glob("benchmarks/real/*.yaml"))
METHOD_ONLY = {"vanilla": set(), "dlb": {"alpha0", "tau0"},
               "dynsdpb": {"alpha0", "tau0", "lambda_alpha", "lambda_tau", "granularity"}}
ALL_METHOD_PARAMS = set().union(*METHOD_ONLY.values())

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

BASE = """\
name: t
task: rte
model: m
methods: [vanilla, dlb, dynsdpb]
params:
  common:
    learning_rate: {low: 1e-5, high: 1.0e-4, log: true}
    per_device_train_batch_size: {choices: [16, 32]}
  dlb: {alpha0: {low: 0.1, high: 3.0}, tau0: {low: 1.0, high: 5.0}}
  dynsdpb:
    alpha0: {low: 0.1, high: 3.0}
    tau0: {low: 1.0, high: 5.0}
    lambda_alpha: {low: 0.0, high: 2.0}
    lambda_tau: {low: -0.5, high: 1.0}
    granularity: {choices: [sample, batch]}
"""


def write(tmp_path, text, name="sweep.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def declared(spec, method, name):
    blocks = [spec.params.common] + ([getattr(spec.params, method)] if method != "vanilla" else [])
    return next(getattr(b, name) for b in blocks if name in type(b).model_fields)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_samples_inside_its_space(path):
    spec = load_search_space(path)
    assert isinstance(spec, SweepSpec) and spec.path == path and spec.methods
    rng = random.Random(0)
    for method in spec.methods:
        fn = create_define_by_run(spec, method)
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True))
        for _ in range(12):  # past TPE's 10 random start-up trials
            trial = study.ask()
            const = fn(trial)
            assert const["method"] == method
            config = {**trial.params, **const}
            assert not set(config) & (ALL_METHOD_PARAMS - METHOD_ONLY[method]), (method, config)
            for name, value in trial.params.items():
                p = declared(spec, method, "warmup_ratio" if name == "warmup_steps" else name)
                if isinstance(p, Range):
                    assert p.low <= value <= p.high, (name, value)
                else:
                    assert isinstance(p, Choices) and value in p.choices, (name, value)
            if method != "vanilla" and "per_device_train_batch_size" in config:
                bs = config["per_device_train_batch_size"]
                assert isinstance(bs, int) and bs >= 2 and bs % 2 == 0
            study.tell(trial, rng.random())


def test_suggestions_build_a_dynsdpb_config(tmp_path):
    from tune_dynsdpb.trainer import DynSDPBConfig

    for path in SHIPPED:
        spec = load_search_space(path)
        for method in spec.methods:
            study = optuna.create_study()
            for point in create_points_to_evaluate(spec, method):
                study.enqueue_trial(point)
            trial = study.ask()
            const = create_define_by_run(spec, method)(trial)
            DynSDPBConfig(output_dir=str(tmp_path), use_cpu=True, **trial.params, **const, **spec.training_kwargs())
    assert config_name("warmup_ratio") in ("warmup_ratio", "warmup_steps") and config_name("tau0") == "tau0"


def test_quickstart_is_small():
    spec = load_search_space(SHIPPED[0].parent / "quickstart.yaml")
    assert spec.task == "rte" and spec.max_train_samples == 128 and spec.max_eval_samples == 64
    assert spec.budget.num_samples == 2 and spec.params.common.num_train_epochs == 1
    assert spec.params.common.per_device_train_batch_size == 16 and spec.resources.cpus_per_trial == 1


def test_searcher_scheduler_and_warm_starts(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    text = BASE.replace("  common:\n", "  common:\n    num_train_epochs: {choices: [1, 3]}\n")
    spec = load_search_space(write(tmp_path, text + "budget: {evals_per_epoch: 2, max_concurrent: 2}\n"))
    assert create_points_to_evaluate(spec, "vanilla") == []
    assert create_points_to_evaluate(spec, "dlb") == [{"tau0": 3.0, "alpha0": 1.0}]
    dyn = create_points_to_evaluate(spec, "dynsdpb")
    assert dyn == [{"tau0": 3.0, "alpha0": 1.0, "lambda_alpha": 0.0, "lambda_tau": 0.0}]

    searcher = create_searcher(spec, "dynsdpb", "eval_accuracy", "max", seed=0)
    assert isinstance(searcher, ConcurrencyLimiter) and isinstance(searcher.searcher, OptunaSearch)
    first = searcher.searcher.suggest("t0")  # the enqueued warm start comes first
    assert first["method"] == "dynsdpb" and {k: first[k] for k in dyn[0]} == dyn[0]

    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune checkpoints its searcher: must pickle
    spec.budget.max_concurrent = None
    plain = create_searcher(spec, "dlb", "eval_accuracy", "max")
    assert isinstance(plain, OptunaSearch) and plain._points_to_evaluate == [{"tau0": 3.0, "alpha0": 1.0}]

    sched = create_scheduler(spec)
    assert isinstance(sched, ASHAScheduler) and sched._max_t == 6  # 3 epochs x 2 evaluations
    assert sched.set_search_properties("eval_accuracy", "max")  # metric/mode come from TuneConfig


def test_default_warm_start_skips_values_outside_the_space(tmp_path):
    text = BASE.replace("tau0: {low: 1.0, high: 5.0}}", "tau0: {low: 4.0, high: 5.0}}")
    spec = load_search_space(write(tmp_path, text))
    assert create_points_to_evaluate(spec, "dlb") == [{"alpha0": 1.0}]


def test_explicit_points_fixed_values_and_metric(tmp_path):
    text = BASE.replace("    granularity: {choices: [sample, batch]}\n", "    granularity: batch\n")
    text += "points_to_evaluate:\n  dynsdpb: [{tau0: 2.0, lambda_tau: 0.5}]\n  dlb: []\nmetric: f1\n"
    spec = load_search_space(write(tmp_path, text))
    assert create_points_to_evaluate(spec, "dynsdpb") == [{"tau0": 2.0, "lambda_tau": 0.5}]
    assert create_points_to_evaluate(spec, "dlb") == []
    trial = optuna.create_study().ask()
    assert create_define_by_run(spec, "dynsdpb")(trial) == {"method": "dynsdpb", "granularity": "batch"}
    assert resolve_metric(spec, "accuracy", "max") == ("eval_f1", "max")
    spec.metric = None
    assert resolve_metric(spec, "accuracy", "max") == ("eval_accuracy", "max")
    assert spec.params.common.learning_rate.low == 1e-5  # YAML-1.1 style "1e-5" is read as a number
    assert SweepSpec.model_validate(spec.model_dump()).model_dump() == spec.model_dump()  # round trip


BAD = [  # (what, replace this, with this, key the message must name)
    ("unknown top-level key", "name: t\n", "name: t\nbogus: 1\n", "bogus"),
    ("unknown param in a block", "dlb: {alpha0:", "dlb: {lambda_tau: {low: 0, high: 1}, alpha0:", "lambda_tau"),
    ("unknown range key", "{low: 0.1, high: 3.0}", "{low: 0.1, hgh: 3.0}", "hgh"),
    ("unknown method", "[vanilla, dlb, dynsdpb]", "[vanilla, dbl]", "dbl"),
    ("empty range", "{low: 0.0, high: 2.0}", "{low: 2.0, high: 2.0}", "lambda_alpha"),
    ("inverted range", "{low: 1e-5, high: 1.0e-4, log: true}", "{low: 1e-3, high: 1.0e-4}", "learning_rate"),
    ("log range from 0", "{low: 1e-5, high: 1.0e-4, log: true}", "{low: 0, high: 1.0e-4, log: true}",
     "learning_rate"),
    ("negative alpha0", "dlb: {alpha0: {low: 0.1", "dlb: {alpha0: {low: -0.1", "alpha0"),
    ("lambda_tau reaching -1", "{low: -0.5, high: 1.0}", "{low: -1.0, high: 1.0}", "lambda_tau"),
    ("odd batch size with dlb", "{choices: [16, 32]}", "{choices: [15, 32]}", "per_device_train_batch_size"),
    ("empty choices", "{choices: [sample, batch]}", "{choices: []}", "granularity"),
    ("bad granularity", "{choices: [sample, batch]}", "{choices: [sample, token]}", "granularity"),
    ("tau0 outside tau_range", "tau0: {low: 1.0, high: 5.0}}", "tau0: {low: 1.0, high: 30.0}}", "tau0"),
    ("point outside range", "name: t\n", "name: t\npoints_to_evaluate: {dlb: [{tau0: 9.0}]}\n", "tau0"),
    ("point naming unknown param", "name: t\n", "name: t\npoints_to_evaluate: {dlb: [{lambda_tau: 0}]}\n",
     "lambda_tau"),
    ("malformed YAML", "  common:\n", "  common: [\n", "line"),
]


@pytest.mark.parametrize("what,old,new,key", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_user_error(tmp_path, what, old, new, key):
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1), name="bad_sweep.yaml")
    with pytest.raises(UserError) as info:
        load_search_space(path)
    msg = str(info.value)
    assert "bad_sweep.yaml" in msg and key in msg and "\n" not in msg, msg


def test_odd_batch_size_is_fine_without_paired_arms(tmp_path):
    text = BASE.replace("[vanilla, dlb, dynsdpb]", "[vanilla]").replace("[16, 32]", "[15, 32]")
    spec = load_search_space(write(tmp_path, text))
    assert spec.methods == ["vanilla"]  # the dlb/dynsdpb blocks are ignored
    with pytest.raises(UserError, match="dlb"):
        create_define_by_run(spec, "dlb")


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="nowhere.yaml.*not found"):
        load_search_space(tmp_path / "nowhere.yaml")
    with pytest.raises(UserError, match="list.yaml.*mapping"):
        load_search_space(write(tmp_path, "- a\n- b\n", name="list.yaml"))
    assert yaml.safe_load("a: 1e-5")["a"] == "1e-5"  # why the loader needs its own float rule
