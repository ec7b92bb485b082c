"""``tune-dynsdpb compare``: re-run each arm's best config over K seeds, then report.

The finals are Tune trials of one ``Tuner`` (a grid over (arm, seed) of full configs: no searcher,
no scheduler), tracked in MLflow under the sweep's parent run as the arm ``finals-<budget>``.
Seeds are the pairing unit: one seed gives every arm the same data order and initialization.

Layout, beside the sweep's own files::

    SWEEP/ray/finals-<budget>/      the Tune experiment of the finals
    SWEEP/report-<budget>/          report.md, report.html, finals.json and the PNG plots
                                    (also logged to the parent run under report-<budget>/)

``--budget epochs``: every arm trains for its best config's epochs. ``--budget compute``: vanilla's
epochs are doubled, since DLB-style methods see each sample twice per epoch (equal sample-passes).
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import UserError

BUDGETS = ("epochs", "compute")
COMPARISONS = (("dynsdpb", "dlb"), ("dynsdpb", "vanilla"))


# -- statistics (pure) ----------------------------------------------------------------------------
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
    """n, mean, sample std (ddof=1) and the two-sided t-interval of the mean,
    ``mean ± t_{(1+confidence)/2, n-1} · std / sqrt(n)``. With fewer than two values the std and
    the interval are NaN (and everything is NaN for none)."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    from scipy import stats

    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * sd / math.sqrt(x.size)
    return Summary(int(x.size), mean, sd, mean - half, mean + half)


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
    t-interval, the paired t-test p-value (``scipy.stats.ttest_rel``), the Wilcoxon signed-rank
    p-value (only for n >= 5 with a non-zero difference, else None) and Cohen's d_z."""
    import warnings

    from scipy import stats

    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    d = a - b
    s = summarize(d, confidence)
    t = p = math.nan
    wilcoxon = None
    if d.size >= 2:
        with warnings.catch_warnings():  # zero variance: scipy warns and returns NaN
            warnings.simplefilter("ignore")
            res = stats.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    if d.size >= 5 and np.any(d != 0):
        wilcoxon = float(stats.wilcoxon(d).pvalue)
    return Paired(s.n, s.mean, s.std, s.ci_low, s.ci_high, t, p, wilcoxon, cohens_dz(d))


# -- the finals -----------------------------------------------------------------------------------
def final_configs(best: dict[str, dict], seeds: Sequence[int], budget: str) -> list[dict]:
    """One full trial config per (arm, seed) from each arm's best config. ``budget="compute"``
    doubles vanilla's epochs (TrainingArguments' default of 3 when the config has none)."""
    configs = []
    for method, config in best.items():
        config = dict(config)
        if budget == "compute" and method == "vanilla":
            config["num_train_epochs"] = 2 * float(config.get("num_train_epochs", 3.0))
        configs += [{**config, "seed": int(s)} for s in seeds]
    return configs


def train_final(config: dict, job, train_dataset, eval_dataset) -> None:
    """The sweep's trainable under its own name, so finals read apart from sweep trials in Tune
    and MLflow. ``config["seed"]`` seeds the run, the new head's initialization included."""
    from trainables.dynsdpb import train_dynsdpb

    train_dynsdpb(config, job, train_dataset, eval_dataset)


def _grad_norm_steps(n_train: int, config: dict, evals_per_epoch: int, accumulation: int) -> int:
    """fit()'s evaluation interval, so each report carries the gradient norms of its own step."""
    batch = int(config.get("per_device_train_batch_size", 8))
    per_step = batch * accumulation if config["method"] == "vanilla" else batch // 2 * accumulation
    return max(1, math.ceil(max(1, math.ceil(n_train / per_step)) / evals_per_epoch))


def _select_arms(state: dict, methods: Sequence[str] | None, where: str) -> dict[str, dict]:
    arms = state.get("arms", {})
    scored = {m: a["best"] for m, a in arms.items() if (a.get("best") or {}).get("score") is not None}
    if not scored:
        raise UserError(f"{where}: the sweep has no finished trial")
    if not methods:
        return {m: scored[m] for m in state["methods"] if m in scored}
    for m in methods:
        if m not in arms:
            raise UserError(f"--methods: the sweep has no arm {m!r} (arms: {', '.join(arms) or 'none'})")
        if m not in scored:
            raise UserError(f"--methods: arm {m!r} of the sweep has no finished trial")
    return {m: scored[m] for m in dict.fromkeys(methods)}


def run_compare(sweep_dir: str | Path, seeds: int = 5, budget: str = "epochs", methods: Sequence[str] | None = None,
                ray_address: str | None = None, grad_norm_steps: int | None = None,
                ray_temp_dir: str | None = None) -> Path:
    """Runs the finals of a sweep and writes ``SWEEP/report-<budget>/``; returns that folder."""
    from mlflow.entities import Param
    from ray import tune

    from .cli import staged_output
    from .data import load_task, tokenize_task
    from .run import load_model
    from .search_space import parse_search_space
    from .sweep import fit_tuner, _init_ray, _trial_resources, check_resources, load_sweep_state
    from .tracking import SweepTracker
    from trainables.dynsdpb import Job

    out = Path(sweep_dir).resolve()
    state = load_sweep_state(out)
    if budget not in BUDGETS:
        raise UserError(f"--budget: must be one of {', '.join(BUDGETS)} (got {budget!r})")
    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1 (got {seeds})")
    if grad_norm_steps is not None and grad_norm_steps < 0:
        raise UserError(f"--grad-norm-steps: must be >= 0 (got {grad_norm_steps})")
    best = _select_arms(state, methods, str(out))
    report_dir = out / f"report-{budget}"
    if report_dir.exists():
        raise UserError(f"{report_dir} already exists; remove it to run the {budget} finals again")

    spec = parse_search_space(state["spec"], state["spec_path"])
    metric, mode = state["metric"], state["mode"]
    task = load_task(spec.task, state["data_dir"], max_train_samples=spec.max_train_samples,
                     max_eval_samples=spec.max_eval_samples, seed=spec.seed)
    tracker = SweepTracker(state["tracking_uri"], spec.name, state["sweep_id"])
    try:
        parent = tracker.parent_run_id
    except RuntimeError:
        raise UserError(f"{out}: the sweep's parent run is missing from {state['tracking_uri']}") from None
    _init_ray(ray_address, ray_temp_dir)
    check_resources(spec, str(out))
    _, tokenizer = load_model(state["model_path"], task, lora=spec.lora.model_dump() if spec.lora else None)
    train_ds, eval_ds = tokenize_task(task, tokenizer, spec.max_length, cache_dir=out / "cache")

    seed_list = [spec.seed + i for i in range(seeds)]
    configs = final_configs({m: b["config"] for m, b in best.items()}, seed_list, budget)
    accumulation = int(spec.training_kwargs().get("gradient_accumulation_steps", 1))
    for c in configs:
        c["grad_norm_log_steps"] = (grad_norm_steps if grad_norm_steps is not None else
                                    _grad_norm_steps(len(train_ds), c, spec.budget.evals_per_epoch, accumulation))
    job = Job(model_path=state["model_path"], task=task, metric=metric, evals_per_epoch=spec.budget.evals_per_epoch,
              seed=spec.seed, cpus_per_trial=spec.resources.cpus_per_trial,
              gpus_per_trial=spec.resources.gpus_per_trial, workers_per_trial=spec.resources.workers_per_trial,
              lora=spec.lora.model_dump() if spec.lora else None, training=spec.training_kwargs())

    # At equal compute only vanilla's config changes: finished equal-epochs finals with the same
    # config (dlb, dynsdpb) are read back instead of trained again.
    reused = _reusable_finals(out / "ray" / "finals-epochs", configs) if budget == "compute" else []
    configs = [c for c in configs if not any(r.config == c for r in reused)]

    # -- the finals: one Tuner, a grid of full configs -----------------------------------------
    name = f"finals-{budget}"
    _discard_earlier_attempt(tracker, name)
    shutil.rmtree(out / "ray" / name, ignore_errors=True)
    finals_run = tracker.start_arm(name)
    tracker.client.log_batch(finals_run, params=[Param(k, v) for k, v in {
        "budget": budget, "seeds": ",".join(map(str, seed_list)), "methods": ",".join(best)}.items()])
    trainable = tune.with_resources(tune.with_parameters(train_final, job=job, train_dataset=train_ds,
                                                         eval_dataset=eval_ds), _trial_resources(spec))
    results = []
    if configs:
        tuner = tune.Tuner(
            trainable, param_space=tune.grid_search(configs),
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(out / "ray"), verbose=0,
                                      callbacks=[tracker.trial_callback(name)],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        try:
            grid = fit_tuner(tuner, len(configs))
        except KeyboardInterrupt:  # no report from part of the runs
            tracker.finish_arm(name, "KILLED")
            raise KeyboardInterrupt(f"finals interrupted; run tune-dynsdpb compare {out} --budget {budget} "
                                    "again") from None
        results = list(grid)
    tracker.finish_arm(name)

    trials, histories = collect_finals(results + reused, metric)
    for result in results:  # the finals keep no models (export takes the sweep's best checkpoints)
        for checkpoint, _ in result.best_checkpoints or []:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
    reused_ids = {r.metrics.get("trial_id") for r in reused}
    for t in trials:
        run_arm = "finals-epochs" if t["trial_id"] in reused_ids else name
        t["run_id"] = tracker.find_trial_run(run_arm, t["trial_id"]) if t["trial_id"] else None
    sweep_scores = {m: _sweep_scores(tracker, m, metric, mode) for m in best}
    with staged_output(report_dir) as tmp:
        summary = write_report(tmp, state=state, task=task.name, best=best, budget=budget, seeds=seed_list,
                               trials=trials, histories=histories, sweep_scores=sweep_scores,
                               finals_run=finals_run)
        tracker.client.log_artifacts(parent, str(tmp), f"report-{budget}")
    for m, s in summary["arms"].items():
        if s["mean"] is not None:
            tracker.client.log_metric(finals_run, f"{m}_{metric}_mean", s["mean"])
    return report_dir


def _reusable_finals(experiment: Path, configs: list[dict]) -> list:
    """Finished trials of an earlier finals experiment whose config equals one of ``configs``."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    if not experiment.is_dir():
        return []
    try:
        grid = ResultGrid(ExperimentAnalysis(str(experiment)))
    except Exception:  # an unreadable or partial experiment: train everything again
        return []
    return [r for r in grid if r.error is None and (r.metrics or {}).get("final") and r.config in configs]


def _discard_earlier_attempt(tracker, name: str) -> None:
    """Soft-deletes (``mlflow gc`` or a restore can follow) the MLflow runs of an earlier finals
    attempt whose report was never written or was removed, so the runs match the new report."""
    from .tracking import TAG_ARM, TAG_ROLE, TAG_SWEEP, _filter

    ident = {TAG_SWEEP: tracker.sweep_id, TAG_ROLE: "arm", TAG_ARM: name}
    for run in [*tracker.trial_runs(name), *tracker.client.search_runs([tracker.experiment_id], _filter(ident))]:
        tracker.client.delete_run(run.info.run_id)


def collect_finals(grid, metric: str) -> tuple[list[dict], dict[str, list]]:
    """Per trial: arm, seed, status, final score, sample-passes and wall time; per arm: the
    histories (Tune's ``metrics_dataframe``) of the trials that ran to their end."""
    trials, histories = [], {}
    for result in grid:
        config, last = result.config or {}, result.metrics or {}
        finished = result.error is None and bool(last.get("final")) and not last.get("dynsdpb_failure")
        score = last.get(metric)
        finished = finished and isinstance(score, (int, float)) and math.isfinite(score)
        trials.append({
            "method": config.get("method"), "seed": config.get("seed"), "trial_id": last.get("trial_id"),
            "status": "FINISHED" if finished else "FAILED",
            "error": last.get("dynsdpb_failure") or (str(result.error).splitlines()[0][:200] if result.error else None),
            "score": float(score) if finished else None, "step": last.get("step"),
            "num_train_epochs": config.get("num_train_epochs"), "sample_passes": last.get("sample_passes"),
            "time_total_s": last.get("time_total_s")})
        if finished:
            histories.setdefault(config["method"], []).append(result.metrics_dataframe)
    trials.sort(key=lambda t: (str(t["method"]), t["seed"] if t["seed"] is not None else -1))
    return trials, histories


def _sweep_scores(tracker, method: str, metric: str, mode: str) -> list[float | None]:
    """Each sweep trial's best reported score, trials in start order (None: never reported)."""
    runs = sorted(tracker.trial_runs(method), key=lambda r: r.info.start_time or 0)
    scores = []
    for r in runs:
        values = [m.value for m in tracker.client.get_metric_history(r.info.run_id, metric) if math.isfinite(m.value)]
        scores.append((max(values) if mode == "max" else min(values)) if values else None)
    return scores


# -- the report -----------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    v = _num(v)
    return "–" if v is None else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


def _count(v: Any) -> str:
    v = _num(v)
    return "–" if v is None else f"{v:,.0f}"


def same_runs(best_configs: dict[str, dict]) -> bool:
    """Whether dynsdpb's best config is dlb's with zero rates: then both arms train identical runs."""
    dyn, dlb = best_configs.get("dynsdpb"), best_configs.get("dlb")
    return bool(dyn and dlb and not dyn.get("lambda_alpha", 0) and not dyn.get("lambda_tau", 0)
                and all(dlb.get(k) == v for k, v in dyn.items()
                        if k not in ("method", "lambda_alpha", "lambda_tau", "granularity")))


def config_notes(best_configs: dict[str, dict], sweep_scores: dict[str, list] | None = None) -> list[str]:
    """Plain-words notes on the arms' best configs that a reader needs to read the differences:
    an arm whose sweep trials all tied (its "best" is then just the first, the warm start);
    dynsdpb with both adaptation rates at zero, which is static DLB; and dynsdpb matching dlb's
    best config, so that the two arms train identical runs and differ by zero by construction."""
    notes = []
    for arm, scores in (sweep_scores or {}).items():
        done = [x for x in scores if x is not None]
        if len(done) > 1 and len(set(done)) == 1:
            notes.append(f"All {len(done)} sweep trials of {arm} tied at {done[0]:.4g}: its best config is the "
                         f"first trial's (the warm start), not a finding of the search.")
    dyn = best_configs.get("dynsdpb")
    if not dyn or dyn.get("lambda_alpha", 0) or dyn.get("lambda_tau", 0):
        return notes
    notes += [f"dynsdpb's best config has both adaptation rates at 0 (λα = λτ = 0): it is static DLB with "
             f"α0 = {dyn.get('alpha0')}, τ0 = {dyn.get('tau0')}."]
    if same_runs(best_configs):
        notes.append("It also matches dlb's best config, so the dlb and dynsdpb runs are identical and "
                     "dynsdpb − dlb is 0 by construction.")
    return notes


def write_report(folder: Path, *, state: dict, task: str, best: dict, budget: str, seeds: list[int],
                 trials: list[dict], histories: dict, sweep_scores: dict, finals_run: str) -> dict:
    """Writes report.md, report.html, finals.json and the plots into ``folder``; returns the summary."""
    from . import plots

    metric, mode = state["metric"], state["mode"]
    done = [t for t in trials if t["status"] == "FINISHED"]
    by_arm = {m: {t["seed"]: t for t in done if t["method"] == m} for m in best}
    arms = {}
    for m, runs in by_arm.items():
        s = summarize([runs[k]["score"] for k in sorted(runs)])
        passes = [t["sample_passes"] for t in runs.values() if _num(t["sample_passes"]) is not None]
        wall = [t["time_total_s"] for t in runs.values() if _num(t["time_total_s"]) is not None]
        epochs = {t["num_train_epochs"] for t in trials if t["method"] == m}
        arms[m] = {**{k: _num(v) if isinstance(v, float) else v for k, v in asdict(s).items()},
                   "scores": {str(k): runs[k]["score"] for k in sorted(runs)},
                   "num_train_epochs": sorted(epochs, key=str)[0] if len(epochs) == 1 else sorted(epochs, key=str),
                   "sample_passes_mean": _num(float(np.mean(passes))) if passes else None,
                   "sample_passes_total": float(np.sum(passes)) if passes else None,
                   "wall_s_mean": _num(float(np.mean(wall))) if wall else None,
                   "wall_s_total": float(np.sum(wall)) if wall else None}
    paired = {}
    for a, b in COMPARISONS:
        if a in by_arm and b in by_arm:
            common = sorted(set(by_arm[a]) & set(by_arm[b]))
            p = paired_test([by_arm[a][k]["score"] for k in common], [by_arm[b][k]["score"] for k in common])
            paired[f"{a}-{b}"] = {**{k: (_num(v) if isinstance(v, float) else v) for k, v in asdict(p).items()},
                                  "seeds": common,
                                  "diffs": [by_arm[a][k]["score"] - by_arm[b][k]["score"] for k in common]}

    pngs = {
        "eval_curve.png": plots.eval_curves(histories, metric, folder / "eval_curve.png"),
        "alpha_tau.png": plots.alpha_tau(histories.get("dynsdpb", []), folder / "alpha_tau.png"),
        "best_so_far.png": plots.best_so_far(sweep_scores, mode, metric, folder / "best_so_far.png"),
        "grad_norms.png": plots.grad_norms(histories, folder / "grad_norms.png"),
    }
    summary = {"sweep_id": state["sweep_id"], "name": state["spec"]["name"], "task": task, "metric": metric,
               "mode": mode, "budget": budget, "seeds": seeds, "methods": list(best),
               "parent_run_id": state.get("parent_run_id"), "finals_run_id": finals_run, "arms": arms,
               "paired": paired, "trials": trials, "best_configs": {m: b["config"] for m, b in best.items()},
               "sweep_scores": sweep_scores,
               "notes": config_notes({m: b["config"] for m, b in best.items()}, sweep_scores),
               "plots": [k for k, v in pngs.items() if v], "created": time.time()}
    (folder / "finals.json").write_text(json.dumps(summary, indent=2, default=str))
    blocks = _blocks(summary, pngs)
    (folder / "report.md").write_text(_markdown(blocks))
    (folder / "report.html").write_text(_html(blocks, f"{summary['name']}: finals ({budget} budget)"))
    return summary


_BUDGET_TEXT = {
    "epochs": "**epochs**: every arm trains for its best config's `num_train_epochs`. DLB-style arms (dlb, "
              "dynsdpb) see each sample twice per epoch, so they spend about twice vanilla's sample-passes.",
    "compute": "**compute**: vanilla's `num_train_epochs` is doubled, so that every arm spends about the same "
               "training sample-passes (DLB-style arms see each sample twice per epoch).",
}


def _blocks(s: dict, pngs: dict) -> list[tuple]:
    """The report as a list of blocks: (h1|h2|p, text), (table, header, rows), (img, file, alt), (pre, text)."""
    metric, better = s["metric"], "higher" if s["mode"] == "max" else "lower"
    b: list[tuple] = [("h1", f"{s['name']}: finals ({s['budget']} budget)"),
                      ("p", f"Task `{s['task']}`, metric `{metric}` ({better} is better), seeds "
                            f"{', '.join(map(str, s['seeds']))}. Sweep `{s['sweep_id']}`, MLflow parent run "
                            f"`{s['parent_run_id']}`, finals run `{s['finals_run_id']}`."),
                      ("p", "Budget: " + _BUDGET_TEXT[s["budget"]]),
                      ("h2", "Task metric per arm"),
                      ("p", "The final evaluation of each seed's run; 95% CI from the t-distribution."),
                      ("table", ["arm", "n", "mean", "std", "95% CI", "per seed"],
                       [[m, a["n"], _fmt(a["mean"]), _fmt(a["std"]), f"[{_fmt(a['ci_low'])}, {_fmt(a['ci_high'])}]",
                         ", ".join(f"{k}: {_fmt(v)}" for k, v in a["scores"].items())] for m, a in s["arms"].items()])]
    b += [("h2", "Paired differences (per seed)"),
          ("p", "Same seed, same data order and initialization in every arm. Paired t-test "
                "(scipy.stats.ttest_rel), Wilcoxon signed-rank for n ≥ 5, effect size Cohen's "
                "d_z = mean(diff) / sd(diff).")]
    b += [("p", "**Note:** " + note) for note in s.get("notes", [])]
    if s["paired"]:
        b.append(("table", ["difference", "n", "mean diff", "sd", "95% CI", "t-test p", "Wilcoxon p", "d_z"],
                  [[k.replace("-", " − "), p["n"], _fmt(p["mean_diff"]), _fmt(p["sd_diff"]),
                    f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]", _fmt(p["p_ttest"]), _fmt(p["p_wilcoxon"]),
                    _fmt(p["d_z"])] for k, p in s["paired"].items()]))
        seeds = sorted({k for p in s["paired"].values() for k in p["seeds"]})
        cols = list(s["paired"])
        b.append(("table", ["seed", *s["arms"], *[c.replace("-", " − ") for c in cols]],
                  [[k, *[_fmt(a["scores"].get(str(k))) for a in s["arms"].values()],
                    *[_fmt(dict(zip(s["paired"][c]["seeds"], s["paired"][c]["diffs"])).get(k)) for c in cols]]
                   for k in seeds]))
    else:
        b.append(("p", "No pair of arms to compare (needs dynsdpb and dlb or vanilla)."))
    b += [("h2", "Compute per arm"),
          ("p", "Sample-passes: training samples through forward+backward (the trainable's `sample_passes`); "
                "wall time: Tune's `time_total_s` per run."),
          ("table", ["arm", "epochs", "sample-passes per run", "sample-passes total", "wall s per run",
                     "wall s total"],
           [[m, a["num_train_epochs"], _count(a["sample_passes_mean"]), _count(a["sample_passes_total"]),
             _fmt(a["wall_s_mean"], 1), _fmt(a["wall_s_total"], 1)] for m, a in s["arms"].items()])]
    failed = [t for t in s["trials"] if t["status"] != "FINISHED"]
    if failed:
        b += [("h2", "Runs that did not finish (left out above)"),
              ("table", ["arm", "seed", "reason"], [[t["method"], t["seed"], t["error"] or "?"] for t in failed])]
    titles = {"eval_curve.png": f"{metric} against training step (mean ± std over seeds)",
              "alpha_tau.png": "dynsdpb: α and τ over training (interval mean, min..max band)",
              "best_so_far.png": "Sweep: best score so far against trial count",
              "grad_norms.png": "Per-layer gradient norms over training"}
    b.append(("h2", "Plots"))
    for name, path in pngs.items():
        if path:
            b += [("p", titles[name]), ("img", name, titles[name])]
    b += [("h2", "Best configs"), ("pre", json.dumps(s["best_configs"], indent=2, default=str))]
    return b


def _markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}")
        elif kind == "h2":
            out.append(f"## {rest[0]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            header, rows = rest
            lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        elif kind == "pre":
            out.append(f"```json\n{rest[0]}\n```")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escapes text and turns markdown's `code` and **bold** into HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _html(blocks: list[tuple], title: str) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            body.append(f'<img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}">')
        elif kind == "pre":
            body.append(f"<pre>{html.escape(rest[0])}</pre>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
