"""A retried single-process trial continues from its checkpoint, through Tune, on the real trainable.

Two trials of one identical config (same seed) run side by side in one Tune experiment with
``trainables.dynsdpb.train_dynsdpb``. One of them crashes once, right after its first reported
checkpoint; Tune retries it. The retry must pick up that checkpoint: its training starts at the
checkpoint's global step (not 0), no step is reported twice (Tune's own result log and the MLflow
run through the real ``MLflowTrialCallback``), and it ends with exactly the uninterrupted trial's
metrics and weights. A retry that restarted from step 0 would end with the same numbers (the run
is deterministic), which is why the steps are checked as well.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.slow

CONFIG = {"task": "rte", "method": "dynsdpb", "num_train_epochs": 2, "per_device_train_batch_size": 16,
          "alpha0": 1.0, "tau0": 2.0, "lambda_alpha": 0.5, "lambda_tau": 0.5}
# 64 samples, B/2 = 8 new per step: 8 steps an epoch, 2 evaluations (and checkpoints) an epoch
REPORTED_STEPS = [4, 8, 12, 16]
FINAL_KEYS = ("eval_loss", "eval_accuracy", "loss", "ce_loss", "consistency_loss", "alpha_mean", "alpha_min",
              "alpha_max", "tau_mean", "tau_min", "tau_max", "u_mean", "c_mean", "objective", "step",
              "sample_passes")


class CrashOnce:
    """A TrainerCallback: the first trial to take the token file crashes right after its first
    reported checkpoint (the trainable's reporter runs before the job's callbacks)."""

    def __init__(self, token: str):
        self.token = token

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_save(self, args, state, control, **kw):
        try:
            os.remove(self.token)
        except FileNotFoundError:
            return
        raise RuntimeError("injected crash (resume test)")


class AttemptLog:
    """A TrainerCallback: every ``trainer.train()`` (every attempt of a trial) appends one line,
    its trial id and the global step its training starts from."""

    def __init__(self, path: str):
        self.path = path

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kw):
        from ray import tune

        with open(self.path, "a") as f:
            f.write(json.dumps({"trial": tune.get_context().get_trial_id(), "start": state.global_step}) + "\n")


def test_a_retried_trial_continues_from_its_checkpoint(ray_session, tiny_bert, data_dir, tmp_path):
    import ray
    import torch
    from mlflow import MlflowClient
    from ray import tune
    from safetensors.torch import load_file

    from sweeps import spec_file
    from trainables.dynsdpb import train_dynsdpb
    from tune_dynsdpb.experiment import prepare_tasks
    from tune_dynsdpb.search_space import load_search_space
    from tune_dynsdpb.tracking import ATTEMPT, TAG_ATTEMPTS, SweepTracker, default_tracking_uri

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    token, attempts = tmp_path / "crash.token", tmp_path / "attempts.jsonl"
    token.write_text("")
    spec = load_search_space(spec_file(tmp_path, tiny_bert, name="resume", methods=["dynsdpb"]))
    (prepared,) = prepare_tasks(spec, str(tiny_bert), tmp_path / "cache", "spec", data_dir=str(data_dir),
                                callbacks=[CrashOnce(str(token)), AttemptLog(str(attempts))]).values()
    tracker = SweepTracker(default_tracking_uri(tmp_path), "resume", "resume1")
    tracker.start_sweep({})
    trainable = tune.with_resources(
        tune.with_parameters(train_dynsdpb, jobs={"rte": prepared.job}, data={"rte": (prepared.train, prepared.eval)}),
        {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={**CONFIG, "learning_rate": tune.grid_search([1e-3, 1e-3])},  # two identical trials
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(name="resume", storage_path=str(tmp_path / "ray"), verbose=0,
                                  callbacks=[tracker.trial_callback([("rte", "dynsdpb")])],
                                  failure_config=tune.FailureConfig(max_failures=1)))
    grid = tuner.fit()
    assert not token.exists()  # the crash was delivered
    assert grid.num_errors == 0

    starts: dict[str, list[int]] = {}
    for line in attempts.read_text().splitlines():
        row = json.loads(line)
        starts.setdefault(row["trial"], []).append(row["start"])
    (retried,) = [t for t, s in starts.items() if len(s) == 2]
    (plain,) = [t for t, s in starts.items() if len(s) == 1]
    assert starts[plain] == [0]
    assert starts[retried] == [0, REPORTED_STEPS[0]], starts  # the retry starts at its checkpoint's step

    results = {r.metrics["trial_id"]: r for r in grid}
    for trial in (plain, retried):  # Tune's own log of every report, both attempts: each step once
        steps = results[trial].metrics_dataframe["step"].tolist()
        assert steps == REPORTED_STEPS, (trial, steps)
    a, b = results[plain].metrics, results[retried].metrics
    assert a["final"] and b["final"]
    assert {k: b[k] for k in FINAL_KEYS} == pytest.approx({k: a[k] for k in FINAL_KEYS}, rel=1e-6, abs=1e-9)
    wa = load_file(os.path.join(results[plain].checkpoint.path, "model.safetensors"))
    wb = load_file(os.path.join(results[retried].checkpoint.path, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)

    client = MlflowClient(tracker.tracking_uri)  # the MLflow run: one attempt, every step once
    runs = {r.data.tags["ray.trial_id"]: r for r in tracker.trial_runs("rte", "dynsdpb")}
    run = runs[retried]
    assert int(run.data.tags["tune_dynsdpb.retries"]) == 1 and TAG_ATTEMPTS not in run.data.tags
    logged = sorted(client.get_metric_history(run.info.run_id, "step"), key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in logged] == REPORTED_STEPS
    assert {m.value for m in client.get_metric_history(run.info.run_id, ATTEMPT)} == {1.0}
