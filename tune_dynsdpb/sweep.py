"""``tune-dynsdpb sweep``: every (task, arm) of a sweep file in one Ray Tune experiment.

A sweep reads top to bottom (:func:`run_sweep`):

1. open the sweep: the file (and ``--set`` overrides) validated, or the saved state of the
   folder to resume (or, for a folder that has none, the state mirrored on ``--storage-path``),
   with a lock so one driver owns the folder, and a lease on the storage path;
2. check the storage path (a probe object written and deleted) and make ready what every trial
   shares, in the driver: Ray, the tracking store, each task's data (tokenized once), and one real
   training step per task (:func:`~tune_dynsdpb.experiment.preflight`) so a setting that would fail
   in every trial fails now, once;
3. run one ``Tuner`` over all (task, arm) groups (:mod:`tune_dynsdpb.tuning`): a round-robin
   searcher with one Optuna study per group and one ASHA bracket set per group
   (:mod:`tune_dynsdpb.searching`), tracked in MLflow from this process (:mod:`tune_dynsdpb.tracking`);
4. record each group's outcome counts and best trial (never a failed one) in the state and in
   MLflow; keep each trial's best checkpoint, and the optimizer state only of each arm's best.

Ctrl-C and SIGTERM stop the same way: Tune saves the experiment, and ``--resume`` continues it.
The folder's layout, and what is mirrored on the storage path, are in :mod:`tune_dynsdpb.state`;
the console (header, live table, summary) is :mod:`tune_dynsdpb.console`.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
from ray import tune

from . import results as R
from . import storage
from .console import ProgressCallback, ProgressTable, print_header, print_summary
from .errors import UserError
from .experiment import check_resources, create_trainable, init_ray, preflight, prepare_tasks, quiet_libraries
from .params import passes_per_epoch
from .run import resolve_model_path
from .search_space import SweepSpec, apply_overrides, load_search_space, parse_search_space
from .searching import create_journal_storage, fill_schedules, study_name, use_journal
from .state import (EXPERIMENT, JOURNAL_FILE, STATE_FILE, ArmState, BestTrial, SweepState, TaskState, inside,
                    mirror_journal, open_stored_sweep, open_sweep, own_folder)
from .tracking import (SweepTracker, check_tracking_uri, default_artifact_location, default_tracking_uri,
                       open_tracking_uri, redact_uri, use_tracking_uri)
from .tuning import CheckpointPruner, JournalMirror, checkpoint_uri, configure_tune, create_tuner, fit_tuner


# -- 1. open the sweep ----------------------------------------------------------------------------
@dataclass
class _Sweep:
    """What one run of ``sweep`` works on."""
    out: Path
    spec: SweepSpec
    state: SweepState | None       # None: a new sweep, until its state is first saved
    tracking_uri: str
    storage_path: str
    where: str                     # the sweep file, as errors name it
    resume: bool
    fresh: bool                    # the folder did not exist before this run
    from_storage: bool = False     # resumed from the storage path's mirror into a new folder

    @property
    def journal(self) -> str:
        return str(self.out / JOURNAL_FILE)


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
             "--tracking-uri": state.tracking_uri, "--storage-path": state.storage_path}
    for flag, value in given.items():
        if value is None or value == [] or value == ():
            continue
        if flag == "--methods" and list(value) == saved[flag] or value == saved[flag]:
            continue
        if flag == "--tracking-uri" and "***" in saved[flag]:  # the same store, its secret given again
            continue
        raise UserError(f"{flag}: {value!r} conflicts with the saved sweep's {saved[flag]!r}; "
                        f"drop it to resume, or start a new sweep")


def _saved_data_dir(state: SweepState):
    dirs = {t.data_dir for t in state.tasks.values()}
    return dirs.pop() if len(dirs) == 1 else None


def open_sweep_run(spec_path, output_dir, *, resume: bool, storage_path: str | None, tracking_uri: str | None,
                   data_dir: str | None, methods, num_samples, overrides) -> _Sweep:
    """Step 1: what was asked, validated before anything runs. A resume opens ``OUT/sweep.json``;
    for an empty or missing ``OUT`` with ``--storage-path``, the state mirrored there."""
    if not resume:
        if spec_path is None:
            raise UserError("sweep: give a sweep file (e.g. search_spaces/quickstart.yaml)")
        spec = create_spec(spec_path, methods, num_samples, overrides)
        out = Path(output_dir or Path("runs") / spec.name).resolve()
        fresh = not out.exists()
        _check_output_dir(out)
        uri = use_tracking_uri(tracking_uri) if tracking_uri else default_tracking_uri(out)
        return _Sweep(out, spec, None, uri, storage.normalize(storage_path or out / "ray"), str(spec.path or spec.name),
                      resume=False, fresh=fresh)
    if output_dir is None:
        raise UserError("--resume: needs --output-dir of the interrupted sweep")
    if spec_path is not None or overrides:
        raise UserError("--resume: continues the saved sweep file; give no sweep file or --set")
    out = Path(output_dir).resolve()
    fresh = not out.exists()
    from_storage = storage_path is not None and not (out / STATE_FILE).exists()
    if from_storage:
        state = open_stored_sweep(storage.normalize(storage_path))
        _check_output_dir(out)
    else:
        state = open_sweep(out)
    _check_resume_args(state, **{"--methods": methods, "--num-samples": num_samples, "--data-dir": data_dir,
                                 "--tracking-uri": redact_uri(tracking_uri) if tracking_uri else None,
                                 "--storage-path": storage.normalize(storage_path) if storage_path else None})
    spec = state.sweep_spec().model_copy(update={"tasks": state.task_specs(), "task": None})
    return _Sweep(out, spec, state, open_tracking_uri(state.tracking_uri, tracking_uri), state.storage_path,
                  state.spec_path, resume=True, fresh=fresh, from_storage=from_storage)


# -- the run --------------------------------------------------------------------------------------
def run_sweep(spec_path: str | Path | None = None, *, output_dir: str | Path | None = None,
              data_dir: str | None = None, methods: Sequence[str] | None = None, num_samples: int | None = None,
              overrides: Sequence[str] = (), ray_address: str | None = None, tracking_uri: str | None = None,
              storage_path: str | None = None, resume: bool = False, progress: bool = True, verbose: bool = False,
              ray_temp_dir: str | None = None) -> SweepState:
    """Runs (or resumes) a sweep; returns its final state."""
    quiet_libraries(verbose)
    run = open_sweep_run(spec_path, output_dir, resume=resume, storage_path=storage_path, tracking_uri=tracking_uri,
                         data_dir=data_dir, methods=methods, num_samples=num_samples, overrides=overrides)
    with own_folder(run.out, fresh=run.fresh, storage_path=run.storage_path):
        check_tracking_uri(run.tracking_uri)
        init_ray(ray_address, ray_temp_dir, verbose=verbose)
        check_resources(run.spec, run.where)
        tasks = prepare(run, data_dir, progress)
        if progress:
            print_header(run.state, run.out)
        groups = order_groups(tasks, run.spec.methods)
        tracker = start_tracking(run, tasks, groups)
        grid = run_experiment(run, tasks, groups, tracker, progress)
        try:
            record_outcomes(run, grid, groups, tracker)
        except KeyboardInterrupt:
            raise interrupted(run) from None
    if progress:
        print_summary(run.state, run.out)
    return run.state


# -- 2. what every trial shares -------------------------------------------------------------------
def prepare(run: _Sweep, data_dir: str | None, progress: bool) -> dict:
    """Each task made ready; a new sweep's preflight and first state, or a resume's data check."""
    spec, state = run.spec, run.state
    model_path = state.model_path if state else resolve_model_path(spec.model)
    tasks = prepare_tasks(spec, model_path, run.out / "cache", run.where, data_dir=None if state else data_dir,
                          say=print)
    if state is not None:
        for n, t in tasks.items():
            if t.data_hash != state.tasks[n].data_hash:
                raise UserError(f"{t.task.source}: the data of task {n} changed since the sweep started; "
                                "resume with the same data, or start a new sweep")
        if run.from_storage:  # take the sweep over: its studies, then its state, into the new folder
            journal = storage.join(run.storage_path, JOURNAL_FILE)
            if storage.is_file(journal):
                storage.download(journal, run.journal)
            state.save(run.out)
        return tasks
    if progress:
        print(f"preflight: one training step per task ({', '.join(tasks)}) ...", flush=True)
    preflight(spec, tasks, run.where)
    run.state = SweepState(
        sweep_id=uuid.uuid4().hex[:12], spec=spec.model_dump(mode="json", by_alias=True), spec_path=run.where,
        methods=list(spec.methods), num_samples=spec.budget.num_samples, tracking_uri=redact_uri(run.tracking_uri),
        model_path=model_path, created=time.time(), storage_path=run.storage_path,
        tasks={n: TaskState(name=n, metric=t.metric, mode=t.mode, data_dir=data_dir or t.spec.data_dir,
                            source=t.task.source, train_size=len(t.train), eval_size=len(t.eval),
                            data_hash=t.data_hash, baseline=t.baseline,
                            truncated={s: c.truncated for s, c in t.truncation.items()})
               for n, t in tasks.items()})
    for n in tasks:
        for m in spec.methods:
            run.state.arm(n, m)
    run.state.save(run.out)
    return tasks


def order_groups(tasks: dict, methods: Sequence[str]) -> list[tuple[str, str]]:
    """The (task, arm) groups, costliest trial first (tokens of the task's train split x the
    method's passes per sample and epoch). Each round of the round-robin then sends its long trials
    out first and its short ones last, where they fill the slots the long ones leave (longest
    processing time first), instead of one long trial running alone at the end of the sweep."""
    tokens = {n: sum(map(len, t.train["input_ids"])) for n, t in tasks.items()}
    groups = [(n, m) for n in tasks for m in methods]  # sorted() is stable: ties keep the spec's order
    return sorted(groups, key=lambda g: -tokens[g[0]] * passes_per_epoch(g[1]))


def start_tracking(run: _Sweep, tasks: dict, groups: list):
    """The MLflow runs of the sweep, its tasks and arms (found again on a resume)."""
    state = run.state
    tracker = SweepTracker(run.tracking_uri, run.spec.name, state.sweep_id,
                           artifact_location=default_artifact_location(run.out)
                           if run.tracking_uri.startswith("sqlite") else None)
    state.parent_run_id = tracker.start_sweep(
        {"spec": state.spec, "model": state.model_path, "methods": ",".join(run.spec.methods),
         "tasks": ",".join(tasks)}, tags={"tune_dynsdpb.output_dir": str(run.out)})
    for n, m in groups:
        tracker.start_arm(n, m)
    tracker.set_trial_view({t.metric: t.mode for t in tasks.values()})  # what the MLflow UI opens on
    for n, t in tasks.items():  # nothing dropped in silence: the truncation counts too
        tracker.log_truncation(n, t.truncation)
    state.status = "running"
    state.save(run.out)
    return tracker


# -- 3. one experiment for every (task, arm) ------------------------------------------------------
def run_experiment(run: _Sweep, tasks: dict, groups: list, tracker, progress: bool):
    """The Tuner, new or restored from the storage path, run to its budget."""
    state, spec = run.state, run.spec
    trainable = create_trainable(spec, tasks)
    experiment = storage.join(state.storage_path, EXPERIMENT)
    table = ProgressTable(state, enabled=progress)
    callback = tracker.trial_callback(groups)
    configure_tune(spec)
    use_journal(run.journal)  # a restored searcher re-opens its studies in this folder's journal
    JournalMirror.current = None if inside(state.storage_path, run.out) else (run.journal, state.storage_path)
    if run.resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        tuner = create_tuner(spec, groups, trainable, state.storage_path,
                             [callback, ProgressCallback(), CheckpointPruner(state.storage_path), JournalMirror()],
                             run.journal)
    try:
        grid = fit_tuner(tuner, len(groups) * spec.budget.num_samples, spec.budget.time_budget_s)
    except KeyboardInterrupt:  # Tune returned early and saved its state
        callback.flush()
        table.close()
        raise interrupted(run) from None
    finally:
        table.close()
    callback.flush()
    return grid


def interrupted(run: _Sweep) -> KeyboardInterrupt:
    """The sweep stopped by Ctrl-C or SIGTERM (during the experiment, or while its outcomes were being
    recorded): its state says so, and the error says how to continue."""
    mirror_journal(run.storage_path, run.out)
    run.state.status = "interrupted"
    run.state.save(run.out)
    return KeyboardInterrupt(f"sweep interrupted; continue it with tune-dynsdpb sweep --resume --output-dir {run.out}")


# -- 4. what each arm got, and its best trial -----------------------------------------------------
def record_outcomes(run: _Sweep, grid, groups: list, tracker) -> None:
    state = run.state
    for n, m in groups:
        state.arms[f"{n}/{m}"] = ArmState(task=n, method=m)
    outcomes = collect_outcomes(grid, state)
    tracker.trial_callback(groups).backfill(grid)  # what a killed driver had queued and not written
    tracker.delete_orphans({o["trial_id"] for o in outcomes})
    _close_orphan_studies(run.spec, groups, run.journal)
    fill_schedules(state)  # pbt arms: the winning lineage's schedule
    for arm in state.arms.values():
        if arm.best is not None:
            arm.best.run_id = tracker.find_trial_run(arm.task, arm.method, arm.best.trial_id)
            t = state.tasks[arm.task]
            tracker.record_best(arm.task, arm.method, arm.best.run_id, arm.best.config, t.metric, arm.best.score,
                                t.baseline, arm.best.schedule)
    keep = {a.best.checkpoint for a in state.arms.values() if a.best and a.best.checkpoint}
    CheckpointPruner(state.storage_path).finish(grid, keep)
    state.disk_bytes = _disk_use(run.out) + (0 if inside(state.storage_path, run.out)
                                             else storage.size(state.storage_path))
    state.status, state.finished = "finished", time.time()
    mirror_journal(run.storage_path, run.out)
    state.save(run.out)
    tracker.finish_sweep()


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
    return records


def _close_orphan_studies(spec: SweepSpec, groups: list, journal: str) -> None:
    """Optuna trials a killed driver left RUNNING (their Tune trials came back under new ids) are
    marked FAIL, so the studies hold exactly the sweep's trials as COMPLETE/PRUNED/FAIL."""
    if not Path(journal).exists():
        return
    journal_storage = create_journal_storage(journal)
    for g in groups:
        try:
            study = optuna.load_study(study_name=study_name(spec.name, g), storage=journal_storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _disk_use(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


__all__ = ["run_sweep", "create_spec", "order_groups", "collect_outcomes"]
