"""The private-API table (tune_dynsdpb/private_apis.py) holds: each use is where it says, was
checked against the installed version of its library, and no private use is missing from it."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from tune_dynsdpb.private_apis import USES

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for top in ("tune_dynsdpb", "trainables", "benchmarks") for p in (ROOT / top).rglob("*.py")
                 if p.name != "private_apis.py")
# What a private use of another library looks like in this code base (our own private names are
# called on self, cls or our own modules, and are not matched).
PATTERNS = [
    re.compile(r"super\(\)\._[a-z]\w*"),                            # a private method of a base class
    re.compile(r"def _(save_checkpoint|load_from_checkpoint)\b"),     # Trainer's private methods overridden
    re.compile(r"self\._(get_output_dir|remove_unused_columns|get_collator_with_removed_columns|train_batch_size)\b"),
    re.compile(r"getattr\([^,()]+,\s*[\"']_[a-z]\w*[\"']"),         # a private attribute read
    re.compile(r"\.(_ot_\w+|_backend|_file_path|_storage)\b"),        # Optuna / OptunaSearch internals
    re.compile(r"\b(from|import)\s+\w+(\.\w+)*\._\w+"),               # an internal module (ray._private, ...)
    re.compile(r"\bMODEL_FOR_\w+_MAPPING_NAMES\b"),
    re.compile(r"\.abort\.remote\("),                                # Ray Train's internal controller
]


@pytest.mark.parametrize("use", USES, ids=[u.name for u in USES])
def test_checked_against_the_installed_version(use):
    installed = importlib.metadata.version(use.library)
    assert installed == use.checked, (
        f"{use.library} is {installed}, but {use.name} ({use.where}) was checked against {use.checked}: "
        "check it against the new release, then update its row in tune_dynsdpb/private_apis.py")


@pytest.mark.parametrize("use", USES, ids=[u.name for u in USES])
def test_each_listed_use_is_in_its_file(use):
    text = (ROOT / use.where).read_text(encoding="utf-8")
    assert use.text in text, f"{use.where} no longer holds {use.text!r}: drop the row of {use.name}"


def test_no_private_use_is_missing_from_the_table():
    """Every line that looks like a private use holds a listed text, or a private name its file's
    rows name (``super()._save_checkpoint(...)`` inside the listed override)."""
    texts: dict[str, set[str]] = {}
    for u in USES:
        texts.setdefault(u.where, set()).update({u.text, *re.findall(r"\b_[a-z]\w*", f"{u.name} {u.text}")})
    missing = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in PATTERNS) and not any(t in code for t in texts.get(rel, ())):
                missing.append(f"{rel}:{n}: {line.strip()}")
    assert not missing, "private uses not in tune_dynsdpb/private_apis.py:\n" + "\n".join(missing)


def test_the_scan_finds_what_it_should():
    assert any(p.search('backend = getattr(journal, "_backend", None)') for p in PATTERNS)
    assert any(p.search("from ray._private.utils import get_user_temp_dir") for p in PATTERNS)
    assert any(p.search("super()._save_checkpoint(model, trial)") for p in PATTERNS)
    assert not any(p.search("self._stats_reset()") or p.search("parts._replace(netloc=x)") for p in PATTERNS)


def test_the_install_pins_the_checked_versions():
    """scripts/setup-venv.sh installs with constraints.txt: its pins are the checked versions."""
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M))
    assert pins == {u.library: u.checked for u in USES}
    assert "-c constraints.txt" in (ROOT / "scripts" / "setup-venv.sh").read_text()
