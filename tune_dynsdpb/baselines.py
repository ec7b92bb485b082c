"""Trivial baselines: what a model that learned nothing scores, so a report can say whether an arm learned.

Pure (data in, numbers and words out): no Ray, MLflow or trainer imports.

- classification metrics (accuracy, F1, macro-F1, MCC, ...): always predicting the majority class
  of the evaluation labels, scored through the task's own metric function (so F1 of the positive
  class is 0 when the majority class is negative, and MCC is 0);
- correlations (pearson, spearmanr): a constant prediction has none, 0 by convention;
- the loss (``eval_loss``, the only loss a task reports): the loss of the best constant prediction,
  the class prior for integer labels (cross-entropy = the entropy of the label distribution, in
  nats) and the mean for real-valued labels (mean squared error, as the Hugging Face regression
  loss, = the variance).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

CORRELATIONS = ("pearson", "spearmanr", "spearman")


def is_loss(metric: str) -> bool:
    return "loss" in metric.lower()


def baseline_name(metric: str) -> str:
    """The words for the trivial predictor of ``metric``: "majority" (a class) or "constant"."""
    name = metric.lower().removeprefix("eval_")
    return "constant" if is_loss(metric) or name in CORRELATIONS else "majority"


def _is_classification(labels: np.ndarray) -> bool:
    return labels.dtype.kind in "biu"


def _constant_loss(labels: np.ndarray, classification: bool) -> float:
    if classification:
        _, counts = np.unique(labels, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log(p)).sum())
    y = labels.astype(np.float64)
    return float(np.mean((y - y.mean()) ** 2))


def trivial_baseline(metric: str, labels: Any, compute_metrics: Callable[[tuple], dict] | None = None,
                     *, classification: bool | None = None) -> float | None:
    """The score of the trivial predictor on ``labels`` under ``metric`` (see the module doc).

    ``compute_metrics`` is a Hugging-Face-style scorer, ``(predictions, label_ids) -> {metric: value}``
    (``Task.compute_metrics``); the constant prediction goes through it, so the baseline is scored
    by the same function as the arms. The key may carry the ``eval_`` prefix or not. Without a
    scorer, only correlations (0) and losses are known. ``classification`` defaults to "the labels
    are integers". Returns None when there are no labels or the metric is unknown.
    """
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        return None
    name = metric.lower().removeprefix("eval_")
    if classification is None:
        classification = _is_classification(y)
    if is_loss(metric):
        return _constant_loss(y, classification)
    if name in CORRELATIONS and compute_metrics is None:
        return 0.0
    if compute_metrics is None:
        return None
    if classification:
        values, counts = np.unique(y.astype(np.int64), return_counts=True)
        preds = np.full(y.shape, values[np.argmax(counts)], dtype=np.int64)  # ties: the smallest class
    else:
        preds = np.full(y.shape, float(np.mean(y)), dtype=np.float64)
    scores = compute_metrics((preds, y))
    for key in (metric, name, f"eval_{name}"):
        if key in scores:
            v = float(scores[key])
            return v if math.isfinite(v) else (0.0 if name in CORRELATIONS else None)
    return 0.0 if name in CORRELATIONS else None


def task_baseline(task: Any) -> float | None:
    """The trivial baseline of a loaded ``data.Task`` on its evaluation split, through its own
    ``compute_metrics`` (duck-typed: ``kind``, ``metric``, ``eval``, ``compute_metrics``). None for
    causal LMs (their metric is the eval loss over a vocabulary, not a label column)."""
    if getattr(task, "kind", None) not in ("classification", "regression"):
        return None
    if "label" not in task.eval.column_names:
        return None
    labels = np.asarray(task.eval.select_columns(["label"])[:]["label"])
    return trivial_baseline(task.metric, labels, task.compute_metrics,
                            classification=task.kind == "classification")


def beats(score: float | None, baseline: float | None, mode: str) -> bool | None:
    """Whether ``score`` is strictly better than ``baseline`` (None when either is missing)."""
    if score is None or baseline is None or not (math.isfinite(score) and math.isfinite(baseline)):
        return None
    return score > baseline if mode == "max" else score < baseline


def _g(v: float) -> str:
    return f"{v:.4g}"


def learned_line(score: float | None, baseline: float | None, metric: str, mode: str) -> str:
    """Plain words on ``score`` against the trivial baseline, e.g. ``did not learn: 0.47 vs majority
    0.53`` or ``+0.21 over majority 0.53`` (``-0.1 below constant 0.69`` for a loss)."""
    name = baseline_name(metric)
    if baseline is None or not math.isfinite(baseline):
        return "no baseline"
    if score is None or not math.isfinite(score):
        return f"no score (vs {name} {_g(baseline)})"
    if not beats(score, baseline, mode):
        return f"did not learn: {_g(score)} vs {name} {_g(baseline)}"
    return f"{score - baseline:+.4g} {'over' if mode == 'max' else 'below'} {name} {_g(baseline)}"
