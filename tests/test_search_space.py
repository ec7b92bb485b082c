"""Sweep files: the shipped ones validate and sample inside their spaces; bad ones fail in one line."""

import random
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from tune_dynsdpb.errors import UserError
from tune_dynsdpb.search_space import (Choices, Range, SweepSpec, TaskSpec, apply_overrides, config_name,
                                       load_search_space, parse_search_space, resolve_metric)
from tune_dynsdpb.searching import (DefineByRun, GroupedASHA, RoundRobinSearcher, create_points_to_evaluate,
                                    create_scheduler, create_searcher)

ROOT = Path(__file__).parent.parent
# every sweep file we ship: the user-facing ones and the real-data benchmark protocol
SHIPPED = sorted(ROOT.glob("search_spaces/*.yaml")) + sorted(ROOT.glob("benchmarks/real/*.yaml"))
METHOD_ONLY = {"vanilla": set(), "dlb": {"alpha0", "tau0"}, "dlb_warmup": {"alpha0", "tau0", "distill_warmup"},
               "dynsdpb": {"alpha0", "tau0", "lambda_alpha", "lambda_tau", "granularity"}, "pbt": {"alpha0", "tau0"}}
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
MINIMAL = {"name": "t", "task": "rte", "model": "m", "methods": ["vanilla", "dlb"]}


def write(tmp_path, text, name="sweep.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def declared(spec, method, name):
    blocks = [spec.params.common] + ([getattr(spec.params, method)] if method != "vanilla" else [])
    return next(getattr(b, name) for b in blocks if name in type(b).model_fields)


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_samples_inside_its_space(path):
    spec = load_search_space(path)
    assert isinstance(spec, SweepSpec) and spec.path == path and spec.methods
    rng = random.Random(0)
    for ts in spec.task_specs():
        for method in spec.methods:
            fn = DefineByRun(spec, (ts.task, method))
            study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True))
            for _ in range(12):  # past TPE's 10 random start-up trials
                trial = study.ask()
                const = fn(trial)
                assert const["method"] == method and const["task"] == ts.task
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
        task = spec.task_specs()[0].task
        for method in spec.methods:
            study = optuna.create_study()
            for point in create_points_to_evaluate(spec, method):
                study.enqueue_trial(point)
            trial = study.ask()
            const = DefineByRun(spec, (task, method))(trial)
            const.pop("task")
            DynSDPBConfig(output_dir=str(tmp_path), use_cpu=True, **trial.params, **const, **spec.training_kwargs())
    assert config_name("warmup_ratio") == "warmup_steps" and config_name("tau0") == "tau0"


def test_quickstart_is_small_and_has_every_arm():
    """The README's main job: SST-2 (which MiniLM learns within a few dozen steps), vanilla and
    four distinct DLB-style arms (pbt included) x 2 trials of one epoch on 800 sentences, two
    one-CPU trials at once."""
    spec = load_search_space(ROOT / "search_spaces" / "quickstart.yaml")
    assert spec.task == "sst2" and spec.max_train_samples == 800 and spec.max_eval_samples == 400
    assert spec.methods == ["vanilla", "dlb", "dlb_warmup", "dynsdpb", "pbt"]
    assert spec.budget.num_samples == 2 and spec.params.common.num_train_epochs == 1
    assert spec.params.common.per_device_train_batch_size == 16 and spec.resources.cpus_per_trial == 1
    assert [t.task for t in spec.task_specs()] == ["sst2"]


def test_the_multi_task_files_list_six_and_three_tasks():
    glue = load_search_space(ROOT / "search_spaces" / "glue-superglue.yaml")
    assert [t.task for t in glue.task_specs()] == ["rte", "mrpc", "cola", "cb", "stsb", "sst2"]
    real = load_search_space(ROOT / "benchmarks" / "real" / "protocol.yaml")
    assert [t.task for t in real.task_specs()] == ["sst2", "cb", "stsb"] and real.budget.num_samples >= 8
    pbt = load_search_space(ROOT / "benchmarks" / "real" / "protocol-pbt.yaml")  # the same protocol, dlb vs pbt
    assert pbt.methods == ["dlb", "pbt"] and pbt.task_specs() == real.task_specs()
    assert (pbt.budget, pbt.resources, pbt.seed) == (real.budget, real.resources, real.seed)
    assert pbt.params.common == real.params.common and pbt.params.dlb == real.params.dlb
    assert (pbt.params.pbt.alpha0, pbt.params.pbt.tau0) == (real.params.dlb.alpha0, real.params.dlb.tau0)


def test_searcher_scheduler_and_warm_starts(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    text = BASE.replace("  common:\n", "  common:\n    num_train_epochs: {choices: [1, 3]}\n")
    spec = load_search_space(write(tmp_path, text + "budget: {evals_per_epoch: 2, max_concurrent: 2}\n"))
    assert create_points_to_evaluate(spec, "vanilla") == []
    assert create_points_to_evaluate(spec, "dlb") == [{"tau0": 3.0, "alpha0": 1.0}]
    dyn = create_points_to_evaluate(spec, "dynsdpb")
    assert dyn == [{"tau0": 3.0, "alpha0": 1.0, "lambda_alpha": 0.8, "lambda_tau": -0.1}]

    groups = [("rte", m) for m in spec.methods]
    searcher = create_searcher(spec, groups)
    assert isinstance(searcher, RoundRobinSearcher) and list(searcher.searchers) == groups
    assert all(isinstance(s, OptunaSearch) for s in searcher.searchers.values())
    assert searcher.searchers["rte", "dlb"]._points_to_evaluate == [{"tau0": 3.0, "alpha0": 1.0}]
    first = searcher.searchers["rte", "dynsdpb"].suggest("t0")  # the enqueued warm start comes first
    assert first["method"] == "dynsdpb" and first["task"] == "rte" and {k: first[k] for k in dyn[0]} == dyn[0]
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune checkpoints its searcher: must pickle

    sched = create_scheduler(spec, groups)
    assert isinstance(sched, GroupedASHA) and set(sched.schedulers) == set(groups)
    for s in sched.schedulers.values():
        assert isinstance(s, ASHAScheduler) and s._max_t == 6  # 3 epochs x 2 evaluations
        assert s._metric == "objective" and s._mode == "max"
    assert sched.set_search_properties("objective", "max")  # metric/mode come from TuneConfig


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
    assert DefineByRun(spec, ("rte", "dynsdpb"))(trial) == {"task": "rte", "method": "dynsdpb", "granularity": "batch"}
    (ts,) = spec.task_specs()
    assert resolve_metric(ts, ("accuracy", "f1"), "accuracy", "max", "f.yaml") == ("eval_f1", "max")
    spec.metric = None
    (ts,) = spec.task_specs()
    assert resolve_metric(ts, ("accuracy", "f1"), "accuracy", "max", "f.yaml") == ("eval_accuracy", "max")
    assert spec.params.common.learning_rate.low == 1e-5  # YAML-1.1 style "1e-5" is read as a number
    assert SweepSpec.model_validate(spec.model_dump()).model_dump() == spec.model_dump()  # round trip


BAD = [  # (what, replace this, with this, the message after "<file>: ")
    ("unknown top-level key", "name: t\n", "name: t\nbogus: 1\n", "bogus: unknown key"),
    ("unknown param in a block", "dlb: {alpha0:", "dlb: {lambda_tau: {low: 0, high: 1}, alpha0:",
     "params.dlb.lambda_tau: unknown key"),
    ("unknown range key", "{low: 0.1, high: 3.0}", "{low: 0.1, hgh: 3.0}", "params.dlb.alpha0.hgh: unknown key"),
    ("unknown method", "[vanilla, dlb, dynsdpb]", "[vanilla, dbl]",
     "methods.1: unknown method 'dbl' (valid: vanilla, dlb, dlb_warmup, dynsdpb, pbt)"),
    ("empty range", "{low: 0.0, high: 2.0}", "{low: 2.0, high: 2.0}",
     "params.dynsdpb.lambda_alpha: empty or inverted range: low (2) must be < high (2)"),
    ("inverted range", "{low: 1e-5, high: 1.0e-4, log: true}", "{low: 1e-3, high: 1.0e-4}",
     "params.common.learning_rate: empty or inverted range: low (0.001) must be < high (0.0001)"),
    ("log range from 0", "{low: 1e-5, high: 1.0e-4, log: true}", "{low: 0, high: 1.0e-4, log: true}",
     "params.common.learning_rate: log range needs low > 0, got 0"),
    ("negative alpha0", "dlb: {alpha0: {low: 0.1", "dlb: {alpha0: {low: -0.1",
     "params.dlb.alpha0: alpha0 must be >= 0 (got -0.1)"),
    ("lambda_tau reaching -1", "{low: -0.5, high: 1.0}", "{low: -1.0, high: 1.0}",
     "params.dynsdpb.lambda_tau: lambda_tau must be > -1 (got -1.0)"),
    ("odd batch size with dlb", "{choices: [16, 32]}", "{choices: [15, 32]}",
     "params.common.per_device_train_batch_size: dlb/dynsdpb split each batch in two halves: every batch size "
     "must be even and >= 2 (for a range: even low and an even step)"),
    ("empty choices", "{choices: [sample, batch]}", "{choices: []}",
     "params.dynsdpb.granularity: choices must not be empty"),
    ("bad granularity", "{choices: [sample, batch]}", "{choices: [sample, token]}",
     "params.dynsdpb.granularity: granularity must be one of sample, batch (got 'token')"),
    ("tau0 outside tau_range", "    tau0: {low: 1.0, high: 5.0}\n", "    tau0: {low: 1.0, high: 30.0}\n",
     "params.dynsdpb.tau0: dynsdpb's tau0 must lie inside tau_range [0.05, 20] (training.tau_range)"),
    ("inverted tau_range", "name: t\n", "name: t\ntraining: {tau_range: [8.0, 4.0]}\n",
     "training.tau_range: must have LOW <= HIGH (got (8.0, 4.0))"),
    ("point outside range", "name: t\n", "name: t\npoints_to_evaluate: {dlb: [{tau0: 9.0}]}\n",
     "points_to_evaluate.dlb.0.tau0: 9.0 lies outside the declared range [1, 5]"),
    ("point naming unknown param", "name: t\n", "name: t\npoints_to_evaluate: {dlb: [{lambda_tau: 0}]}\n",
     "points_to_evaluate.dlb.0.lambda_tau: not a searched parameter of the dlb arm "
     "(searched: learning_rate, per_device_train_batch_size, alpha0, tau0)"),
    ("malformed YAML", "  common:\n", "  common: [\n",
     "line 8: malformed YAML: while parsing a flow sequence expected ',' or ']', but got '<scalar>'"),
    ("time budget zero", "name: t\n", "name: t\nbudget: {time_budget_s: 0}\n",
     "budget.time_budget_s: Input should be greater than 0"),
    ("time budget negative", "name: t\n", "name: t\nbudget: {time_budget_s: -60}\n",
     "budget.time_budget_s: Input should be greater than 0"),
    ("task and tasks", "task: rte\n", "task: rte\ntasks: [{task: cola}]\n",
     "task: give either task: NAME or tasks: [{task: NAME, ...}, ...]"),
    ("neither task nor tasks", "task: rte\n", "",
     "task: give either task: NAME or tasks: [{task: NAME, ...}, ...]"),
    ("task listed twice", "task: rte\n", "tasks: [{task: rte}, {task: rte, max_length: 64}]\n",
     "tasks.1.task: task 'rte' is listed twice"),
    ("unknown task override", "task: rte\n", "tasks: [{task: rte}, {task: cola, max_lenght: 64}]\n",
     "tasks.1.max_lenght: unknown key"),
    ("empty tasks", "task: rte\n", "tasks: []\n", "tasks: list at least one task"),
]


@pytest.mark.parametrize("what,old,new,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_user_error(tmp_path, what, old, new, expected):
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1), name="bad_sweep.yaml")
    assert user_error(load_search_space, path) == f"{path}: {expected}"


def test_tau_range_binds_dynsdpbs_tau0_alone(tmp_path):
    """tau_range clamps dynsdpb's tau only: dlb's tau0 (and vanilla's default 3) may lie outside it."""
    from tune_dynsdpb.params import check_values

    text = BASE.replace("name: t\n", "name: t\ntraining: {tau_range: [0.5, 4.0]}\n")
    text = text.replace("    tau0: {low: 1.0, high: 5.0}\n", "    tau0: {low: 1.0, high: 4.0}\n")
    spec = load_search_space(write(tmp_path, text))
    assert spec.params.dlb.tau0.high == 5.0 and spec.training.tau_range == (0.5, 4.0)
    for method, tau0 in (("vanilla", 3.0), ("dlb", 5.0), ("dlb_warmup", 5.0), ("pbt", 5.0)):
        assert check_values({"method": method, "tau0": tau0, "tau_range": (0.5, 4.0)}) is None
    assert check_values({"method": "dynsdpb", "tau0": 5.0, "tau_range": (0.5, 4.0)})[0] == "tau_range"
    # dynsdpb's tau0 left at its default (3), outside the range: the range is named
    path = write(tmp_path, BASE.replace("    tau0: {low: 1.0, high: 5.0}\n", "") + "training: {tau_range: [4, 8]}\n",
                 name="default.yaml")
    assert user_error(load_search_space, path) == (
        f"{path}: training.tau_range: dynsdpb's tau0 must lie inside tau_range [4, 8] (training.tau_range)")


@pytest.mark.parametrize("name", ["../..", "/home/x", "a/b", ".hidden", "", "x" * 101])
def test_names_that_would_escape_their_folder_are_rejected(name):
    msg = user_error(parse_search_space, {**MINIMAL, "name": name}, "f.yaml")
    if name == "":
        assert msg == "f.yaml: name: String should have at least 1 character"
    else:
        assert msg == (f"f.yaml: name: {name!r}: use letters, digits, '.', '_' and '-' (it names folders), "
                       "starting with a letter or digit")


def test_multi_task_overrides_resolve_per_task():
    spec = parse_search_space({
        **{k: v for k, v in MINIMAL.items() if k != "task"}, "data_dir": "/data", "max_length": 96,
        "max_train_samples": 500, "metric": "accuracy",
        "tasks": [{"task": "rte"},
                  {"task": "cola", "max_length": 48, "metric": "mcc", "mode": "max", "data_dir": "/cola"},
                  {"task": "stsb", "max_eval_samples": 10, "max_train_samples": 20, "metric": "loss"}]})
    rte, cola, stsb = spec.task_specs()
    assert rte == TaskSpec(task="rte", data_dir="/data", max_length=96, max_train_samples=500, metric="accuracy")
    assert cola == TaskSpec(task="cola", data_dir="/cola", max_length=48, max_train_samples=500, metric="mcc",
                            mode="max")
    assert stsb == TaskSpec(task="stsb", data_dir="/data", max_length=96, max_train_samples=20,
                            max_eval_samples=10, metric="loss")
    assert spec.task is None and [t.task for t in spec.tasks] == ["rte", "cola", "stsb"]  # the file is unchanged
    assert resolve_metric(stsb, ("pearson", "spearmanr"), "pearson", "max", "f.yaml") == ("eval_loss", "min")
    assert resolve_metric(cola, ("mcc",), "mcc", "max", "f.yaml") == ("eval_mcc", "max")


def test_resolve_metric_lists_the_valid_names_and_reads_loss_as_min():
    ts = TaskSpec(task="rte", metric="acuracy")
    assert user_error(resolve_metric, ts, ("accuracy", "f1"), "accuracy", "max", "f.yaml") == (
        "f.yaml: metric: 'acuracy' is not reported by task 'rte' (valid: accuracy, f1, loss)")
    for metric in ("loss", "eval_loss"):
        assert resolve_metric(TaskSpec(task="rte", metric=metric), ("accuracy",), "accuracy", "max",
                              "f.yaml") == ("eval_loss", "min")
    assert resolve_metric(TaskSpec(task="rte", metric="loss", mode="max"), ("accuracy",), "accuracy", "max",
                          "f.yaml") == ("eval_loss", "max")  # an explicit mode wins
    assert resolve_metric(TaskSpec(task="rte"), ("accuracy",), "accuracy", "max", "f.yaml") == (
        "eval_accuracy", "max")


def test_apply_overrides():
    raw = {**MINIMAL, "budget": {"num_samples": 4, "grace_period": 1}}
    out = apply_overrides(raw, ["budget.num_samples=16", "model=/path/to/model", "resources.cpus_per_trial=2",
                                "params.common.learning_rate={low: 1e-5, high: 1e-3, log: true}"])
    assert raw["budget"]["num_samples"] == 4 and raw["model"] == "m"  # the input is not changed
    spec = parse_search_space(out, "f.yaml")
    assert spec.budget.num_samples == 16 and spec.budget.grace_period == 1 and spec.model == "/path/to/model"
    assert spec.resources.cpus_per_trial == 2.0
    assert spec.params.common.learning_rate == Range(low=1e-5, high=1e-3, log=True)  # "1e-5" read as a number

    unknown = apply_overrides(raw, ["budget.num_sample=16"])  # accepted here, rejected when validated
    assert user_error(parse_search_space, unknown, "--set") == "--set: budget.num_sample: unknown key"
    assert user_error(apply_overrides, raw, ["foo"]) == (
        "--set: 'foo': expected key=value (e.g. budget.num_samples=16)")
    assert user_error(apply_overrides, raw, ["=3"]) == "--set: '=3': expected key=value (e.g. budget.num_samples=16)"
    assert user_error(apply_overrides, raw, ["model.path=x"]) == "--set: model: is a value, not a section"
    assert user_error(apply_overrides, raw, ["budget.num_samples=[1"]) == (
        "--set: budget.num_samples: cannot read '[1' as a value")


def test_dlb_warmup_block(tmp_path):
    raw = {**MINIMAL, "methods": ["dlb", "dlb_warmup"],
           "params": {"dlb_warmup": {"distill_warmup": {"low": 0.05, "high": 0.5},
                                     "alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0}}}}
    spec = parse_search_space(raw, "f.yaml")
    assert create_points_to_evaluate(spec, "dlb_warmup") == [{"tau0": 3.0, "alpha0": 1.0, "distill_warmup": 0.25}]
    assert create_points_to_evaluate(spec, "dlb") == []  # the dlb block searches nothing
    study = optuna.create_study()
    for _ in range(5):
        trial = study.ask()
        const = DefineByRun(spec, ("rte", "dlb_warmup"))(trial)
        assert const == {"task": "rte", "method": "dlb_warmup"}
        assert 0.05 <= trial.params["distill_warmup"] <= 0.5
        study.tell(trial, 0.0)
    fixed = parse_search_space({**raw, "params": {"dlb_warmup": {"distill_warmup": 0.25}}}, "f.yaml")
    assert DefineByRun(fixed, ("rte", "dlb_warmup"))(optuna.create_study().ask())["distill_warmup"] == 0.25
    assert DefineByRun(fixed, ("rte", "dlb"))(optuna.create_study().ask()) == {"task": "rte", "method": "dlb"}

    def bad(block):
        return user_error(parse_search_space, {**raw, "params": {"dlb_warmup": block}}, "f.yaml")

    where = "f.yaml: params.dlb_warmup.distill_warmup"
    assert bad({"distill_warmup": {"low": 0.1, "high": 1.0}}) == f"{where}: distill_warmup must be in (0, 1) (got 1.0)"
    assert bad({"distill_warmup": {"low": -0.1, "high": 0.5}}) == (
        f"{where}: distill_warmup must be in (0, 1) (got -0.1)")
    assert bad({"distill_warmup": 1.0}) == f"{where}: distill_warmup must be in (0, 1) (got 1.0)"
    assert bad({"distill_warmup": {"choices": [0.1, 1.5]}}) == f"{where}: distill_warmup must be in (0, 1) (got 1.5)"
    # a warm-up of 0 is dlb itself: refused as a value, a range end or a choice
    assert bad({"distill_warmup": {"low": 0.0, "high": 0.5}}) == f"{where}: distill_warmup must be in (0, 1) (got 0.0)"
    assert bad({"distill_warmup": 0}) == f"{where}: distill_warmup must be in (0, 1) (got 0)"
    assert user_error(parse_search_space, {**raw, "params": {"dlb": {"distill_warmup": 0.5}}}, "f.yaml") == (
        "f.yaml: params.dlb.distill_warmup: unknown key")  # only dlb_warmup has a warm-up


def test_odd_batch_size_is_fine_without_paired_arms(tmp_path):
    text = BASE.replace("[vanilla, dlb, dynsdpb]", "[vanilla]").replace("[16, 32]", "[15, 32]")
    spec = load_search_space(write(tmp_path, text))
    assert spec.methods == ["vanilla"]  # the dlb/dynsdpb blocks are ignored
    searcher = create_searcher(spec, [("rte", "vanilla")])
    config = searcher.suggest("t0")
    assert config["method"] == "vanilla" and config["per_device_train_batch_size"] in (15, 32)


def test_missing_file_and_non_mapping(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    assert user_error(load_search_space, missing) == f"{missing}: file not found"
    listed = write(tmp_path, "- a\n- b\n", name="list.yaml")
    assert user_error(load_search_space, listed) == (
        f"{listed}: top level must be a mapping of keys (name, task, model, ...)")
    assert yaml.safe_load("a: 1e-5")["a"] == "1e-5"  # why the loader needs its own float rule
