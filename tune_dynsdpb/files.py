"""Writing files so that nothing half-written is ever left: the one home of atomic writes.

* :func:`write_atomic`: a file is replaced whole (temp file beside it, then ``os.replace``);
* :func:`staged_output`: a folder is built beside its target and renamed into place on success,
  removed on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` in one step: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def staged_output(out: Path, flag: str = "--output-dir") -> Iterator[Path]:
    """Yields a temporary sibling of ``out``; renames it to ``out`` on success, removes it on failure.

    ``out`` must not exist, or be an empty folder; ``flag`` names it in the one-line error."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag}: {out} exists and is not empty")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create {out.parent}: {e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: {out.parent} is not writable")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
