"""``tune-dynsdpb validate``: a sweep file checked against its data and model, without Ray.

The same steps as a sweep's set-up: the file (with ``--set``), every task's data and metric, the
model and tokenizer, and one real training step per task. Nothing is written but the
tokenization cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from .experiment import preflight, prepare_tasks, quiet_libraries
from .run import resolve_model_path
from .sweep import create_spec


def validate(spec_path: str | Path, data_dir: str | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """Raises a one-line UserError on the first problem; returns what was checked, line by line."""
    quiet_libraries()
    spec = create_spec(spec_path, overrides=overrides)
    where = str(spec.path or spec_path)
    model_path = resolve_model_path(spec.model)
    with tempfile.TemporaryDirectory(prefix="dynsdpb-validate-") as cache:
        tasks = prepare_tasks(spec, model_path, Path(cache), where, data_dir=data_dir)
        preflight(spec, tasks, where)
    lines = [f"{where}: valid; model {model_path}; arms {', '.join(spec.methods)} x {spec.budget.num_samples} trials"]
    for name, t in tasks.items():
        base = "" if t.baseline is None else f", trivial baseline {t.baseline:.4f}"
        lines.append(f"  {name}: {len(t.train)} train / {len(t.eval)} eval from {t.task.source}; "
                     f"{t.metric} ({t.mode}){base}; one training step ran")
        lines.append(f"    truncation: {t.truncation_summary()}")
    return lines
