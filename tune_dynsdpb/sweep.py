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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import storage
from .console import print_header, print_summary
from .errors import UserError
from .experiment import check_resources, init_ray, order_groups, preflight, prepare_tasks, quiet_libraries
from .search_space import SweepSpec, apply_overrides, load_search_space, parse_search_space
from .searching import close_orphan_studies, fill_schedules
from .state import JOURNAL_FILE, STATE_FILE, SweepState, create_state, open_stored_sweep, open_sweep, own_folder
from .tracking import (check_tracking_uri, default_tracking_uri, open_tracking_uri, shown_uri, start_sweep_tracking,
                       use_tracking_uri)
from .tuning import collect_outcomes, run_experiment


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
    model: str                     # the model as given (a new sweep), or its resolved path (a resume)
    data_dir: str | None = None    # --data-dir of a new sweep (a resume reads the saved one)

    @property
    def shown_uri(self) -> str:
        """The tracking URI as the state and the console show it (no secret)."""
        return shown_uri(self.tracking_uri)

    @property
    def finished(self) -> bool:
        """A finished sweep opened from its own folder (one resumed into a new folder is taken over)."""
        return self.state is not None and self.state.status == "finished" and (self.out / STATE_FILE).exists()

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
                      resume=False, fresh=fresh, model=spec.model, data_dir=data_dir)
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
    _check_resume_args(state, **{"--methods": methods, "--num-samples": num_samples,
                                 "--data-dir": storage.normalize(data_dir) if data_dir else None,
                                 "--tracking-uri": shown_uri(tracking_uri) if tracking_uri else None,
                                 "--storage-path": storage.normalize(storage_path) if storage_path else None})
    spec = state.sweep_spec().model_copy(update={"tasks": state.task_specs(), "task": None})
    return _Sweep(out, spec, state, open_tracking_uri(state.tracking_uri, tracking_uri), state.storage_path,
                  state.spec_path, resume=True, fresh=fresh, model=state.model_path)


# -- the run --------------------------------------------------------------------------------------
def run_sweep(spec_path: str | Path | None = None, *, output_dir: str | Path | None = None,
              data_dir: str | None = None, methods: Sequence[str] | None = None, num_samples: int | None = None,
              overrides: Sequence[str] = (), ray_address: str | None = None, tracking_uri: str | None = None,
              storage_path: str | None = None, resume: bool = False, progress: bool = True, verbose: bool = False,
              ray_temp_dir: str | None = None) -> SweepState:
    """Runs (or resumes) a sweep; returns its final state. ``progress``: the live table (the header
    and the summary are printed either way, for a job's log)."""
    quiet_libraries(verbose)
    run = open_sweep_run(spec_path, output_dir, resume=resume, storage_path=storage_path, tracking_uri=tracking_uri,
                         data_dir=data_dir, methods=methods, num_samples=num_samples, overrides=overrides)
    if run.finished:  # resumed again (a job's retry): nothing runs, nothing is logged again
        print(f"sweep {run.spec.name}: finished; nothing to resume")
        print_summary(run.state, run.out)
        return run.state
    with own_folder(run.out, fresh=run.fresh, storage_path=run.storage_path, new=not run.resume):
        check_tracking_uri(run.tracking_uri)
        init_ray(ray_address, ray_temp_dir, verbose=verbose)
        # 2. what every trial shares: each task made ready, and a new sweep's preflight and first state
        check_resources(run.spec, run.where)
        tasks = prepare_tasks(run.spec, run.model, run.out / "cache", run.where, data_dir=run.data_dir, say=print)
        groups = order_groups(tasks, run.spec.methods)
        if run.state is None:
            preflight(run.spec, tasks, run.where, say=print)
            run.state = create_state(run.spec, tasks, spec_path=run.where, tracking_uri=run.shown_uri,
                                     storage_path=run.storage_path, data_dir=run.data_dir)
        else:
            run.state.check_data(tasks, run.out)
        print_header(run.state, run.out)
        tracker = start_sweep_tracking(run.tracking_uri, run.out, run.state, tasks, groups)
        run.state.status = "running"
        run.state.save(run.out)
        try:
            # 3. one experiment for every (task, arm)
            grid = run_experiment(run.spec, run.state, tasks, groups, tracker, folder=run.out, resume=run.resume,
                                  progress=progress)
            # 4. what each arm got, and its best trial
            trial_ids = collect_outcomes(grid, groups, run.state)
            close_orphan_studies(run.spec.name, groups, run.journal)
            fill_schedules(run.state)  # pbt arms: the winning lineage's schedule
            tracker.record_outcomes(grid, groups, run.state, trial_ids)
            run.state.finish(run.out)
            tracker.finish_sweep()
        except KeyboardInterrupt:
            raise run.state.stop(run.out) from None
    print_summary(run.state, run.out)
    return run.state


__all__ = ["run_sweep", "create_spec", "open_sweep_run"]
