"""``tune-dynsdpb compare``: re-run each arm's best config over K seeds, then report.

The finals are Tune trials of one ``Tuner`` (a grid over (arm, seed) of full configs: no searcher,
no scheduler), tracked in MLflow under the sweep's parent run as the arm ``finals-<budget>``.
Seeds are the pairing unit: one seed gives every arm the same data order and initialization.

Layout, beside the sweep's own files::

    STORAGE/finals-<budget>/        the Tune experiment of the finals (STORAGE: the sweep's storage
                                    path, SWEEP/ray by default; a local folder or a URI); a compare
                                    of some tasks (``--task``) has its own, finals-<budget>-<task>...,
                                    so that one of other tasks later leaves it, and their MLflow
                                    runs, alone
    SWEEP/report-<budget>/          report.md, report.html, finals.json and the PNG plots
                                    (also logged to the parent run under report-<budget>/)

``--budget epochs``: every arm trains for its best config's epochs. ``--budget compute``: vanilla's
epochs are doubled, since DLB-style methods see each sample twice per epoch (equal sample-passes).

A report is written whole to disk first, then uploaded; an artifact store that fails leaves the
reports on disk, and the same ``compare`` command run again uploads what the store lacks (the
finals are not trained again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ray import tune

from trainables.dynsdpb import eval_interval, train_dynsdpb

from . import results as R
from . import storage
from .errors import StoreError, UserError
from .experiment import check_resources, create_trainable, init_ray, prepare_tasks
from .files import staged_output
from .params import PAIRED_METHODS, passes_per_epoch
from .report import write_report, write_cross_task
from .search_space import Choices, Range, config_name
from .searching import replay_config
from .state import SweepState, open_sweep
from .tracking import TAG_ARM, TAG_SWEEP, TAG_TASK, SweepTracker, open_tracking_uri
from .tuning import checkpoint_uri, create_loggers, fit_tuner

BUDGETS = ("epochs", "compute")


# -- the finals -----------------------------------------------------------------------------------
def final_configs(best: dict[str, dict], seeds: Sequence[int], budget: str) -> list[dict]:
    """One full trial config per (arm, seed) from each arm's best config. ``budget="compute"``
    scales an arm's epochs to the paired methods' sample-passes (:func:`params.passes_per_epoch`):
    vanilla's double (TrainingArguments' default of 3 when the config has none)."""
    configs = []
    most = passes_per_epoch(next(iter(PAIRED_METHODS)))
    for method, config in best.items():
        config = dict(config)
        if budget == "compute" and passes_per_epoch(method) < most:
            config["num_train_epochs"] = most / passes_per_epoch(method) * float(config.get("num_train_epochs", 3.0))
        configs += [{**config, "seed": int(s)} for s in seeds]
    return configs


def train_final(config: dict, jobs, data) -> None:
    """The sweep's trainable under its own name, so finals read apart from sweep trials in Tune
    and MLflow. ``config["seed"]`` seeds the run, the new head's initialization included."""
    train_dynsdpb(config, jobs, data)


def _select_arms(state: SweepState, task: str, methods: Sequence[str] | None, where: str) -> dict[str, dict]:
    """{method: best trial (as a dict)} of the arms to re-run."""
    scored = {m: b.model_dump() for m, b in state.scored(task).items()}
    if not scored:
        raise UserError(f"{where}: task {task} of the sweep has no finished trial")
    if not methods:
        return scored
    for m in methods:
        if m not in state.methods:
            raise UserError(f"--methods: the sweep has no arm {m!r} (arms: {', '.join(state.methods)})")
        if m not in scored:
            raise UserError(f"--methods: arm {m!r} of the sweep has no finished trial on task {task}")
    return {m: scored[m] for m in dict.fromkeys(methods)}


def run_compare(sweep_dir: str | Path, seeds: int = 5, budget: str = "epochs", methods: Sequence[str] | None = None,
                tasks: Sequence[str] | None = None, ray_address: str | None = None, tracking_uri: str | None = None,
                grad_norm_steps: int | None = None, ray_temp_dir: str | None = None) -> Path:
    """Runs the finals of a sweep, every task in one Tune experiment, and writes
    ``SWEEP/report-<budget>/`` (one report per task, plus the cross-task table when the sweep
    has several); returns that folder.

    Each report is complete on disk before it goes to the artifact store. When the store fails,
    the reports (and the finals in them, ``finals.json``) stay, the error (:class:`StoreError`) names
    the store and the cause, and running the same command again uploads what the store lacks
    without training the finals again."""
    out = Path(sweep_dir).resolve()
    state = open_sweep(out)
    if budget not in BUDGETS:
        raise UserError(f"--budget: must be one of {', '.join(BUDGETS)} (got {budget!r})")
    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1 (got {seeds})")
    if grad_norm_steps is not None and grad_norm_steps < 0:
        raise UserError(f"--grad-norm-steps: must be >= 0 (got {grad_norm_steps})")
    names = [state.pick_task(t) for t in tasks] if tasks else list(state.tasks)
    best = {t: _select_arms(state, t, methods, str(out)) for t in names}
    report_dir = out / f"report-{budget}"
    targets = {n: report_dir if len(state.tasks) == 1 else report_dir / n for n in names}
    spec = state.sweep_spec()
    tracker = SweepTracker(open_tracking_uri(state.tracking_uri, tracking_uri), spec.name, state.sweep_id)
    written = {n: target for n, target in targets.items() if target.exists()}
    for n, target in written.items():  # a report on disk: only what the artifact store lacks goes up
        if not tracker.missing_artifacts(tracker.parent_run_id, target, _artifact_path(target, out)):
            raise UserError(f"{target} already exists; remove it to run the {budget} finals again")
    todo = [n for n in names if n not in written]
    if todo:
        storage.check_storage(state.storage_path, "the sweep's storage path")  # one line, before any final
        run_finals(out, state, spec, tracker, todo, {n: best[n] for n in todo}, seeds, budget, grad_norm_steps,
                   ray_address, ray_temp_dir, {n: targets[n] for n in todo})
    for n in names:  # every report on disk now; upload what the store does not have
        _upload(tracker, targets[n], out)
    if len(state.tasks) > 1:
        write_cross_task_report(out, tracker)
    return report_dir


def _artifact_path(target: Path, out: Path) -> str:
    return target.relative_to(out).as_posix()


def _upload(tracker, target: Path, out: Path) -> None:
    path = _artifact_path(target, out)
    try:
        missing = tracker.missing_artifacts(tracker.parent_run_id, target, path)
        if missing:
            tracker.upload_artifacts(tracker.parent_run_id, target, path, files=missing)
    except StoreError as e:
        raise StoreError(f"{e}; the report and its finals stay in {target}: run the same command again to "
                         "upload them") from None


def run_finals(out: Path, state: SweepState, spec, tracker, names: list[str], best: dict, seeds: int, budget: str,
               grad_norm_steps: int | None, ray_address: str | None, ray_temp_dir: str | None,
               targets: dict[str, Path]) -> None:
    """The finals of ``names``, one Tuner for all, and each task's report written to disk."""
    init_ray(ray_address, ray_temp_dir)
    check_resources(spec, str(out))
    spec_one = spec.model_copy(update={"tasks": state.task_specs(names), "task": None})
    prepared = prepare_tasks(spec_one, state.model_path, out / "cache", str(out))
    for n, t in prepared.items():
        if t.data_hash != state.tasks[n].data_hash:
            raise UserError(f"{t.task.source}: the data of task {n} changed since the sweep; compare needs the same")

    seed_list = [spec.seed + i for i in range(seeds)]
    configs = []
    for n in names:
        for c in final_configs({m: replay_config(b) for m, b in best[n].items()}, seed_list, budget):
            c["grad_norm_log_steps"] = (grad_norm_steps if grad_norm_steps is not None else
                                        eval_interval(len(prepared[n].train), c, prepared[n].job))
            configs.append(c)

    # At equal compute only vanilla's config changes: finished equal-epochs finals with the same
    # config (dlb, dynsdpb) are read back instead of trained again.
    reused = _reusable_finals(state.storage_path, configs) if budget == "compute" else []
    configs = [c for c in configs if not any(r.config == c for r in reused)]

    # -- the finals: one Tuner, a grid of full configs, retried on crashes ---------------------
    name = f"finals-{budget}"  # the MLflow arm of every task's finals at this budget
    experiment = name if set(names) == set(state.tasks) else "-".join([name, *names])  # Tune's, for these tasks
    _discard_earlier_attempt(tracker, name, names)
    storage.rmtree(storage.join(state.storage_path, experiment))
    finals_runs = {n: tracker.start_arm(n, name) for n in names}
    for n in names:
        tracker.log_params(finals_runs[n], {"budget": budget, "seeds": ",".join(map(str, seed_list)),
                                            "methods": ",".join(best[n])})
    results = []
    if configs:
        callback = tracker.trial_callback([(n, name) for n in names], arm=name)
        tuner = tune.Tuner(
            create_trainable(spec_one, prepared, train_final), param_space=tune.grid_search(configs),
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name=experiment, storage_path=state.storage_path, verbose=0,
                                      callbacks=[callback, *create_loggers()],
                                      failure_config=tune.FailureConfig(max_failures=2),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        try:
            grid = fit_tuner(tuner, len(configs))
        except KeyboardInterrupt:  # no report from part of the runs
            callback.flush()
            for run_id in finals_runs.values():
                tracker.finish(run_id, "KILLED")
            raise KeyboardInterrupt(f"finals interrupted; run tune-dynsdpb compare {out} --budget {budget} "
                                    "again") from None
        callback.flush()
        results = list(grid)
    for run_id in finals_runs.values():
        tracker.finish(run_id)

    for result in results:  # the finals keep no models (export takes the sweep's best checkpoints)
        for checkpoint, _ in result.best_checkpoints or []:
            storage.rmtree(checkpoint_uri(checkpoint, state.storage_path))
    reused_ids = {r.metrics.get("trial_id") for r in reused}
    for n in names:
        with staged_output(targets[n], flag=str(targets[n])) as folder:
            t = state.tasks[n]
            trials, histories = collect_finals([r for r in results + reused if (r.config or {}).get("task") == n],
                                               t.metric)
            for tr in trials:
                arm = "finals-epochs" if tr["trial_id"] in reused_ids else name
                tr["run_id"] = tracker.find_trial_run(n, arm, tr["trial_id"]) if tr["trial_id"] else None
            sweep_trials = {m: _sweep_trials(tracker, spec, n, m, t.metric, t.mode) for m in best[n]}
            sweep_scores = {m: [x["score"] for x in trials_] for m, trials_ in sweep_trials.items()}
            summary = write_report(folder, state=_report_state(state, n), task=n, best=best[n], budget=budget,
                                   seeds=seed_list, trials=trials, histories=histories,
                                   sweep_scores=sweep_scores, finals_run=finals_runs[n], baseline=t.baseline,
                                   sweep_trials=sweep_trials)
        tracker.log_metrics(finals_runs[n], {f"{m}_{t.metric}_mean": s["mean"] for m, s in summary["arms"].items()
                                             if s["mean"] is not None})


def write_cross_task_report(out: Path, tracker=None) -> Path | None:
    """The cross-task table (tasks x arms, at each budget that has finals) in ``SWEEP/cross-task/``,
    rebuilt from every ``report-<budget>/<task>/finals.json``; logged to the parent run."""
    per_task: dict[str, dict] = {}
    for budget in BUDGETS:
        for f in sorted((out / f"report-{budget}").glob("*/finals.json")):
            summary = json.loads(f.read_text())
            per_task.setdefault(summary["task"], {})[budget] = summary
    if not per_task:
        return None
    folder = out / "cross-task"
    folder.mkdir(exist_ok=True)
    write_cross_task(folder, per_task)
    if tracker is not None:
        _upload(tracker, folder, out)
    return folder


def _report_state(state: SweepState, task: str) -> dict:
    """What write_report reads of the sweep, for one task."""
    t = state.tasks[task]
    return {"metric": t.metric, "mode": t.mode, "sweep_id": state.sweep_id, "spec": state.spec,
            "parent_run_id": state.parent_run_id, "baseline": t.baseline}


def _reusable_finals(storage_path: str, configs: list[dict]) -> list:
    """Finished trials of the equal-epochs finals (``finals-epochs``, or ``finals-epochs-<task>...``
    for a compare of some tasks; local folders or URIs) whose config equals one of ``configs``,
    one per config."""
    found: dict[str, object] = {}
    for folder in sorted(n for n, is_dir in storage.list_dir(storage_path).items()
                         if is_dir and (n == "finals-epochs" or n.startswith("finals-epochs-"))):
        experiment = storage.join(storage_path, folder)
        if not tune.Tuner.can_restore(experiment):
            continue
        try:
            grid = tune.Tuner.restore(experiment, trainable=train_final).get_results()
        except Exception:  # an unreadable or partial experiment: what it held is trained again
            continue
        for r in grid:
            if R.classify(r.metrics, r.error is not None) is R.Outcome.FINISHED and r.config in configs:
                found.setdefault(json.dumps(r.config, sort_keys=True, default=str), r)
    return list(found.values())


def _discard_earlier_attempt(tracker, name: str, tasks: list[str]) -> None:
    """Soft-deletes (``mlflow gc`` or a restore can follow) the MLflow runs of an earlier finals
    attempt of ``tasks`` whose report was never written or was removed, so the runs match the new
    report. Other tasks' finals at this budget stay."""
    for task in tasks:
        tracker.delete_runs(tracker.search({TAG_SWEEP: tracker.sweep_id, TAG_ARM: name, TAG_TASK: task}))


def collect_finals(grid, metric: str) -> tuple[list[dict], dict[str, list]]:
    """Per trial: arm, seed, outcome, final score, sample-passes and wall time; per arm: the
    histories (Tune's ``metrics_dataframe``) of the trials that ran to their end."""
    trials, histories = [], {}
    for result in grid:
        config, last = result.config or {}, result.metrics or {}
        score = last.get(metric)
        finished = R.classify(last, result.error is not None) is R.Outcome.FINISHED and R.finite(score)
        trials.append({
            "method": config.get(R.METHOD), "seed": config.get("seed"), "trial_id": last.get("trial_id"),
            "status": "FINISHED" if finished else "FAILED",
            "error": R.failure_reason(last) or (str(result.error).strip().splitlines()[-1][:200] if result.error
                                                else None if finished else "no finite score"),
            "score": float(score) if finished else None, "step": last.get(R.STEP),
            "num_train_epochs": config.get("num_train_epochs"), "sample_passes": last.get(R.SAMPLE_PASSES),
            "time_total_s": last.get("time_total_s")})
        if finished:
            histories.setdefault(config[R.METHOD], []).append(result.metrics_dataframe)
    trials.sort(key=lambda t: (str(t["method"]), t["seed"] if t["seed"] is not None else -1))
    return trials, histories


def _sweep_trials(tracker, spec, task: str, method: str, metric: str, mode: str) -> list[dict]:
    """Each sweep trial of one arm, in start order: its searched parameters and its best reported
    score (None: never reported, or failed), read back from MLflow."""
    searched = [config_name(k) for k, v in spec.params.arm(method).items() if isinstance(v, (Range, Choices))]
    runs = sorted(tracker.trial_runs(task, method), key=lambda r: r.info.start_time or 0)
    out = []
    for r in runs:
        values = [v for v in tracker.metric_history(r.info.run_id, metric) if math.isfinite(v)]
        failed = r.info.status == "FAILED"
        score = (max(values) if mode == "max" else min(values)) if values and not failed else None
        out.append({**{k: _number(r.data.params.get(k)) for k in searched}, "score": score})
    return out


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text
