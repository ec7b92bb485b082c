"""The trial's result contract: what the trainable reports to Tune, and what a finished trial was.

Every report of a sweep or finals trial carries the task's eval metrics, the latest training log
(losses, α/τ/u/c statistics) and these keys:

==================  ==========================================================================
``OBJECTIVE``       the task's headline metric, signed so that higher is better (``-loss`` for a
                    ``min`` metric). Searchers, schedulers and checkpoint scoring use it alone,
                    so trials of tasks with different metrics and modes share one experiment.
``TASK``/``METHOD`` which (task, arm) group the trial belongs to (also in its config).
``STEP``            optimizer steps so far.
``SAMPLE_PASSES``   training samples through forward+backward so far.
``FINAL``           True only on the report after the last training step.
``FAILURE``         a reason string, on the last report of a trial that failed on its own
                    (e.g. ``training diverged: non-finite ce_loss at step 4``).
==================  ==========================================================================

:func:`classify` is the one rule that turns a trial's last report (and whether Tune saw it
error) into an :class:`Outcome`; the MLflow callback, the live table, the sweep summary and
``compare`` all use it.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Mapping

OBJECTIVE = "objective"
TASK = "task"
METHOD = "method"
STEP = "step"
SAMPLE_PASSES = "sample_passes"
FINAL = "final"
FAILURE = "dynsdpb_failure"
MODE = "max"  # of OBJECTIVE, always
CHECKPOINT_RESULT = "tune_dynsdpb_result.json"  # in each reported checkpoint: its OBJECTIVE and STEP


class Outcome(str, enum.Enum):
    FINISHED = "FINISHED"  # ran to its last step, every score finite
    STOPPED = "STOPPED"    # stopped by the scheduler (ASHA) or by the sweep's end
    FAILED = "FAILED"      # diverged, or raised an error Tune did not recover from

    def __str__(self) -> str:
        return self.value


def metric_key(name: str) -> str:
    """The Trainer's name of a task metric: ``accuracy`` -> ``eval_accuracy`` (unchanged if prefixed)."""
    return name if name.startswith("eval_") else f"eval_{name}"


def objective(score: float, mode: str) -> float:
    """``score`` signed so that higher is better."""
    return float(score) if mode == "max" else -float(score)


def classify(last: Mapping[str, Any] | None, errored: bool = False) -> Outcome:
    """The outcome of a trial from its last report and whether it ended in an error."""
    last = last or {}
    if errored or last.get(FAILURE):
        return Outcome.FAILED
    if last.get(FINAL):
        return Outcome.FINISHED
    return Outcome.STOPPED


def failure_reason(last: Mapping[str, Any] | None) -> str | None:
    return (last or {}).get(FAILURE) or None


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
