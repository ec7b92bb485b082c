"""The designs that ``benchmarks/sweep_scale.py`` runs on the same stand-in trials.

- ``after`` (ours): the driver's own pieces, one ``create_tuner`` over every (task, arm) group,
  ``fit_tuner``, the MLflow trial callback, the progress callback, the checkpoint pruner. A
  variant switches one piece (patching this process only, never the product): ``:no-mlflow``,
  ``:no-pruner``, ``:no-progress``, ``:asha`` (one Tune ``ASHAScheduler`` instead of one per group),
  ``:fifo``, ``:pending=N|auto`` (``TUNE_MAX_PENDING_TRIALS_PG``), ``:random`` (Optuna's random
  sampler), ``:no-journal`` (in-memory studies), ``:keep=N|none`` (``CheckpointConfig.num_to_keep``),
  ``:concurrent=N`` (``budget.max_concurrent``, passed to Tune as ``max_concurrent_trials``).
- ``before``: the old sweep, one ``create_tuner`` per group in sequence.
- ``tune``: a plain ``Tuner``: random search (``grid_search`` over the arms: equal counts), FIFO
  or Tune's ``ASHAScheduler`` with the same rungs, ``reuse_actors=True``, no callbacks, Tune's
  defaults; ``tune:concurrent=N``: ``max_concurrent_trials``.
- ``tune-optuna``: the same with Tune's ``OptunaSearch`` and ``MLflowLoggerCallback``, by hand.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from benchmarks.scale_figures import RaySampler, figures, mlflow_runs, self_cpu, trial_records
from tune_dynsdpb.console import ProgressCallback, ProgressTable
from tune_dynsdpb.tuning import CheckpointPruner, configure_tune, create_tuner, fit_tuner


def build_state(spec, storage: str, uri: str):
    from tune_dynsdpb.state import ArmState, SweepState, TaskState

    tasks = {t.task: TaskState(name=t.task, metric="eval_accuracy", mode="max") for t in spec.task_specs()}
    arms = {f"{n}/{m}": ArmState(task=n, method=m) for n in tasks for m in spec.methods}
    return SweepState(sweep_id=uuid.uuid4().hex[:12], spec=spec.model_dump(mode="json", by_alias=True),
                      spec_path=f"<{spec.name}>", methods=list(spec.methods), num_samples=spec.budget.num_samples,
                      tracking_uri=uri, model_path="standin", storage_path=storage, tasks=tasks, arms=arms,
                      created=time.time())


@contextlib.contextmanager
def variant(options: list[str]):
    """The benchmark process patched for one variant of our design, and put back afterwards."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    import tune_dynsdpb.searching as searching
    from tune_dynsdpb import results as R
    from tune_dynsdpb.search_space import max_reports

    saved = (searching.create_scheduler, tune.CheckpointConfig, searching.create_optuna_search,
             searching.create_journal_storage)
    for o in options:
        key, _, value = o.partition("=")
        if key == "pending":
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
            if value != "auto":
                os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = value
        elif key == "asha":
            searching.create_scheduler = lambda spec, groups: ASHAScheduler(
                time_attr="training_iteration", metric=R.OBJECTIVE, mode=R.MODE, max_t=max_reports(spec),
                grace_period=spec.budget.grace_period, reduction_factor=spec.budget.reduction_factor)
        elif key == "fifo":
            searching.create_scheduler = lambda spec, groups: FIFOScheduler()
        elif key == "random":  # create_optuna_search with Optuna's random sampler instead of TPE
            def random_search(spec, group, storage=None):
                import optuna
                from ray.tune.search.optuna import OptunaSearch
                return OptunaSearch(space=searching.DefineByRun(spec, group), metric=R.OBJECTIVE, mode=R.MODE,
                                    points_to_evaluate=searching.create_points_to_evaluate(spec, group[1]) or None,
                                    sampler=optuna.samplers.RandomSampler(seed=spec.seed),
                                    study_name=searching.study_name(spec.name, group), storage=storage)
            searching.create_optuna_search = random_search
        elif key == "no-journal":
            searching.create_journal_storage = lambda path: None
        elif key == "keep":
            keep = None if value == "none" else int(value)
            tune.CheckpointConfig = lambda *a, _c=saved[1], **kw: _c(*a, **{**kw, "num_to_keep": keep})
    try:
        yield
    finally:
        (searching.create_scheduler, tune.CheckpointConfig, searching.create_optuna_search,
         searching.create_journal_storage) = saved


def run_ours(design: str, spec, trainable, folder: Path):
    """Our driver; returns (grids, fits, tracker or None). ``design`` is after[:option...] or before."""
    from tune_dynsdpb.tracking import SweepTracker

    name, *options = design.split(":")
    for o in options:
        if o.startswith("concurrent="):
            budget = spec.budget.model_copy(update={"max_concurrent": int(o.split("=")[1])})
            spec = spec.model_copy(update={"budget": budget})
    uri, storage = "sqlite:///" + str(folder / "mlflow.db"), str(folder / "ray")
    groups = [(t.task, m) for t in spec.task_specs() for m in spec.methods]
    state = build_state(spec, storage, uri)
    ProgressTable(state, enabled=False)  # the callback path runs; nothing is drawn
    callbacks, tracker = [], None
    if "no-mlflow" not in options:
        tracker = SweepTracker(uri, spec.name, state.sweep_id, artifact_location=(folder / "mlartifacts").as_uri())
        tracker.start_sweep({"spec": state.spec}, tags={"tune_dynsdpb.output_dir": str(folder)})
        for g in groups:
            tracker.start_arm(*g)
        callbacks.append(tracker.trial_callback(groups))
    if "no-progress" not in options:
        callbacks.append(ProgressCallback())
    if "no-pruner" not in options:
        callbacks.append(CheckpointPruner(storage))
    grids, fits = [], []
    with variant(options):
        if not any(o.startswith("pending=") for o in options):
            configure_tune(spec)
        for i, gs in enumerate([groups] if name == "after" else [[g] for g in groups]):
            f0 = time.time()
            tuner = create_tuner(spec, gs, trainable, storage if name == "after" else f"{storage}/{i}", callbacks,
                                 str(folder / "optuna.journal"))
            grids.append(fit_tuner(tuner, len(gs) * spec.budget.num_samples))
            if tracker is not None:
                callbacks[0].flush()
            fits.append((f0, time.time()))
    return grids, fits, tracker


def run_tune(design: str, spec, shape, folder: Path, loggers: str):
    """A plain ``Tuner`` over the same stand-in trials (``tune`` or ``tune-optuna``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from benchmarks.standin import standin_trainable

    tasks, methods = [t.task for t in spec.task_specs()], list(spec.methods)
    name, *options = design.split(":")
    b, optuna = spec.budget, name == "tune-optuna"
    concurrent = next((int(o.split("=")[1]) for o in options if o.startswith("concurrent=")), None)
    pick = tune.choice if optuna else tune.grid_search
    space = {"task": pick(tasks) if len(tasks) > 1 else tasks[0], "method": pick(methods),
             "learning_rate": tune.loguniform(1e-5, 1e-3), "alpha0": tune.uniform(0.5, 2.0),
             "tau0": tune.uniform(1.0, 5.0), "lambda_alpha": tune.uniform(0.0, 1.0),
             "lambda_tau": tune.uniform(-0.5, 0.5), "num_train_epochs": 1, "per_device_train_batch_size": 16}
    trainable = tune.with_resources(tune.with_parameters(standin_trainable, jobs={t: shape for t in tasks}, data={}),
                                    {"cpu": spec.resources.cpus_per_trial})
    scheduler = None if b.grace_period >= shape.reports else ASHAScheduler(
        time_attr="training_iteration", max_t=shape.reports, grace_period=b.grace_period,
        reduction_factor=b.reduction_factor)
    callbacks, search = [], None
    if optuna:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        from ray.tune.search.optuna import OptunaSearch
        search = OptunaSearch(seed=spec.seed)
        callbacks.append(MLflowLoggerCallback(tracking_uri="sqlite:///" + str(folder / "mlflow.db"),
                                              experiment_name=spec.name, save_artifact=False))
    if loggers == "json":  # Tune's default CSV and TensorBoard loggers off, as in our driver
        from ray.tune.logger import JsonLoggerCallback
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        callbacks.append(JsonLoggerCallback())
    n = b.num_samples * (1 if not optuna else len(methods) * len(tasks))
    tuner = tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
        metric="objective", mode="max", num_samples=n, reuse_actors=True, search_alg=search, scheduler=scheduler,
        max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(folder / "ray"), verbose=0, callbacks=callbacks))
    f0 = time.time()
    grid = tuner.fit()
    return [grid], [(f0, time.time())]


def run_design(design: str, spec, shape, slots: int, work: Path, loggers: str = "default",
               gpu_resources: dict | None = None) -> dict:
    """One design, timed and sampled; its figures (``_trials``: the per-trial records)."""
    from ray import tune

    from benchmarks.standin import standin_trainable
    from tune_dynsdpb import results as R
    from tune_dynsdpb.experiment import create_trainable

    folder = work / design.replace(":", "_").replace("=", "")
    folder.mkdir(parents=True)
    env = dict(os.environ)
    tasks = {t.task: SimpleNamespace(job=shape, train=None, eval=None) for t in spec.task_specs()}
    if gpu_resources is None:  # the driver's own wrapping: data by reference, resources from the spec
        trainable = create_trainable(spec, tasks, trainable=standin_trainable)
    else:
        trainable = tune.with_resources(tune.with_parameters(
            standin_trainable, jobs={n: t.job for n, t in tasks.items()}, data={}), gpu_resources)
    sampler = RaySampler()
    sampler.start()
    cpu0, t0 = self_cpu(), time.time()
    tracker = None
    try:
        if design.startswith("tune"):
            grids, fits = run_tune(design, spec, shape, folder, loggers)
        else:
            grids, fits, tracker = run_ours(design, spec, trainable, folder)
    finally:
        os.environ.clear()
        os.environ.update(env)
    t1 = time.time()
    driver_cpu = self_cpu() - cpu0
    ray_cpu = sampler.finish()
    driver_cpu -= ray_cpu.pop("sampler_cpu_s")
    trials = [rec for grid, fit in zip(grids, fits) for rec in trial_records(grid, fit)]
    counts: dict[str, int] = {}
    for grid in grids:
        for r in grid:
            o = R.classify(r.metrics or {}, r.error is not None).value
            counts[o] = counts.get(o, 0) + 1
    out = {"design": design, "tuners": len(fits), "outcomes": counts,
           **figures(trials, fits, shape.seconds / shape.reports, slots, t0, t1),
           "driver_cpu_s": driver_cpu, **ray_cpu,
           "mlflow_trial_runs": len(tracker.trial_runs()) if tracker else mlflow_runs(folder, spec.name)}
    out["driver_cpu_s_per_1000_results"] = driver_cpu / out["results"] * 1000 if out["results"] else None
    out["_trials"] = trials
    return out
