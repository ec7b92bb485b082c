"""MLflow tracking for a sweep, logged from the Ray Tune driver only.

Run tree (one MLflow experiment per sweep, nested so the UI expands it)::

    experiment <sweep name>                      tags: mlflow.experimentKind (training runs), the
                                                 saved trial view (mlflow.sharedViewState.trials)
    └── <sweep name>             role=sweep      tune_dynsdpb.sweep_id=<id>
        └── rte                  role=task       tune_dynsdpb.task=rte
            ├── rte · dlb        role=arm        tune_dynsdpb.arm=dlb
            │   ├── rte · dlb · trial 1          role=trial, ray.trial_id=<id>
            │   └── ...
            ├── rte · finals-epochs              (compare's finals)
            └── ...

Every run is found by its identifying tags before one is created, so a restarted driver
(``Tuner.restore``) reuses the runs it made before. Workers never touch MLflow: SQLite does
not take concurrent writers well, and one writer (the driver) keeps the store consistent.

The trial callback never writes in Tune's event loop: it queues each write for one background
thread (:class:`_Writer`). Each turn of it (at most one per 5 s, unless a flush is waiting) takes
everything queued and sends one ``log_batch`` per trial run, and it retries a store that is slow or
briefly unreachable with backoff, in order, losing nothing; the sweep waits for the queue to
drain at its end.

A repeated step is never hidden. A trial that reports a step at or below one it already logged
has run again from an earlier point (a retry that restarted from an older checkpoint, or from
step 0; a restored driver whose trial re-runs steps Tune had not saved). The writer logs those
steps again, as a new *attempt*: every report carries the metric ``attempt`` (1, 2, ...) at its
step, the run gets the tag ``tune_dynsdpb.attempts`` (how many), and a warning names the trial
and the steps. A retry that continues from its checkpoint reports only later steps and stays
attempt 1, so a run whose ``step`` history holds a step twice restarted, and says so. Trial outcomes follow :func:`tune_dynsdpb.results.classify`: FINISHED,
KILLED (stopped by the scheduler, tag ``tune_dynsdpb.stopped_by``) or FAILED (tag
``tune_dynsdpb.failure`` or ``tune_dynsdpb.error``). Credentials never reach a record: URIs are
stored redacted (:func:`redact_uri`), and secrets go to MLflow through its own environment
variables (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``/``_TOKEN``, ``MLFLOW_TRACKING_INSECURE_TLS``, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import queue
import re
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.transformers
import torch
import transformers
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.validation import (MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH,
                                     MAX_PARAMS_TAGS_PER_BATCH)
from ray.tune import Callback

from . import results as R
from .errors import StoreError, UserError, one_line

TAG_SWEEP = "tune_dynsdpb.sweep_id"
TAG_ROLE = "tune_dynsdpb.role"
TAG_TASK = "tune_dynsdpb.task"
TAG_ARM = "tune_dynsdpb.arm"
TAG_TRIAL = "ray.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_FAILURE = "tune_dynsdpb.failure"
TAG_STOPPED_BY = "tune_dynsdpb.stopped_by"
TAG_RETRIES = "tune_dynsdpb.retries"
TAG_ERROR = "tune_dynsdpb.error"
TAG_ATTEMPTS = "tune_dynsdpb.attempts"  # set once a trial re-reports a step: it restarted (see the module doc)
ATTEMPT = "attempt"  # metric logged with every report: which attempt of the trial it belongs to
TAG_KIND = "mlflow.experimentKind"
KIND_TRAINING = "custom_model_development"  # MLflow 3.x UIs without the GenAI/Model-training switch
# open such an experiment on its training runs; from 3.1x on the sidebar's switch (or the URL's
# ``workflowType=machine_learning``) picks the view, and the UI no longer reads this tag.
# A saved view of the runs table, as the UI's own "share view" stores one: an experiment tag
# ``mlflow.sharedViewState.<key>`` holding the search (the trial runs, best score first) and the
# columns (each task's score, the method, alpha0/tau0 and the rates), opened by
# ``#/experiments/<id>/runs?viewStateShareKey=<key>`` (see :func:`trial_view_path`).
TAG_VIEW = "mlflow.sharedViewState."
VIEW_KEY = "trials"
VIEW_PARAMS = ("method", "alpha0", "tau0", "lambda_alpha", "lambda_tau", "distill_warmup", "learning_rate")

# Tune bookkeeping in every result that is not a metric worth a chart.
_SKIP_KEYS = {"config", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp", R.TASK, R.METHOD,
              "checkpoint_dir_name", "should_checkpoint", "done", "experiment_tag", R.FAILURE}
_MAX_KEY, _MAX_PARAM, _MAX_TAG = 250, 6000, 8000
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")  # MLflow rejects a whole batch over one bad key
log = logging.getLogger(__name__)


def _key(k: str) -> str:
    return _BAD_KEY_CHARS.sub("_", k)[:_MAX_KEY]


# -- URIs and credentials -------------------------------------------------------------------------
def redact_uri(uri: str) -> str:
    """``uri`` without the password (or token) in its user info: ``https://user:***@host``."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and not (parts.username and "token" in parts.username.lower()):
        return uri
    host = parts.netloc.rpartition("@")[2]  # as written: keeps an IPv6 host's brackets
    user = parts.username or ""
    # a user name without a password is the token itself (``https://<token>@host``): hide it all
    netloc = f"{user}:***@{host}" if user and parts.password is not None else f"***@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _http_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """``uri`` without the user info of an ``http(s)://user:pw@host`` URI, and that (user, password)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.password is not None:
        user = (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password))
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), user
    return uri, None


def use_tracking_uri(uri: str) -> str:
    """The URI to connect with: credentials in ``http(s)://user:pw@host`` move to MLflow's
    ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` for this process (database URIs keep them, since
    their drivers read them there, but are only ever stored and printed redacted)."""
    bare, user = _http_credentials(uri)
    if user is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user[0])
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", user[1])
    return bare


def shown_uri(uri: str) -> str:
    """``uri`` as a sweep's state and console show it: what :func:`use_tracking_uri` connects
    with, redacted (:func:`redact_uri`). The same store given with or without its password shows
    the same."""
    return redact_uri(_http_credentials(uri)[0])


def open_tracking_uri(saved: str, given: str | None = None, flag: str = "--tracking-uri") -> str:
    """The URI to connect with: ``given`` (its http credentials moved to MLflow's env variables),
    else the sweep's ``saved`` one, which is redacted: a secret it held must be given again."""
    if given:
        return use_tracking_uri(given)
    if "***" in saved:
        raise UserError(f"{flag}: the sweep's tracking URI {saved} held a password; pass the URI again "
                        "(or set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)")
    return saved


def default_tracking_uri(output_dir) -> str:
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlflow.db")


def default_artifact_location(output_dir) -> str:
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Raise :class:`UserError` naming ``uri`` (redacted) when the tracking store cannot be used."""
    shown = redact_uri(uri)
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme.startswith("sqlite"):
        path = uri.split("://", 1)[1][1:] if "://" in uri else ""
        if path in ("", ":memory:"):
            return
        db, folder = Path(path), Path(path).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"MLflow tracking URI {shown}: folder {folder} does not exist or is not writable")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise UserError(f"MLflow tracking URI {shown}: database {db} is not writable")
        return
    err: list[BaseException] = []  # ask MLflow itself, in a thread so a hanging store cannot block us

    def probe():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except BaseException as e:  # noqa: BLE001
            err.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise UserError(f"MLflow tracking URI {shown} did not answer within {timeout:g} s")
    if err:
        text = one_line(err[0]).replace(uri, shown)
        raise UserError(f"MLflow tracking URI {shown} is not usable: {text}")


# -- values ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def fluent_tracking(uri: str | None):
    """Points MLflow's fluent API (tracking and registry) at ``uri`` for the block, then puts back
    what was there before, environment variables included (``set_*_uri`` export them). None: as is."""
    if uri is None:
        yield
        return
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    # What was *set* (None: nothing), not what the getters resolve: putting back a resolved default
    # (``sqlite:///mlflow.db`` in the working directory) would pin it for every later client.
    saved = (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None), env["MLFLOW_REGISTRY_URI"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key, sep))
        else:
            out[key] = v
    return out


def params_of(d: dict) -> dict[str, str]:
    out = {}
    for k, v in _flatten(d).items():
        if v is None or isinstance(v, (str, int, float, bool)):
            s = str(v)
        else:
            try:  # lists, tuples: JSON. Objects are skipped: their repr (an address) changes
                s = json.dumps(v)  # between restarts and MLflow refuses to change a param
            except (TypeError, ValueError):
                continue
        out[_key(k)] = s[:_MAX_PARAM]
    return out


def metrics_of(result: dict, now_ms: int) -> tuple[int, list[Metric]]:
    """The result's numbers as MLflow metrics at its step, stamped with the time the trial reported."""
    step = int(result.get(R.STEP, result.get("training_iteration", 0)) or 0)
    if isinstance(result.get("timestamp"), (int, float)):
        now_ms = int(result["timestamp"] * 1000)
    out = [Metric(_key(k), float(v), now_ms, step)
           for k, v in _flatten({k: v for k, v in result.items() if k not in _SKIP_KEYS}, sep="/").items()
           if isinstance(v, numbers.Real)]  # bools too; NaN/inf are kept
    return step, out


def ident_filter(tags: dict) -> str:
    """An MLflow search filter matching every tag of ``tags``."""
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def _find_or_create(client: MlflowClient, exp_id: str, ident: dict, extra: dict, name: str) -> str:
    found = client.search_runs([exp_id], ident_filter(ident), max_results=1,
                               order_by=["attributes.start_time ASC"])  # the oldest, if ever two
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, tags={**ident, **extra}, run_name=name).info.run_id


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    have = client.get_run(run_id).data.params  # a reused run has its params; MLflow refuses changes
    todo = [Param(k, v) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[i:i + 100])


def _reopen(client: MlflowClient, run_id: str) -> None:
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


# -- what the MLflow UI opens on -------------------------------------------------------------------
def trial_view(metrics: dict[str, str]) -> dict[str, str]:
    """The experiment tags of the trial-runs view, for ``metrics`` = {metric key: mode} of the
    sweep's tasks (e.g. ``{"eval_accuracy": "max"}``): the trial runs alone, sorted by the task's
    score (by ``objective`` when tasks differ), with the score, method, α0/τ0 and rate columns.
    A sort on a metric also lists the trials flat rather than folded under their arm runs."""
    if len(metrics) == 1:
        (key, mode), = metrics.items()
    else:
        key, mode = R.OBJECTIVE, R.MODE
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in VIEW_PARAMS]
    view = {"searchFilter": f"tags.`{TAG_ROLE}` = 'trial'", "orderByKey": f"metrics.`{key}`",
            "orderByAsc": mode == "min", "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
            "modelVersionFilter": "All Runs", "selectedColumns": columns}
    return {TAG_KIND: KIND_TRAINING, TAG_VIEW + VIEW_KEY: json.dumps(view)}


def trial_view_path(experiment_id: str) -> str:
    """The MLflow UI's page of the trial-runs view, in the model-training view: append it to the
    UI's address (``http://127.0.0.1:5000/``)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


# -- the sweep's runs -----------------------------------------------------------------------------
def start_sweep_tracking(tracking_uri: str, out: Path, state, tasks: dict, groups: list[tuple[str, str]]
                         ) -> "SweepTracker":
    """The MLflow runs of a sweep (``state``, a ``SweepState``), its tasks and arms (found again on a
    resume), the trial view the UI opens on, and each task's truncation counts (``tasks``:
    ``experiment.PreparedTask``); the sweep run's id goes into the state. A SQLite store keeps its
    artifacts in ``out/mlartifacts``."""
    tracker = SweepTracker(tracking_uri, state.spec["name"], state.sweep_id,
                           artifact_location=default_artifact_location(out) if tracking_uri.startswith("sqlite")
                           else None)
    state.parent_run_id = tracker.start_sweep(
        {"spec": state.spec, "model": state.model_path, "methods": ",".join(state.methods), "tasks": ",".join(tasks)},
        tags={"tune_dynsdpb.output_dir": str(out)})
    for n, m in groups:
        tracker.start_arm(n, m)
    tracker.set_trial_view({t.metric: t.mode for t in tasks.values()})  # what the MLflow UI opens on
    for n, t in tasks.items():  # nothing dropped in silence: the truncation counts too
        tracker.log_truncation(n, t.truncation)
    return tracker


class SweepTracker:
    """Owns the sweep, task and arm runs; hands Tune one :class:`MLflowTrialCallback`."""

    def __init__(self, tracking_uri: str, experiment_name: str, sweep_id: str,
                 artifact_location: str | None = None):
        if "'" in sweep_id or '"' in sweep_id:
            raise UserError(f"sweep id {sweep_id!r} must not contain quotes")
        self.tracking_uri, self.sweep_id, self.experiment_name = tracking_uri, sweep_id, experiment_name
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            try:
                self._exp_id = self.client.create_experiment(experiment_name, artifact_location,
                                                             tags={TAG_KIND: KIND_TRAINING})
            except MlflowException:  # created meanwhile by someone else
                self._exp_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self._exp_id = exp.experiment_id
            self.client.set_experiment_tag(self._exp_id, TAG_KIND, KIND_TRAINING)
        self._parent: str | None = None
        self._runs: dict[tuple, str] = {}

    @property
    def experiment_id(self) -> str:
        return self._exp_id

    def set_trial_view(self, metrics: dict[str, str]) -> str:
        """Tags the experiment with the trial-runs view (:func:`trial_view`); returns its UI path."""
        for k, v in trial_view(metrics).items():
            self.client.set_experiment_tag(self._exp_id, k, v)
        return trial_view_path(self._exp_id)

    @property
    def parent_run_id(self) -> str:
        if self._parent is None:
            found = self.client.search_runs([self._exp_id], ident_filter(self._ident("sweep")), max_results=1)
            if not found:
                raise UserError(f"the sweep's parent run (sweep id {self.sweep_id}) is missing from "
                                f"{redact_uri(self.tracking_uri)}")
            self._parent = found[0].info.run_id
        return self._parent

    def _ident(self, role: str, task: str | None = None, arm: str | None = None) -> dict:
        ident = {TAG_SWEEP: self.sweep_id, TAG_ROLE: role}
        if task is not None:
            ident[TAG_TASK] = task
        if arm is not None:
            ident[TAG_ARM] = arm
        return ident

    def start_sweep(self, params: dict, tags: dict | None = None) -> str:
        self._parent = _find_or_create(self.client, self._exp_id, self._ident("sweep"), {}, self.experiment_name)
        _reopen(self.client, self._parent)
        _log_params(self.client, self._parent, params_of(params))
        for k, v in (tags or {}).items():
            self.client.set_tag(self._parent, k, str(v)[:_MAX_TAG])
        return self._parent

    def task_run(self, task: str) -> str:
        if ("task", task) not in self._runs:
            self._runs["task", task] = _find_or_create(self.client, self._exp_id, self._ident("task", task),
                                                      {TAG_PARENT: self.parent_run_id}, task)
        return self._runs["task", task]

    def log_truncation(self, task: str, counts: dict) -> None:
        """The task run's truncation counts (split -> ``data.TruncationCount``) as params, so that
        nothing is cut or dropped in silence: ``samples_<split>`` (before tokenization),
        ``truncated_<split>`` (cut, or for causal LMs dropped, at ``max_length``) and, for causal
        LMs, ``dropped_<split>``. A resumed sweep finds them logged already (same data)."""
        params = {}
        for split, c in counts.items():
            params[f"samples_{split}"] = str(c.total)
            params[f"truncated_{split}"] = str(c.truncated)
            if c.kind == "causal_lm":
                params[f"dropped_{split}"] = str(c.dropped)
            params["max_length"] = str(c.max_length)
        _log_params(self.client, self.task_run(task), params)

    def arm_run(self, task: str, arm: str) -> str:
        if ("arm", task, arm) not in self._runs:
            self._runs["arm", task, arm] = _find_or_create(
                self.client, self._exp_id, self._ident("arm", task, arm), {TAG_PARENT: self.task_run(task)},
                f"{task} · {arm}")
        return self._runs["arm", task, arm]

    def start_arm(self, task: str, arm: str) -> str:
        _reopen(self.client, self.task_run(task))
        run_id = self.arm_run(task, arm)
        _reopen(self.client, run_id)
        return run_id

    def trial_callback(self, groups: list[tuple[str, str]], arm: str | None = None) -> "MLflowTrialCallback":
        """The callback that logs each trial under its (task, arm) run; ``arm`` files every trial
        under that arm instead of its config's method (compare's ``finals-<budget>``). Tune pickles
        it, so a URI that still holds a secret (a database URI) is not kept in it: the callback
        then reads ``MLFLOW_TRACKING_URI``, which is set here for this process."""
        uri = self.tracking_uri
        if redact_uri(uri) != uri:
            os.environ["MLFLOW_TRACKING_URI"] = uri
            uri = None
        return MLflowTrialCallback(uri, self._exp_id, self.sweep_id, {g: self.arm_run(*g) for g in groups}, arm)

    def find_trial_run(self, task: str, arm: str, trial_id: str) -> str | None:
        found = self.client.search_runs([self._exp_id], ident_filter({**self._ident("trial", task, arm),
                                                                      TAG_TRIAL: trial_id}), max_results=1)
        return found[0].info.run_id if found else None

    def record_best(self, task: str, arm: str, trial_run_id: str | None, config: dict, metric: str,
                    value: float, baseline: float | None = None, schedule: list | None = None) -> None:
        """An arm's best trial on the task, arm and sweep runs; a pbt arm's learned ``schedule``
        also as the trial run's ``schedule_alpha``/``schedule_tau`` at each breakpoint's step and,
        on the trial and arm runs, the tag ``best.schedule`` (JSON)."""
        now = int(time.time() * 1000)
        cfg = json.dumps(config, default=str, sort_keys=True)[:_MAX_TAG]
        up = [RunTag(f"best.{arm}.config", cfg)] + ([RunTag(f"best.{arm}.run_id", trial_run_id)] if trial_run_id else [])
        arm_tags = [RunTag("best.config", cfg)] + ([RunTag("best.run_id", trial_run_id)] if trial_run_id else [])
        self.client.log_batch(self.task_run(task), tags=up, metrics=[Metric(f"best_{arm}_{metric}", float(value), now, 0)]
                              + ([Metric(f"baseline_{metric}", float(baseline), now, 0)] if baseline is not None else []))
        self.client.log_batch(self.parent_run_id, tags=[RunTag(f"best.{task}.{arm}.config", cfg)],
                              metrics=[Metric(f"best_{task}_{arm}_{metric}", float(value), now, 0)])
        if schedule:
            tag = RunTag("best.schedule", json.dumps(schedule))
            arm_tags.append(tag)
            if trial_run_id:
                self.client.log_batch(trial_run_id, tags=[tag], metrics=[
                    Metric(name, float(v), now, int(step)) for step, a, t in schedule
                    for name, v in (("schedule_alpha", a), ("schedule_tau", t))])
        self.client.log_batch(self.arm_run(task, arm), tags=arm_tags,
                              metrics=[Metric(f"best_{metric}", float(value), now, 0)])

    def record_outcomes(self, grid, groups: list[tuple[str, str]], state, trial_ids: set[str]) -> None:
        """After the experiment: what a killed driver had queued and not written (from Tune's
        ``grid``), trial runs of Tune trials that no longer exist deleted (``trial_ids`` are the
        trials that do), and each arm's best trial of ``state`` (a ``SweepState``) recorded, with
        its trial run's id put into the state."""
        self.trial_callback(groups).backfill(grid)
        self.delete_orphans(trial_ids)
        for arm in state.arms.values():
            if arm.best is not None:
                arm.best.run_id = self.find_trial_run(arm.task, arm.method, arm.best.trial_id)
                t = state.tasks[arm.task]
                self.record_best(arm.task, arm.method, arm.best.run_id, arm.best.config, t.metric, arm.best.score,
                                 t.baseline, arm.best.schedule)

    # -- what compare and export ask of the store (they never hold a client) ----------------------
    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Logs the params the run does not have yet (MLflow refuses to change one)."""
        _log_params(self.client, run_id, {k: str(v)[:_MAX_PARAM] for k, v in params.items()})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(_key(k), float(v), now, step) for k, v in metrics.items()])

    def metric_history(self, run_id: str, key: str) -> list[float]:
        return [m.value for m in self.client.get_metric_history(run_id, key)]

    def delete_runs(self, runs: list[Run]) -> None:
        """Soft-deletes runs (``mlflow gc`` or a restore can follow)."""
        for run in runs:
            self.client.delete_run(run.info.run_id)

    def artifact_store(self, run_id: str) -> str:
        """The run's artifact location, credentials redacted (names the store in errors)."""
        try:
            return redact_uri(self.client.get_run(run_id).info.artifact_uri)
        except Exception:  # noqa: BLE001
            return f"the artifact store of {redact_uri(self.tracking_uri)}"

    def missing_artifacts(self, run_id: str, folder: str | os.PathLike, artifact_path: str) -> list[str]:
        """The files of the local ``folder`` (relative paths) that the run's ``artifact_path`` lacks,
        or holds with another size. Raises :class:`StoreError` when the store cannot be listed."""
        folder = Path(folder)
        local = {f.relative_to(folder).as_posix(): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
        try:
            stored = self._list_files(run_id, artifact_path)
        except Exception as e:  # noqa: BLE001 - an unreachable or failing artifact store
            raise StoreError(f"MLflow artifact store {self.artifact_store(run_id)}: cannot list {artifact_path}: "
                             f"{one_line(e)}") from None
        return sorted(k for k, size in local.items() if stored.get(k) != size)

    def _list_files(self, run_id: str, path: str, base: str | None = None) -> dict[str, int]:
        base = path if base is None else base
        out = {}
        for info in self.client.list_artifacts(run_id, path):
            if info.is_dir:
                out.update(self._list_files(run_id, info.path, base))
            else:
                out[info.path[len(base):].lstrip("/")] = info.file_size
        return out

    def upload_artifacts(self, run_id: str, folder: str | os.PathLike, artifact_path: str,
                         files: list[str] | None = None) -> None:
        """Uploads the local ``folder`` (or only ``files`` of it) under the run's ``artifact_path``.
        A failing store raises :class:`StoreError`: one line naming the store and the cause."""
        folder = Path(folder)
        try:
            if files is None:
                self.client.log_artifacts(run_id, str(folder), artifact_path)
            for rel in files or []:
                parent = Path(rel).parent.as_posix()
                self.client.log_artifact(run_id, str(folder / rel),
                                         artifact_path if parent == "." else f"{artifact_path}/{parent}")
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"MLflow artifact store {self.artifact_store(run_id)}: cannot upload {artifact_path}: "
                             f"{one_line(e)}") from None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def finish_sweep(self, status: str = "FINISHED") -> None:
        for key, run_id in self._runs.items():
            if key[0] in ("task", "arm") and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status)
        self.client.set_terminated(self.parent_run_id, status)

    def trial_runs(self, task: str | None = None, arm: str | None = None) -> list[Run]:
        return self.search(self._ident("trial", task, arm))

    def search(self, ident: dict) -> list[Run]:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self._exp_id], ident_filter(ident), max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def delete_orphans(self, keep_trial_ids: set[str]) -> int:
        """Soft-deletes trial runs whose Tune trial no longer exists (a trial a killed driver had
        started after Tune's last state save comes back under a new id); returns how many."""
        gone = [r for r in self.trial_runs() if r.data.tags.get(TAG_TRIAL) not in keep_trial_ids
                and not r.data.tags.get(TAG_ARM, "").startswith("finals-")]
        for r in gone:
            self.client.delete_run(r.info.run_id)
        return len(gone)


class _Pending:
    """What one turn of the writer sends to one trial run, in the order it was queued."""

    def __init__(self, group: tuple):
        self.group, self.start, self.params, self.reports, self.tags, self.status = group, False, {}, [], {}, None


class _Writer:
    """The driver's one MLflow writer: a FIFO of writes done by a background thread.

    Each turn takes everything queued (after waiting until ``turn_s`` has passed since the last
    turn began, unless a flush is queued), groups it by trial run and sends one ``log_batch`` per
    run: its params, every report's metrics at their own steps and its tags (split only above
    MLflow's limits per batch), then ends the run if it ended. A run's writes keep their order; a
    flush is answered once everything queued before it is written. A write that fails is retried
    with backoff until it succeeds, so a slow or briefly unreachable server delays logging but
    loses nothing and never holds Tune's loop. A report at a step the run already logged starts a
    new attempt (module doc): it is logged, never dropped. ``start=False`` leaves the thread to be
    started by the caller."""

    def __init__(self, uri: str, experiment_id: str, sweep_id: str, arm_runs: dict, start: bool = True,
                 turn_s: float = 5.0):
        self.client = MlflowClient(uri)
        self.exp_id, self.sweep_id, self.arm_runs, self.turn_s = experiment_id, sweep_id, arm_runs, turn_s
        self.queue: queue.Queue = queue.Queue()
        self.runs: dict[str, str] = {}       # trial id -> run id
        self.last_step: dict[str, int] = {}  # trial id -> step of its last report logged
        self.attempts: dict[str, int] = {}   # trial id -> its current attempt (1 + restarts seen)
        self.params: dict[str, set] = {}     # trial id -> the param keys its run has (MLflow refuses changes)
        self.running: set[str] = set()       # trial ids whose run is RUNNING
        self.names: dict[tuple, int] = {}    # group -> trial runs named so far
        self.groups: dict[str, tuple] = {}   # trial id -> its (task, arm), once its run is known
        self.turn_began = -float("inf")
        self.thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        if start:
            self.thread.start()

    def put(self, op: tuple) -> None:
        self.queue.put(op)

    def flush(self, timeout: float = 600.0) -> bool:
        done = threading.Event()
        self.queue.put(("flush", done))
        return done.wait(timeout)

    def _loop(self) -> None:
        while True:
            self._turn(self._take())

    def _take(self) -> list[tuple]:
        """One turn's ops: the next one, then what comes until ``turn_s`` after the last turn
        began, then what else is queued; up to and including a flush, which ends the wait."""
        ops = [self.queue.get()]
        deadline = self.turn_began + self.turn_s
        while ops[-1][0] != "flush":
            try:  # past the deadline (timeout 0) this still takes what is queued, without waiting
                ops.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        self.turn_began = time.monotonic()
        return ops

    def _turn(self, ops: list[tuple]) -> None:
        todo: dict[str, _Pending] = {}  # trial id -> its writes of this turn
        for op in ops:
            kind = op[0]
            if kind == "flush":
                self._write_all(todo)
                op[1].set()
                continue
            if kind == "backfill":  # ("backfill", id, group, params, reports, tags, status)
                self._write_all(todo)
                self._backfill(*op[1:])
                continue
            # ("start", id, group, params) ("metrics", (id, group), metrics, step) ("tags", id, group, tags)
            # ("end", id, group, tags, status)
            trial_id, group = op[1] if kind == "metrics" else op[1:3]
            p = todo.get(trial_id)
            if p is not None and p.status is not None:  # more for a run that ended: end it first
                self._write(trial_id, todo.pop(trial_id))
                p = None
            if p is None:
                p = todo[trial_id] = _Pending(group)
            if kind == "start":
                p.start = True
                p.params.update(op[3])
            elif kind == "metrics":
                p.reports.append((op[3], op[2]))
            else:
                p.tags.update(op[3])
                if kind == "end":
                    p.status = op[4]
        self._write_all(todo)

    def _write_all(self, todo: dict) -> None:
        for trial_id, p in todo.items():
            self._write(trial_id, p)
        todo.clear()

    def _retry(self, call):
        delay = 0.5
        while True:
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - the store is down or slow: wait and retry
                log.warning("MLflow write failed (%s); retrying in %.0f s", one_line(e), delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _write(self, trial_id: str, p: _Pending) -> None:
        run_id = self._retry(lambda: self._run(trial_id, p.group))
        if p.start and trial_id not in self.running:  # a run found in the store, or ended before
            self._retry(lambda: self.client.update_run(run_id, status="RUNNING"))
            self.running.add(trial_id)
        have = self.params[trial_id]
        params = [Param(k, v) for k, v in p.params.items() if k not in have]
        have.update(p.params)
        last, attempt, metrics = self.last_step[trial_id], self.attempts[trial_id], []
        for step, reported in p.reports:
            if step <= last:  # it runs again from an earlier point: log it as a new attempt
                attempt += 1
                log.warning("trial %s reports step %d again (it had reached step %d): it restarted from an "
                            "earlier point; logging its steps again as attempt %d", trial_id, step, last, attempt)
            stamp = reported[0].timestamp if reported else int(time.time() * 1000)
            metrics += [*reported, Metric(ATTEMPT, float(attempt), stamp, step)]
            last = step
        tags = {TAG_ATTEMPTS: str(attempt)} if attempt != self.attempts[trial_id] else {}
        tags = [RunTag(k, v[:_MAX_TAG]) for k, v in {**p.tags, **tags}.items()]
        self.last_step[trial_id], self.attempts[trial_id] = last, attempt
        while metrics or params or tags:  # MLflow's limits per log_batch
            ps, ts = params[:MAX_PARAMS_TAGS_PER_BATCH], tags[:MAX_PARAMS_TAGS_PER_BATCH]
            ms = metrics[:min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(ps) - len(ts))]
            self._retry(lambda: self.client.log_batch(run_id, metrics=ms, params=ps, tags=ts))
            metrics, params, tags = metrics[len(ms):], params[len(ps):], tags[len(ts):]
        if p.status is not None:
            self._retry(lambda: self.client.set_terminated(run_id, p.status))
            self.running.discard(trial_id)

    def _backfill(self, trial_id: str, group: tuple, params: dict, reports: list, tags: dict, status: str) -> None:
        """A trial Tune ended whose run misses reports or its end (a driver killed while writes were
        queued): the reports after the last step its run has, then its end. Said on stderr."""
        run_id = self._retry(lambda: self._run(trial_id, group))
        missing = [(step, metrics) for step, metrics in reports if step > self.last_step[trial_id]]
        if not missing and trial_id not in self.running:
            return
        log.warning("trial %s: %d report(s) or its end were missing from its MLflow run %s (the driver stopped with "
                    "writes queued, or Tune stopped the trial before it reported, as a time budget does); logged "
                    "now from its result.json", trial_id, len(missing), run_id)
        p = _Pending(group)
        p.params, p.reports, p.tags, p.status = params, missing, tags, status
        self._write(trial_id, p)

    def _run(self, trial_id: str, group: tuple) -> str:
        if trial_id not in self.runs:
            ident = {TAG_SWEEP: self.sweep_id, TAG_ROLE: "trial", TAG_TASK: group[0], TAG_ARM: group[1],
                     TAG_TRIAL: trial_id}
            found = self.client.search_runs([self.exp_id], ident_filter(ident), max_results=1)
            if found:
                run = found[0]  # logged before (a restored driver): carry on from its history
                run_id = run.info.run_id
                # (MLflow's latest value is the one at the highest step, not the last one logged)
                steps = self.client.get_metric_history(run_id, R.STEP)
                attempts = self.client.get_metric_history(run_id, ATTEMPT)
                last = max(steps, key=lambda m: (m.timestamp, m.step)) if steps else None
                self.last_step[trial_id] = int(last.value) if last is not None else -1
                self.attempts[trial_id] = int(max(m.value for m in attempts)) if attempts else 1
                self.params[trial_id] = set(run.data.params)
                if run.info.status == "RUNNING":
                    self.running.add(trial_id)
            else:
                n = self.names.get(group)
                if n is None:
                    n = len(self.client.search_runs([self.exp_id], ident_filter({k: v for k, v in ident.items()
                                                                                 if k != TAG_TRIAL})))
                run_id = self.client.create_run(self.exp_id, run_name=f"{group[0]} · {group[1]} · trial {n + 1}",
                                                tags={**ident, TAG_PARENT: self.arm_runs[group]}).info.run_id
                self.names[group] = n + 1
                self.last_step[trial_id], self.attempts[trial_id], self.params[trial_id] = -1, 1, set()
                self.running.add(trial_id)
            self.runs[trial_id], self.groups[trial_id] = run_id, group
        return self.runs[trial_id]


_WRITERS: dict[tuple, _Writer] = {}  # one per (uri, sweep) in the driver process


class MLflowTrialCallback(Callback):
    """One MLflow run per Tune trial, written from the driver through a :class:`_Writer`.
    Picklable: Tune stores the callbacks in ``tuner.pkl``; ``Tuner.restore`` brings this object
    back, which finds its runs again by their tags."""

    def __init__(self, tracking_uri: str | None, experiment_id: str, sweep_id: str, arm_runs: dict,
                 arm: str | None = None):
        self.tracking_uri, self.experiment_id, self.sweep_id = tracking_uri, experiment_id, sweep_id
        self.arm_runs, self.arm = dict(arm_runs), arm

    @property
    def writer(self) -> _Writer:
        key = (self.tracking_uri, self.sweep_id, self.arm, tuple(sorted(self.arm_runs.items())))
        if key not in _WRITERS:
            _WRITERS[key] = _Writer(self.tracking_uri, self.experiment_id, self.sweep_id, self.arm_runs)
        return _WRITERS[key]

    def flush(self, timeout: float = 600.0) -> bool:
        return self.writer.flush(timeout)

    def _group(self, trial) -> tuple[str, str]:
        c = trial.config or {}
        return c.get(R.TASK), self.arm or c.get(R.METHOD)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.writer.put(("start", trial.trial_id, self._group(trial), params_of(trial.config or {})))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, metrics = metrics_of(result, int(time.time() * 1000))
        self.writer.put(("metrics", (trial.trial_id, self._group(trial)), metrics, step))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.writer.put(("end", trial.trial_id, self._group(trial), *_end_of(trial.last_result or {})))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.writer.put(("tags", trial.trial_id, self._group(trial),
                         {TAG_RETRIES: str(getattr(trial, "num_failures", 1))}))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.writer.put(("end", trial.trial_id, self._group(trial), {TAG_ERROR: error_line(trial)[:5000]}, "FAILED"))

    def on_experiment_end(self, trials, **info):
        self.flush()

    def backfill(self, grid) -> None:
        """After the experiment: every trial of ``grid`` (Tune's results) whose run the writer did not
        see end in this process (a resumed driver) gets what its run misses from its ``result.json``:
        a driver killed before its queued writes went out loses no trial run and no report."""
        w = self.writer
        w.flush()
        for result in grid:
            last = result.metrics or {}
            trial_id = last.get("trial_id")
            if not trial_id or (trial_id in w.runs and trial_id not in w.running):
                continue
            try:
                with result.filesystem.open_input_stream(f"{result.path}/result.json") as f:
                    rows = [json.loads(line) for line in f.readall().decode().splitlines() if line.strip()]
            except FileNotFoundError:
                rows = []
            # A trial Tune stopped before its first report (the time budget ran out) has no config in
            # its result: its run's group as the writer knows it, else as its last logged row says.
            config = result.config or (rows[-1].get("config") if rows else None)
            group = self._group(SimpleNamespace(config=config)) if config else w.groups.get(trial_id)
            if group is None:  # never started, never reported: no run to make
                continue
            reports = [metrics_of(r, int(time.time() * 1000)) for r in rows]
            params = params_of(result.config or {})
            if result.error is None:
                end = _end_of(last)
            else:
                end = ({TAG_ERROR: one_line(result.error)[:5000]}, "FAILED")
            w.put(("backfill", trial_id, group, params, reports, *end))
        w.flush()


def _end_of(last: dict) -> tuple[dict, str]:
    """A trial run's end tags and status, from its last report (:func:`tune_dynsdpb.results.classify`)."""
    outcome = R.classify(last)
    tags = {}
    if outcome is R.Outcome.FAILED:
        tags[TAG_FAILURE] = str(R.failure_reason(last))
    elif outcome is R.Outcome.STOPPED:
        tags[TAG_STOPPED_BY] = "scheduler"
    return tags, {R.Outcome.FINISHED: "FINISHED", R.Outcome.STOPPED: "KILLED", R.Outcome.FAILED: "FAILED"}[outcome]


def error_line(trial) -> str:
    """The user's exception as 'Type: message' from Tune's error text (its last line)."""
    try:
        text = trial.get_error() if hasattr(trial, "get_error") else ""
    except Exception:  # noqa: BLE001 - never let error reporting crash the driver
        text = ""
    if not text and getattr(trial, "error_file", None) and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"  # a traceback ends with "ValueError: boom"


# -- the model registry (export) ------------------------------------------------------------------
TAG_MODEL_TASK = "tune_dynsdpb.task"


class Registry:
    """The MLflow Model Registry, as ``export`` uses it: every registry call goes through here.

    A registered model carries its task (tag ``tune_dynsdpb.task``); versions get aliases only once
    all of an export's versions exist; :meth:`rollback` undoes one export and touches only what it
    made (see its docstring)."""

    def __init__(self, uri_or_client):
        self.uri = None if isinstance(uri_or_client, MlflowClient) else uri_or_client
        self.client = uri_or_client if isinstance(uri_or_client, MlflowClient) else \
            MlflowClient(uri_or_client, registry_uri=uri_or_client)

    def check_name(self, name: str, task: str) -> bool:
        """Refuses a registered model of another task; returns whether ``name`` exists already."""
        try:
            model = self.client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise UserError(f"--name: {name!r}: {one_line(e)}") from None
        have = model.tags.get(TAG_MODEL_TASK)
        if have is None and self.client.search_model_versions(f"name = '{name}'", max_results=1):
            raise UserError(f"--name: registered model {name!r} already holds models of an unknown task "
                            f"(no {TAG_MODEL_TASK} tag); pick another name")
        if have is not None and have != task:
            raise UserError(f"--name: registered model {name!r} holds {have} models; this sweep's task is {task}")
        return True

    def create_model(self, name: str, task: str, tags: dict) -> bool:
        """Creates the registered model; returns whether it existed (a concurrent export made it
        first: it is shared, never deleted by this one's roll-back)."""
        try:
            self.client.create_registered_model(name, tags={TAG_MODEL_TASK: task, **tags})
            return False
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.check_name(name, task)

    def tag_model(self, name: str, key: str, value: str) -> None:
        self.client.set_registered_model_tag(name, key, value)

    def alias_versions(self, name: str, aliases) -> dict[str, str]:
        """{alias: version} of the aliases that exist."""
        out = {}
        for alias in aliases:
            with contextlib.suppress(Exception):
                out[alias] = str(self.client.get_model_version_by_alias(name, alias).version)
        return out

    def create_version(self, name: str, source: str, run_id: str, tags: dict, model_id: str | None) -> str:
        with fluent_tracking(self.uri):  # the registry resolves a models:/ source through the fluent URI
            return str(self.client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                                        model_id=model_id).version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def log_transformers_model(self, run_id: str, name: str, model, tokenizer, task: str, example: list,
                               output, model_config: dict | None) -> tuple[str, str]:
        """Logs ``model`` and ``tokenizer`` (their weights and files: no hub reference) as the
        transformers pipeline ``task`` called ``name`` in run ``run_id``; returns (model URI, model
        id). ``example`` and the pipeline's ``output`` for it make the signature and the input
        example; the requirements pin this environment's mlflow, transformers and torch."""
        reqs = [f"mlflow=={mlflow.__version__}", f"transformers=={transformers.__version__}",
                f"torch=={torch.__version__.split('+')[0]}"]
        with fluent_tracking(self.uri), mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer}, task=task, name=name,
                signature=infer_signature(example, output), input_example=example, model_config=model_config,
                pip_requirements=reqs)
        return info.model_uri, info.model_id

    def start_run(self, experiment_id: str, run_name: str, tags: dict) -> str:
        return self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def end_run(self, run_id: str) -> None:
        self.client.set_terminated(run_id)

    def discard(self, run_id: str, logged_models: list[str]) -> None:
        """Deletes an export's logged models and its run (after a failure)."""
        for model_id in logged_models:
            with contextlib.suppress(Exception):
                self.client.delete_logged_model(model_id)
        with contextlib.suppress(Exception):
            self.client.delete_run(run_id)

    def rollback(self, name: str, created: list[str], before: dict[str, str], existed: bool) -> None:
        """Undoes one export, touching only what it made, so that a concurrent export survives it:

        * an alias is put back (or removed, if it had no version before) only while it still points
          at a version this export created; an alias another export has moved since is left alone;
        * the versions this export created are deleted;
        * the registered model is deleted only if this export created it and no version is left in it."""
        client = self.client
        mine = {str(v) for v in created}
        for alias in before.keys() | self._aliases(name):
            try:
                now = client.get_model_version_by_alias(name, alias).version
            except Exception:  # noqa: BLE001 - no such alias (any more)
                continue
            if str(now) not in mine:
                continue
            with contextlib.suppress(Exception):
                if alias in before:
                    client.set_registered_model_alias(name, alias, before[alias])
                else:
                    client.delete_registered_model_alias(name, alias)
        for version in created:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, version)
        if not existed:
            with contextlib.suppress(Exception):
                if not client.search_model_versions(f"name = '{name}'", max_results=1):
                    client.delete_registered_model(name)

    def _aliases(self, name: str) -> set[str]:
        try:
            return set(self.client.get_registered_model(name).aliases)
        except Exception:  # noqa: BLE001
            return set()


def download_model(model_uri: str, dst: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """The artifacts of a logged or registered model (e.g. ``models:/NAME@champion``) downloaded
    into ``dst``; a one-line UserError naming ``--model`` when MLflow cannot give them."""
    try:
        with fluent_tracking(tracking_uri):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise UserError(f"--model: cannot load {model_uri}: {one_line(e)}") from None
