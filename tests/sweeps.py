"""Sweep files and MLflow look-ups shared by the sweep, compare and export tests."""

from __future__ import annotations

import re
from pathlib import Path

import yaml


def spec_dict(model: Path, name="e2e", methods=("vanilla", "dlb", "dynsdpb"), num_samples=2, grace_period=1,
              tasks=None, **extra) -> dict:
    spec = {
        "name": name, "model": str(model), "max_length": 32, "methods": list(methods), "seed": 0,
        "budget": {"num_samples": num_samples, "evals_per_epoch": 2, "grace_period": grace_period,
                   "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1},
        "params": {
            "common": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "num_train_epochs": 1,
                       "per_device_train_batch_size": 16},
            "dlb": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0}},
            "dlb_warmup": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0},
                           "distill_warmup": {"low": 0.05, "high": 0.5}},
            "dynsdpb": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0},
                        "lambda_alpha": {"low": 0.0, "high": 1.0}, "lambda_tau": {"low": 0.1, "high": 1.0}},
        },
    }
    if tasks is None:
        spec["task"] = "rte"
    else:
        spec["tasks"] = [t if isinstance(t, dict) else {"task": t} for t in tasks]
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    return spec


def spec_file(tmp_path: Path, model: Path, name="e2e", **kw) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_dict(model, name=name, **kw)))
    return path


def client_for(uri):
    """A client of ``uri`` for tracking and registry alike (without ``registry_uri``, MLflow takes a
    registry URI that any earlier code in this process set globally)."""
    from mlflow import MlflowClient
    return MlflowClient(uri, registry_uri=uri)


def runs_by_role(client, experiment_name) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    out: dict[str, list] = {"sweep": [], "task": [], "arm": [], "trial": [], "export": []}
    for r in runs:
        out[r.data.tags["tune_dynsdpb.role"]].append(r)
    return out


def check_tree(client, name: str, tasks: list[str], methods: list[str], budget: int) -> dict:
    """The MLflow tree of a finished sweep: parent → task → arm → exactly ``budget`` trial runs per
    (task, arm), none RUNNING, no trial id twice, no metric step logged twice unless as a new attempt."""
    runs = runs_by_role(client, name)
    (parent,) = runs["sweep"]
    assert parent.info.status == "FINISHED"
    task_runs = {r.data.tags["tune_dynsdpb.task"]: r for r in runs["task"]}
    assert set(task_runs) == set(tasks)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in task_runs.values())
    for task in tasks:
        arms = {r.data.tags["tune_dynsdpb.arm"]: r for r in runs["arm"] if r.data.tags["tune_dynsdpb.task"] == task
                and not r.data.tags["tune_dynsdpb.arm"].startswith("finals-")}
        assert set(arms) == set(methods)
        for method in methods:
            assert arms[method].data.tags["mlflow.parentRunId"] == task_runs[task].info.run_id
            assert arms[method].info.run_name == f"{task} · {method}"
            trials = [r for r in runs["trial"] if r.data.tags["tune_dynsdpb.task"] == task
                      and r.data.tags["tune_dynsdpb.arm"] == method]
            assert len(trials) == budget, (task, method, len(trials))
            assert len({r.data.tags["ray.trial_id"] for r in trials}) == budget
            names = {r.info.run_name for r in trials}  # readable, distinct (after a SIGKILL the numbers
            assert len(names) == budget             # of deleted orphan runs are not reused)
            assert all(re.fullmatch(f"{task} · {method} · trial [0-9]+", n) for n in names), names
            for r in trials:
                assert r.data.tags["mlflow.parentRunId"] == arms[method].info.run_id
                assert r.info.status in {"FINISHED", "KILLED", "FAILED"}, r.info.status
                steps = [m.step for m in client.get_metric_history(r.info.run_id, "step")]
                # a step logged twice only as a marked new attempt (a trial that ran steps again after
                # the driver was killed before Tune saved them: tracking.py's module doc)
                if len(steps) != len(set(steps)):
                    assert int(r.data.tags.get("tune_dynsdpb.attempts", 1)) > 1, (r.info.run_name, steps)
    return runs
