"""The report's PNG plots (matplotlib, Agg: no display needed).

Each function takes plain data (lists of per-seed histories as pandas DataFrames, or lists of
numbers), writes one PNG and returns its path, or None when there is nothing to draw.

Sweep trials (``param_heatmap``, ``param_importances``) are plain dicts: the trial's searched
params as keys plus ``"score"`` (its best reported score; None when it never reported). Keys in
``NOT_PARAMS`` are bookkeeping, not params.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from scipy.interpolate import griddata  # noqa: E402

COLORS = {"vanilla": "tab:gray", "dlb": "tab:blue", "dlb_warmup": "tab:cyan", "dynsdpb": "tab:red", "pbt": "tab:green"}
NOT_PARAMS = frozenset({"score", "trial_id", "method", "seed", "status", "run_id"})


def mean_std_by_step(histories: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """Mean and std (ddof=1; 0 for a single seed) of ``column`` over seeds at each ``step``."""
    rows = [h[["step", column]].dropna() for h in histories if h is not None and column in h and "step" in h]
    if not rows:
        return pd.DataFrame(columns=["step", "mean", "std"])
    g = pd.concat(rows).groupby("step")[column]
    return pd.DataFrame({"mean": g.mean(), "std": g.std().fillna(0.0)}).reset_index()


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps and trial counts
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_curves(histories: dict[str, list[pd.DataFrame]], metric: str, path: Path) -> Path | None:
    """The task metric against training step per arm: mean over seeds, shaded ±1 std."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for method, hs in histories.items():
        s = mean_std_by_step(hs, metric)
        if s.empty:
            continue
        c = COLORS.get(method)
        ax.plot(s["step"], s["mean"], marker="o", ms=3, label=method, color=c)
        ax.fill_between(s["step"], s["mean"] - s["std"], s["mean"] + s["std"], alpha=0.2, color=c)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="training step", ylabel=metric, title=f"{metric} (mean ± std over seeds)")
    ax.legend()
    return _save(fig, path)


def schedule_line(schedule: list, index: int, end: int) -> tuple[list[int], list[float]]:
    """A learned schedule ``[[step, alpha, tau], ...]`` as a post-step line of α (``index`` 0) or τ
    (1): each value from its step on, the last one held to ``end`` (the run's last step)."""
    steps = [int(e[0]) for e in schedule]
    values = [float(e[1 + index]) for e in schedule]
    return steps + [max(end, steps[-1] + 1)], values + [values[-1]]


def alpha_tau(histories: list[pd.DataFrame], path: Path, schedule: list | None = None,
              constants: tuple[float, float] | None = None, last_step: int = 0) -> Path | None:
    """DynSDPB's α and τ over training: the interval mean (line) and min..max (band), averaged over
    seeds; beside it the pbt arm's learned schedule (``[[step, alpha, tau], ...]``, a step line held
    to ``last_step``, the finals' last step, or the last step drawn) and static DLB's constants
    (``(alpha0, tau0)``, dashed)."""
    has_dyn = any(h is not None and "alpha_mean" in h for h in histories)
    if not has_dyn and not schedule:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (ax, name) in enumerate(zip(axes, ("alpha", "tau"))):
        last = last_step
        if has_dyn:
            mean = mean_std_by_step(histories, f"{name}_mean")
            lo, hi = mean_std_by_step(histories, f"{name}_min"), mean_std_by_step(histories, f"{name}_max")
            ax.plot(mean["step"], mean["mean"], color=COLORS["dynsdpb"], marker="o", ms=3, label=f"dynsdpb {name} mean")
            if not lo.empty and not hi.empty:
                band = lo.merge(hi, on="step", suffixes=("_lo", "_hi"))
                ax.fill_between(band["step"], band["mean_lo"], band["mean_hi"], alpha=0.2, color=COLORS["dynsdpb"],
                                label=f"dynsdpb {name} min..max")
            last = max(last, int(mean["step"].max()) if not mean.empty else 0)
        if schedule:
            ax.step(*schedule_line(schedule, i, last), where="post", color=COLORS["pbt"], lw=2,
                    label=f"pbt: learned {name}")
        if constants is not None:
            ax.axhline(constants[i], color=COLORS["dlb"], ls="--", label=f"dlb: {name}0 = {constants[i]:.3g}")
        ax.set(xlabel="training step", ylabel=name, title=f"{name} over training")
        ax.legend(fontsize=8)
    return _save(fig, path)


def best_so_far(scores: dict[str, list[float | None]], mode: str, metric: str, path: Path) -> Path | None:
    """Best score so far against the number of trials per arm (trials in start order)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for method, values in scores.items():
        best, xs, ys = None, [], []
        for i, v in enumerate(values, 1):
            if v is not None and (best is None or (v > best if mode == "max" else v < best)):
                best = v
            if best is not None:
                xs.append(i)
                ys.append(best)
        if xs:
            ax.step(xs, ys, where="post", marker="o", ms=3, label=method, color=COLORS.get(method))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="trials", ylabel=f"best {metric} so far", title="sweep: best so far per arm")
    ax.legend()
    return _save(fig, path)


def grad_norms(histories: dict[str, list[pd.DataFrame]], path: Path) -> Path | None:
    """Per-layer gradient norms over training, one panel per arm (mean over seeds, log scale)."""
    arms = {m: hs for m, hs in histories.items()
            if any(h is not None and any(c.startswith("grad_norm/") for c in h.columns) for h in hs)}
    if not arms:
        return None
    fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 4), sharey=True, squeeze=False)
    for ax, (method, hs) in zip(axes[0], arms.items()):
        layers = sorted({c for h in hs if h is not None for c in h.columns if c.startswith("grad_norm/")})
        for col in layers:
            s = mean_std_by_step(hs, col)
            ax.plot(s["step"], s["mean"], marker="o", ms=3, label=col.split("/", 1)[1])
        ax.set(xlabel="training step", title=method, yscale="log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("gradient norm")
    return _save(fig, path)


# -- the sweep: score over two params, and param importances ---------------------------------------
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _binned(xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, bins: int = 6):
    """Mean score per cell of a ``bins`` x ``bins`` grid over the trials' ranges (NaN: no trial)."""
    def edges(v: np.ndarray) -> np.ndarray:  # cells centred on the extreme trials
        if not np.ptp(v):
            half = 0.05 * (abs(v[0]) or 1.0)
            return np.array([v[0] - half, v[0] + half])
        step = np.ptp(v) / (bins - 1)
        return np.linspace(v.min() - step / 2, v.max() + step / 2, bins + 1)

    xe, ye = edges(xs), edges(ys)
    total, _, _ = np.histogram2d(xs, ys, bins=[xe, ye], weights=zs)
    count, _, _ = np.histogram2d(xs, ys, bins=[xe, ye])
    with np.errstate(invalid="ignore", divide="ignore"):
        return xe, ye, (total / count).T  # rows: y


def param_heatmap(trials: list[dict], x: str, y: str, metric: str, mode: str, path: Path,
                  title: str | None = None) -> Path | None:
    """The sweep score as a colour map over params ``x`` and ``y`` (the DLB / DynSDPB papers'
    sensitivity figures), the trials drawn as dots and the best one as a star.

    With at least 4 distinct (x, y) points that span both axes, the map is interpolated
    (``scipy.interpolate.griddata``, linear inside the trials' convex hull; outside it the nearest
    trial's score, drawn faded, since it is extrapolated); otherwise the mean score per cell of a
    coarse grid. Bright is better whatever the mode. None with fewer than 2 scored trials.
    """
    pts = [(float(t[x]), float(t[y]), float(t["score"])) for t in trials
           if _finite(t.get(x)) and _finite(t.get(y)) and _finite(t.get("score"))]
    if len(pts) < 2:
        return None
    xs, ys, zs = (np.array(c) for c in zip(*pts))
    cmap = "viridis" if mode == "max" else "viridis_r"
    vmin, vmax = float(zs.min()), float(zs.max())
    if vmin == vmax:
        vmin, vmax = vmin - 0.5 * (abs(vmin) or 1) * 1e-3, vmax + 0.5 * (abs(vmax) or 1) * 1e-3
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    distinct = len(set(zip(xs.tolist(), ys.tolist())))
    mesh = None
    if distinct >= 4 and np.ptp(xs) and np.ptp(ys):
        gx, gy = np.meshgrid(np.linspace(xs.min(), xs.max(), 80), np.linspace(ys.min(), ys.max(), 80))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                linear = griddata((xs, ys), zs, (gx, gy), method="linear")
            nearest = griddata((xs, ys), zs, (gx, gy), method="nearest")
            ax.pcolormesh(gx, gy, nearest, cmap=cmap, vmin=vmin, vmax=vmax, shading="auto", alpha=0.35)
            mesh = ax.pcolormesh(gx, gy, np.ma.masked_invalid(linear), cmap=cmap, vmin=vmin, vmax=vmax,
                                 shading="auto")
        except Exception:  # collinear trials (Qhull): fall back to bins
            mesh = None
    if mesh is None:
        xe, ye, grid = _binned(xs, ys, zs, bins=min(6, max(2, distinct)))
        mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.scatter(xs, ys, c="white", edgecolors="black", s=22, linewidths=0.8, label="trials", zorder=3)
    best = int(np.argmax(zs) if mode == "max" else np.argmin(zs))
    ax.scatter([xs[best]], [ys[best]], marker="*", c="gold", edgecolors="black", s=160, zorder=4,
               label=f"best {zs[best]:.4g}")
    fig.colorbar(mesh, ax=ax, label=metric)
    for get, set_, v in ((ax.get_xlim, ax.set_xlim, xs), (ax.get_ylim, ax.set_ylim, ys)):
        lo, hi = get()  # room for the dots on the edges
        pad = 0.04 * (hi - lo)
        set_(min(lo, v.min()) - pad, max(hi, v.max()) + pad)
    ax.set(xlabel=x, ylabel=y, title=title or f"sweep {metric} over {x} x {y}")
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _distribution(values: list):
    if all(_finite(v) for v in values):
        lo, hi = min(values), max(values)
        if all(isinstance(v, int) for v in values):
            return IntDistribution(int(lo), int(hi))
        return FloatDistribution(float(lo), float(hi))
    return CategoricalDistribution(sorted({v if isinstance(v, (str, bool, int, float)) or v is None else str(v)
                                           for v in values}, key=str))


def param_importances(trials_by_arm: dict[str, list[dict]], mode: str = "max",
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """Optuna's hyperparameter importances (``optuna.importance.get_param_importances``, fANOVA)
    per arm, from the sweep trials: an in-memory study per arm, each trial added with
    ``optuna.trial.create_trial`` under distributions from the observed values (min..max for
    numbers, categorical for the rest). Params that never vary are left out. An arm with fewer
    than 2 scored trials, a constant score or no varying param gets ``{}``."""
    out: dict[str, dict[str, float]] = {}
    for arm, trials in trials_by_arm.items():
        scored = [t for t in trials if _finite(t.get("score"))]
        names = sorted({k for t in scored for k in t if k not in NOT_PARAMS and t[k] is not None})
        values = {k: [t[k] for t in scored if t.get(k) is not None] for k in names}
        names = [k for k in names if len({str(v) for v in values[k]}) > 1]
        if len(scored) < 2 or len({t["score"] for t in scored}) < 2 or not names:
            out[arm] = {}
            continue
        dists = {k: _distribution(values[k]) for k in names}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for t in scored:
            params = {}
            for k in names:
                v = t.get(k)
                if v is None:
                    continue
                if isinstance(dists[k], optuna.distributions.CategoricalDistribution) and v not in dists[k].choices:
                    v = str(v)
                params[k] = v
            study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                      value=float(t["score"])))
        try:  # (fANOVA needs scikit-learn: a dependency of the package)
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
            out[arm] = {k: float(v) for k, v in imp.items()}
        except Exception:  # e.g. params missing from some trials, or too few to fit
            out[arm] = {}
    return out


def importances_plot(importances: dict[str, dict[str, float]], path: Path,
                     title: str = "sweep: hyperparameter importance (fANOVA)") -> Path | None:
    """One horizontal bar chart per arm of the params' importances (they sum to 1 per arm)."""
    arms = {a: imp for a, imp in importances.items() if imp}
    if not arms:
        return None
    rows = max(len(imp) for imp in arms.values())
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 1 + 0.35 * rows), squeeze=False)
    for ax, (arm, imp) in zip(axes[0], arms.items()):
        names = sorted(imp, key=imp.get)
        ax.barh(names, [imp[n] for n in names], color=COLORS.get(arm, "tab:purple"))
        ax.set(xlim=(0, 1), xlabel="importance", title=arm)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
