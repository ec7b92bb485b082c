"""A retried single-process trial continues from its checkpoint, through Tune, on the real trainable.

Two trials of one identical config (same seed) run side by side in one Tune experiment with
``trainables.dynsdpb.train_dynsdpb``. The process of one of them is killed (SIGKILL, from a Tune
callback: ``tests/faults.py``) once Tune holds its first checkpoint; Tune retries it. The retry
must pick up that checkpoint: its first report after the restore is the step after the
checkpoint's (a restart from 0 would report the checkpoint's step again), no step is reported
twice (the retry's rows in Tune's own result log; the MLflow run, through the real
``MLflowTrialCallback``, has every step exactly once), and it
ends with exactly the uninterrupted trial's metrics and weights. A retry that restarted from step
0 would end with the same numbers (the run is deterministic), which is why the steps are checked
as well.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

CONFIG = {"task": "rte", "method": "dynsdpb", "num_train_epochs": 2, "per_device_train_batch_size": 16,
          "alpha0": 1.0, "tau0": 2.0, "lambda_alpha": 0.5, "lambda_tau": 0.5}
# 64 samples, B/2 = 8 new per step: 8 steps an epoch, 2 evaluations (and checkpoints) an epoch
REPORTED_STEPS = [4, 8, 12, 16]
FINAL_KEYS = ("eval_loss", "eval_accuracy", "loss", "ce_loss", "consistency_loss", "alpha_mean", "alpha_min",
              "alpha_max", "tau_mean", "tau_min", "tau_max", "u_mean", "c_mean", "objective", "step",
              "sample_passes")


def test_a_retried_trial_continues_from_its_checkpoint(ray_session, tiny_bert, data_dir, tmp_path):
    import torch
    from mlflow import MlflowClient
    from ray import tune
    from safetensors.torch import load_file

    from faults import KillOnFirstCheckpoint, killed
    from sweeps import spec_file
    from trainables.dynsdpb import train_dynsdpb
    from tune_dynsdpb.experiment import prepare_tasks
    from tune_dynsdpb.search_space import load_search_space
    from tune_dynsdpb.tracking import ATTEMPT, TAG_ATTEMPTS, TAG_RETRIES, SweepTracker, default_tracking_uri

    token = tmp_path / "kill.token"
    token.write_text("")
    spec = load_search_space(spec_file(tmp_path, tiny_bert, name="resume", methods=["dynsdpb"]))
    (prepared,) = prepare_tasks(spec, str(tiny_bert), tmp_path / "cache", "spec", data_dir=str(data_dir)).values()
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
                                  callbacks=[tracker.trial_callback([("rte", "dynsdpb")]),
                                             KillOnFirstCheckpoint(str(token), "trial")],
                                  failure_config=tune.FailureConfig(max_failures=1)))
    grid = tuner.fit()
    (pid,) = killed(token)  # the crash was delivered
    assert grid.num_errors == 0

    results = {r.metrics["trial_id"]: r for r in grid}
    log = {t: r.metrics_dataframe for t, r in results.items()}  # Tune's own log of every report
    runs = {r.data.tags["ray.trial_id"]: r for r in tracker.trial_runs("rte", "dynsdpb")}
    (retried,) = [t for t, r in runs.items() if TAG_RETRIES in r.data.tags]  # (on_trial_recover)
    (plain,) = [t for t in log if t != retried]
    assert log[plain]["step"].tolist() == REPORTED_STEPS
    assert log[plain]["iterations_since_restore"].tolist() == [1, 2, 3, 4]
    # The retry's own reports: after the checkpoint's step, each once, counted from the restore. (The
    # killed attempt's report may be missing here: on a retry Tune copies the trial's result.json
    # back from the storage path, which lacks the rows written since its last sync. MLflow has it.)
    df = log[retried]
    seen = df[["step", "pid", "iterations_since_restore"]].values.tolist()
    after = df[df["pid"] != pid]
    assert after["step"].tolist() == REPORTED_STEPS[1:], (pid, seen)
    assert after["iterations_since_restore"].tolist() == [1, 2, 3], (pid, seen)
    assert after["pid"].nunique() == 1, (pid, seen)
    a, b = results[plain].metrics, results[retried].metrics
    assert a["final"] and b["final"]
    assert {k: b[k] for k in FINAL_KEYS} == pytest.approx({k: a[k] for k in FINAL_KEYS}, rel=1e-6, abs=1e-9)
    wa = load_file(os.path.join(results[plain].checkpoint.path, "model.safetensors"))
    wb = load_file(os.path.join(results[retried].checkpoint.path, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)

    client = MlflowClient(tracker.tracking_uri)  # the MLflow run: one attempt, every step once
    run = runs[retried]
    assert int(run.data.tags[TAG_RETRIES]) == 1 and TAG_ATTEMPTS not in run.data.tags
    logged = sorted(client.get_metric_history(run.info.run_id, "step"), key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in logged] == REPORTED_STEPS
    assert {m.value for m in client.get_metric_history(run.info.run_id, ATTEMPT)} == {1.0}
