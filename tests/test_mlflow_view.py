"""What the MLflow UI opens a sweep on: the trial runs, with the score, method, alpha0/tau0 and rate
columns, set through experiment tags only (the view a person saves with the UI's "share" button)."""

import json
import re
from pathlib import Path

import pytest

from tune_dynsdpb import results as R
from tune_dynsdpb.tracking import (KIND_TRAINING, TAG_KIND, TAG_VIEW, VIEW_KEY, VIEW_PARAMS, SweepTracker,
                                   trial_view, trial_view_path)


def test_trial_view_sorts_by_the_tasks_score_and_shows_the_method_columns():
    tags = trial_view({"eval_accuracy": "max"})
    assert tags[TAG_KIND] == KIND_TRAINING
    view = json.loads(tags[TAG_VIEW + VIEW_KEY])
    assert view["searchFilter"] == "tags.`tune_dynsdpb.role` = 'trial'"
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`eval_accuracy`", False)  # a metric sort: flat list
    assert view["selectedColumns"][:5] == ["metrics.`eval_accuracy`", "params.`method`", "params.`alpha0`",
                                           "params.`tau0`", "params.`lambda_alpha`"]
    assert {"params.`lambda_tau`", "params.`learning_rate`"} <= set(view["selectedColumns"])
    loss = json.loads(trial_view({"eval_loss": "min"})[TAG_VIEW + VIEW_KEY])
    assert (loss["orderByKey"], loss["orderByAsc"]) == ("metrics.`eval_loss`", True)
    both = json.loads(trial_view({"eval_loss": "min", "eval_accuracy": "max"})[TAG_VIEW + VIEW_KEY])
    assert (both["orderByKey"], both["orderByAsc"]) == (f"metrics.`{R.OBJECTIVE}`", False)  # tasks differ
    assert both["selectedColumns"][:2] == ["metrics.`eval_loss`", "metrics.`eval_accuracy`"]
    assert trial_view_path("7") == "#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=trials"


def test_the_tracker_tags_the_experiment(tmp_path):
    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", "view", "abc123")
    path = tracker.set_trial_view({"eval_accuracy": "max"})
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags[TAG_KIND] == KIND_TRAINING and json.loads(tags[TAG_VIEW + VIEW_KEY])["selectedColumns"]
    assert path == trial_view_path(tracker.experiment_id)
    tracker.set_trial_view({"eval_accuracy": "max"})  # a resumed sweep: the same tags again, no error


def _ui_bundle() -> str:
    import mlflow
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    if not js.is_dir():
        pytest.skip("this mlflow has no UI build")
    return "".join(p.read_text(errors="replace") for p in js.glob("*.js"))


def test_the_installed_mlflow_ui_reads_what_we_set():
    """The names the view relies on, as the installed UI spells them (MLflow 3.x): the shared-view
    tag and its URL key, the model-training switch in the URL, metric/param column ids, and the
    Assistant's localStorage keys the screenshot sets (scripts/screenshots.sh)."""
    ui = _ui_bundle()
    assert f'"{TAG_VIEW}"' in ui and '"viewStateShareKey"' in ui
    assert '"workflowType"' in ui and 'MACHINE_LEARNING="machine_learning"' in ui
    assert re.search(r'=\(e,t\)=>e\+"\.`"\+t\+"`"', ui)  # column ids: metrics.`key`, params.`key`
    assert "selectedColumns" in ui and all(k in ui for k in ("searchFilter", "orderByKey", "orderByAsc"))
    assert '"mlflow.assistant.fab.autoOpenedOnFirstLoad"' in ui and '"mlflow.assistant.panelOpen"' in ui
    assert "`${e}_v${t}`" in ui  # localStorage keys carry a version suffix: <key>_v1
    assert set(VIEW_PARAMS) >= {"method", "alpha0", "tau0", "lambda_alpha", "lambda_tau"}


@pytest.mark.slow
def test_a_sweep_tags_its_view_and_logs_truncation_on_its_task_runs(tiny_sweep):
    """The shared two-task sweep (rte by eval loss, sst2 by accuracy; 64 train / 32 eval each)."""
    from sweeps import client_for, runs_by_role

    out, state = tiny_sweep
    client = client_for(f"sqlite:///{out}/mlflow.db")
    tags = client.get_experiment_by_name("tiny").tags
    assert tags[TAG_VIEW + VIEW_KEY] == trial_view({"eval_loss": "min", "eval_accuracy": "max"})[TAG_VIEW + VIEW_KEY]
    for run in runs_by_role(client, "tiny")["task"]:
        p = run.data.params
        assert (p["samples_train"], p["samples_eval"], p["max_length"]) == ("64", "32", "32")
        assert int(p["truncated_train"]) == state.tasks[run.data.tags["tune_dynsdpb.task"]].truncated["train"]
        assert "dropped_train" not in p  # classification: cut as usual, nothing dropped
