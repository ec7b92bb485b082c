"""The finals report and the cross-task table: statistics, plots and Jinja2 templates.

Pure: data in, files out. Nothing here imports the sweep, Ray, MLflow, the CLI or the trainables;
``compare.run_compare`` gathers the data and calls ``write_report``; a benchmark collector reads
each report's ``finals.json`` (the dict ``write_report`` returns) and calls ``write_cross_task``.

Templates live in ``tune_dynsdpb/templates/``: ``report.{md,html}.j2`` and
``cross_task.{md,html}.j2``, each pair rendered from the same context; HTML autoescapes.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import jinja2
import numpy as np

from .baselines import baseline_name, beats, learned_line
from .search_space import PBT_IS_DLB, pbt_replays_dlb

COMPARISONS = (("dynsdpb", "dlb"), ("dynsdpb", "vanilla"), ("dynsdpb", "dlb_warmup"), ("pbt", "dlb"), ("pbt", "dynsdpb"))
ARM_ORDER = ("vanilla", "dlb", "dlb_warmup", "dynsdpb", "pbt")
# The two params of each arm's sensitivity map (the DLB and DynSDPB papers' figures).
HEATMAP_AXES = {"dlb": ("tau0", "alpha0"), "dlb_warmup": ("tau0", "alpha0"),
                "dynsdpb": ("lambda_alpha", "lambda_tau")}
TEMPLATES = Path(__file__).parent / "templates"


# -- statistics -----------------------------------------------------------------------------------
@dataclass
class Summary:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclass
class Paired:
    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_ttest: float
    p_wilcoxon: float | None
    d_z: float


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """n, mean, sample std (ddof=1) and the two-sided t-interval of the mean
    (``scipy.stats.t.interval`` with scale std / sqrt(n)). With fewer than two values the std and
    the interval are NaN (and everything is NaN for none); with zero spread the interval is the mean."""
    from scipy import stats  # here: ~0.7 s, only for the paired tests

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    if sd == 0:
        return Summary(int(x.size), mean, 0.0, mean, mean)
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=sd / math.sqrt(x.size))
    return Summary(int(x.size), mean, sd, float(low), float(high))


def cohens_dz(diffs: Sequence[float]) -> float:
    """Cohen's d_z of paired differences: mean(diff) / sd(diff) (ddof=1). NaN for fewer than two
    differences or when all are zero; ±inf when they are all equal and non-zero."""
    d = np.asarray(list(diffs), dtype=float)
    if d.size < 2:
        return math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return math.nan if mean == 0 else math.copysign(math.inf, mean)
    return mean / sd


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Paired:
    """Paired comparison of ``a - b`` (one pair per seed): mean and sd of the differences, their
    t-interval (``scipy.stats.ttest_rel(...).confidence_interval``), the paired t-test p-value, the
    Wilcoxon signed-rank p-value (only for n >= 5 with a non-zero difference, else None) and
    Cohen's d_z."""
    from scipy import stats  # here: ~0.7 s, only for the paired tests

    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    d = a - b
    s = summarize(d, confidence)
    t = p = math.nan
    low, high = s.ci_low, s.ci_high
    wilcoxon = None
    if d.size >= 2:
        with warnings.catch_warnings():  # zero variance: scipy warns and returns NaN
            warnings.simplefilter("ignore")
            res = stats.ttest_rel(a, b)
            ci = res.confidence_interval(confidence)
        t, p = float(res.statistic), float(res.pvalue)
        if math.isfinite(ci.low) and math.isfinite(ci.high):
            low, high = float(ci.low), float(ci.high)
    if d.size >= 5 and np.any(d != 0):
        wilcoxon = float(stats.wilcoxon(d).pvalue)
    return Paired(s.n, s.mean, s.std, low, high, t, p, wilcoxon, cohens_dz(d))


def significance(p: float | None) -> str:
    """``**`` for p < 0.01, ``*`` for p < 0.05, else ``""``."""
    if p is None or not math.isfinite(p):
        return ""
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


# -- notes on the best configs --------------------------------------------------------------------
def same_runs(best_configs: dict[str, dict]) -> bool:
    """Whether dynsdpb's best config is dlb's with zero rates: then both arms train identical runs."""
    dyn, dlb = best_configs.get("dynsdpb"), best_configs.get("dlb")
    return bool(dyn and dlb and not dyn.get("lambda_alpha", 0) and not dyn.get("lambda_tau", 0)
                and all(dlb.get(k) == v for k, v in dyn.items()
                        if k not in ("method", "lambda_alpha", "lambda_tau", "granularity")))


def config_notes(best_configs: dict[str, dict], sweep_scores: dict[str, list] | None = None,
                 pbt_schedule: list | None = None) -> list[str]:
    """Plain-words notes on the arms' best configs that a reader needs to read the differences:
    an arm whose sweep trials all tied (its "best" is then just the first, the warm start);
    a pbt winner that PBT never perturbed and that started at dlb's best config (the finals then
    replay dlb's run); dynsdpb with both adaptation rates at zero, which is static DLB; and
    dynsdpb matching dlb's best config, so that the two arms train identical runs and differ by
    zero by construction."""
    notes = []
    for arm, scores in (sweep_scores or {}).items():
        done = [x for x in scores if x is not None]
        if len(done) > 1 and len(set(done)) == 1:
            notes.append(f"All {len(done)} sweep trials of {arm} tied at {done[0]:.4g}: its best config is the "
                         f"first trial's (the warm start), not a finding of the search.")
    if "pbt" in best_configs and pbt_replays_dlb(best_configs["pbt"], pbt_schedule, best_configs.get("dlb")):
        notes.append(f"On this task, {PBT_IS_DLB}: the pbt finals replay a constant schedule at dlb's α0/τ0, "
                     "and pbt − dlb is 0.")
    dyn = best_configs.get("dynsdpb")
    if not dyn or dyn.get("lambda_alpha", 0) or dyn.get("lambda_tau", 0):
        return notes
    notes += [f"dynsdpb's best config has both adaptation rates at 0 (λα = λτ = 0): it is static DLB with "
             f"α0 = {dyn.get('alpha0')}, τ0 = {dyn.get('tau0')}."]
    if same_runs(best_configs):
        notes.append("It also matches dlb's best config, so the dlb and dynsdpb runs are identical and "
                     "dynsdpb − dlb is 0 by construction.")
    return notes


# -- formatting (Jinja filters) -------------------------------------------------------------------
def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    v = _num(v)
    return "–" if v is None else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


def _count(v: Any) -> str:
    v = _num(v)
    return "–" if v is None else f"{v:,.0f}"


def _pval(v: Any) -> str:
    v = _num(v)
    return "–" if v is None else "< 0.001" if v < 0.001 else f"{v:.3f}"


def _mdcell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _env(html: bool):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=html,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(fmt=_fmt, count=_count, pval=_pval, mdcell=_mdcell, pair=lambda k: k.replace("-", " − "),
                       sig=significance, mdsig=lambda p: significance(p).replace("*", "\\*"),
                       json=lambda v: json.dumps(v, indent=2, default=str))
    return env


def render(name: str, context: dict) -> tuple[str, str]:
    """``name.md.j2`` and ``name.html.j2`` rendered from the same context: (markdown, html)."""
    return _env(False).get_template(f"{name}.md.j2").render(**context), \
        _env(True).get_template(f"{name}.html.j2").render(**context)


def _order(arms) -> list[str]:
    arms = list(dict.fromkeys(arms))
    return [a for a in ARM_ORDER if a in arms] + [a for a in arms if a not in ARM_ORDER]


# -- the finals report ----------------------------------------------------------------------------
_PLOT_TITLES = {"eval_curve.png": "{metric} against training step (mean ± std over seeds)",
                "alpha_tau.png": "α and τ over training: dynsdpb (interval mean, min..max band), the pbt arm's "
                                 "learned schedule, dlb's constants",
                "best_so_far.png": "Sweep: best score so far against trial count",
                "grad_norms.png": "Per-layer gradient norms over training"}


def _last_step(histories: dict) -> int:
    """The finals' last logged training step (0 without histories): where a schedule ends."""
    return max((int(h["step"].max()) for hs in histories.values() for h in hs
                if h is not None and "step" in h and not h.empty), default=0)


def _dlb_constants(best: dict | None) -> tuple[float, float] | None:
    config = (best or {}).get("config") or {}
    return (float(config["alpha0"]), float(config["tau0"])) if "alpha0" in config and "tau0" in config else None


def write_report(folder: Path, *, state: dict, task: str, best: dict, budget: str, seeds: list[int],
                 trials: list[dict], histories: dict, sweep_scores: dict, finals_run: str,
                 baseline: float | None = None, sweep_trials: dict[str, list[dict]] | None = None) -> dict:
    """Writes report.md, report.html, finals.json and the plots into ``folder``; returns the summary
    (the content of finals.json).

    ``baseline``: the task's trivial baseline on the eval split (``baselines.task_baseline``); each
    arm's score is set beside it, and an arm that does not beat it is called out.
    ``sweep_trials``: per arm, one dict per sweep trial, ``{<searched param>: value, ..., "score":
    best reported score or None}``; gives the sensitivity heatmaps and the param importances."""
    from . import plots  # here: matplotlib, pandas and scipy, ~1.5 s, only when a report is drawn

    folder = Path(folder)
    metric, mode = state["metric"], state["mode"]
    done = [t for t in trials if t["status"] == "FINISHED"]
    by_arm = {m: {t["seed"]: t for t in done if t["method"] == m} for m in best}
    arms = {}
    for m, runs in by_arm.items():
        s = summarize([runs[k]["score"] for k in sorted(runs)])
        passes = [t["sample_passes"] for t in runs.values() if _num(t["sample_passes"]) is not None]
        wall = [t["time_total_s"] for t in runs.values() if _num(t["time_total_s"]) is not None]
        epochs = {t["num_train_epochs"] for t in trials if t["method"] == m}
        mean = _num(s.mean)
        arms[m] = {**{k: _num(v) if isinstance(v, float) else v for k, v in asdict(s).items()},
                   "scores": {str(k): runs[k]["score"] for k in sorted(runs)},
                   "num_train_epochs": sorted(epochs, key=str)[0] if len(epochs) == 1 else sorted(epochs, key=str),
                   "sample_passes_mean": _num(float(np.mean(passes))) if passes else None,
                   "sample_passes_total": float(np.sum(passes)) if passes else None,
                   "wall_s_mean": _num(float(np.mean(wall))) if wall else None,
                   "wall_s_total": float(np.sum(wall)) if wall else None,
                   "beats_baseline": beats(mean, baseline, mode),
                   "vs_baseline": learned_line(mean, baseline, metric, mode) if baseline is not None else None}
    paired = {}
    for a, b in COMPARISONS:
        if a in by_arm and b in by_arm:
            common = sorted(set(by_arm[a]) & set(by_arm[b]))
            p = paired_test([by_arm[a][k]["score"] for k in common], [by_arm[b][k]["score"] for k in common])
            paired[f"{a}-{b}"] = {**{k: (_num(v) if isinstance(v, float) else v) for k, v in asdict(p).items()},
                                  "seeds": common, "significance": significance(p.p_ttest),
                                  "diffs": [by_arm[a][k]["score"] - by_arm[b][k]["score"] for k in common]}

    pngs = {
        "eval_curve.png": plots.eval_curves(histories, metric, folder / "eval_curve.png"),
        "alpha_tau.png": plots.alpha_tau(histories.get("dynsdpb", []), folder / "alpha_tau.png",
                                         schedule=(best.get("pbt") or {}).get("schedule"),
                                         constants=_dlb_constants(best.get("dlb")),
                                         last_step=_last_step(histories)),
        "best_so_far.png": plots.best_so_far(sweep_scores, mode, metric, folder / "best_so_far.png"),
        "grad_norms.png": plots.grad_norms(histories, folder / "grad_norms.png"),
    }
    images = [{"file": k, "title": _PLOT_TITLES[k].format(metric=metric)} for k, v in pngs.items() if v]
    heatmaps, importances = [], {}
    if sweep_trials:
        for arm in _order(sweep_trials):
            if arm not in HEATMAP_AXES:
                continue
            x, y = HEATMAP_AXES[arm]
            name = f"heatmap_{arm}.png"
            title = f"{arm}: sweep {metric} over {x} × {y}"
            if plots.param_heatmap(sweep_trials[arm], x, y, metric, mode, folder / name, title):
                heatmaps.append({"file": name, "arm": arm, "x": x, "y": y, "title": title,
                                 "trials": sum(1 for t in sweep_trials[arm] if _num(t.get("score")) is not None)})
        importances = plots.param_importances({a: sweep_trials[a] for a in _order(sweep_trials)}, mode)
        if plots.importances_plot(importances, folder / "importances.png"):
            pngs["importances.png"] = folder / "importances.png"
        pngs.update({h["file"]: folder / h["file"] for h in heatmaps})
    params = sorted({p for imp in importances.values() for p in imp},
                    key=lambda p: -max(imp.get(p, 0.0) for imp in importances.values()))

    best_configs = {m: b["config"] for m, b in best.items()}
    summary = {"sweep_id": state["sweep_id"], "name": state["spec"]["name"], "task": task, "metric": metric,
               "mode": mode, "budget": budget, "seeds": seeds, "methods": list(best),
               "parent_run_id": state.get("parent_run_id"), "finals_run_id": finals_run, "arms": arms,
               "paired": paired, "trials": trials, "best_configs": best_configs,
               "baseline": baseline, "baseline_name": baseline_name(metric),
               "sweep_scores": sweep_scores, "sweep_trials": sweep_trials or {},
               "importances": importances, "heatmaps": heatmaps,
               "notes": config_notes(best_configs, sweep_scores, (best.get("pbt") or {}).get("schedule")),
               "plots": [k for k, v in pngs.items() if v], "created": time.time()}
    (folder / "finals.json").write_text(json.dumps(summary, indent=2, default=str))
    seed_list = sorted({k for p in paired.values() for k in p["seeds"]})
    context = {"s": summary, "images": images, "failed": [t for t in trials if t["status"] != "FINISHED"],
               "below_baseline": [m for m, a in arms.items() if a["beats_baseline"] is False],
               "importance_params": params, "importance_arms": [a for a, imp in importances.items() if imp],
               "seed_rows": [{"seed": k, "scores": [a["scores"].get(str(k)) for a in arms.values()],
                              "diffs": [dict(zip(p["seeds"], p["diffs"])).get(k) for p in paired.values()]}
                             for k in seed_list],
               "title": f"{summary['name']}: finals ({budget} budget)"}
    md, page = render("report", context)
    (folder / "report.md").write_text(md)
    (folder / "report.html").write_text(page)
    return summary


# -- across tasks ---------------------------------------------------------------------------------
def _mean_std(a: dict | None) -> str:
    if not a or _num(a.get("mean")) is None:
        return "–"
    std = _num(a.get("std"))
    return f"{_fmt(a['mean'])} ± {_fmt(std)}" if std is not None else _fmt(a["mean"])


def cross_task_table(per_task: dict[str, dict[str, dict]]) -> dict:
    """One table per budget across tasks from each task's report summaries (``per_task[task][budget]``
    is the dict ``write_report`` returns / its finals.json).

    Returns ``{"budgets": {budget: {"arms": [...], "comparisons": ["dynsdpb-dlb", ...], "rows": [...]}}}``;
    a row: task, metric, mode, n (seeds), baseline, per arm ``{mean, std, n, text, beats_baseline}``
    and per comparison ``{mean_diff, p_ttest, significance, n}`` (None where that task lacks it).
    Significance: ``*`` p < 0.05, ``**`` p < 0.01 (paired t-test over seeds)."""
    budgets: dict[str, dict] = {}
    for task, by_budget in per_task.items():
        for budget, s in by_budget.items():
            table = budgets.setdefault(budget, {"arms": [], "comparisons": [], "rows": []})
            table["arms"] = _order([*table["arms"], *s.get("arms", {})])
            for a, b in COMPARISONS:
                key = f"{a}-{b}"
                if key in s.get("paired", {}) and key not in table["comparisons"]:
                    table["comparisons"].append(key)
            baseline, mode = s.get("baseline"), s.get("mode", "max")
            row = {"task": task, "metric": s.get("metric"), "mode": mode, "baseline": baseline,
                   "baseline_name": s.get("baseline_name") or baseline_name(s.get("metric") or ""),
                   "n": max([a.get("n") or 0 for a in s.get("arms", {}).values()], default=0),
                   "arms": {}, "paired": {}}
            for m, a in s.get("arms", {}).items():
                row["arms"][m] = {"mean": _num(a.get("mean")), "std": _num(a.get("std")), "n": a.get("n"),
                                  "text": _mean_std(a), "beats_baseline": beats(_num(a.get("mean")), baseline, mode)}
            for key, p in s.get("paired", {}).items():
                row["paired"][key] = {"mean_diff": _num(p.get("mean_diff")), "p_ttest": _num(p.get("p_ttest")),
                                      "significance": significance(_num(p.get("p_ttest"))), "n": p.get("n")}
            table["rows"].append(row)
    order = [b for b in ("epochs", "compute") if b in budgets] + [b for b in budgets if b not in ("epochs", "compute")]
    return {"budgets": {b: budgets[b] for b in order}}


def write_cross_task(folder: Path, per_task: dict[str, dict[str, dict]]) -> dict:
    """Writes cross_task.md, cross_task.html and cross_task.json (the ``cross_task_table``) into
    ``folder``; returns the table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = cross_task_table(per_task)
    (folder / "cross_task.json").write_text(json.dumps(table, indent=2, default=str))
    md, page = render("cross_task", {"t": table, "title": "DynSDPB across tasks"})
    (folder / "cross_task.md").write_text(md)
    (folder / "cross_task.html").write_text(page)
    return table
