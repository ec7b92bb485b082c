"""The sweep folder, typed: what a sweep was asked to do, where it stands, and each arm's best.

``sweep``, ``compare`` and ``export`` open a folder with :func:`open_sweep` and write it back with
:meth:`SweepState.save` (atomic, so a killed driver never leaves half a file). Layout::

    OUT/sweep.json        this state (the resume point)
    OUT/.lock             held by the driver that runs the sweep (one driver per folder)
    OUT/mlflow.db         default tracking store (SQLite), artifacts in OUT/mlartifacts
    OUT/optuna.journal    every (task, arm) study: ``optuna-dashboard OUT/optuna.journal``
    OUT/ray/sweep/        the one Tune experiment: trial folders, checkpoints, searcher state
    OUT/ray/finals-*/     compare's finals

``OUT/ray`` is the default storage path; ``--storage-path`` puts it elsewhere (an NFS folder,
``s3://bucket/prefix``, ...; see :mod:`tune_dynsdpb.storage`). The storage path also holds a mirror
of the driver's state, so that another machine can take a sweep over (``sweep --resume
--storage-path URI --output-dir NEW``)::

    STORAGE/sweep.json        this state, written with every save
    STORAGE/optuna.journal    the studies, uploaded as trials start and end (and every 30 s)
    STORAGE/driver.lease      the driver that owns the sweep now: host, pid, heartbeat

The lease stands in for the folder lock on shared storage, where no lock spans machines. The
driver writes it before any trial, then rewrites its heartbeat every ``LEASE_HEARTBEAT_S`` seconds,
and deletes it when it ends (also on Ctrl-C or SIGTERM). Another driver refuses the sweep while the
lease is held: its heartbeat is younger than ``LEASE_TTL_S`` seconds, and, on the same host, its
process is alive. A lease whose driver was killed (SIGKILL, a lost machine) is taken over after
``LEASE_TTL_S`` seconds (at once on the same host). It is advisory and best effort: object stores
have no compare-and-swap for it. A driver reads the lease back right after writing it and refuses
the sweep when another driver's write came after its own, so only two drivers whose writes and
read-backs interleave exactly (started within the same second on two machines) could both take
it; the heartbeat does not look again, and both would then run. Start one driver per sweep.
Heartbeats are compared with the reader's clock: keep the machines' clocks in sync (NTP).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from . import storage
from .errors import UserError, one_line
from .files import write_atomic
from .results import Outcome
from .search_space import SweepSpec, parse_search_space

STATE_FILE = "sweep.json"
LOCK_FILE = ".lock"
JOURNAL_FILE = "optuna.journal"
LEASE_FILE = "driver.lease"
LEASE_TTL_S = float(os.environ.get("TUNE_DYNSDPB_LEASE_TTL_S", 90))
LEASE_HEARTBEAT_S = LEASE_TTL_S / 6
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
    schedule: Optional[list] = None  # pbt: the winning lineage's [[step, alpha, tau], ...] (searching.fill_schedules)


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

    def sweep_spec(self) -> SweepSpec:
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

    def check_data(self, tasks: dict, where: str | os.PathLike) -> None:
        """A resume: each task's data (``experiment.PreparedTask``) must be what the sweep started on.
        A driver that takes the sweep over from the storage path (``where`` is its new folder, without
        a state yet) also takes its studies, then its state, into that folder."""
        for n, t in tasks.items():
            if t.data_hash != self.tasks[n].data_hash:
                raise UserError(f"{t.task.source}: the data of task {n} changed since the sweep started; "
                                "resume with the same data, or start a new sweep")
        out = Path(where)
        if not (out / STATE_FILE).exists():
            journal = storage.join(self.storage_path, JOURNAL_FILE)
            if storage.is_file(journal):
                storage.download(journal, str(out / JOURNAL_FILE))
            self.save(out)

    def stop(self, out: str | os.PathLike) -> KeyboardInterrupt:
        """The sweep stopped by Ctrl-C or SIGTERM (during the experiment, or while its outcomes were
        being recorded): the state says so, and the error says how to continue."""
        self.status = "interrupted"
        self.save(out, journal=True)
        return KeyboardInterrupt(f"sweep interrupted; continue it with tune-dynsdpb sweep --resume --output-dir {out}")

    def finish(self, out: str | os.PathLike) -> None:
        """The sweep done: its disk use (the folder, and the storage path outside it), and the state
        saved as finished, with the journal."""
        folder = Path(out)
        self.disk_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        if not storage.within(self.storage_path, folder):
            self.disk_bytes += storage.size(self.storage_path)
        self.status, self.finished = "finished", time.time()
        self.save(folder, journal=True)

    def save(self, out: str | os.PathLike, journal: bool = False) -> None:
        """Writes ``OUT/sweep.json`` (atomic), then, unless the storage path lies inside ``OUT`` (as
        the default ``OUT/ray`` does), its mirror there; with ``journal``, the Optuna journal is
        mirrored first, so the stored journal is never older than the stored state (a journal that
        cannot be mirrored leaves the stored state as it was, one warning line, until the next save)."""
        text = self.model_dump_json(indent=2)
        write_atomic(Path(out) / STATE_FILE, text)
        if not storage.within(self.storage_path, out):
            if journal and (Path(out) / JOURNAL_FILE).exists():
                if not storage.mirror(self.storage_path, JOURNAL_FILE, local=Path(out) / JOURNAL_FILE):
                    return
            storage.mirror(self.storage_path, STATE_FILE, text=text)


def _absolute(data_dir: str | None) -> str | None:
    return storage.normalize(data_dir) if data_dir else None


def create_state(spec: SweepSpec, tasks: dict, *, spec_path: str, tracking_uri: str, storage_path: str,
                 data_dir: str | None = None) -> SweepState:
    """A new sweep's first state: what was asked (``spec``; ``tracking_uri`` with its secret
    redacted, as ``tracking.shown_uri`` does), each task's data as prepared
    (``experiment.PreparedTask``) with its folder made absolute (``compare``, ``export`` and
    ``--resume`` may run from another working directory), and one empty arm per (task, method)."""
    state = SweepState(
        sweep_id=uuid.uuid4().hex[:12], spec=spec.model_dump(mode="json", by_alias=True), spec_path=spec_path,
        methods=list(spec.methods), num_samples=spec.budget.num_samples, tracking_uri=tracking_uri,
        model_path=next(iter(tasks.values())).job.model_path, created=time.time(), storage_path=storage_path,
        tasks={n: TaskState(name=n, metric=t.metric, mode=t.mode, data_dir=_absolute(data_dir or t.spec.data_dir),
                            source=t.task.source, train_size=len(t.train), eval_size=len(t.eval),
                            data_hash=t.data_hash, baseline=t.baseline,
                            truncated={s: c.truncated for s, c in t.truncation.items()})
               for n, t in tasks.items()})
    for n in tasks:
        for m in spec.methods:
            state.arm(n, m)
    return state


def arm_key(task: str, method: str) -> str:
    return f"{task}/{method}"


def open_sweep(out: str | os.PathLike) -> SweepState:
    """The sweep in folder ``out``; one-line errors for a folder without one or a corrupt state."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{out}: holds no sweep (no {STATE_FILE})")
    try:
        return _parse(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt sweep state: {str(e).splitlines()[0]}") from None


def open_stored_sweep(storage_path: str, flag: str = "--storage-path") -> SweepState:
    """The sweep mirrored on a storage path (``STORAGE/sweep.json``), for a driver that takes it
    over from another folder or machine."""
    where = storage.join(storage_path, STATE_FILE)
    try:
        if not storage.is_file(where):
            raise UserError(f"{flag}: {storage.redact(storage_path)} holds no sweep (no {STATE_FILE})")
        text = storage.read_text(where)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag}: cannot read {storage.redact(where)}: {one_line(e)}") from None
    return _parse(text, storage.redact(where))


def _parse(text: str, path) -> SweepState:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
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


@contextlib.contextmanager
def own_folder(out: Path, *, fresh: bool, storage_path: str, new: bool = False) -> Iterator[None]:
    """What one driver holds while it runs a sweep: the folder's lock, the storage path checked (a
    probe object written and deleted; for a ``new`` sweep, holding no other sweep, whose state and
    Tune experiment it would overwrite) and its lease (unless it lies in the folder). A sweep that
    fails before its state is first saved (a bad metric, an unreachable tracking store or storage
    path, resources no node has, a failing preflight) leaves the folder as it found it: removed if
    it made it, else emptied (it was empty), so the same --output-dir works next time. The undo
    runs only under the lock, so it never touches another driver's folder."""
    with lock_folder(out):
        try:
            storage.check_storage(storage_path)  # before any MLflow run or trial
            if new and not storage.within(storage_path, out) and (
                    storage.exists(storage.join(storage_path, STATE_FILE))
                    or storage.exists(storage.join(storage_path, EXPERIMENT))):
                shown = storage.redact(storage_path)
                raise UserError(f"--storage-path: {shown} already holds a sweep; continue it with "
                                f"--resume --storage-path {shown}, or give another path")
            with contextlib.nullcontext() if storage.within(storage_path, out) else hold_lease(storage_path):
                yield
        except BaseException:
            if not (out / STATE_FILE).exists() and fresh:  # this driver made the folder: removed
                shutil.rmtree(out, ignore_errors=True)
            elif not (out / STATE_FILE).exists():  # it was empty: emptied
                for child in out.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            raise


def _lease_text() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lease(where: str) -> dict | None:
    try:
        return json.loads(storage.read_text(where)) if storage.is_file(where) else None
    except (ValueError, OSError):
        return None


@contextlib.contextmanager
def hold_lease(storage_path: str, flag: str = "--storage-path") -> Iterator[None]:
    """The driver's lease on the storage path for the block (semantics in the module's docstring):
    a one-line UserError while another live driver holds it; a heartbeat thread keeps it fresh."""
    where = storage.join(storage_path, LEASE_FILE)
    mine = _lease_text()
    held = _read_lease(where)
    if held and (held.get("host"), held.get("pid")) != (mine["host"], mine["pid"]):
        age = time.time() - float(held.get("heartbeat", 0))
        same_host = held.get("host") == mine["host"]
        if age < LEASE_TTL_S and (not same_host or _alive(int(held.get("pid", 0)))):
            raise UserError(f"{flag}: {storage.redact(storage_path)} is in use by the tune-dynsdpb driver on "
                            f"{held.get('host')} (pid {held.get('pid')}, heartbeat {age:.0f} s ago); a driver "
                            f"silent for {LEASE_TTL_S:.0f} s is taken over")
    storage.write_text(where, json.dumps(mine))
    back = _read_lease(where)
    if back and (back.get("host"), back.get("pid")) != (mine["host"], mine["pid"]):
        raise UserError(f"{flag}: {storage.redact(storage_path)} was just taken by the tune-dynsdpb driver on "
                        f"{back.get('host')} (pid {back.get('pid')})")
    stop = threading.Event()

    def beat():
        while not stop.wait(LEASE_HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next one
                storage.write_text(where, json.dumps({**mine, "heartbeat": time.time()}))

    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            now = _read_lease(where)
            if now is None or (now.get("host"), now.get("pid")) == (mine["host"], mine["pid"]):
                storage.delete_file(where)


__all__ = ["SweepState", "create_state", "ArmState", "TaskState", "BestTrial", "open_sweep", "open_stored_sweep", "lock_folder",
           "own_folder", "hold_lease", "arm_key", "STATE_FILE", "JOURNAL_FILE", "LEASE_FILE", "EXPERIMENT", "Outcome"]
