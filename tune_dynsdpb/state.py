"""The sweep folder, typed: what a sweep was asked to do, where it stands, and each arm's best.

``sweep``, ``compare`` and ``export`` open a folder with :func:`open_sweep` and write it back with
:meth:`SweepState.save` (atomic, so a killed driver never leaves half a file). Layout::

    OUT/sweep.json        this state (the resume point)
    OUT/.lock             held by the driver that runs the sweep (one driver per folder)
    OUT/mlflow.db         default tracking store (SQLite), artifacts in OUT/mlartifacts
    OUT/optuna.journal    every (task, arm) study: ``optuna-dashboard OUT/optuna.journal``
    OUT/ray/sweep/        the one Tune experiment: trial folders, checkpoints, searcher state
    OUT/ray/finals-*/     compare's finals
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError
from .files import write_atomic
from .results import Outcome

STATE_FILE = "sweep.json"
LOCK_FILE = ".lock"
EXPERIMENT = "sweep"   # the Tune experiment's name under OUT/ray
VERSION = 2


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BestTrial(_Model):
    trial_id: str
    score: float                   # the task's metric, best report of the trial
    config: dict
    checkpoint: Optional[str] = None
    run_id: Optional[str] = None
    schedule: Optional[list] = None  # pbt: the winning lineage's [[step, alpha, tau], ...] (searching.record_schedules)


class ArmState(_Model):
    """One (task, arm) group: trial counts by outcome, and its best trial (None: nothing scored)."""
    task: str
    method: str
    started: int = 0
    counts: dict[str, int] = {}     # Outcome -> trials
    failures: list[str] = []        # distinct failure reasons, first few
    best: Optional[BestTrial] = None

    @property
    def key(self) -> str:
        return arm_key(self.task, self.method)


class TaskState(_Model):
    name: str
    metric: str                     # e.g. eval_accuracy
    mode: Literal["max", "min"]
    data_dir: Optional[str] = None
    source: str = ""
    train_size: int = 0
    eval_size: int = 0
    data_hash: str = ""
    baseline: Optional[float] = None  # the trivial baseline's score on the eval split
    truncated: dict[str, int] = {}    # split -> samples cut at max_length (under the check's threshold)


class SweepState(_Model):
    version: int = VERSION
    sweep_id: str
    spec: dict                      # the validated sweep file, as JSON
    spec_path: str
    methods: list[str]
    num_samples: int
    tracking_uri: str               # credentials redacted; secrets come from MLflow's env variables
    model_path: str
    storage_path: str               # where Tune keeps the experiment (shared storage on a cluster)
    tasks: dict[str, TaskState]
    arms: dict[str, ArmState] = {}
    status: Literal["running", "interrupted", "finished"] = "running"
    parent_run_id: Optional[str] = None
    created: float
    finished: Optional[float] = None
    disk_bytes: Optional[int] = None

    def sweep_spec(self):
        from .search_space import parse_search_space
        return parse_search_space(self.spec, self.spec_path)

    def task_specs(self, names=None):
        """The sweep file's tasks (all, or ``names``), each with the data folder it was run on."""
        return [t.model_copy(update={"data_dir": self.tasks[t.task].data_dir})
                for t in self.sweep_spec().task_specs() if names is None or t.task in names]

    def arm(self, task: str, method: str) -> ArmState:
        return self.arms.setdefault(arm_key(task, method), ArmState(task=task, method=method))

    def scored(self, task: str) -> dict[str, BestTrial]:
        """{method: best trial} of the task's arms that have a scored trial, in the sweep's order."""
        arms = {a.method: a.best for a in self.arms.values() if a.task == task and a.best is not None}
        return {m: arms[m] for m in self.methods if m in arms}

    def single_task(self, flag: str = "--task") -> str:
        if len(self.tasks) != 1:
            raise UserError(f"{flag}: this sweep has several tasks; name one ({', '.join(self.tasks)})")
        return next(iter(self.tasks))

    def pick_task(self, task: str | None, flag: str = "--task") -> str:
        if task is None:
            return self.single_task(flag)
        if task not in self.tasks:
            raise UserError(f"{flag}: the sweep has no task {task!r} (tasks: {', '.join(self.tasks)})")
        return task

    def save(self, out: str | os.PathLike) -> None:
        write_atomic(Path(out) / STATE_FILE, self.model_dump_json(indent=2))


def arm_key(task: str, method: str) -> str:
    return f"{task}/{method}"


def open_sweep(out: str | os.PathLike) -> SweepState:
    """The sweep in folder ``out``; one-line errors for a folder without one or a corrupt state."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{out}: holds no sweep (no {STATE_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt sweep state: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise UserError(f"{path}: not a version-{VERSION} sweep state (written by another tune-dynsdpb?)")
    try:
        return SweepState.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise UserError(f"{path}: corrupt sweep state: {where}: {err['msg']}") from None


@contextlib.contextmanager
def lock_folder(out: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on the sweep folder for this process; a second driver gets a one-line error.
    The kernel drops the lock when the process dies, so a killed driver never leaves it held."""
    path = Path(out) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--output-dir: {out} is in use by another tune-dynsdpb driver") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


__all__ = ["SweepState", "ArmState", "TaskState", "BestTrial", "open_sweep", "lock_folder", "arm_key",
           "STATE_FILE", "EXPERIMENT", "Outcome"]
