"""The report's PNG plots (matplotlib, Agg: no display needed).

Each function takes plain data (lists of per-seed histories as pandas DataFrames, or lists of
numbers), writes one PNG and returns its path, or None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

COLORS = {"vanilla": "tab:gray", "dlb": "tab:blue", "dynsdpb": "tab:red"}


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


def alpha_tau(histories: list[pd.DataFrame], path: Path) -> Path | None:
    """DynSDPB's α and τ over training: the interval mean (line) and min..max (band), averaged over seeds."""
    if not any(h is not None and "alpha_mean" in h for h in histories):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("alpha", "tau")):
        mean = mean_std_by_step(histories, f"{name}_mean")
        lo, hi = mean_std_by_step(histories, f"{name}_min"), mean_std_by_step(histories, f"{name}_max")
        ax.plot(mean["step"], mean["mean"], color="tab:red", marker="o", ms=3, label=f"{name} mean")
        if not lo.empty and not hi.empty:
            band = lo.merge(hi, on="step", suffixes=("_lo", "_hi"))
            ax.fill_between(band["step"], band["mean_lo"], band["mean_hi"], alpha=0.2, color="tab:red",
                            label=f"{name} min..max")
        ax.set(xlabel="training step", ylabel=name, title=f"dynsdpb: {name} per logging interval")
        ax.legend()
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
