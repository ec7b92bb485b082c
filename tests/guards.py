"""Session and fast-lane guards for the test suite (used by conftest.py).

Where tests may write
    Every temporary file goes under pytest's basetemp (``/tmp/pytest-of-<user>/pytest-<n>``):
    :func:`session_env` points ``TMPDIR`` (and :mod:`tempfile`), ``RAY_TMPDIR`` and the token
    cache there, for this process and every process it starts (Ray workers, CLI subprocesses).
    Ray's unix sockets need a short folder (a socket path holds at most 107 bytes and Ray adds
    ``/session_<date>_<time>_<us>_<pid>/sockets/plasma_store``, ~63 bytes): :func:`ray_temp_dir`
    is ``<basetemp>/r`` when that and a folder below it are at most 44 bytes long (it is with pytest's default basetemp),
    else a ``pytest-ray-*`` folder in the system temp dir that the session removes at its end.

:class:`WriteGuard` (the whole session) fails the run when a test writes
    - into the checkout: a snapshot of the tree (names, sizes, mtimes; ``.git``, caches and the
      virtualenv left out) before and after the session must match;
    - into the shared system temp dir outside pytest's basetemp: an audit hook
      (:func:`sys.addaudithook`) sees every file this process opens for writing, every folder it
      makes, renames into, links or SQLite database it opens, and names the test that did it.
      Entries that appear in ``/tmp`` without such a record are listed as a warning only: the
      machine may be shared, and a file in ``/tmp`` cannot be traced back to its writer after
      the fact, so failing on them would fail on other people's work.

:class:`FastLaneGuard` (every test not marked ``slow``) fails the test when it starts Ray (every
``ray.init`` is refused and ``RAY_ADDRESS`` points at a closed port, so a path around the patch
cannot start or join a cluster either), starts a server or a sweep as a subprocess, or leaves a
child process running. The test fails even if the code under test swallowed the refusal.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SYSTEM_TMP = Path(tempfile.gettempdir()).resolve()  # before session_env redirects it
_SOCKET_ROOM = 37  # the longest Ray temp dir whose socket paths still fit in 107 bytes (plasma_store.N of a 2nd node)
SNAPSHOT_SKIP = {".git", "__pycache__", ".pytest_cache", ".venv", ".mypy_cache", ".ruff_cache"}
TMP_ALLOWED = ("pytest-of-*", "pytest-ray-*", "*.lock")  # pytest's own root (our basetemp lies in it); lock files


def session_env(basetemp: Path) -> dict[str, str]:
    """Environment variables that keep every temporary file of the session under ``basetemp``."""
    tmp = basetemp / "tmp"
    tmp.mkdir(exist_ok=True)
    return {"TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp), "RAY_TMPDIR": str(ray_temp_dir(basetemp)),
            "TUNE_DYNSDPB_CACHE": str(basetemp / "token-cache")}


_RAY_DIR: Path | None = None


def ray_temp_dir(basetemp: Path | None = None) -> str:
    """The session's Ray temp dir (short enough for unix sockets; see the module doc)."""
    global _RAY_DIR
    if _RAY_DIR is None:
        assert basetemp is not None, "session_env first"
        d = basetemp / "r"
        if len(str(d)) + 5 > _SOCKET_ROOM:  # room for one short_dir() below it
            d = Path(tempfile.mkdtemp(prefix="pytest-ray-", dir=SYSTEM_TMP))
        d.mkdir(exist_ok=True)
        _RAY_DIR = d
    return str(_RAY_DIR)


def short_dir(prefix: str = "r") -> str:
    """A new folder for another Ray (a ``ray start`` head, a sweep subprocess's RAY_TMPDIR) under
    the session's short Ray temp dir: still short enough for its unix sockets."""
    global _SHORT
    while True:
        _SHORT += 1
        d = Path(ray_temp_dir()) / f"{prefix[:1]}{_SHORT}"
        try:
            d.mkdir()
            return str(d)
        except FileExistsError:
            continue


_SHORT = 0


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``root`` but SNAPSHOT_SKIP."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SNAPSHOT_SKIP and not d.endswith(".egg-info")]
        for name in files:
            p = os.path.join(folder, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def diff(before: dict, after: dict) -> list[str]:
    return sorted([f"+ {p}" for p in after.keys() - before.keys()] + [f"- {p}" for p in before.keys() - after.keys()]
                  + [f"~ {p}" for p in before.keys() & after.keys() if before[p] != after[p]])


# -- writes seen by an audit hook -----------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class WriteGuard:
    """Records writes of this process outside the allowed places (see the module doc)."""

    def __init__(self, root: Path, basetemp: Path):
        self.root, self.basetemp = str(root.resolve()), str(basetemp.resolve())
        self.tmp = str(SYSTEM_TMP)
        self.ray = str(Path(ray_temp_dir()).resolve())
        self.current = "(collection)"
        self.seen: list[str] = []
        self.active = False
        self._busy = threading.local()
        self.tree = snapshot(root)
        self.tmp_entries = set(os.listdir(self.tmp))
        sys.addaudithook(self._hook)  # (cannot be removed: ``active`` turns it off)

    def _bad(self, path) -> str | None:
        if isinstance(path, int):
            return None
        p = os.path.abspath(os.fsdecode(path))
        inside = lambda root: p == root or p.startswith(root + os.sep)  # noqa: E731
        if inside(self.basetemp) or inside(self.ray):
            return None
        if inside(self.root) and not any(part in SNAPSHOT_SKIP for part in Path(p).parts):
            return p
        if inside(self.tmp):
            top = os.path.relpath(p, self.tmp).split(os.sep)[0]
            if not any(fnmatch.fnmatch(top, pat) for pat in TMP_ALLOWED):
                return p
        return None

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active or event not in _EVENTS or getattr(self._busy, "on", False):
            return
        self._busy.on = True
        try:
            for path in _EVENTS[event](args):
                bad = self._bad(path)
                if bad:
                    self.seen.append(f"{self.current}: {event} {bad}")
        except Exception:  # noqa: BLE001 - a guard must never break the code under test
            pass
        finally:
            self._busy.on = False

    def problems(self) -> tuple[list[str], list[str]]:
        """(failures, warnings) at the end of the session."""
        failures = [f"written outside pytest's temp folders: {w}" for w in dict.fromkeys(self.seen)]
        changed = diff(self.tree, snapshot(Path(self.root)))
        failures += [f"the checkout changed during the tests: {c}" for c in changed]
        new = sorted(e for e in set(os.listdir(self.tmp)) - self.tmp_entries
                     if not any(fnmatch.fnmatch(e, pat) for pat in TMP_ALLOWED))
        warnings = [f"new in {self.tmp} during the session (not traced to this session's writes): {e}" for e in new]
        return failures, warnings


def _open_args(args):
    path, mode, flags = args
    if mode is not None:
        return [path] if any(c in str(mode) for c in "wax+") else []
    return [path] if (flags or 0) & _WRITE_FLAGS else []


_EVENTS = {
    "open": _open_args,
    "os.mkdir": lambda a: [a[0]],
    "os.rename": lambda a: [a[1]],
    "os.link": lambda a: [a[1]],
    "os.symlink": lambda a: [a[1]],
    "shutil.copyfile": lambda a: [a[1]],
    "shutil.copytree": lambda a: [a[1]],
    "sqlite3.connect": lambda a: [a[0]] if a and str(a[0]) not in ("", ":memory:") else [],
}


def remove_ray_temp_dir() -> None:
    if _RAY_DIR is not None and _RAY_DIR.parent == SYSTEM_TMP:  # the fallback: ours to remove
        shutil.rmtree(_RAY_DIR, ignore_errors=True)


# -- the fast lane --------------------------------------------------------------------------------
SERVER = re.compile(r"\bmlflow\b.*\b(server|ui)\b|\bray\b.*\bstart\b|gunicorn|uvicorn|optuna-dashboard|gcs_server"
                    r"|raylet|tune[-_]dynsdpb(\.cli)?\b.*\b(sweep|compare)\b")


class FastLaneGuard:
    """Around one fast-lane test; ``check()`` after it fails the test on a violation."""

    def __init__(self, nodeid: str):
        self.nodeid, self.violations = nodeid, []

    def _refuse(self, what: str):
        self.violations.append(what)
        return RuntimeError(f"fast-lane test {self.nodeid} {what}: mark it @pytest.mark.slow")

    def __enter__(self):
        import pytest
        import ray
        import ray._private.worker as worker

        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a closed port: no cluster to start or join

        def no_ray(*a, **k):
            raise self._refuse("starts Ray (ray.init)")

        self.mp.setattr(ray, "init", no_ray)
        self.mp.setattr(worker, "init", no_ray)
        original = subprocess.Popen.__init__
        guard = self

        def popen(self, args, *a, **k):
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            line = " ".join(os.fsdecode(x) if isinstance(x, (bytes, os.PathLike)) else str(x) for x in argv)
            if SERVER.search(line):
                raise guard._refuse(f"starts a server or a sweep: {line[:200]}")
            return original(self, args, *a, **k)

        self.mp.setattr(subprocess.Popen, "__init__", popen)
        self.children = self._children()
        return self

    @staticmethod
    def _children() -> set[int]:
        try:
            import psutil
        except ImportError:
            return set()
        alive = set()
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.add(p.pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def __exit__(self, *exc):
        self.mp.undo()
        return False

    def check(self) -> None:
        import pytest

        left = self._children() - self.children
        if left:
            self.violations.append(f"left child processes running: {sorted(left)}")
        if self.violations:
            pytest.fail(f"fast-lane test {self.nodeid}: " + "; ".join(dict.fromkeys(self.violations)), pytrace=False)
