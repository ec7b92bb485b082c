"""``tune-dynsdpb sweep``: one Optuna-searched, ASHA-scheduled Ray Tune experiment per arm.

A sweep reads top to bottom:

1. validate everything that can be validated before a trial starts (the file, the data, the
   tracking store, the cluster's resources), then tokenize the task once, here in the driver;
2. for each arm (vanilla, dlb, dynsdpb) run a ``Tuner`` with its own Optuna study and the same
   trial budget, tracked in MLflow from this process (:mod:`tune_dynsdpb.tracking`);
3. record each arm's best trial on the sweep's parent run; keep only the best checkpoint per trial.

Layout of ``--output-dir``::

    OUT/sweep.json        what was asked for, and which arms are done (the resume point)
    OUT/mlflow.db         default tracking store (SQLite), artifacts in OUT/mlartifacts
    OUT/ray/<arm>/        Ray Tune experiments: trial folders, checkpoints, searcher state
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from .errors import UserError
from .search_space import (SweepSpec, create_scheduler, create_searcher, load_search_space,
                           parse_search_space, resolve_metric)

STATE = "sweep.json"


@dataclass
class ArmResult:
    method: str
    metric: str
    score: float | None
    config: dict
    trial_id: str | None
    checkpoint: str | None
    trials: int
    run_id: str | None = None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # never a half-written state file


def load_sweep_state(output_dir: str | Path) -> dict:
    path = Path(output_dir) / STATE
    if not path.is_file():
        raise UserError(f"{output_dir}: holds no sweep (no {STATE})")
    return json.loads(path.read_text())


def check_resources(spec: SweepSpec, where: str) -> None:
    """Rejects a per-trial request that no node (or, for multi-worker trials, no cluster) can meet."""
    import ray

    r = spec.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    workers = max(r.workers_per_trial, int(r.gpus_per_trial) if r.gpus_per_trial > 1 else 1)
    cpu, gpu = r.cpus_per_trial / workers, (r.gpus_per_trial / workers if r.gpus_per_trial else 0)
    fits = sum(int(min(n.get("CPU", 0) // cpu if cpu else 1e9, n.get("GPU", 0) // gpu if gpu else 1e9))
               for n in nodes)
    if fits < workers:
        best = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise UserError(f"{where}: resources: a trial needs {workers} worker(s) of {cpu:g} CPU / {gpu:g} GPU but the "
                        f"cluster's largest node has {best.get('CPU', 0):g} CPU / {best.get('GPU', 0):g} GPU")


def _quiet() -> None:
    """Our live table replaces Ray's console output; keep Ray and Optuna to warnings."""
    import optuna

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _init_ray(address: str | None, temp_dir: str | None) -> None:
    import ray

    _quiet()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        kwargs["address"] = address
    elif temp_dir:
        kwargs["_temp_dir"] = temp_dir
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--ray-address: cannot join Ray at {address!r}: {str(e).splitlines()[0]}") from None


def run_sweep(spec_path: str | Path | None = None, *, output_dir: str | Path | None = None,
              data_dir: str | None = None, methods: list[str] | None = None, num_samples: int | None = None,
              ray_address: str | None = None, tracking_uri: str | None = None, resume: bool = False,
              progress: bool = True, ray_temp_dir: str | None = None) -> list[ArmResult]:
    from trainables.dynsdpb import Job, train_dynsdpb

    from .data import load_task, tokenize_task
    from .run import load_model, resolve_model_path
    from .tracking import SweepTracker, check_tracking_uri, default_artifact_location, default_tracking_uri

    # -- 1. what was asked, validated before any trial -----------------------------------------
    if resume:
        if output_dir is None:
            raise UserError("--resume: needs --output-dir of the interrupted sweep")
        state = load_sweep_state(output_dir)
        spec = parse_search_space(state["spec"], state["spec_path"])
        data_dir, methods, tracking_uri = state["data_dir"], state["methods"], state["tracking_uri"]
    else:
        if spec_path is None:
            raise UserError("sweep: give a sweep file (e.g. search_spaces/quickstart.yaml)")
        spec = load_search_space(spec_path)
        updates: dict[str, Any] = {}
        if methods:
            raw = spec.model_dump(mode="json")
            raw["methods"] = list(methods)
            spec = parse_search_space(raw, f"{spec_path} (--methods)")  # validates the names
        if num_samples is not None:
            if num_samples < 1:
                raise UserError(f"--num-samples: must be >= 1 (got {num_samples})")
            updates["num_samples"] = num_samples
        if updates:
            spec = spec.model_copy(update={"budget": spec.budget.model_copy(update=updates)})
        methods = list(spec.methods)
        data_dir = data_dir or spec.data_dir
        output_dir = Path(output_dir or Path("runs") / spec.name)
        if (Path(output_dir) / STATE).exists():
            raise UserError(f"--output-dir: {output_dir} already holds a sweep; pass --resume to continue it")
        state = None
    out = Path(output_dir).resolve()
    where = str(spec.path or spec.name)

    task = load_task(spec.task, data_dir, max_train_samples=spec.max_train_samples,
                     max_eval_samples=spec.max_eval_samples, seed=spec.seed)
    metric, mode = resolve_metric(spec, task.metric, task.metric_mode)
    model_path = resolve_model_path(spec.model)
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or default_tracking_uri(out)
    check_tracking_uri(tracking_uri)
    _init_ray(ray_address, ray_temp_dir)
    check_resources(spec, where)
    _, tokenizer = load_model(model_path, task, lora=spec.lora.model_dump() if spec.lora else None)
    train_ds, eval_ds = tokenize_task(task, tokenizer, spec.max_length, cache_dir=out / "cache")

    if state is None:
        state = {"sweep_id": uuid.uuid4().hex[:12], "spec": spec.model_dump(mode="json"), "spec_path": where,
                 "data_dir": data_dir, "methods": methods, "tracking_uri": tracking_uri, "metric": metric,
                 "mode": mode, "model_path": model_path, "arms": {}, "created": time.time()}
        _write_json(out / STATE, state)

    # -- 2. one Tuner per arm, each with its own study and the same budget -----------------------
    tracker = SweepTracker(tracking_uri, spec.name, state["sweep_id"],
                           artifact_location=default_artifact_location(out) if tracking_uri.startswith("sqlite") else None)
    parent = tracker.start_sweep({"spec": state["spec"], "task": task.name, "metric": metric, "mode": mode,
                                  "model": model_path, "methods": ",".join(methods)},
                                 tags={"tune_dynsdpb.output_dir": str(out), "tune_dynsdpb.task": task.name})
    state["parent_run_id"] = parent
    job = Job(model_path=model_path, task=task, metric=metric, evals_per_epoch=spec.budget.evals_per_epoch,
              seed=spec.seed, cpus_per_trial=spec.resources.cpus_per_trial,
              gpus_per_trial=spec.resources.gpus_per_trial, workers_per_trial=spec.resources.workers_per_trial,
              lora=spec.lora.model_dump() if spec.lora else None, training=spec.training_kwargs())
    trainable = tune.with_resources(tune.with_parameters(train_dynsdpb, job=job, train_dataset=train_ds,
                                                         eval_dataset=eval_ds), _trial_resources(spec))
    table = ProgressTable(metric, enabled=progress)
    results = []
    for method in methods:
        arm_state = state["arms"].setdefault(method, {"status": "pending"})
        if arm_state["status"] == "done":
            results.append(ArmResult(**arm_state["best"]))
            continue
        arm_run = tracker.start_arm(method)
        experiment = out / "ray" / method
        if resume and tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=False,
                                       restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=spec.budget.num_samples,
                    reuse_actors=True,  # no process start + torch/transformers import per trial
                    max_concurrent_trials=_max_concurrent(spec),
                    search_alg=create_searcher(spec, method, metric, mode, seed=spec.seed),
                    scheduler=create_scheduler(spec)),
                run_config=tune.RunConfig(
                    name=method, storage_path=str(out / "ray"), verbose=0,
                    callbacks=[tracker.trial_callback(method), table.for_arm(method)],
                    failure_config=tune.FailureConfig(max_failures=2),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                            checkpoint_score_order=mode)))
        arm_state["status"] = "running"
        _write_json(out / STATE, state)
        try:
            grid = fit_tuner(tuner, spec.budget.num_samples)
        except KeyboardInterrupt:  # Tune returned early and saved its state
            _write_json(out / STATE, state)
            table.close()
            raise KeyboardInterrupt(f"sweep interrupted during arm {method!r}; continue it with "
                                    f"tune-dynsdpb sweep --resume --output-dir {out}") from None
        best = _best(grid, method, metric, mode)
        _keep_best_checkpoints(grid, metric, mode)
        if best.trial_id:
            best.run_id = next((r.info.run_id for r in tracker.trial_runs(method)
                                if r.data.tags.get("ray.trial_id") == best.trial_id), None)
            tracker.record_best(method, best.run_id, best.config, metric, best.score)
        tracker.finish_arm(method)
        arm_state.update(status="done", best=best.__dict__, run_id=arm_run)
        _write_json(out / STATE, state)
        results.append(best)
    tracker.finish_sweep()
    state["finished"] = time.time()
    _write_json(out / STATE, state)
    table.close()
    if progress:
        print_summary(results, state, out)
    return results


def _trial_resources(spec: SweepSpec):
    from trainables.distributed import create_trial_resources
    r = spec.resources
    return create_trial_resources(r.cpus_per_trial, r.gpus_per_trial, r.workers_per_trial)


def _max_concurrent(spec: SweepSpec) -> int | None:
    """Multi-worker trials reserve their workers outside Tune's view, so Tune must be told how many fit."""
    from trainables.distributed import max_concurrent_ddp_trials
    r = spec.resources
    caps = [c for c in (spec.budget.max_concurrent,
                        max_concurrent_ddp_trials(r.cpus_per_trial, r.gpus_per_trial) if r.distributed else None) if c]
    return min(caps) if caps else None


def fit_tuner(tuner, budget: int):
    """``tuner.fit()``, raising KeyboardInterrupt if Ctrl-C ended it early.

    Tune swaps in its own SIGINT handler for the run and puts the previous one back only when the
    signal arrives, so the handler in place afterwards tells whether the run was interrupted; the
    trial states catch the rest (interrupted trials are left TERMINATED but not ``done``).
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    grid = tuner.fit()
    interrupted = False
    if main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        interrupted = signal.getsignal(signal.SIGINT) is before
        signal.signal(signal.SIGINT, before)
    if interrupted or not _complete(grid, budget):
        raise KeyboardInterrupt
    return grid


def _complete(grid, budget: int) -> bool:
    """Whether every budgeted trial of the arm has ended (finished, stopped or failed)."""
    # An interrupt also leaves running trials TERMINATED; only a trial that ended on its own (or
    # that the scheduler stopped) has ``done`` in its last result.
    trials = grid._experiment_analysis.trials
    return len(trials) >= budget and all(
        t.status == "ERROR" or (t.status == "TERMINATED" and (t.last_result or {}).get("done")) for t in trials)


def _best(grid, method: str, metric: str, mode: str) -> ArmResult:
    """The arm's best trial by its best reported score (not only the last one)."""
    best = None
    for result in grid:
        if result.metrics_dataframe is None or metric not in result.metrics_dataframe:
            continue
        scores = result.metrics_dataframe[metric].dropna()
        if scores.empty:
            continue
        score = float(scores.max() if mode == "max" else scores.min())
        if best is None or (score > best[0] if mode == "max" else score < best[0]):
            best = (score, result)
    if best is None:
        return ArmResult(method, metric, None, {}, None, None, len(grid))
    score, result = best
    ckpt = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    config = {k: v for k, v in result.config.items()}
    return ArmResult(method, metric, score, config, result.metrics.get("trial_id"), ckpt.path if ckpt else None,
                     len(grid))


def _keep_best_checkpoints(grid, metric: str, mode: str) -> None:
    """Checkpoints are bounded during the run (num_to_keep); afterwards only each trial's best stays."""
    for result in grid:
        if not result.best_checkpoints:
            continue
        keep = result.get_best_checkpoint(metric, mode)
        for ckpt, _ in result.best_checkpoints:
            if keep is not None and ckpt.path != keep.path and os.path.isdir(ckpt.path):
                shutil.rmtree(ckpt.path, ignore_errors=True)


class ProgressTable:
    """A live table of trials (arm, trial, params, latest metric, status), drawn with rich."""

    current: "ProgressTable | None" = None  # the driver's table; callbacks look it up when called

    def __init__(self, metric: str, enabled: bool = True):
        self.metric, self.enabled = metric, enabled
        self.rows: dict[str, dict] = {}
        self._live = None
        ProgressTable.current = self

    def for_arm(self, method: str) -> "_ProgressCallback":
        return _ProgressCallback(method)

    def update(self, method, trial, status, result=None) -> None:
        if not self.enabled:
            return
        row = self.rows.setdefault(trial.trial_id, {"arm": method, "params": _short(trial.config), "metric": None})
        row["status"] = status
        if result and self.metric in result:
            row["metric"] = result[self.metric]
            row["step"] = result.get("step")
        self._render()

    def _render(self) -> None:
        from rich.live import Live
        from rich.table import Table

        t = Table(title="tune-dynsdpb sweep", expand=False)
        for col in ("arm", "trial", "params", self.metric, "step", "status"):
            t.add_column(col)
        for tid, r in self.rows.items():
            m = r["metric"]
            t.add_row(r["arm"], tid, r["params"], "" if m is None else f"{m:.4f}", str(r.get("step", "")), r["status"])
        if self._live is None:
            self._live = Live(t, refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self._live.update(t)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        ProgressTable.current = None


class _ProgressCallback(tune.Callback):
    """Feeds the driver's ProgressTable. Holds only the arm's name, so Tune can pickle it."""

    def __init__(self, method: str):
        self.method = method

    def _update(self, trial, status, result=None):
        if ProgressTable.current is not None:
            ProgressTable.current.update(self.method, trial, status, result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self._update(trial, "FAILED" if last.get("dynsdpb_failure") else "DONE" if last.get("final") else "STOPPED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "ERROR")


def _short(config: dict) -> str:
    keys = ("learning_rate", "per_device_train_batch_size", "alpha0", "tau0", "lambda_alpha", "lambda_tau",
            "granularity")
    names = {"learning_rate": "lr", "per_device_train_batch_size": "B"}
    parts = [f"{names.get(k, k)}={config[k]:.3g}" if isinstance(config[k], float) else f"{names.get(k, k)}={config[k]}"
             for k in keys if k in config]
    return " ".join(parts)


def print_summary(results: list[ArmResult], state: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"best per arm ({state['metric']}, {state['mode']})")
    for col in ("arm", "score", "trials", "config", "MLflow run"):
        t.add_column(col)
    for r in results:
        t.add_row(r.method, "-" if r.score is None else f"{r.score:.4f}", str(r.trials), _short(r.config),
                  r.run_id or "-")
    console = Console()
    console.print(t)
    uri = state["tracking_uri"]
    console.print(f"MLflow: experiment '{state['spec']['name']}', parent run {state.get('parent_run_id')}")
    console.print(f"  mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"  {uri}")
    console.print(f"Sweep folder: {out}")
