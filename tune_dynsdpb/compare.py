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

import math
import shutil
from pathlib import Path
from typing import Sequence

from .errors import UserError
from .report import (  # noqa: F401  (the report lives in report.py; these names stay importable from here)
    COMPARISONS, Paired, Summary, cohens_dz, config_notes, paired_test, same_runs, summarize, write_report)

BUDGETS = ("epochs", "compute")


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
