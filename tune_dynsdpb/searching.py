"""One Tune experiment for a whole sweep: every (task, arm) group searched and scheduled apart.

A sweep of T tasks and A arms with N trials per arm is one ``Tuner`` of T·A·N trials, so the
cluster stays full until the last trial ends. Two Tune plug-ins keep the groups apart:

* :class:`RoundRobinSearcher` (a ``Searcher``) holds one Optuna study per group (TPE, seeded,
  with the arm's warm starts) and hands out new trials round-robin over the groups. The
  started-trial counts of any two groups therefore never differ by more than one: a sweep cut
  short (Ctrl-C, ``budget.time_budget_s``, a lost cluster) still compares its arms on equal terms.
  One exception: a ``pbt`` group's population goes out as a block once its turn comes (PBT needs
  its members side by side), so while it is handed out its count runs ahead by up to N-1.
* :class:`GroupedASHA` (a ``TrialScheduler``) holds one scheduler per group, so a trial is only
  ever compared with trials of its own task and arm: an ASHA bracket set, or for a ``pbt`` arm
  Tune's ``PopulationBasedTraining`` (synchronous), whose population is that group's
  ``budget.num_samples`` trials and which changes their α0/τ0 every ``budget.perturbation_interval``
  evaluations within the arm's ``params.pbt`` ranges. A restored member trains on with the mutated
  α0/τ0 from the checkpoint it inherits, whose schedule it extends (:mod:`tune_dynsdpb.trainer`).

Both work on the result key ``objective`` (:mod:`tune_dynsdpb.results`), the task's metric signed
so that higher is better; a group's study is named ``<sweep>.<task>.<arm>`` and, with a storage,
opens in ``optuna-dashboard``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import warnings
from typing import Any, Optional

import optuna
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune import Checkpoint
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from . import results as R
from .errors import UserError
from .params import check_value
from .search_space import (DEFAULT_POINTS, PAIRED, PBT_IS_DLB, PBT_MUTABLE, Choices, Range, SweepSpec, _contains,
                           config_name, max_reports, pbt_replays_dlb, perturbation_interval)

Group = tuple[str, str]  # (task, method)


def group_of(config: dict) -> Group:
    return config[R.TASK], config[R.METHOD]


def study_name(sweep: str, group: Group) -> str:
    return f"{sweep}.{group[0]}.{group[1]}"


class DefineByRun:
    """The define-by-run space of one arm (common parameters, then the arm's own); returns the
    constants: ``task``, ``method`` and the fixed parameters. A class so it pickles."""

    def __init__(self, spec: SweepSpec, group: Group):
        self.spec, self.group = spec, group

    def __call__(self, trial) -> dict:
        task, method = self.group
        const: dict[str, Any] = {R.TASK: task, R.METHOD: method}
        blocks = [self.spec.params.common] + ([getattr(self.spec.params, method)] if method in PAIRED else [])
        for block in blocks:
            for name, p in block:
                if p is None:
                    continue
                name = config_name(name)
                if isinstance(p, Range) and p.int_:
                    trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
                elif isinstance(p, Range):
                    trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
                elif isinstance(p, Choices):
                    trial.suggest_categorical(name, p.choices)
                else:
                    const[name] = p
        return const


def create_points_to_evaluate(spec: SweepSpec, method: str) -> list[dict]:
    """Warm starts of one arm: the file's, else the defaults (:data:`search_space.DEFAULT_POINTS`:
    DLB's τ0=3, α0=1; DynSDPB with the rates and warm-up DLB with the warm-up found best on real
    data, never a point where an arm trains another arm), keeping only searched keys inside the
    declared space."""
    searched = {k: v for k, v in spec.params.arm(method).items() if isinstance(v, (Range, Choices))}
    if spec.points_to_evaluate is not None and method in spec.points_to_evaluate:
        return [{config_name(k): v for k, v in p.items()} for p in spec.points_to_evaluate[method] if p]
    point = {config_name(k): v for k, v in DEFAULT_POINTS.get(method, {}).items()
             if k in searched and _contains(searched[k], v)}
    return [point] if point else []


def create_optuna_search(spec: SweepSpec, group: Group, storage=None):
    """The OptunaSearch of one group: TPE (multivariate, grouped, seeded by the file's seed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(multivariate=True, group=True, seed=spec.seed)
    return OptunaSearch(space=DefineByRun(spec, group), metric=R.OBJECTIVE, mode=R.MODE,
                        points_to_evaluate=create_points_to_evaluate(spec, group[1]) or None, sampler=sampler,
                        study_name=study_name(spec.name, group), storage=storage)


@contextlib.contextmanager
def _finished_in_storage():
    """A driver killed after it told the study a trial's end, but before Tune saved the searcher,
    comes back (``Tuner.restore``) with that trial still open in memory; the study's storage has it
    finished already, which is the truth: the repeated report is dropped."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


class RoundRobinSearcher(Searcher):
    """One searcher per group; new trials go out round-robin, ``per_group`` trials each."""

    def __init__(self, searchers: dict[Group, Searcher], per_group: int, whole: tuple = ()):
        super().__init__()  # no metric for Tune to demand: a failed trial's last report has no objective
        self.searchers, self.per_group = dict(searchers), per_group
        self.order = list(self.searchers)
        self.started: dict[Group, int] = {g: 0 for g in self.order}
        self.trial_group: dict[str, Group] = {}
        # groups handed out as a whole once their turn comes (a PBT population must train side by side)
        self.whole = tuple(whole)

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec) -> bool:
        return True  # every group searcher already has metric, mode and space

    def _next_group(self) -> Optional[Group]:
        open_ = [g for g in self.order if self.started[g] < self.per_group]
        if not open_:
            return None
        begun = [g for g in open_ if g in getattr(self, "whole", ()) and self.started[g] > 0]
        if begun:  # a population already begun: the rest of it first
            return begun[0]
        fewest = min(self.started[g] for g in open_)
        return next(g for g in open_ if self.started[g] == fewest)  # fixed order breaks ties

    def suggest(self, trial_id: str) -> Optional[dict]:
        group = self._next_group()
        if group is None:
            return Searcher.FINISHED
        config = self.searchers[group].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        self.started[group] += 1
        self.trial_group[trial_id] = group
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        group = self.trial_group.get(trial_id)
        if group is not None and R.OBJECTIVE in result:  # a failure's last report has none: OptunaSearch
            with _finished_in_storage():                     # would raise KeyError on it
                self.searchers[group].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        group = self.trial_group.get(trial_id)
        if group is None:
            return
        if R.classify(result, error) is R.Outcome.FAILED:  # diverged: a failed study trial, never a value
            result, error = {k: v for k, v in (result or {}).items() if k != R.OBJECTIVE}, True
        with _finished_in_storage():
            self.searchers[group].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        if _JOURNAL:  # the studies live in this driver's journal, wherever the sweep started
            reopen_journal(self, _JOURNAL[0])


class _GroupView:
    """The Tune controller as one group's scheduler sees it: only that group's trials, and no
    search algorithm (Tune's PBT refuses to run beside one; here the searcher only creates the
    population, and PBT alone changes it)."""

    search_alg = None

    def __init__(self, controller, group: Group):
        self._controller, self._group = controller, group

    def _mine(self, trials) -> list:
        out = []
        for t in trials:
            try:
                if group_of(t.config) == self._group:
                    out.append(t)
            except KeyError:
                continue
        return out

    def get_trials(self) -> list:
        return self._mine(self._controller.get_trials())

    def get_live_trials(self):
        return self._mine(self._controller.get_live_trials())

    def __getattr__(self, name):
        return getattr(self._controller, name)


class ClipToRanges:
    """PBT's ``custom_explore_fn``: a perturbed α0/τ0 (×0.8 or ×1.2) is clipped back into the arm's
    ``params.pbt`` range, so no mutation leaves the declared space. A class so it pickles."""

    def __init__(self, ranges: dict[str, tuple[float, float]]):
        self.ranges = dict(ranges)

    def __call__(self, config: dict) -> dict:
        for k, (lo, hi) in self.ranges.items():
            if k in config:
                config[k] = float(min(max(config[k], lo), hi))
        return config


def create_pbt(spec: SweepSpec) -> PopulationBasedTraining:
    """Synchronous PBT over reports (``training_iteration``) on ``objective`` (max), mutating the
    searched α0/τ0 of ``params.pbt``: the population waits at each perturbation point, the lower
    quarter clones an upper-quarter member's checkpoint and config, then explores α0/τ0. Every
    member keeps its own trial: no trial is added, and none trains longer than the others.

    ``budget.pbt_scheduler`` picks the explore step: ``pbt`` (Tune's ``PopulationBasedTraining``:
    ×0.8 or ×1.2, or a resample, clipped to the ranges) or ``pb2`` (Tune's ``PB2``, Parker-Holder
    et al. 2020: a time-varying GP bandit on the population's reward changes picks α0/τ0 within
    the ranges)."""
    mutations, ranges = {}, {}
    for name in PBT_MUTABLE:
        p = getattr(spec.params.pbt, name)
        if isinstance(p, Range):
            mutations[name] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
            ranges[name] = (p.low, p.high)
        elif isinstance(p, Choices):
            mutations[name] = list(p.choices)
    common = dict(time_attr="training_iteration", metric=R.OBJECTIVE, mode=R.MODE,
                  perturbation_interval=perturbation_interval(spec), synch=True)
    if spec.budget.pbt_scheduler == "pb2":  # ranges only (the spec's check)
        from ray.tune.schedulers.pb2 import PB2  # here: it imports scikit-learn's GP, ~1 s measured

        return PB2(hyperparam_bounds={k: list(v) for k, v in ranges.items()}, **common)
    return PopulationBasedTraining(hyperparam_mutations=mutations, custom_explore_fn=ClipToRanges(ranges), **common)


class GroupedASHA(FIFOScheduler):
    """One scheduler per group (ASHA bracket sets; PBT for pbt arms), on ``objective`` (max); trials
    run first-in, first-out, except that a PBT population's paused members wait for their PBT."""

    def __init__(self, schedulers: dict[Group, TrialScheduler], population: int = 0):
        super().__init__()
        self.schedulers = dict(schedulers)
        self.population = population  # members of each PBT group (budget.num_samples)
        for s in self.schedulers.values():
            s.set_search_properties(R.OBJECTIVE, R.MODE)

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        return True

    def _of(self, trial) -> Optional[TrialScheduler]:
        try:
            return self.schedulers.get(group_of(trial.config))
        except KeyError:
            return None

    def _view(self, tune_controller, trial):
        """PBT sees only its population; ASHA gets the controller as it is."""
        s = self._of(trial)
        return _GroupView(tune_controller, group_of(trial.config)) if isinstance(s, PopulationBasedTraining) \
            else tune_controller

    def on_trial_add(self, tune_controller, trial) -> None:
        s = self._of(trial)
        if s is not None:
            s.on_trial_add(self._view(tune_controller, trial), trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        s = self._of(trial)
        if s is None or R.OBJECTIVE not in result:
            return TrialScheduler.CONTINUE
        if isinstance(s, PopulationBasedTraining) and result.get(R.FINAL):
            # a member's last report ends it: PBT must not clone an older checkpoint into it (it
            # would train past its budget); finished, it leaves the population's synchronisation
            return TrialScheduler.CONTINUE
        return s.on_trial_result(self._view(tune_controller, trial), trial, result)

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        """FIFO over the trials outside PBT populations, each population's pick (its paused members
        resume only when their PBT says so), then paused trials of the others."""
        pbt = {g: s for g, s in self.schedulers.items() if isinstance(s, PopulationBasedTraining)}
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING and self._pbt_group(trial, pbt) is None:
                return trial
        for group, s in pbt.items():
            chosen = s.choose_trial_to_run(_GroupView(tune_controller, group))
            if chosen is None:
                chosen = self._stalled(trials, group, getattr(self, "population", 0))
                if chosen is not None:
                    _say_released(chosen, group)
            if chosen is not None:
                return chosen
        for trial in trials:
            if trial.status == Trial.PAUSED and self._pbt_group(trial, pbt) is None:
                return trial
        return None

    @staticmethod
    def _stalled(trials: list, group: Group, population: int) -> Optional[Trial]:
        """A population that PBT can no longer move: all its members exist, some wait (PAUSED or
        PENDING) and none runs, so no report will ever reach the synchronisation point they wait
        for. (While members are still to come, the waiting ones wait for them.) That only happens
        after ``sweep --resume``: Tune does not save schedulers, so the restored PBT starts
        with no record of the members' progress, and a member that had passed a perturbation point
        before the interruption finishes without reporting at it again (its final report never
        reaches PBT). The member that has trained least goes on with its own config (that
        perturbation point is skipped, no member trains longer than its trial)."""
        members = [t for t in trials if GroupedASHA._group(t) == group]
        if len(members) < population or any(t.status == Trial.RUNNING for t in members):
            return None
        waiting = [t for t in members if t.status in (Trial.PAUSED, Trial.PENDING)]
        return min(waiting, key=lambda t: (t.last_result or {}).get("training_iteration", 0), default=None)

    @staticmethod
    def _group(trial) -> Optional[Group]:
        try:
            return group_of(trial.config)
        except KeyError:
            return None

    @staticmethod
    def _pbt_group(trial, pbt: dict) -> Optional[Group]:
        try:
            g = group_of(trial.config)
        except KeyError:
            return None
        return g if g in pbt else None

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        s = self._of(trial)
        if s is not None and R.OBJECTIVE in (result or {}):
            s.on_trial_complete(self._view(tune_controller, trial), trial, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        s = self._of(trial)
        if s is not None:
            s.on_trial_error(self._view(tune_controller, trial), trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        s = self._of(trial)
        if s is not None:
            s.on_trial_remove(self._view(tune_controller, trial), trial)

    def debug_string(self) -> str:
        return "; ".join(f"{t}/{m}: {s.debug_string()}" for (t, m), s in self.schedulers.items())


def _say_released(trial, group: Group) -> None:
    print(f"tune-dynsdpb: {group[0]}/{group[1]}: after the resume, member {trial.trial_id} goes on with its own "
          "alpha0/tau0 past a perturbation point its population had not reached together before the interruption "
          "(Tune keeps no scheduler state across a resume)", file=sys.stderr, flush=True)


def create_searcher(spec: SweepSpec, groups: list[Group], storage=None) -> RoundRobinSearcher:
    """Optuna proposes every trial's starting point, a pbt population's included (its α0/τ0 from
    ``params.pbt``, its learning rate and common params as in any arm); a pbt group's population
    goes out as a whole once its turn comes."""
    return RoundRobinSearcher({g: create_optuna_search(spec, g, storage) for g in groups},
                              per_group=spec.budget.num_samples, whole=tuple(g for g in groups if g[1] == "pbt"))


def create_scheduler(spec: SweepSpec, groups: list[Group]) -> GroupedASHA:
    """ASHA over Tune reports (``training_iteration``), one bracket set per group; PBT
    (:func:`create_pbt`) for the pbt groups."""
    return GroupedASHA({g: create_pbt(spec) if g[1] == "pbt" else
                        ASHAScheduler(time_attr="training_iteration", max_t=max_reports(spec),
                                      grace_period=spec.budget.grace_period,
                                      reduction_factor=spec.budget.reduction_factor) for g in groups},
                       population=spec.budget.num_samples)


def learned_schedule(checkpoint: str) -> Optional[list]:
    """The ``[[step, alpha, tau], ...]`` schedule a dlb/pbt checkpoint followed up to its step (the
    trainer writes it into every checkpoint), or None if the checkpoint has none. ``checkpoint``
    may be a local path or a storage URI."""
    from .trainer import SCHEDULE_FILE  # here: the trainer imports torch and transformers (~5 s)

    try:
        with Checkpoint(checkpoint).as_directory() as folder:
            path = os.path.join(folder, SCHEDULE_FILE)
            if not os.path.exists(path):
                return None
            with open(path) as f:
                return [list(e) for e in json.load(f)]
    except (OSError, ValueError):
        return None


def fill_schedules(state) -> None:
    """Each pbt arm's best trial: the schedule of its lineage (its best checkpoint's) into the
    state's ``best.schedule`` (``SweepTracker.record_best`` then logs it)."""
    for arm in state.arms.values():
        if arm.method == "pbt" and arm.best is not None and arm.best.checkpoint:
            arm.best.schedule = learned_schedule(arm.best.checkpoint) or None


def close_orphan_studies(sweep: str, groups: list[Group], journal: str) -> None:
    """Optuna trials a killed driver left RUNNING (their Tune trials came back under new ids) are
    marked FAIL, so the studies hold exactly the sweep's trials as COMPLETE/PRUNED/FAIL."""
    if not os.path.exists(journal):
        return
    storage = create_journal_storage(journal)
    for g in groups:
        try:
            study = optuna.load_study(study_name=study_name(sweep, g), storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def replay_config(best: dict) -> dict:
    """The config that re-runs an arm's best trial (``compare``'s finals): its config, and for a
    pbt arm the learned schedule, which the trainer then follows from step 0 (dlb's loss; the
    schedule fixed, no population)."""
    config = dict(best["config"])
    if best.get("schedule"):
        problem = check_value("schedule", best["schedule"])  # e.g. a hand-edited sweep.json
        if problem:
            raise UserError(f"sweep.json: the {config.get(R.METHOD)} arm's best.schedule: {problem}")
        config["schedule"] = [list(e) for e in best["schedule"]]
    return config


def tie_notes(state) -> list[str]:
    """One line per group of arms of a task whose best scores are equal, saying why: every arm
    trains its own method (:func:`search_space._check_distinct_arms`), so a tie is two different
    runs that scored the same on a coarse metric (accuracy over n samples moves by 1/n), except a
    pbt winner that PBT never perturbed and that started from dlb's best point (:data:`PBT_IS_DLB`)."""
    lines = []
    for task, t in state.tasks.items():
        by_score: dict[float, list[str]] = {}
        for method, best in state.scored(task).items():
            by_score.setdefault(best.score, []).append(method)
        for score, methods in by_score.items():
            scored = state.scored(task)
            if {"dlb", "pbt"} <= set(methods) and pbt_replays_dlb(
                    scored["pbt"].config, getattr(scored["pbt"], "schedule", None), scored["dlb"].config):
                lines.append(f"{task}: dlb, pbt tie at {score:.4f}: {PBT_IS_DLB}")
                methods = [m for m in methods if m != "pbt"]
            if len(methods) < 2:
                continue
            configs = [state.scored(task)[m].config for m in methods]
            keys = sorted({k for c in configs for k in c} - {R.METHOD, R.TASK})
            differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
            lines.append(f"{task}: {', '.join(methods)} tie at {score:.4f} with different methods"
                         f"{' and ' + ', '.join(differ) if differ else ''}: different runs, the same score on "
                         f"{t.eval_size} eval samples ({t.metric.removeprefix('eval_')} moves in coarse steps, "
                         f"e.g. accuracy by 1/{t.eval_size})")
    return lines


_JOURNAL: list[str] = []  # the journal file of this driver (set by the sweep before Tune restores)


def use_journal(path: str | None) -> None:
    """The journal file this driver keeps the studies in: a searcher that Tune restores
    (``Tuner.restore``) re-opens its studies there, also when the sweep was started in another
    folder or on another machine (its pickled studies name the old file)."""
    _JOURNAL[:] = [path] if path else []


def reopen_journal(searcher: "RoundRobinSearcher", path: str) -> None:
    """Points every group's study (one JournalStorage shared by all of them and their trials) at
    the journal file ``path``."""
    for s in searcher.searchers.values():
        journal = getattr(s, "_storage", None)
        backend = getattr(journal, "_backend", None)
        if isinstance(backend, JournalFileBackend) and getattr(backend, "_file_path", path) != path:
            journal._backend = JournalFileBackend(path)


def create_journal_storage(path: str):
    """Optuna's journal storage in the sweep folder: ``optuna-dashboard <path>`` opens its studies."""
    return optuna.storages.JournalStorage(JournalFileBackend(path))


__all__: list[str] = ["RoundRobinSearcher", "GroupedASHA", "create_searcher", "create_scheduler",
                      "create_points_to_evaluate", "create_journal_storage", "use_journal", "tie_notes",
                      "create_pbt", "learned_schedule", "fill_schedules", "replay_config", "group_of", "study_name",
                      "DefineByRun"]
