"""The finals report, the trivial baselines and the cross-task table on synthetic data (no Ray, no MLflow)."""

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tune_dynsdpb import plots, report  # noqa: E402
from tune_dynsdpb.baselines import learned_line, trivial_baseline  # noqa: E402
from tune_dynsdpb.data import _metric_table  # noqa: E402

SEEDS = [0, 1, 2]
SCORES = {"vanilla": [0.47, 0.46, 0.48], "dlb": [0.70, 0.72, 0.71], "dynsdpb": [0.74, 0.75, 0.76]}
BASELINE = 0.53


def _scorer(*metrics):
    table = _metric_table()
    return lambda ep: {m: table[m](ep[0], ep[1]) for m in metrics}


def _history(seed: int, method: str) -> pd.DataFrame:
    steps = np.arange(1, 6)
    h = pd.DataFrame({"step": steps, "accuracy": 0.5 + 0.04 * steps + 0.01 * seed,
                      "grad_norm/layer0": 1.0 / steps})
    if method == "dynsdpb":
        h = h.assign(alpha_mean=0.5 + 0.05 * steps, alpha_min=0.4, alpha_max=0.9,
                     tau_mean=2.0 + 0.1 * steps, tau_min=1.5, tau_max=3.0)
    return h


def _sweep_trials(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dlb = [{"tau0": float(rng.uniform(1, 5)), "alpha0": float(rng.uniform(0.5, 2)),
            "learning_rate": float(10 ** rng.uniform(-5, -3))} for _ in range(8)]
    for t in dlb:
        t["score"] = 0.6 + 0.03 * t["tau0"] - 0.02 * t["alpha0"]
    dyn = [{"lambda_alpha": float(rng.uniform(0, 1)), "lambda_tau": float(rng.uniform(-0.5, 0.5)),
            "granularity": str(rng.choice(["sample", "batch"]))} for _ in range(8)]
    for t in dyn:
        t["score"] = 0.7 + 0.05 * t["lambda_alpha"] - 0.1 * t["lambda_tau"] ** 2
    vanilla = [{"learning_rate": 1e-4, "score": 0.5}]  # too few trials: no importances, no heatmap
    return {"vanilla": vanilla, "dlb": dlb, "dynsdpb": dyn}


def _write(folder: Path, task: str = "rte", baseline=BASELINE, sweep_trials=None, scores=SCORES) -> dict:
    state = {"metric": "accuracy", "mode": "max", "sweep_id": "abc123", "spec": {"name": "qs"},
             "parent_run_id": "parent"}
    best = {m: {"config": {"method": m, "learning_rate": 1e-4, "num_train_epochs": 1,
                           **({"lambda_alpha": 0.5} if m == "dynsdpb" else {})}, "score": max(v)}
            for m, v in scores.items()}
    trials = [{"method": m, "seed": s, "trial_id": f"{m}{s}", "status": "FINISHED", "error": None,
               "score": v, "step": 5, "num_train_epochs": 1, "sample_passes": 100.0, "time_total_s": 2.0}
              for m, vs in scores.items() for s, v in zip(SEEDS, vs)]
    trials.append({"method": "dlb", "seed": 9, "trial_id": "x", "status": "FAILED", "error": "boom | <oops>",
                   "score": None, "step": None, "num_train_epochs": 1, "sample_passes": None, "time_total_s": None})
    histories = {m: [_history(s, m) for s in SEEDS] for m in scores}
    folder.mkdir(parents=True, exist_ok=True)
    return report.write_report(folder, state=state, task=task, best=best, budget="epochs", seeds=SEEDS,
                               trials=trials, histories=histories,
                               sweep_scores={m: [0.5, 0.6, None] for m in scores}, finals_run="finals",
                               baseline=baseline, sweep_trials=sweep_trials)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_report_images_heatmaps_importances_and_baseline(tmp_path):
    summary = _write(tmp_path, sweep_trials=_sweep_trials())
    page = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    parser = _Images()
    parser.feed(page)
    assert parser.srcs and all((tmp_path / src).is_file() for src in parser.srcs)
    assert {"heatmap_dlb.png", "heatmap_dynsdpb.png", "importances.png", "eval_curve.png"} <= set(parser.srcs)
    assert "heatmap_vanilla.png" not in parser.srcs
    for src in parser.srcs:
        assert f"({src})" in md  # markdown references the same images
    assert set(summary["importances"]["dlb"]) == {"tau0", "alpha0", "learning_rate"}
    assert summary["importances"]["dlb"]["tau0"] > 0.5 and summary["importances"]["vanilla"] == {}
    assert sum(summary["importances"]["dynsdpb"].values()) == pytest.approx(1.0)
    # the baseline beside each arm, and the arm below it called out
    assert summary["baseline"] == BASELINE and summary["arms"]["vanilla"]["beats_baseline"] is False
    assert summary["arms"]["dynsdpb"]["vs_baseline"] == "+0.22 over majority 0.53"
    for text in (md, page):
        assert "did not learn: 0.47 vs majority 0.53" in text
        assert "vanilla did not learn" in text and "dlb did not learn" not in text
        assert "0.5300" in text
    assert summary["paired"]["dynsdpb-vanilla"]["significance"] == "**"
    assert json.loads((tmp_path / "finals.json").read_text())["baseline"] == BASELINE
    assert "boom \\| <oops>" in md and "boom | &lt;oops&gt;" in page  # failed runs listed, escaped


def test_report_without_baseline_or_sweep_trials(tmp_path):
    summary = _write(tmp_path, baseline=None)
    md = (tmp_path / "report.md").read_text()
    assert "vs trivial baseline" not in md and "did not learn" not in md and "heatmap" not in md
    assert summary["heatmaps"] == [] and summary["importances"] == {}
    assert summary["arms"]["vanilla"]["vs_baseline"] is None


def test_report_html_autoescapes(tmp_path):
    _write(tmp_path, task="<b>")
    page = (tmp_path / "report.html").read_text()
    assert "<code>&lt;b&gt;</code>" in page and "<code><b></code>" not in page
    assert "Task `<b>`" in (tmp_path / "report.md").read_text()


def test_summarize_and_paired_intervals_from_scipy():
    from scipy import stats

    x = [0.70, 0.72, 0.74]
    assert (report.summarize(x).ci_low, report.summarize(x).ci_high) == pytest.approx(
        stats.t.interval(0.95, 2, loc=0.72, scale=stats.sem(x)))
    a, b = [0.70, 0.72, 0.74], [0.68, 0.71, 0.70]
    ci = stats.ttest_rel(a, b).confidence_interval(0.9)
    p = report.paired_test(a, b, confidence=0.9)
    assert (p.ci_low, p.ci_high) == pytest.approx((ci.low, ci.high))
    same = report.paired_test([1.0, 2.0], [0.5, 1.5])  # zero spread: the interval is the mean
    assert (same.ci_low, same.ci_high) == (0.5, 0.5) and same.d_z == math.inf


def test_trivial_baselines():
    y = np.array([0, 0, 0, 1, 1])
    assert trivial_baseline("accuracy", y, _scorer("accuracy")) == pytest.approx(0.6)
    assert trivial_baseline("eval_f1", y, _scorer("f1")) == 0.0  # majority is the negative class
    assert trivial_baseline("matthews_correlation", y, _scorer("matthews_correlation")) == 0.0
    assert trivial_baseline("eval_loss", y) == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    r = np.array([0.1, 0.5, 2.0])
    assert trivial_baseline("pearson", r, _scorer("pearson")) == 0.0 and trivial_baseline("spearmanr", r) == 0.0
    assert trivial_baseline("eval_loss", r) == pytest.approx(np.var(r))
    assert trivial_baseline("accuracy", []) is None
    assert learned_line(0.47, 0.53, "accuracy", "max") == "did not learn: 0.47 vs majority 0.53"
    assert learned_line(0.74, 0.53, "accuracy", "max") == "+0.21 over majority 0.53"
    assert learned_line(0.53, 0.53, "accuracy", "max").startswith("did not learn")
    assert learned_line(0.5, 0.69, "eval_loss", "min") == "-0.19 below constant 0.69"
    assert learned_line(0.8, 0.69, "eval_loss", "min") == "did not learn: 0.8 vs constant 0.69"


def test_heatmap_and_importances_edge_cases(tmp_path):
    few = [{"tau0": 1.0, "alpha0": 1.0, "score": 0.5}]
    assert plots.param_heatmap(few, "tau0", "alpha0", "accuracy", "max", tmp_path / "h.png") is None
    three = few + [{"tau0": 2.0, "alpha0": 1.5, "score": 0.6}, {"tau0": 3.0, "alpha0": 1.0, "score": 0.4}]
    assert plots.param_heatmap(three, "tau0", "alpha0", "accuracy", "max", tmp_path / "h.png").is_file()
    collinear = [{"tau0": float(i), "alpha0": 1.0, "score": 0.1 * i} for i in range(5)]
    assert plots.param_heatmap(collinear, "tau0", "alpha0", "eval_loss", "min", tmp_path / "c.png").is_file()
    const = [{"tau0": float(i), "score": 0.5} for i in range(4)]
    assert plots.param_importances({"dlb": const, "none": [], "one": few}) == {"dlb": {}, "none": {}, "one": {}}
    assert plots.importances_plot({"dlb": {}}, tmp_path / "i.png") is None


def test_cross_task_table_marks_significance(tmp_path):
    strong = {m: [v + 0.001 * i for i, v in enumerate(vs)] for m, vs in SCORES.items()}
    per_task = {"rte": {"epochs": _write(tmp_path / "rte", scores=strong)},
                "<cola>": {"epochs": _write(tmp_path / "cola", task="<cola>", baseline=None),
                           "compute": _write(tmp_path / "cola-c", task="<cola>", baseline=None)}}
    per_task["rte"]["epochs"]["paired"]["dynsdpb-dlb"]["p_ttest"] = 0.03  # a known p-value
    table = report.write_cross_task(tmp_path / "out", per_task)
    assert list(table["budgets"]) == ["epochs", "compute"]
    epochs = table["budgets"]["epochs"]
    assert epochs["arms"] == ["vanilla", "dlb", "dynsdpb"]
    assert epochs["comparisons"] == ["dynsdpb-dlb", "dynsdpb-vanilla"]
    rte = epochs["rows"][0]
    assert rte["task"] == "rte" and rte["baseline"] == BASELINE and rte["n"] == 3
    assert rte["paired"]["dynsdpb-dlb"]["significance"] == "*"
    assert rte["arms"]["vanilla"]["beats_baseline"] is False
    dlb = strong["dlb"]
    assert rte["arms"]["dlb"]["text"] == f"{np.mean(dlb):.4f} ± {np.std(dlb, ddof=1):.4f}"
    page = (tmp_path / "out" / "cross_task.html").read_text()
    md = (tmp_path / "out" / "cross_task.md").read_text()
    assert "(p = 0.030)*</td>" in page and "(p = 0.030)\\*" in md
    assert "&lt;cola&gt;" in page and "<cola>" not in page
    assert "## At equal epochs" in md and "## At equal compute" in md
    assert json.loads((tmp_path / "out" / "cross_task.json").read_text()) == json.loads(json.dumps(table))


def test_task_baseline_uses_the_tasks_own_scorer():
    import datasets

    from tune_dynsdpb.baselines import task_baseline
    from tune_dynsdpb.data import Task

    ev = datasets.Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "label": [1, 1, 1, 0]})
    task = Task("sst2", "classification", ev, ev, ("sentence",), ("no", "yes"), 2, "accuracy", "max", "test",
                ("accuracy", "f1"))
    assert task_baseline(task) == pytest.approx(0.75)
    reg = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0.1, 2.5, 4.0]})
    assert task_baseline(Task("stsb", "regression", reg, reg, ("sentence",), None, 1, "pearson", "max", "test",
                              ("pearson",))) == 0.0
