"""The Tune set-up that ``sweep`` and ``compare`` (and ``benchmarks/``) share.

    configure_tune(spec)                    # Tune's pending-trial queue sized to the cluster
    tuner = create_tuner(spec, groups, trainable, storage, callbacks, journal)
    grid = fit_tuner(tuner, budget)         # KeyboardInterrupt when Ctrl-C/SIGTERM ended it early
    CheckpointPruner(storage).finish(grid, keep)   # each trial's best checkpoint only

Loggers: Tune's JSON log only (:func:`create_loggers`). Checkpoints: Tune keeps all of them while a
trial runs (``num_to_keep=None``); :class:`CheckpointPruner`, the one pruner, keeps each finished
trial's best, through :mod:`tune_dynsdpb.storage` (a local folder or a URI alike).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.stopper import TimeoutStopper

from trainables.distributed import max_concurrent_ddp_trials

from . import results as R
from . import storage
from .console import ProgressCallback, ProgressTable
from .experiment import create_trainable, sigterm_as_interrupt
from .search_space import SweepSpec
from .searching import create_journal_storage, create_scheduler, create_searcher, use_journal
from .state import EXPERIMENT, JOURNAL_FILE, ArmState, BestTrial, SweepState, arm_key


def configure_tune(spec: SweepSpec) -> None:
    """With a search algorithm Tune keeps one pending trial by default; let it queue as many as
    the cluster has slots, so new trials start as fast as old ones end."""
    cpus = ray.cluster_resources().get("CPU", 1)
    slots = int(cpus // max(spec.resources.cpus_per_trial, 1e-9)) or 1
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(slots, 2)))


def max_concurrent(spec: SweepSpec) -> int | None:
    """Tune's ``max_concurrent_trials``: the sweep file's cap, and for multi-worker trials, which
    reserve their workers outside Tune's view, how many of them fit the cluster."""
    r = spec.resources
    caps = [c for c in (spec.budget.max_concurrent,
                        max_concurrent_ddp_trials(r.cpus_per_trial, r.gpus_per_trial) if r.distributed else None) if c]
    return min(caps) if caps else None


def create_loggers() -> list:
    """The Tune loggers of our runs: the JSON log only (``result.json``, from which Tune reads a
    trial's ``metrics_dataframe``). Tune's default CSV and TensorBoard loggers are left out while
    :func:`fit_tuner` runs: every trial is tracked in MLflow, and the TensorBoard writer alone took
    a quarter of the driver's loop at 32 results/s (``benchmarks/sweep_scale.py``). A user who
    sets ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0`` gets them back."""
    return [JsonLoggerCallback()]


@contextlib.contextmanager
def _without_default_loggers():
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # read by Tune when fit() starts
    given = os.environ.get(key)
    os.environ.setdefault(key, "1")
    try:
        yield
    finally:
        if given is None:
            os.environ.pop(key, None)


_TIME_UP = threading.Event()  # set by TimeBudget in this (the driver's) process


class TimeBudget(TimeoutStopper):
    """``budget.time_budget_s``: Tune's own ``TimeoutStopper``, which also tells :func:`fit_tuner`
    that it ended the run. Tune saves a stopper with the experiment and a restore brings it back
    with the time that was left, so a resumed sweep gets the rest of its budget, not all of it
    again, and only the stopper knows when that rest is spent."""

    def stop_all(self) -> bool:
        if super().stop_all():
            _TIME_UP.set()
            return True
        return False


def create_tuner(spec: SweepSpec, groups: list, trainable, storage_path: str, callbacks: list,
                 journal: str | None):
    """One Tuner for every (task, arm) group: round-robin Optuna searcher, grouped ASHA."""
    storage_obj = create_journal_storage(journal) if journal else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(  # no metric here: a failed trial's last report has no objective
            num_samples=len(groups) * spec.budget.num_samples,
            reuse_actors=True,  # no process start + torch/transformers import per trial
            max_concurrent_trials=max_concurrent(spec),
            search_alg=create_searcher(spec, groups, storage_obj), scheduler=create_scheduler(spec, groups)),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage_path, verbose=0, callbacks=[*callbacks, *create_loggers()],
            stop=TimeBudget(spec.budget.time_budget_s) if spec.budget.time_budget_s else None,
            failure_config=tune.FailureConfig(max_failures=2),
            # num_to_keep=None: a bound would force an experiment snapshot every few reports
            # (benchmarks/sweep_scale.py); CheckpointPruner keeps a finished trial's best one
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=R.OBJECTIVE,
                                                    checkpoint_score_order=R.MODE)))


def fit_tuner(tuner, budget: int | None = None):
    """``tuner.fit()``; raises KeyboardInterrupt if Ctrl-C or SIGTERM ended it early (a run that
    :class:`TimeBudget` ended is not early).

    SIGTERM (a preempted node, Slurm, Kubernetes) is turned into the SIGINT that Tune handles:
    Tune saves the experiment and returns. Tune swaps in its own SIGINT handler for the run and
    puts the previous one back only when the signal arrives, so the handler in place afterwards
    tells whether the run was interrupted; the results' ``done`` flags catch the rest."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    _TIME_UP.clear()
    sigterm_as_interrupt()
    with _without_default_loggers():
        grid = tuner.fit()
    interrupted = False
    if main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        interrupted = signal.getsignal(signal.SIGINT) is before
        signal.signal(signal.SIGINT, before)
    time_up = _TIME_UP.is_set()
    if interrupted:
        raise KeyboardInterrupt
    if budget is not None and not time_up and not complete(grid, budget):
        left = unfinished(grid)
        print(f"tune-dynsdpb: Tune returned with {budget - len(list(grid)) + len(left)} of {budget} trials "
              f"unfinished ({', '.join(left) or 'not started'})", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    return grid


def run_experiment(spec: SweepSpec, state: SweepState, tasks: dict, groups: list, tracker, *, folder,
                   resume: bool, progress: bool):
    """The sweep's one Tuner for every (task, arm) group, new or restored from the storage path, run
    to its budget; every trial tracked by ``tracker`` (a ``tracking.SweepTracker``), the live table
    drawn when ``progress``. On KeyboardInterrupt (Ctrl-C, SIGTERM) Tune has saved the experiment,
    and what the tracker queued is written before it propagates."""
    configure_tune(spec)
    ours = [CheckpointPruner(state.storage_path), JournalMirror()]
    journal = str(Path(folder) / JOURNAL_FILE)
    trainable = create_trainable(spec, tasks)
    table = ProgressTable(state, enabled=progress)
    use_journal(journal)  # a restored searcher re-opens its studies in this folder's journal
    JournalMirror.current = None if storage.within(state.storage_path, folder) else (journal, state.storage_path)
    experiment = storage.join(state.storage_path, EXPERIMENT)
    callback = tracker.trial_callback(groups)
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        tuner = create_tuner(spec, groups, trainable, state.storage_path, [callback, ProgressCallback(), *ours],
                             journal)
    try:
        return fit_tuner(tuner, len(groups) * spec.budget.num_samples)
    finally:  # (also when interrupted: Tune returned early and saved its state)
        table.close()
        callback.flush()


def collect_outcomes(grid, groups: list, state: SweepState) -> set[str]:
    """Each arm's counts, failure reasons and best trial (by its best report; failed trials never
    count) into ``state``, from Tune's ``grid``; then each trial keeps its best checkpoint only, and
    only each arm's best keeps its optimizer state (:meth:`CheckpointPruner.finish`). Returns the
    ids of the grid's trials."""
    for n, m in groups:
        state.arms[arm_key(n, m)] = ArmState(task=n, method=m)
    trial_ids = set()
    for result in grid:
        config, last = result.config or {}, result.metrics or {}
        task, method = config.get(R.TASK), config.get(R.METHOD)
        if task not in state.tasks:
            continue
        arm = state.arm(task, method)
        outcome = R.classify(last, result.error is not None)
        arm.started += 1
        arm.counts[outcome.value] = arm.counts.get(outcome.value, 0) + 1
        reason = R.failure_reason(last) or (str(result.error).strip().splitlines()[-1][:200] if result.error else None)
        if reason and reason not in arm.failures and len(arm.failures) < 5:
            arm.failures.append(reason)
        trial_ids.add(last.get("trial_id") or getattr(result, "path", ""))
        if outcome is R.Outcome.FAILED:
            continue
        # every report with a score carries a checkpoint; Tune keeps each trial's best ones
        scored = [(m[R.OBJECTIVE], checkpoint_uri(ckpt, state.storage_path)) for ckpt, m in result.best_checkpoints or []
                  if R.finite(m.get(R.OBJECTIVE))]
        scored = [(obj, where) for obj, where in scored if storage.is_dir(where)]  # (not pruned)
        if not scored:
            continue
        best_obj, where = max(scored, key=lambda x: x[0])
        if arm.best is None or best_obj > R.objective(arm.best.score, state.tasks[task].mode):
            score = best_obj if state.tasks[task].mode == "max" else -best_obj
            arm.best = BestTrial(trial_id=str(last.get("trial_id")), score=float(score), config=dict(config),
                                 checkpoint=where)
    keep = {a.best.checkpoint for a in state.arms.values() if a.best and a.best.checkpoint}
    CheckpointPruner(state.storage_path).finish(grid, keep)
    return trial_ids


def ended(result) -> bool:
    """Whether a trial (a ``ResultGrid`` entry) has ended: in an error, on its own, by the scheduler
    (Tune's ``done``), or with its final report in (``final``: an interrupt can come between that
    report and Tune's seeing the function return; the trial is then TERMINATED without ``done``,
    and a restore skips it). An interrupt leaves running trials TERMINATED without either."""
    metrics = result.metrics or {}
    return result.error is not None or bool(metrics.get("done") or metrics.get(R.FINAL))


def unfinished(grid) -> list[str]:
    """The trials of ``grid`` that have not :func:`ended`: ``trial_id@training_iteration``."""
    return [f"{(r.metrics or {}).get('trial_id', '?')}@{(r.metrics or {}).get('training_iteration', 0)}"
            for r in grid if not ended(r)]


def complete(grid, budget: int) -> bool:
    """Whether every budgeted trial has :func:`ended`."""
    results = list(grid)
    return len(results) >= budget and all(map(ended, results))


def checkpoint_uri(checkpoint, storage_path: str) -> str:
    """A Tune checkpoint's location as a local path or a URI of the storage path's kind (Tune hands
    out paths inside its filesystem: ``bucket/prefix/...`` for S3)."""
    return storage.to_uri(checkpoint.path, storage_path)


class CheckpointPruner(tune.Callback):
    """The one checkpoint pruner. Tune keeps every checkpoint (``num_to_keep=None``: a bounded number
    forces an experiment snapshot every few reports, which stalls a large sweep); as a driver
    callback this keeps a finished trial's best checkpoint only, by the objective the trainable
    wrote into each one; :meth:`finish` does the same for every trial at the end and drops the
    optimizer state of all but each arm's best. Local folders and URIs alike (it holds the storage
    path as a string, so Tune can pickle it)."""

    OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")

    def __init__(self, storage_path: str):
        self.storage_path = storage_path

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.config or {}).get(R.METHOD) == "pbt":  # another member may still clone any of them
            return
        if trial.path:
            with contextlib.suppress(Exception):  # never let pruning stop the sweep; finish() tries again
                self.keep_best(storage.to_uri(trial.path, self.storage_path))

    def keep_best(self, trial_dir: str) -> str | None:
        """Removes every checkpoint of the trial folder but its best; returns the best one."""
        scored = []
        for name, folder in sorted(storage.list_dir(trial_dir).items()):
            if not (folder and name.startswith("checkpoint_")):
                continue
            where = storage.join(trial_dir, name)
            try:
                scored.append((json.loads(storage.read_text(storage.join(where, R.CHECKPOINT_RESULT)))[R.OBJECTIVE],
                               where))
            except (OSError, ValueError, KeyError):
                continue
        if not scored:
            return None
        best = max(scored, key=lambda x: x[0])[1]
        for _, where in scored:
            if where != best:
                storage.rmtree(where)
        return best

    def finish(self, grid, keep: set[str]) -> None:
        """After the sweep: each trial keeps its best checkpoint only; of those, only the ones in
        ``keep`` (each arm's best) keep the optimizer and scheduler state (what a resumed training
        would need)."""
        for result in grid:
            if not result.path:
                continue
            best = self.keep_best(storage.to_uri(result.path, self.storage_path))
            if best is not None and best not in keep:
                for name in self.OPTIMIZER_FILES:
                    for f in storage.find(best, name):
                        storage.delete_file(f)


class JournalMirror(tune.Callback):
    """Uploads the driver's Optuna journal to the storage path whenever Tune saves the experiment
    state, as trials start and end, and every ``period_s`` seconds, so that another machine can
    take the sweep over. Holds nothing (Tune pickles it, and a restored sweep may run from another
    folder): the driver sets :attr:`current` to ``(local journal, storage path)``.

    The upload at each save (:meth:`get_state`, which Tune calls after it has saved the searchers'
    state and before it syncs that state to storage) keeps the stored journal at least as new as
    the stored searchers: a searcher restored on another machine never refers to an Optuna trial
    that its journal lacks (Optuna's ``KeyError: 'Record does not exist.'`` at the first report)."""

    current: "tuple[str, str] | None" = None
    period_s = 30.0
    _last = 0.0

    def _upload(self, force: bool = True) -> None:
        now = time.monotonic()
        if JournalMirror.current is None or (not force and now - JournalMirror._last < self.period_s):
            return
        JournalMirror._last = now
        local, storage_path = JournalMirror.current
        if os.path.exists(local):
            storage.mirror(storage_path, JOURNAL_FILE, local=local)

    def get_state(self) -> None:
        self._upload()
        return None  # nothing to restore

    def on_trial_start(self, iteration, trials, trial, **info):
        self._upload()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._upload()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._upload()

    def on_step_end(self, iteration, trials, **info):
        self._upload(force=False)

    def on_experiment_end(self, trials, **info):
        self._upload()


__all__ = ["run_experiment", "collect_outcomes", "configure_tune", "create_loggers", "create_tuner", "fit_tuner", "complete", "checkpoint_uri",
           "CheckpointPruner", "JournalMirror"]
