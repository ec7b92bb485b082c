"""``tune-dynsdpb sweep``: every (task, arm) of a sweep file in one Ray Tune experiment.

A sweep reads top to bottom:

1. open the sweep: the file (and ``--set`` overrides) validated, or the saved state of the
   folder to resume, with a lock so one driver owns the folder;
2. make ready what every trial shares, in the driver: Ray, the tracking store, each task's data
   (tokenized once), and one real training step per task (:func:`~tune_dynsdpb.experiment.preflight`)
   so a setting that would fail in every trial fails now, once;
3. run one ``Tuner`` over all (task, arm) groups: a round-robin searcher with one Optuna study
   per group and one ASHA bracket set per group (:mod:`tune_dynsdpb.searching`), tracked in
   MLflow from this process (:mod:`tune_dynsdpb.tracking`);
4. record each group's outcome counts and best trial (never a failed one) in the state and in
   MLflow; keep each trial's best checkpoint, and the optimizer state only of each arm's best.

Ctrl-C and SIGTERM stop the same way: Tune saves the experiment, and ``--resume`` continues it.
The folder's layout is in :mod:`tune_dynsdpb.state`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from ray import tune

from . import results as R
from .baselines import learned_line
from .errors import UserError
from .params import passes_per_epoch
from .experiment import (check_resources, create_trainable, init_ray, max_concurrent, preflight, prepare_tasks,
                         quiet_libraries)
from .search_space import SweepSpec, apply_overrides, load_search_space, parse_search_space
from .searching import record_schedules, tie_notes
from .state import EXPERIMENT, STATE_FILE, ArmState, BestTrial, SweepState, TaskState, lock_folder, open_sweep

OPTUNA_JOURNAL = "optuna.journal"


# -- 1. open the sweep ----------------------------------------------------------------------------
def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir: {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_FILE).exists():
        raise UserError(f"--output-dir: {out} is not empty and holds no sweep; pick a new folder")
    if (out / STATE_FILE).exists():
        raise UserError(f"--output-dir: {out} already holds a sweep; pass --resume to continue it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir: cannot create {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir: {out} is not writable")


def create_spec(spec_path: str | Path, methods: Sequence[str] | None = None, num_samples: int | None = None,
                overrides: Sequence[str] = ()) -> SweepSpec:
    """The sweep file with ``--methods``/``--num-samples``/``--set`` applied, validated as a whole."""
    spec = load_search_space(spec_path)
    sets = list(overrides)
    if methods:
        sets.append(f"methods={list(methods)}")
    if num_samples is not None:
        if num_samples < 1:
            raise UserError(f"--num-samples: must be >= 1 (got {num_samples})")
        sets.append(f"budget.num_samples={num_samples}")
    if not sets:
        return spec
    raw = apply_overrides(spec.model_dump(mode="json", exclude_none=True, by_alias=True), sets)
    out = parse_search_space(raw, f"{spec_path} (with --set/--methods/--num-samples)")
    out._path = spec.path
    return out


def _check_resume_args(state: SweepState, **given: Any) -> None:
    saved = {"--methods": state.methods, "--num-samples": state.num_samples, "--data-dir": _saved_data_dir(state),
             "--tracking-uri": state.tracking_uri}
    for flag, value in given.items():
        if value is None or value == [] or value == ():
            continue
        if flag == "--methods" and list(value) == saved[flag] or value == saved[flag]:
            continue
        if flag == "--tracking-uri" and "***" in saved[flag]:  # the same store, its secret given again
            continue
        raise UserError(f"{flag}: {value!r} conflicts with the saved sweep's {saved[flag]!r}; "
                        f"drop it to resume, or start a new sweep")


@contextlib.contextmanager
def _undo_unsaved(out: Path | None, fresh: bool):
    """A new sweep that fails before its state is saved (a bad metric, an unreachable tracking
    store, resources no node has, a failing preflight) leaves its folder as it found it: removed if
    it made it, else emptied (it was empty), so the same --output-dir works next time. Entered only
    once the folder lock is held, so it never touches another driver's folder."""
    try:
        yield
    except BaseException:
        if out is not None and not (out / STATE_FILE).exists():
            if fresh:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for child in out.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise


def _saved_data_dir(state: SweepState):
    dirs = {t.data_dir for t in state.tasks.values()}
    return dirs.pop() if len(dirs) == 1 else None


# -- the run --------------------------------------------------------------------------------------
def run_sweep(spec_path: str | Path | None = None, *, output_dir: str | Path | None = None,
              data_dir: str | None = None, methods: Sequence[str] | None = None, num_samples: int | None = None,
              overrides: Sequence[str] = (), ray_address: str | None = None, tracking_uri: str | None = None,
              storage_path: str | None = None, resume: bool = False, progress: bool = True, verbose: bool = False,
              ray_temp_dir: str | None = None, trainer_callbacks: list | None = None) -> SweepState:
    """Runs (or resumes) a sweep; returns its final state. ``trainer_callbacks`` go into every
    trial's Trainer (extra ``TrainerCallback`` objects: logging, fault injection in tests)."""
    from .tracking import (SweepTracker, check_tracking_uri, default_artifact_location, default_tracking_uri,
                           open_tracking_uri, redact_uri, use_tracking_uri)

    quiet_libraries(verbose)
    # -- 1. what was asked, validated before any trial --------------------------------------------
    if resume:
        if output_dir is None:
            raise UserError("--resume: needs --output-dir of the interrupted sweep")
        if spec_path is not None or overrides:
            raise UserError("--resume: continues the saved sweep file; give no sweep file or --set")
        out = Path(output_dir).resolve()
        state = open_sweep(out)
        _check_resume_args(state, **{"--methods": methods, "--num-samples": num_samples, "--data-dir": data_dir,
                                     "--tracking-uri": redact_uri(tracking_uri) if tracking_uri else None})
        spec = state.sweep_spec()
        spec = spec.model_copy(update={"tasks": state.task_specs(), "task": None})
        tracking_uri = open_tracking_uri(state.tracking_uri, tracking_uri)
    else:
        if spec_path is None:
            raise UserError("sweep: give a sweep file (e.g. search_spaces/quickstart.yaml)")
        spec = create_spec(spec_path, methods, num_samples, overrides)
        out = Path(output_dir or Path("runs") / spec.name).resolve()
        fresh = not out.exists()
        _check_output_dir(out)
        state = None
        tracking_uri = use_tracking_uri(tracking_uri) if tracking_uri else default_tracking_uri(out)
    where = str(spec.path or (state.spec_path if state else spec.name))

    with lock_folder(out), _undo_unsaved(None if resume else out, fresh=not resume and fresh):
        check_tracking_uri(tracking_uri)
        init_ray(ray_address, ray_temp_dir, verbose=verbose)
        check_resources(spec, where)
        model_path = state.model_path if state else _model_path(spec.model)
        tasks = prepare_tasks(spec, model_path, out / "cache", where, data_dir=None if state else data_dir,
                              callbacks=trainer_callbacks, say=print)
        if state is None:
            if progress:
                print(f"preflight: one training step per task ({', '.join(tasks)}) ...", flush=True)
            preflight(spec, tasks, where)
            state = SweepState(
                sweep_id=uuid.uuid4().hex[:12], spec=spec.model_dump(mode="json", by_alias=True), spec_path=where,
                methods=list(spec.methods), num_samples=spec.budget.num_samples, tracking_uri=redact_uri(tracking_uri),
                model_path=model_path, created=time.time(), storage_path=str(storage_path or out / "ray"),
                tasks={n: TaskState(name=n, metric=t.metric, mode=t.mode, data_dir=data_dir or t.spec.data_dir,
                                    source=t.task.source, train_size=len(t.train), eval_size=len(t.eval),
                                    data_hash=t.data_hash, baseline=t.baseline,
                                    truncated={s: c.truncated for s, c in t.truncation.items()})
                       for n, t in tasks.items()})
            for n in tasks:
                for m in spec.methods:
                    state.arm(n, m)
            state.save(out)
        else:
            for n, t in tasks.items():
                if t.data_hash != state.tasks[n].data_hash:
                    raise UserError(f"{t.task.source}: the data of task {n} changed since the sweep started; "
                                    "resume with the same data, or start a new sweep")
        if progress:
            print_header(state, out)

        # -- 2. one experiment for every (task, arm) ------------------------------------------------
        groups = order_groups(tasks, spec.methods)
        tracker = SweepTracker(tracking_uri, spec.name, state.sweep_id,
                               artifact_location=default_artifact_location(out) if tracking_uri.startswith("sqlite") else None)
        state.parent_run_id = tracker.start_sweep(
            {"spec": state.spec, "model": model_path, "methods": ",".join(spec.methods),
             "tasks": ",".join(tasks)}, tags={"tune_dynsdpb.output_dir": str(out)})
        for n, m in groups:
            tracker.start_arm(n, m)
        tracker.set_trial_view({t.metric: t.mode for t in tasks.values()})  # what the MLflow UI opens on
        for n, t in tasks.items():  # nothing dropped in silence: the truncation counts too
            tracker.log_truncation(n, t.truncation)
        state.status = "running"
        state.save(out)
        trainable = create_trainable(spec, tasks)
        storage = state.storage_path
        experiment = f"{storage.rstrip('/')}/{EXPERIMENT}"
        table = ProgressTable(state, enabled=progress)
        callback = tracker.trial_callback(groups)
        _configure_tune(spec)
        if resume and tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=False, restart_errored=False)
        else:
            tuner = create_tuner(spec, groups, trainable, storage,
                                 [callback, _ProgressCallback(), CheckpointPruner()], str(out / OPTUNA_JOURNAL))
        try:
            grid = fit_tuner(tuner, len(groups) * spec.budget.num_samples, spec.budget.time_budget_s)
        except KeyboardInterrupt:  # Tune returned early and saved its state
            callback.flush()
            table.close()
            state.status = "interrupted"
            state.save(out)
            raise KeyboardInterrupt(f"sweep interrupted; continue it with tune-dynsdpb sweep --resume "
                                    f"--output-dir {out}") from None
        finally:
            table.close()
        callback.flush()

        # -- 3. what each arm got, and its best trial ---------------------------------------------
        for n, m in groups:
            state.arms[f"{n}/{m}"] = ArmState(task=n, method=m)
        outcomes = collect_outcomes(grid, state)
        tracker.delete_orphans({o["trial_id"] for o in outcomes})
        _close_orphan_studies(spec, groups, str(out / OPTUNA_JOURNAL))
        for arm in state.arms.values():
            if arm.best is not None:
                arm.best.run_id = tracker.find_trial_run(arm.task, arm.method, arm.best.trial_id)
                t = state.tasks[arm.task]
                tracker.record_best(arm.task, arm.method, arm.best.run_id, arm.best.config, t.metric, arm.best.score,
                                    t.baseline)
        record_schedules(state, tracker)  # pbt arms: the winning lineage's schedule, into the state and MLflow
        _prune_checkpoints(grid, state)
        state.disk_bytes = _disk_use(out)
        state.status, state.finished = "finished", time.time()
        state.save(out)
        tracker.finish_sweep()
    if progress:
        print_summary(state, out)
    return state


def _model_path(model: str) -> str:
    from .run import resolve_model_path
    return resolve_model_path(model)


def order_groups(tasks: dict, methods: Sequence[str]) -> list[tuple[str, str]]:
    """The (task, arm) groups, costliest trial first (tokens of the task's train split x the
    method's passes per sample and epoch). Each round of the round-robin then sends its long trials
    out first and its short ones last, where they fill the slots the long ones leave (longest
    processing time first), instead of one long trial running alone at the end of the sweep."""
    tokens = {n: sum(map(len, t.train["input_ids"])) for n, t in tasks.items()}
    groups = [(n, m) for n in tasks for m in methods]  # sorted() is stable: ties keep the spec's order
    return sorted(groups, key=lambda g: -tokens[g[0]] * passes_per_epoch(g[1]))


def _configure_tune(spec: SweepSpec) -> None:
    """With a search algorithm Tune keeps one pending trial by default; let it queue as many as
    the cluster has slots, so new trials start as fast as old ones end."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    slots = int(cpus // max(spec.resources.cpus_per_trial, 1e-9)) or 1
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(slots, 2)))


def create_loggers() -> list:
    """The Tune loggers of our runs: the JSON log only (``result.json``, from which Tune reads a
    trial's ``metrics_dataframe``). Tune's default CSV and TensorBoard loggers are left out while
    :func:`fit_tuner` runs: every trial is tracked in MLflow, and the TensorBoard writer alone took
    a quarter of the driver's loop at 32 results/s (``benchmarks/sweep_scale.py``). A user who
    sets ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0`` gets them back."""
    from ray.tune.logger import JsonLoggerCallback

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


def create_tuner(spec: SweepSpec, groups: list, trainable, storage: str, callbacks: list, journal: str | None):
    from .searching import create_journal_storage, create_scheduler, create_searcher

    storage_obj = create_journal_storage(journal) if journal else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(  # no metric here: a failed trial's last report has no objective
            num_samples=len(groups) * spec.budget.num_samples,
            reuse_actors=True,  # no process start + torch/transformers import per trial
            max_concurrent_trials=max_concurrent(spec), time_budget_s=spec.budget.time_budget_s,
            search_alg=create_searcher(spec, groups, storage_obj), scheduler=create_scheduler(spec, groups)),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage, verbose=0, callbacks=[*callbacks, *create_loggers()],
            failure_config=tune.FailureConfig(max_failures=2),
            # num_to_keep=None: a bound would force an experiment snapshot every few reports
            # (benchmarks/sweep_scale.py); CheckpointPruner keeps a finished trial's best one
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=R.OBJECTIVE,
                                                    checkpoint_score_order=R.MODE)))


def fit_tuner(tuner, budget: int | None = None, time_budget_s: float | None = None):
    """``tuner.fit()``; raises KeyboardInterrupt if Ctrl-C or SIGTERM ended it early.

    SIGTERM (a preempted node, Slurm, Kubernetes) is turned into the SIGINT that Tune handles:
    Tune saves the experiment and returns. Tune swaps in its own SIGINT handler for the run and
    puts the previous one back only when the signal arrives, so the handler in place afterwards
    tells whether the run was interrupted; the results' ``done`` flags catch the rest."""
    from .experiment import sigterm_as_interrupt

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    start = time.monotonic()
    sigterm_as_interrupt()
    with _without_default_loggers():
        grid = tuner.fit()
    interrupted = False
    if main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        interrupted = signal.getsignal(signal.SIGINT) is before
        signal.signal(signal.SIGINT, before)
    time_up = time_budget_s is not None and time.monotonic() - start >= time_budget_s
    if interrupted or (budget is not None and not time_up and not complete(grid, budget)):
        raise KeyboardInterrupt
    return grid


def complete(grid, budget: int) -> bool:
    """Whether every budgeted trial has ended on its own, by the scheduler, or in an error (an
    interrupt leaves running trials TERMINATED without ``done``)."""
    results = list(grid)
    return len(results) >= budget and all(r.error is not None or (r.metrics or {}).get("done") for r in results)


def collect_outcomes(grid, state: SweepState) -> list[dict]:
    """Fills each arm's counts, failure reasons and best trial (by its best report; failed trials
    never count) into ``state``; returns one record per trial."""
    records = []
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
        records.append({"trial_id": last.get("trial_id") or getattr(result, "path", ""), "task": task,
                        "method": method, "outcome": outcome.value})
        # every report with a score carries a checkpoint; Tune keeps each trial's best ones
        scored = [(m[R.OBJECTIVE], ckpt) for ckpt, m in result.best_checkpoints or [] if R.finite(m.get(R.OBJECTIVE))
                  and not (ckpt.path.startswith("/") and not os.path.isdir(ckpt.path))]  # (pruned ones)
        if outcome is R.Outcome.FAILED or not scored:
            continue
        best_obj, ckpt = max(scored, key=lambda x: x[0])
        if arm.best is None or best_obj > R.objective(arm.best.score, state.tasks[task].mode):
            score = best_obj if state.tasks[task].mode == "max" else -best_obj
            arm.best = BestTrial(trial_id=str(last.get("trial_id")), score=float(score), config=dict(config),
                                 checkpoint=ckpt.path)
    return records


def _close_orphan_studies(spec: SweepSpec, groups: list, journal: str) -> None:
    """Optuna trials a killed driver left RUNNING (their Tune trials came back under new ids) are
    marked FAIL, so the studies hold exactly the sweep's trials as COMPLETE/PRUNED/FAIL."""
    import optuna

    from .searching import create_journal_storage, study_name

    if not Path(journal).exists():
        return
    storage = create_journal_storage(journal)
    for g in groups:
        try:
            study = optuna.load_study(study_name=study_name(spec.name, g), storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _prune_checkpoints(grid, state: SweepState) -> None:
    """Each trial keeps its best checkpoint only; of those, only each arm's best keeps the
    optimizer and scheduler state (what a resumed training would need)."""
    keep = {a.best.checkpoint for a in state.arms.values() if a.best and a.best.checkpoint}
    for result in grid:
        best = result.get_best_checkpoint(R.OBJECTIVE, R.MODE) if result.best_checkpoints else None
        for ckpt, _ in result.best_checkpoints or []:
            if best is not None and ckpt.path != best.path and os.path.isdir(ckpt.path):
                shutil.rmtree(ckpt.path, ignore_errors=True)
        if best is not None and best.path not in keep and os.path.isdir(best.path):
            for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
                for f in Path(best.path).rglob(name):
                    f.unlink(missing_ok=True)


class CheckpointPruner(tune.Callback):
    """Tune keeps every checkpoint (``num_to_keep=None``: a bounded number forces an experiment
    snapshot every few reports, which stalls a large sweep); this driver callback keeps only a
    finished trial's best checkpoint, by the objective the trainable wrote into each one."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        import json

        if (trial.config or {}).get(R.METHOD) == "pbt":  # another member may still clone any of them
            return
        where = Path(trial.path) if trial.path and os.path.isdir(trial.path) else None  # (local storage only)
        folders = sorted(where.glob("checkpoint_*")) if where else []
        scored = []
        for folder in folders:
            try:
                scored.append((json.loads((folder / R.CHECKPOINT_RESULT).read_text())[R.OBJECTIVE], folder))
            except (OSError, ValueError, KeyError):
                continue
        if not scored:
            return
        best = max(scored, key=lambda x: x[0])[1]
        for _, folder in scored:
            if folder != best:
                shutil.rmtree(folder, ignore_errors=True)


def _disk_use(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


# -- the console ----------------------------------------------------------------------------------
def console():
    """rich's console; written to a file or a pipe (a log, CI), it is wide enough for the tables,
    and commands and paths stay whole, to copy and paste."""
    import sys

    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def print_header(state: SweepState, out: Path) -> None:
    c = console()
    tasks = ", ".join(f"{n} ({t.train_size} train / {t.eval_size} eval, {t.metric.removeprefix('eval_')})"
                      for n, t in state.tasks.items())
    c.print(f"[bold]sweep {state.spec['name']}[/bold]: {tasks}")
    c.print(f"model {state.model_path}; arms {', '.join(state.methods)} × {state.num_samples} trials each")
    c.print(f"MLflow {state.tracking_uri}; folder {out}")


class ProgressTable:
    """A live table with one row per (task, arm): trials done/running/pending, best so far, ETA."""

    current: "ProgressTable | None" = None  # the driver's table; the Tune callback looks it up

    def __init__(self, state: SweepState, enabled: bool = True):
        self.state, self.enabled = state, enabled
        self.trials: dict[str, dict] = {}
        self.start = time.time()
        self._live = None
        ProgressTable.current = self

    def update(self, trial, status: str, result: dict | None = None) -> None:
        if not self.enabled:
            return
        c = trial.config or {}
        row = self.trials.setdefault(trial.trial_id, {"group": (c.get(R.TASK), c.get(R.METHOD)), "best": None})
        row["status"] = status
        if result and R.finite(result.get(R.OBJECTIVE)):
            row["best"] = max(row["best"], result[R.OBJECTIVE]) if row["best"] is not None else result[R.OBJECTIVE]
        self._render()

    def _render(self) -> None:
        from rich.live import Live
        from rich.table import Table

        n = self.state.num_samples
        t = Table(title=f"tune-dynsdpb sweep {self.state.spec['name']}", expand=False)
        for col in ("task", "arm", "done", "running", "pending", "failed", "best so far", "ETA"):
            t.add_column(col)
        elapsed = time.time() - self.start
        for key, arm in self.state.arms.items():
            rows = [r for r in self.trials.values() if r["group"] == (arm.task, arm.method)]
            done = sum(r["status"] in ("DONE", "STOPPED", "FAILED") for r in rows)
            running = sum(r["status"] == "RUNNING" for r in rows)
            failed = sum(r["status"] == "FAILED" for r in rows)
            objs = [r["best"] for r in rows if r["best"] is not None]
            mode = self.state.tasks[arm.task].mode
            best = "" if not objs else f"{(max(objs) if mode == 'max' else -max(objs)):.4f}"
            eta = "" if not done else f"{elapsed / done * (n - done):.0f} s" if done < n else "-"
            t.add_row(arm.task, arm.method, f"{done}/{n}", str(running), str(max(0, n - done - running)),
                      str(failed), best, eta)
        if self._live is None:
            self._live = Live(t, console=console(), refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self._live.update(t)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class _ProgressCallback(tune.Callback):
    """Feeds the driver's ProgressTable; holds nothing, so Tune can pickle it."""

    def _update(self, trial, status, result=None):
        if ProgressTable.current is not None:
            ProgressTable.current.update(trial, status, result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        outcome = R.classify(trial.last_result)
        self._update(trial, {R.Outcome.FINISHED: "DONE", R.Outcome.STOPPED: "STOPPED"}.get(outcome, "FAILED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "FAILED")


def short_config(config: dict) -> str:
    keys = ("learning_rate", "per_device_train_batch_size", "alpha0", "tau0", "lambda_alpha", "lambda_tau",
            "distill_warmup", "granularity")
    names = {"learning_rate": "lr", "per_device_train_batch_size": "B"}
    return " ".join(f"{names.get(k, k)}={config[k]:.3g}" if isinstance(config[k], float) else
                    f"{names.get(k, k)}={config[k]}" for k in keys if k in config)


def arm_problems(state: SweepState) -> list[str]:
    """One line per arm that has no scored trial, e.g. ``rte/dlb: 8 of 8 trials failed: ...``."""
    lines = []
    for key, arm in state.arms.items():
        if arm.best is None:
            failed = arm.counts.get(R.Outcome.FAILED.value, 0)
            why = f": {arm.failures[0]}" if arm.failures else ""
            lines.append(f"{key}: {failed} of {arm.started} trials failed{why}" if arm.started
                         else f"{key}: no trial ran")
    return lines


def print_summary(state: SweepState, out: Path) -> None:
    from rich.table import Table

    out_console = console()
    for name, task in state.tasks.items():
        t = Table(title=f"{name}: best per arm ({task.metric}, {task.mode})")
        t.add_column("arm")
        t.add_column("score")
        t.add_column("vs trivial baseline", no_wrap=True)
        t.add_column("trials fin/stop/fail", no_wrap=True)
        t.add_column("best config")
        for m in state.methods:
            arm = state.arms.get(f"{name}/{m}")
            if arm is None:
                continue
            b = arm.best
            t.add_row(m, "-" if b is None else f"{b.score:.4f}",
                      learned_line(b.score if b else None, task.baseline, task.metric, task.mode),
                      "/".join(str(arm.counts.get(o.value, 0)) for o in R.Outcome), short_config(b.config) if b else "-")
        out_console.print(t, soft_wrap=False)
    uri = state.tracking_uri
    out_console.print(f"MLflow: experiment '{state.spec['name']}', parent run {state.parent_run_id}")
    out_console.print(f"  mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"  {uri}")
    out_console.print(f"  optuna-dashboard {out / OPTUNA_JOURNAL}")
    if state.disk_bytes is not None:
        out_console.print(f"Sweep folder: {out} ({state.disk_bytes / 2**20:.1f} MiB)")
    for line in arm_problems(state):
        out_console.print(f"[red]no scored trial[/red]: {line}")
    for line in tie_notes(state):  # every arm trains its own method; say why two still score the same
        out_console.print(f"tie: {line}")
