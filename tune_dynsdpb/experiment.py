"""The set-up that ``sweep`` and ``compare`` share: Ray, resources, and each task made ready.

    init_ray(address)                       # local Ray, or join a cluster (token auth handled)
    check_resources(spec)                   # a trial that no node can hold fails here, not in Tune
    tasks = prepare_tasks(spec, ...)        # per task: data, metric/mode, tokenized splits, Job
    preflight(spec, tasks)                  # one real step per task: settings that fail every trial fail once
    trainable = create_trainable(spec, tasks)

Ray, Tune and ``trainables`` (which import Ray) are imported inside the functions: the CLI imports
this module for :func:`set_ray_env`, which must run before anything imports ``ray``.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import optuna
import transformers

from .baselines import trivial_baseline
from .data import check_truncation, count_truncation, fingerprint, load_task, tokenize_task, truncation_summary
from .errors import UserError, one_line
from .params import passes_per_epoch
from .run import load_model, resolve_model_path
from .search_space import PAIRED, Choices, Range, SweepSpec, TaskSpec, check_regression_arms, config_name, resolve_metric


# What the trial actors need in their environment. TUNE_FUNCTION_THREAD_TIMEOUT_S: a pbt member
# that PBT/PB2 moves to new alpha0/tau0 is reset in its actor, and Tune gives the stopped training
# thread 2 s to end before it fails the trial ("Could not re-use actor"); a trial's thread unwinds
# its Trainer and frees its memory first, which took longer on a loaded 2-core machine (seen in CI).
# A local Ray's workers inherit these from the driver; on `ray start` nodes, set them there.
WORKER_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "60"}


def quiet_libraries(verbose: bool = False) -> None:
    """Our live table replaces Ray's console output; keep Ray, Optuna, datasets and transformers
    to warnings (everything shows with ``verbose``)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for k, v in WORKER_ENV.items():  # (the workers of a local Ray inherit them)
        os.environ.setdefault(k, v)
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    if verbose:
        return
    # MLflow prints "View run ... at URL" for each run it ends on a tracking server: one line per
    # trial between our table's frames; the header names the tracking URI once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    for name in ("alembic", "mlflow", "ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING if name != "alembic" else logging.ERROR)
    # an interrupted trial has no result file yet: Tune's warning about it is noise here
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # PB2 (budget.pbt_scheduler) refits its GP on a few points at each perturbation: scikit-learn's
    # ConvergenceWarning about a kernel bound is expected there, one per fit
    warnings.filterwarnings("ignore", message="The optimal value found for dimension", module="sklearn")


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def set_ray_env(address: str | None = None) -> None:
    """The environment Ray reads when it is imported: token authentication on when joining a
    cluster with a token at hand, off for a private local Ray."""
    if address and "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    elif not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: no token to manage


def sigterm_as_interrupt() -> None:
    """SIGTERM (a preempted node, Slurm, Kubernetes) stops the driver as Ctrl-C does: as a SIGINT,
    which Tune turns into a clean stop (state saved) and which is a KeyboardInterrupt elsewhere."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def init_ray(address: str | None = None, temp_dir: str | None = None, verbose: bool = False) -> None:
    """Starts a local Ray, or joins the cluster at ``address``. Ray 2.60's clusters use token
    authentication: when a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``), joining turns it on; without one, the error says what to set. (Ray
    reads ``RAY_AUTH_MODE`` once, when it is first imported: call :func:`set_ray_env` before
    anything imports ``ray``, as the CLI does.)"""
    set_ray_env(address)
    import ray  # here: set_ray_env must run before ray is first imported

    quiet_libraries(verbose)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose, "configure_logging": verbose}
    if address:
        kwargs["address"] = address
    elif temp_dir:
        kwargs["_temp_dir"] = temp_dir
    hint = ("" if _token_available() else "; if the cluster uses token authentication (Ray's default), set "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the head's token (`ray get-auth-token` on the head)")
    try:
        ray.init(**kwargs)
        sigterm_as_interrupt()  # (ray.init installs a SIGTERM handler that exits at once)
    except ray.exceptions.AuthenticationError:
        raise UserError(f"--ray-address: the Ray cluster at {address!r} rejected this driver's token: set "
                        "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the head's token "
                        "(`ray get-auth-token` on the head)") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--ray-address: cannot join Ray at {address!r}: {one_line(e)}{hint}") from None


def check_resources(spec: SweepSpec, where: str) -> None:
    """Rejects a per-trial request that no node (or, for multi-worker trials, no cluster) can meet."""
    import ray  # here: see init_ray

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


def trial_resources(spec: SweepSpec):
    from trainables.distributed import create_trial_resources  # here: the trainables import Ray (see init_ray)
    r = spec.resources
    return create_trial_resources(r.cpus_per_trial, r.gpus_per_trial, r.workers_per_trial)


@dataclass
class PreparedTask:
    """One task of a sweep, ready for trials: its data, metric, tokenized splits and Job."""
    spec: TaskSpec
    task: Any            # tune_dynsdpb.data.Task
    metric: str
    mode: str
    train: Any           # tokenized datasets.Dataset
    eval: Any
    job: Any             # trainables.dynsdpb.Job
    data_hash: str
    baseline: float | None
    truncation: dict     # split -> data.TruncationCount: samples cut (causal LMs: dropped) at max_length

    def truncation_summary(self) -> str:
        """One line with every split's count, e.g. ``task rte: samples cut at max_length=128: train
        304 of 2490 (12.2%), eval 33 of 277 (11.9%)``."""
        return truncation_summary(self.truncation)


def prepare_tasks(spec: SweepSpec, model: str, cache_dir: Path, where: str, data_dir: str | None = None,
                  say=None) -> dict[str, PreparedTask]:
    """Loads, checks and tokenizes every task of ``spec`` (``data_dir`` overrides the file's) for
    ``model`` (resolved by :func:`~tune_dynsdpb.run.resolve_model_path`: each Job holds the path).

    Truncation is counted for every split, and handed to ``say`` (e.g. ``print``) as one line per
    task; it is refused only above the task's ``max_truncated_fraction``, or where dropping the
    causal-LM samples whose answer would lose tokens leaves a split empty."""
    from trainables.dynsdpb import Job  # here: see trial_resources

    lora = spec.lora.model_dump() if spec.lora else None
    out: dict[str, PreparedTask] = {}
    for ts in spec.task_specs():
        task = load_task(ts.task, data_dir or ts.data_dir, max_train_samples=ts.max_train_samples,
                         max_eval_samples=ts.max_eval_samples, seed=spec.seed)
        metric, mode = resolve_metric(ts, task.metrics or (task.metric,), task.metric, task.metric_mode, where)
        if task.kind == "regression":
            check_regression_arms(spec, task.name, where)
        model_path = resolve_model_path(model)  # (a folder, or an installed model package's)
        try:
            _, tokenizer = load_model(model_path, task, lora=lora)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. LoRA target modules the model does not have
            raise UserError(f"{where}: task {task.name}: cannot build the model: {type(e).__name__}: "
                            f"{one_line(e)}") from None
        truncation = count_truncation(task, tokenizer, ts.max_length)
        try:
            check_truncation(truncation, ts.max_truncated_fraction)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if say is not None:
            say(f"truncation: {truncation_summary(truncation)}")
        train, evals = tokenize_task(task, tokenizer, ts.max_length, cache_dir=cache_dir)
        r = spec.resources
        job = Job(model_path=model_path, task=task, metric=metric, mode=mode,
                  evals_per_epoch=spec.budget.evals_per_epoch, seed=spec.seed, cpus_per_trial=r.cpus_per_trial,
                  gpus_per_trial=r.gpus_per_trial, workers_per_trial=r.workers_per_trial, lora=lora,
                  training=spec.training_kwargs())
        data_hash = fingerprint(task)
        baseline = None if task.kind == "causal_lm" else trivial_baseline(metric, task.eval["label"],
                                                                           task.compute_metrics)
        out[task.name] = PreparedTask(ts, task, metric, mode, train, evals, job, data_hash, baseline, truncation)
    return out


def order_groups(tasks: dict[str, PreparedTask], methods) -> list[tuple[str, str]]:
    """The (task, arm) groups, costliest trial first (tokens of the task's train split x the
    method's passes per sample and epoch). Each round of the round-robin then sends its long trials
    out first and its short ones last, where they fill the slots the long ones leave (longest
    processing time first), instead of one long trial running alone at the end of the sweep."""
    tokens = {n: sum(map(len, t.train["input_ids"])) for n, t in tasks.items()}
    groups = [(n, m) for n in tasks for m in methods]  # sorted() is stable: ties keep the spec's order
    return sorted(groups, key=lambda g: -tokens[g[0]] * passes_per_epoch(g[1]))


def preflight(spec: SweepSpec, tasks: dict[str, PreparedTask], where: str, say=None) -> None:
    """Two real training steps per task with the first arm's first point, in this process, so that
    a setting that would fail in every trial (an unknown optimizer, fp16 on a CPU, LoRA modules the
    model lacks, a tokenizer without a pad token, ...) fails once, now, with one line (``say``, e.g.
    ``print``, is told first)."""
    from trainables.dynsdpb import fit  # here: see trial_resources

    from .searching import create_points_to_evaluate  # (imports Ray)

    if say is not None:
        say(f"preflight: one training step per task ({', '.join(tasks)}) ...", flush=True)
    method = next((m for m in spec.methods if m in PAIRED), spec.methods[0])
    point: dict[str, Any] = {}
    for name, p in spec.params.arm(method).items():
        if isinstance(p, Range):
            point[config_name(name)] = int(p.low) if p.int_ else p.low
        elif isinstance(p, Choices):
            point[config_name(name)] = p.choices[0]
        else:
            point[config_name(name)] = p
    point.update((create_points_to_evaluate(spec, method) or [{}])[0])
    point.setdefault("per_device_train_batch_size", 8)
    for name, t in tasks.items():
        job = t.job
        if job.distributed:  # the DDP path runs in the trials only
            continue
        pre = type(job)(**{**job.__dict__, "training": {**job.training, "max_steps": 2}})
        n = min(len(t.train), 2 * int(point["per_device_train_batch_size"]))
        with tempfile.TemporaryDirectory(prefix="dynsdpb-preflight-") as work:
            try:
                fit({**point, "task": name, "method": method}, pre, t.train.select(range(n)),
                    t.eval.select(range(min(len(t.eval), 8))), lambda metrics, ckpt: None, None, work)
            except UserError as e:
                raise UserError(f"{where}: task {name}: {e}") from None
            except Exception as e:  # noqa: BLE001 - any failure here would fail every trial
                raise UserError(f"{where}: task {name}: a training step with the {method} arm's first point "
                                f"fails: {type(e).__name__}: {one_line(e)}") from None


def create_trainable(spec: SweepSpec, tasks: dict[str, PreparedTask], trainable=None):
    """The Tune trainable with every task's Job and data by reference, and the trial's resources."""
    from ray import tune  # here: see init_ray

    from trainables.dynsdpb import train_dynsdpb  # here: see trial_resources

    jobs = {name: t.job for name, t in tasks.items()}
    data = {name: (t.train, t.eval) for name, t in tasks.items()}
    return tune.with_resources(tune.with_parameters(trainable or train_dynsdpb, jobs=jobs, data=data),
                               trial_resources(spec))
