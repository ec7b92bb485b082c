"""One Tune experiment for a whole sweep: every (task, arm) group searched and scheduled apart.

A sweep of T tasks and A arms with N trials per arm is one ``Tuner`` of T·A·N trials, so the
cluster stays full until the last trial ends. Two Tune plug-ins keep the groups apart:

* :class:`RoundRobinSearcher` (a ``Searcher``) holds one Optuna study per group (TPE, seeded,
  with the arm's warm starts) and hands out new trials round-robin over the groups. The
  started-trial counts of any two groups therefore never differ by more than one: a sweep cut
  short (Ctrl-C, ``budget.time_budget_s``, a lost cluster) still compares its arms on equal terms.
* :class:`GroupedASHA` (a ``TrialScheduler``) holds one ASHA bracket set per group, so a trial is
  only ever compared with trials of its own task and arm.

Both work on the result key ``objective`` (:mod:`tune_dynsdpb.results`), the task's metric signed
so that higher is better; a group's study is named ``<sweep>.<task>.<arm>`` and, with a storage,
opens in ``optuna-dashboard``.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from typing import Any, Optional

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from . import results as R
from .search_space import PAIRED, Choices, Range, SweepSpec, _contains, config_name, max_reports

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
    """Warm starts of one arm: the file's, else the defaults (DLB's τ0=3, α0=1; DynSDPB with rates
    0; warm-up DLB with no warm-up), keeping only searched keys inside the declared space."""
    from .search_space import DEFAULT_POINTS

    searched = {k: v for k, v in spec.params.arm(method).items() if isinstance(v, (Range, Choices))}
    if spec.points_to_evaluate is not None and method in spec.points_to_evaluate:
        return [{config_name(k): v for k, v in p.items()} for p in spec.points_to_evaluate[method] if p]
    point = {config_name(k): v for k, v in DEFAULT_POINTS.get(method, {}).items()
             if k in searched and _contains(searched[k], v)}
    return [point] if point else []


def create_optuna_search(spec: SweepSpec, group: Group, storage=None):
    """The OptunaSearch of one group: TPE (multivariate, grouped, seeded by the file's seed)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

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
    import optuna

    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


class RoundRobinSearcher(Searcher):
    """One searcher per group; new trials go out round-robin, ``per_group`` trials each."""

    def __init__(self, searchers: dict[Group, Searcher], per_group: int):
        super().__init__()  # no metric for Tune to demand: a failed trial's last report has no objective
        self.searchers, self.per_group = dict(searchers), per_group
        self.order = list(self.searchers)
        self.started: dict[Group, int] = {g: 0 for g in self.order}
        self.trial_group: dict[str, Group] = {}

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec) -> bool:
        return True  # every group searcher already has metric, mode and space

    def _next_group(self) -> Optional[Group]:
        open_ = [g for g in self.order if self.started[g] < self.per_group]
        if not open_:
            return None
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


class GroupedASHA(FIFOScheduler):
    """One ASHA bracket set per group, on ``objective`` (max); trials run first-in, first-out."""

    def __init__(self, schedulers: dict[Group, ASHAScheduler]):
        super().__init__()
        self.schedulers = dict(schedulers)
        for s in self.schedulers.values():
            s.set_search_properties(R.OBJECTIVE, R.MODE)

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        return True

    def _of(self, trial) -> Optional[TrialScheduler]:
        try:
            return self.schedulers.get(group_of(trial.config))
        except KeyError:
            return None

    def on_trial_add(self, tune_controller, trial) -> None:
        s = self._of(trial)
        if s is not None:
            s.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        s = self._of(trial)
        if s is None or R.OBJECTIVE not in result:
            return TrialScheduler.CONTINUE
        return s.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        s = self._of(trial)
        if s is not None and R.OBJECTIVE in (result or {}):
            s.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        s = self._of(trial)
        if s is not None:
            s.on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        s = self._of(trial)
        if s is not None:
            s.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{t}/{m}: {s.debug_string()}" for (t, m), s in self.schedulers.items())


def create_searcher(spec: SweepSpec, groups: list[Group], storage=None) -> RoundRobinSearcher:
    return RoundRobinSearcher({g: create_optuna_search(spec, g, storage) for g in groups},
                              per_group=spec.budget.num_samples)


def create_scheduler(spec: SweepSpec, groups: list[Group]) -> GroupedASHA:
    """ASHA over Tune reports (``training_iteration``), one bracket set per group."""
    return GroupedASHA({g: ASHAScheduler(time_attr="training_iteration", max_t=max_reports(spec),
                                         grace_period=spec.budget.grace_period,
                                         reduction_factor=spec.budget.reduction_factor) for g in groups})


_JOURNAL: list[str] = []  # the journal file of this driver (set by the sweep before Tune restores)


def use_journal(path: str | None) -> None:
    """The journal file this driver keeps the studies in: a searcher that Tune restores
    (``Tuner.restore``) re-opens its studies there, also when the sweep was started in another
    folder or on another machine (its pickled studies name the old file)."""
    _JOURNAL[:] = [path] if path else []


def reopen_journal(searcher: "RoundRobinSearcher", path: str) -> None:
    """Points every group's study (one JournalStorage shared by all of them and their trials) at
    the journal file ``path``."""
    from optuna.storages.journal import JournalFileBackend

    for s in searcher.searchers.values():
        journal = getattr(s, "_storage", None)
        backend = getattr(journal, "_backend", None)
        if isinstance(backend, JournalFileBackend) and getattr(backend, "_file_path", path) != path:
            journal._backend = JournalFileBackend(path)


def create_journal_storage(path: str):
    """Optuna's journal storage in the sweep folder: ``optuna-dashboard <path>`` opens its studies."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(path))


__all__: list[str] = ["RoundRobinSearcher", "GroupedASHA", "create_searcher", "create_scheduler",
                      "create_points_to_evaluate", "create_journal_storage", "use_journal", "group_of", "study_name",
                      "DefineByRun"]
