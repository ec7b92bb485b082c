"""searching.py without a Ray cluster: RoundRobinSearcher keeps the (task, arm) groups level and
routes results to each group's Optuna study; GroupedASHA compares a trial with its own group only."""

from __future__ import annotations

import itertools

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from tune_dynsdpb import results as R
from tune_dynsdpb.search_space import parse_search_space
from tune_dynsdpb.searching import (RoundRobinSearcher, create_journal_storage, create_scheduler,
                                    create_searcher, group_of, study_name)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

TASKS, METHODS = ("rte", "cola"), ("vanilla", "dlb", "dynsdpb")
GROUPS = [(t, m) for t in TASKS for m in METHODS]


def make_spec(num_samples=3, **extra):
    return parse_search_space({
        "name": "grp", "model": "m", "tasks": [{"task": t} for t in TASKS], "methods": list(METHODS), "seed": 0,
        "budget": {"num_samples": num_samples, "evals_per_epoch": 2, "grace_period": 1, "reduction_factor": 2},
        "params": {"common": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}, "num_train_epochs": 2,
                              "per_device_train_batch_size": 8},
                   "dlb": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0}},
                   "dynsdpb": {"alpha0": {"low": 0.5, "high": 2.0}, "lambda_alpha": {"low": 0.0, "high": 1.0}}},
        **extra}, "grp.yaml")


def study(searcher: RoundRobinSearcher, group) -> optuna.Study:
    return searcher.searchers[group]._ot_study


def spread(searcher) -> int:
    return max(searcher.started.values()) - min(searcher.started.values())


# -- RoundRobinSearcher ----------------------------------------------------------------------------
def test_round_robin_keeps_groups_level_and_finishes():
    spec = make_spec(num_samples=3)
    searcher = create_searcher(spec, GROUPS)
    configs = {}
    for i in itertools.count():
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        assert config is not None
        assert spread(searcher) <= 1, (i, searcher.started)
        configs[f"t{i}"] = config
        if i % 4 == 3:  # completions along the way change nothing about the order
            searcher.on_trial_complete(f"t{i - 2}", {R.OBJECTIVE: 0.5, "training_iteration": 1})
    assert len(configs) == 3 * len(GROUPS) and i == len(configs)
    assert searcher.started == {g: 3 for g in GROUPS}
    assert searcher.suggest("again") == Searcher.FINISHED  # and stays finished
    for trial_id, config in configs.items():
        assert group_of(config) == searcher.trial_group[trial_id]
        task, method = group_of(config)
        assert ("alpha0" in config) == (method != "vanilla") and ("tau0" in config) == (method == "dlb")
        assert ("lambda_alpha" in config) == (method == "dynsdpb") and task in TASKS
        assert 1e-5 <= config["learning_rate"] <= 1e-3 and config["num_train_epochs"] == 2
    # the first round goes over every group once, in the spec's order
    assert [group_of(configs[f"t{i}"]) for i in range(len(GROUPS))] == GROUPS


def test_each_round_sends_the_costliest_trials_first():
    """experiment.order_groups: train tokens x passes per sample and epoch, most first; ties keep the
    spec's order. cola's 3 x 10-token samples cost less than rte's 2 x 20 (20 + 20 > 3 x 10)."""
    from types import SimpleNamespace

    from tune_dynsdpb.experiment import order_groups

    tasks = {"rte": SimpleNamespace(train={"input_ids": [[0] * 20] * 2}),
             "cola": SimpleNamespace(train={"input_ids": [[0] * 10] * 3})}
    assert order_groups(tasks, METHODS) == [("rte", "dlb"), ("rte", "dynsdpb"), ("cola", "dlb"), ("cola", "dynsdpb"),
                                            ("rte", "vanilla"), ("cola", "vanilla")]


def test_a_group_that_cannot_suggest_now_does_not_advance():
    class Busy(Searcher):
        def suggest(self, trial_id):
            return None  # e.g. a ConcurrencyLimiter at its limit

    spec = make_spec(num_samples=2)
    searcher = create_searcher(spec, GROUPS[:2])
    searcher.searchers[GROUPS[0]] = Busy()
    assert searcher.suggest("t0") is None and searcher.started == {GROUPS[0]: 0, GROUPS[1]: 0}
    assert "t0" not in searcher.trial_group


def test_results_go_to_their_groups_study():
    spec = make_spec(num_samples=2)
    searcher = create_searcher(spec, GROUPS)
    ids = {}
    for i in range(len(GROUPS)):
        config = searcher.suggest(f"t{i}")
        ids[group_of(config)] = f"t{i}"
    target = ("cola", "dlb")
    searcher.on_trial_result(ids[target], {R.OBJECTIVE: 0.25, "training_iteration": 1})
    searcher.on_trial_complete(ids[target], {R.OBJECTIVE: 0.75, "training_iteration": 2, R.FINAL: True})
    for g in GROUPS:
        trials = study(searcher, g).trials
        assert len(trials) == 1, g
        if g == target:
            assert trials[0].state == TrialState.COMPLETE and trials[0].value == 0.75
        else:
            assert trials[0].state == TrialState.RUNNING, g
    searcher.on_trial_complete("unknown-trial", {R.OBJECTIVE: 1.0})  # not ours: ignored, no error


def test_a_failed_trial_is_an_optuna_fail_never_a_value():
    spec = make_spec(num_samples=2)
    searcher = create_searcher(spec, GROUPS[:3])
    for i in range(3):
        searcher.suggest(f"t{i}")
    diverged = {R.OBJECTIVE: 0.99, R.FAILURE: "training diverged: non-finite loss at step 4", R.FINAL: True}
    searcher.on_trial_complete("t0", diverged)                     # diverged: the trainable said so
    searcher.on_trial_complete("t1", {R.OBJECTIVE: 0.6}, error=True)  # raised after reporting a score
    searcher.on_trial_complete("t2", {R.OBJECTIVE: 0.4})            # stopped early by ASHA: a value
    (failed,), (errored,), (stopped,) = (study(searcher, g).trials for g in GROUPS[:3])
    assert failed.state == TrialState.FAIL and failed.value is None
    assert errored.state == TrialState.FAIL and errored.value is None
    assert stopped.state == TrialState.COMPLETE and stopped.value == 0.4
    assert diverged[R.OBJECTIVE] == 0.99  # the caller's result is not modified


def test_save_and_restore_round_trip(tmp_path):
    spec = make_spec(num_samples=2)
    searcher = create_searcher(spec, GROUPS)
    for i in range(4):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {R.OBJECTIVE: 0.5})
    path = str(tmp_path / "searcher.pkl")
    searcher.save(path)

    fresh = create_searcher(spec, GROUPS)
    fresh.restore(path)
    assert fresh.started == searcher.started and fresh.trial_group == searcher.trial_group
    assert fresh.per_group == 2 and fresh.order == GROUPS
    assert [t.state for t in study(fresh, GROUPS[0]).trials] == [TrialState.COMPLETE]
    fresh.on_trial_complete("t1", {R.OBJECTIVE: 0.7})  # a trial started before the save completes after it
    assert study(fresh, GROUPS[1]).trials[0].value == 0.7
    n = 0
    while fresh.suggest(f"t{4 + n}") != Searcher.FINISHED:
        n += 1
        assert n <= 2 * len(GROUPS)
    assert n == 2 * len(GROUPS) - 4 and fresh.started == {g: 2 for g in GROUPS}


def test_journal_storage_studies_load_by_name(tmp_path):
    spec = make_spec(num_samples=2)
    journal = str(tmp_path / "optuna.journal")
    searcher = create_searcher(spec, GROUPS, create_journal_storage(journal))
    for i in range(len(GROUPS)):
        searcher.suggest(f"t{i}")
    for i in range(len(GROUPS)):
        searcher.on_trial_complete(f"t{i}", {R.OBJECTIVE: i / 10})
    path = str(tmp_path / "searcher.pkl")
    searcher.save(path)  # Tune checkpoints the searcher with its storage
    create_searcher(spec, GROUPS).restore(path)

    storage = create_journal_storage(journal)  # a second reader, as optuna-dashboard would be
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == sorted(study_name("grp", g) for g in GROUPS)
    assert study_name("grp", ("rte", "dlb")) == "grp.rte.dlb"
    for i, g in enumerate(GROUPS):
        loaded = optuna.load_study(study_name=study_name("grp", g), storage=storage)
        assert loaded.direction == optuna.study.StudyDirection.MAXIMIZE
        (trial,) = loaded.trials
        assert trial.state == TrialState.COMPLETE and trial.value == i / 10
        if g[1] == "dlb":  # the warm start went first
            assert trial.params == {**trial.params, "tau0": 3.0, "alpha0": 1.0}


# -- GroupedASHA ----------------------------------------------------------------------------------
class FakeController:
    """Neither ASHA nor GroupedASHA reads the controller; it is only passed through."""


def trial(task, method, trial_id):
    return Trial("__fake", config={R.TASK: task, R.METHOD: method, "learning_rate": 1e-4}, trial_id=trial_id,
                 stub=True)


def report(sched, t, it, value):
    return sched.on_trial_result(FakeController(), t, {"training_iteration": it, R.OBJECTIVE: value})


# Two groups on different scales: cola's objective is a Matthews correlation around 0.3 (its best
# trial), rte's an accuracy around 0.85. Reported in this order at the first rung (t=1).
SEQUENCE = [(("rte", "dlb"), "rte1", 0.80), (("rte", "dlb"), "rte2", 0.90), (("cola", "dlb"), "cola1", 0.30),
            (("cola", "dlb"), "cola2", 0.20)]


def first_rung(sched) -> tuple[dict, dict]:
    """Adds SEQUENCE's trials to ``sched`` and reports each once at t=1, in SEQUENCE's order:
    the trials and the scheduler's action for each, by trial id."""
    trials = {tid: trial(*g, tid) for g, tid, _ in SEQUENCE}
    for t in trials.values():
        sched.on_trial_add(FakeController(), t)
    return trials, {tid: report(sched, trials[tid], 1, v) for _, tid, v in SEQUENCE}


CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


@pytest.mark.parametrize("make_scheduler, expected", [
    # one ASHA over both groups ranks cola's best trial (0.30) against rte's accuracies and stops it
    pytest.param(lambda: ASHAScheduler(time_attr="training_iteration", metric=R.OBJECTIVE, mode="max", max_t=4,
                                       grace_period=1, reduction_factor=2),
                 {"rte1": CONTINUE, "rte2": CONTINUE, "cola1": STOP, "cola2": STOP},
                 id="one-shared-asha-stops-the-other-groups-best-trial"),
    # cola1 is cola's best: it continues; cola2 is below cola1 and stops, as ASHA should
    pytest.param(lambda: create_scheduler(make_spec(), [("rte", "dlb"), ("cola", "dlb")]),
                 {"rte1": CONTINUE, "rte2": CONTINUE, "cola1": CONTINUE, "cola2": STOP},
                 id="grouped-asha-compares-a-trial-with-its-own-group-only"),
])
def test_asha_first_rung(make_scheduler, expected):
    _, actions = first_rung(make_scheduler())
    assert actions == expected


def test_grouped_asha_keeps_each_group_in_its_own_bracket():
    sched = create_scheduler(make_spec(), [("rte", "dlb"), ("cola", "dlb")])
    assert all(s._max_t == 4 for s in sched.schedulers.values())  # 2 epochs x 2 evaluations
    trials, _ = first_rung(sched)  # its actions: test_asha_first_rung[grouped-asha-...]
    # cola1 goes on to the next rung and to the end; rte's trials never enter its bracket
    assert report(sched, trials["cola1"], 2, 0.35) == TrialScheduler.CONTINUE
    assert report(sched, trials["rte1"], 2, 0.82) == TrialScheduler.CONTINUE  # first at rung 2 of rte
    assert report(sched, trials["cola1"], 3, 0.36) == TrialScheduler.CONTINUE
    assert report(sched, trials["cola1"], 4, 0.40) == TrialScheduler.STOP  # max_t: the trial is done
    rung1 = {g: dict(s._brackets[0]._rungs[-1][1]) for g, s in sched.schedulers.items()}
    assert rung1 == {("rte", "dlb"): {"rte1": 0.80, "rte2": 0.90}, ("cola", "dlb"): {"cola1": 0.30, "cola2": 0.20}}


def test_grouped_asha_ignores_reports_it_cannot_place():
    sched = create_scheduler(make_spec(), [("rte", "dlb")])
    t = trial("rte", "dlb", "a")
    sched.on_trial_add(FakeController(), t)
    assert report(sched, t, 1, 0.9) == TrialScheduler.CONTINUE
    failed = trial("rte", "dlb", "b")
    sched.on_trial_add(FakeController(), failed)
    # a failed trial's last report has no objective: never compared, never recorded
    res = {"training_iteration": 1, R.FAILURE: "training diverged: non-finite loss at step 1"}
    assert sched.on_trial_result(FakeController(), failed, res) == TrialScheduler.CONTINUE
    assert dict(sched.schedulers["rte", "dlb"]._brackets[0]._rungs[-1][1]) == {"a": 0.9}
    stranger = Trial("__fake", config={"x": 1}, trial_id="c", stub=True)  # no task/method in its config
    sched.on_trial_add(FakeController(), stranger)
    assert report(sched, stranger, 1, -5.0) == TrialScheduler.CONTINUE
    other_group = trial("cola", "dlb", "d")  # a group the scheduler was not built for
    sched.on_trial_add(FakeController(), other_group)
    assert report(sched, other_group, 1, -5.0) == TrialScheduler.CONTINUE
    sched.on_trial_complete(FakeController(), failed, res)
    sched.on_trial_remove(FakeController(), t)
    assert "rte/dlb" in sched.debug_string()


def test_a_report_without_objective_is_not_passed_to_optuna():
    """A diverged trial's last report carries the failure and no objective; OptunaSearch would
    raise KeyError on it (in Tune's loop, ending the whole sweep)."""
    searcher = create_searcher(make_spec(num_samples=1), GROUPS[:1])
    searcher.suggest("t0")
    failure = {"training_iteration": 2, R.FAILURE: "training diverged: non-finite ce_loss at step 8", R.FINAL: True}
    searcher.on_trial_result("t0", failure)
    searcher.on_trial_complete("t0", failure)
    (t,) = study(searcher, GROUPS[0]).trials
    assert t.state == TrialState.FAIL and t.value is None


@pytest.mark.parametrize("metrics, error, ended", [
    ({"done": True, "training_iteration": 2}, None, True),            # the function returned
    ({"done": False, R.FINAL: True, "training_iteration": 2}, None, True),  # interrupted after its final report
    ({"done": True, R.FINAL: False, "training_iteration": 1}, None, True),  # stopped by the scheduler
    ({"done": False, R.FINAL: False, "training_iteration": 1}, None, False),  # cut off by the interrupt
    ({}, RuntimeError("boom"), True),                                   # failed
    (None, None, False),                                                # never reported
])
def test_a_trial_has_ended_on_done_final_or_error(metrics, error, ended):
    """``fit_tuner`` calls a restored experiment complete when every trial has ended: a trial whose
    final report was in when the driver was interrupted (TERMINATED, no ``done``: a restore skips
    it) counts as ended, or its resume would end as 'interrupted' with nothing left to run."""
    from types import SimpleNamespace

    from tune_dynsdpb.tuning import complete, unfinished
    from tune_dynsdpb.tuning import ended as has_ended

    r = SimpleNamespace(metrics=None if metrics is None else {"trial_id": "t1", **metrics}, error=error)
    assert has_ended(r) is ended
    assert complete([r], 1) is ended and complete([r], 2) is False
    assert unfinished([r]) == ([] if ended else [f"{'t1' if metrics is not None else '?'}@"
                                                 f"{(metrics or {}).get('training_iteration', 0)}"])
