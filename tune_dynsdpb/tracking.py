"""MLflow tracking for a sweep, logged from the Ray Tune driver only.

Run tree (one MLflow experiment per sweep)::

    experiment <experiment_name>
    └── sweep run          tags: tune_dynsdpb.sweep_id=<id>, tune_dynsdpb.role=sweep
        ├── arm run        tags: role=arm, tune_dynsdpb.arm=vanilla, mlflow.parentRunId=<sweep>
        │   ├── trial run  tags: role=trial, arm=vanilla, ray.trial_id=<id>, mlflow.parentRunId=<arm>
        │   └── trial run  ...
        ├── arm run        (dlb)      ...
        └── arm run        (dynsdpb)  ...

Every run is found by its identifying tags before one is created, so a restarted driver
(``Tuner.restore``) reuses the runs it made before. Workers never touch MLflow: SQLite does
not take concurrent writers well, and one writer (the driver) keeps the store consistent.

Trial end states (``on_trial_complete`` fires for both a trial that ran to its end and one
the scheduler stopped, and Tune marks both ``done=True``), so the trainable's *last* report
decides:

* key ``dynsdpb_failure`` (a reason string)  -> FAILED, tag ``tune_dynsdpb.failure``
* key ``final`` truthy (the trainable's own last report) -> FINISHED
* otherwise (stopped early by the scheduler or a stop criterion) -> KILLED,
  tag ``tune_dynsdpb.stopped_by=scheduler``

A crash Tune retries keeps the run RUNNING and bumps tag ``tune_dynsdpb.retries``; a permanent
error is FAILED with tag ``tune_dynsdpb.error``.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
import ray.cloudpickle as ray_pickle
from ray.tune import Callback

from tune_dynsdpb.errors import UserError

TAG_SWEEP = "tune_dynsdpb.sweep_id"
TAG_ROLE = "tune_dynsdpb.role"
TAG_ARM = "tune_dynsdpb.arm"
TAG_TRIAL = "ray.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_FAILURE = "tune_dynsdpb.failure"
TAG_STOPPED_BY = "tune_dynsdpb.stopped_by"
TAG_RETRIES = "tune_dynsdpb.retries"
TAG_ERROR = "tune_dynsdpb.error"

# Tune bookkeeping in every result that is not a metric worth a chart.
_SKIP_KEYS = {"config", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp",
              "checkpoint_dir_name", "should_checkpoint", "done", "experiment_tag"}
_MAX_KEY, _MAX_PARAM, _MAX_TAG = 250, 6000, 8000
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")  # MLflow rejects a whole batch over one bad key


def _key(k: str) -> str:
    return _BAD_KEY_CHARS.sub("_", k)[:_MAX_KEY]


def default_tracking_uri(output_dir) -> str:
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlflow.db")


def default_artifact_location(output_dir) -> str:
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()


def _one_line(exc: BaseException | str) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`UserError` naming ``uri`` when the tracking store cannot be used."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        try:
            try:
                urllib.request.urlopen(base + "/health", timeout=timeout).close()
            except urllib.error.HTTPError:  # no /health there (a proxy, a prefix): ask the API
                urllib.request.urlopen(base + "/api/2.0/mlflow/experiments/search?max_results=1",
                                       timeout=timeout).close()
        except Exception as e:  # noqa: BLE001 - any failure means "unreachable"
            raise UserError(f"MLflow tracking URI {uri} is unreachable: {_one_line(e)}") from None
        return
    if scheme.startswith("sqlite"):
        path = uri.split("://", 1)[1][1:] if "://" in uri else ""
        if path in ("", ":memory:"):
            return
        db, folder = Path(path), Path(path).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"MLflow tracking URI {uri}: folder {folder} does not exist or is not writable")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise UserError(f"MLflow tracking URI {uri}: database {db} is not writable")
        return
    # Anything else: ask MLflow itself, in a thread so a hanging store cannot block us.
    err: list[BaseException] = []

    def probe():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except BaseException as e:  # noqa: BLE001
            err.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise UserError(f"MLflow tracking URI {uri} did not answer within {timeout:g} s")
    if err:
        raise UserError(f"MLflow tracking URI {uri} is not usable: {_one_line(err[0])}")


def _flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key, sep))
        else:
            out[key] = v
    return out


def _params(d: dict) -> dict[str, str]:
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


def _filter(tags: dict) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def _find_or_create(client: MlflowClient, exp_id: str, ident: dict, extra: dict, name: str) -> str:
    found = client.search_runs([exp_id], _filter(ident), max_results=1,
                               order_by=["attributes.start_time ASC"])  # the oldest, if ever two
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, tags={**ident, **extra}, run_name=name).info.run_id


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    # A reused run already has its params; MLflow refuses to overwrite them with new values.
    have = client.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[i:i + 100])


def _reopen(client: MlflowClient, run_id: str) -> None:
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


class SweepTracker:
    """Owns the sweep and arm runs; hands one :class:`MLflowTrialCallback` per arm to Tune."""

    def __init__(self, tracking_uri: str, experiment_name: str, sweep_id: str,
                 artifact_location: str | None = None):
        if "'" in sweep_id or '"' in sweep_id:
            raise UserError(f"sweep id {sweep_id!r} must not contain quotes")
        self.tracking_uri, self.sweep_id = tracking_uri, sweep_id
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            try:
                self._exp_id = self.client.create_experiment(experiment_name, artifact_location)
            except MlflowException:  # created meanwhile by someone else
                self._exp_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self._exp_id = exp.experiment_id
        self._parent: str | None = None
        self._arms: dict[str, str] = {}

    @property
    def experiment_id(self) -> str:
        return self._exp_id

    @property
    def parent_run_id(self) -> str:
        if self._parent is None:
            found = self.client.search_runs([self._exp_id], _filter(self._sweep_ident()), max_results=1)
            if not found:
                raise RuntimeError("start_sweep() has not been called for this sweep")
            self._parent = found[0].info.run_id
        return self._parent

    def _sweep_ident(self) -> dict:
        return {TAG_SWEEP: self.sweep_id, TAG_ROLE: "sweep"}

    def start_sweep(self, params: dict, tags: dict | None = None) -> str:
        self._parent = _find_or_create(self.client, self._exp_id, self._sweep_ident(), {}, self.sweep_id)
        _reopen(self.client, self._parent)
        _log_params(self.client, self._parent, _params(params))
        for k, v in (tags or {}).items():
            self.client.set_tag(self._parent, k, str(v)[:_MAX_TAG])
        return self._parent

    def _arm_run_id(self, method: str) -> str:
        if method not in self._arms:
            ident = {TAG_SWEEP: self.sweep_id, TAG_ROLE: "arm", TAG_ARM: method}
            self._arms[method] = _find_or_create(self.client, self._exp_id, ident,
                                                 {TAG_PARENT: self.parent_run_id}, method)
        return self._arms[method]

    def start_arm(self, method: str) -> str:
        run_id = self._arm_run_id(method)
        _reopen(self.client, run_id)
        return run_id

    def trial_callback(self, method: str) -> MLflowTrialCallback:
        return MLflowTrialCallback(self.tracking_uri, self._exp_id, self.sweep_id, method,
                                   self._arm_run_id(method))

    def find_trial_run(self, method: str, trial_id: str) -> str | None:
        ident = {TAG_SWEEP: self.sweep_id, TAG_ROLE: "trial", TAG_ARM: method, TAG_TRIAL: trial_id}
        found = self.client.search_runs([self._exp_id], _filter(ident), max_results=1)
        return found[0].info.run_id if found else None

    def record_best(self, method: str, trial_run_id: str | None, config: dict, metric: str,
                    value: float) -> None:
        now = int(time.time() * 1000)
        cfg = json.dumps(config, default=str, sort_keys=True)[:_MAX_TAG]
        parent_tags = [RunTag(f"best.{method}.config", cfg)]
        arm_tags = [RunTag("best.config", cfg)]
        if trial_run_id:
            parent_tags.append(RunTag(f"best.{method}.run_id", trial_run_id))
            arm_tags.append(RunTag("best.run_id", trial_run_id))
        self.client.log_batch(self.parent_run_id, tags=parent_tags,
                              metrics=[Metric(f"best_{method}_{metric}", float(value), now, 0)])
        self.client.log_batch(self._arm_run_id(method), tags=arm_tags,
                              metrics=[Metric(f"best_{metric}", float(value), now, 0)])

    def finish_arm(self, method: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(self._arm_run_id(method), status)

    def finish_sweep(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status)

    def trial_runs(self, method: str | None = None) -> list[Run]:
        ident = {TAG_SWEEP: self.sweep_id, TAG_ROLE: "trial"}
        if method is not None:
            ident[TAG_ARM] = method
        runs, token = [], None
        while True:
            page = self.client.search_runs([self._exp_id], _filter(ident), max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs


class MLflowTrialCallback(Callback):
    """One MLflow run per Tune trial, written from the driver. Picklable: Tune stores the
    callbacks in ``tuner.pkl`` and ``Tuner.restore`` brings this object back without a client."""

    def __init__(self, tracking_uri: str, experiment_id: str, sweep_id: str, method: str, arm_run_id: str):
        self.tracking_uri, self.experiment_id, self.sweep_id = tracking_uri, experiment_id, sweep_id
        self.method, self.arm_run_id = method, arm_run_id
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id; a cache only, MLflow tags are the truth

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            ident = {TAG_SWEEP: self.sweep_id, TAG_ROLE: "trial", TAG_ARM: self.method, TAG_TRIAL: tid}
            self._runs[tid] = _find_or_create(self.client, self.experiment_id, ident,
                                              {TAG_PARENT: self.arm_run_id}, str(trial) or tid)
        return self._runs[tid]

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        _reopen(self.client, run_id)
        _log_params(self.client, run_id, _params(trial.config or {}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("step", result.get("training_iteration", 0)) or 0)
        now = int(time.time() * 1000)
        metrics = []
        for k, v in _flatten({k: v for k, v in result.items() if k not in _SKIP_KEYS}, sep="/").items():
            if isinstance(v, numbers.Real):  # bools too; NaN/inf are kept
                metrics.append(Metric(_key(k), float(v), now, step))
        run_id = self._run_id(trial)
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        run_id = self._run_id(trial)
        if last.get("dynsdpb_failure"):
            self.client.set_tag(run_id, TAG_FAILURE, str(last["dynsdpb_failure"])[:_MAX_TAG])
            status = "FAILED"
        elif last.get("final"):
            status = "FINISHED"
        else:  # Tune ended it before the trainable's own last report
            self.client.set_tag(run_id, TAG_STOPPED_BY, "scheduler")
            status = "KILLED"
        self.client.set_terminated(run_id, status)

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        count = int(self.client.get_run(run_id).data.tags.get(TAG_RETRIES, "0")) + 1
        self.client.set_tag(run_id, TAG_RETRIES, str(count))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self.client.set_tag(run_id, TAG_ERROR, _error_line(trial)[:5000])
        self.client.set_terminated(run_id, "FAILED")


def _error_line(trial) -> str:
    """The user's exception as 'Type: message', not Ray's wrapper header. Error files land in
    the trial's local driver folder first (synced to storage later), so read those first."""
    try:
        local = trial.pickled_error_file
        if local and os.path.exists(local):
            with open(local, "rb") as f:
                err = ray_pickle.load(f)
        else:
            err = trial.get_pickled_error()
        cause = getattr(err, "cause", None) or err  # RayTaskError wraps the user's exception
        if cause is not None:
            first = (str(cause).strip().splitlines() or [""])[0]
            return f"{type(cause).__name__}: {first}" if first else type(cause).__name__
        local = trial.error_file
        text = Path(local).read_text(errors="replace") if local and os.path.exists(local) else trial.get_error()
    except Exception:  # noqa: BLE001 - never let error reporting crash the driver
        text = ""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"  # a traceback ends with "ValueError: boom"
