"""`tune-dynsdpb compare` and `tune-dynsdpb export` on real sweeps (Ray, MLflow SQLite, registry).

The session's shared two-task sweep (conftest ``tiny_sweep``: rte scored by eval loss, so that
seeds give different numbers; sst2 by accuracy) feeds most tests; a real sweep whose every trial
diverged feeds the "nothing to compare or export" ones. The CLI runs in-process (``cli.main``).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from sweeps import spec_file
from tune_dynsdpb.cli import main
from tune_dynsdpb.compare import final_configs
from tune_dynsdpb.errors import UserError
from tune_dynsdpb.report import cohens_dz, config_notes, paired_test, summarize

pytestmark = pytest.mark.slow
METRIC = "eval_loss"
ARMS = ("vanilla", "dlb", "dynsdpb")


# -- statistics on hand numbers ------------------------------------------------------------------
def test_summarize_matches_hand_numbers_and_scipy():
    s = summarize([0.70, 0.72, 0.74])
    assert s.n == 3 and s.mean == pytest.approx(0.72) and s.std == pytest.approx(0.02)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t_{0.975, 2}
    assert (s.ci_low, s.ci_high) == pytest.approx((0.72 - half, 0.72 + half))
    ref = stats.t.interval(0.95, 2, loc=0.72, scale=stats.sem([0.70, 0.72, 0.74]))
    assert (s.ci_low, s.ci_high) == pytest.approx(ref)
    one = summarize([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert summarize([]).n == 0


def test_paired_test_matches_hand_numbers_and_scipy():
    a, b = [0.70, 0.72, 0.74], [0.68, 0.71, 0.70]
    p = paired_test(a, b)
    d = np.array([0.02, 0.01, 0.04])
    sd = math.sqrt(((d - d.mean()) ** 2).sum() / 2)
    assert p.n == 3 and p.mean_diff == pytest.approx(0.07 / 3) and p.sd_diff == pytest.approx(sd)
    assert p.d_z == pytest.approx((0.07 / 3) / sd) == pytest.approx(1.5275252, rel=1e-6)
    ref = stats.ttest_rel(a, b)
    assert p.t == pytest.approx(ref.statistic) == pytest.approx(p.d_z * math.sqrt(3))
    assert p.p_ttest == pytest.approx(ref.pvalue)
    assert p.p_wilcoxon is None  # n < 5
    a5, b5 = [0.7, 0.72, 0.74, 0.69, 0.75], [0.68, 0.71, 0.70, 0.70, 0.71]
    assert paired_test(a5, b5).p_wilcoxon == pytest.approx(stats.wilcoxon(np.subtract(a5, b5)).pvalue)
    assert cohens_dz([0.5, 0.5, 0.5]) == math.inf and cohens_dz([-0.25, -0.25]) == -math.inf  # equal, non-zero
    assert math.isnan(cohens_dz([0.0, 0.0])) and math.isnan(cohens_dz([1.0]))
    with pytest.raises(ValueError):
        paired_test([1, 2], [1])


def test_final_configs_double_vanilla_epochs_only_for_compute():
    best = {"vanilla": {"method": "vanilla", "num_train_epochs": 1}, "dlb": {"method": "dlb", "num_train_epochs": 1}}
    epochs = final_configs(best, [0, 1], "epochs")
    assert [(c["method"], c["seed"], c["num_train_epochs"]) for c in epochs] == [
        ("vanilla", 0, 1), ("vanilla", 1, 1), ("dlb", 0, 1), ("dlb", 1, 1)]
    compute = final_configs(best, [3], "compute")
    assert [(c["method"], c["seed"], c["num_train_epochs"]) for c in compute] == [("vanilla", 3, 2.0), ("dlb", 3, 1)]
    assert final_configs({"vanilla": {"method": "vanilla"}}, [0], "compute")[0]["num_train_epochs"] == 6.0


# -- the shared sweep ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tiny_sweep):
    return tiny_sweep[0]


@pytest.fixture(scope="module")
def diverged(ray_session, tiny_bert, data_dir, tmp_path_factory):
    """A real sweep whose every trial diverged (learning rate 1e6): no arm has a scored trial."""
    from tune_dynsdpb.sweep import run_sweep

    root = tmp_path_factory.mktemp("diverged")
    spec = spec_file(root, tiny_bert, name="diverged", methods=["dlb"], num_samples=2, grace_period=2,
                     params={"common": {"learning_rate": 1.0e6, "num_train_epochs": 1,
                                        "per_device_train_batch_size": 16},
                             "dlb": {"alpha0": 1.0, "tau0": 3.0}})
    state = run_sweep(spec, output_dir=root / "out", data_dir=str(data_dir), progress=False)
    return root / "out", state


def client(out: Path):
    from mlflow import MlflowClient
    uri = f"sqlite:///{out}/mlflow.db"
    return MlflowClient(uri, registry_uri=uri)


def runs_with(c, name="tiny", **tags):
    exp = c.get_experiment_by_name(name)
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return c.search_runs([exp.experiment_id], where, max_results=1000)


def state_of(out: Path):
    from tune_dynsdpb.state import open_sweep
    return open_sweep(out)


def rejected(capsys, argv, *needles):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err, err
    assert err[-1].startswith("tune-dynsdpb: error:") and len(err) == 1, err
    for n in needles:
        assert n in err[-1], (n, err[-1])
    return err[-1]


def test_a_sweep_whose_trials_all_diverged_has_no_best_and_says_why(diverged):
    from tune_dynsdpb.console import arm_problems

    out, state = diverged
    arm = state.arms["rte/dlb"]
    assert arm.best is None and arm.counts == {"FAILED": 2}
    assert arm.failures and arm.failures[0].startswith("training diverged: non-finite ")
    (line,) = arm_problems(state)
    assert line.startswith("rte/dlb: 2 of 2 trials failed: training diverged: non-finite ")
    runs = runs_with(client(out), "diverged", **{"tune_dynsdpb.role": "trial"})
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    assert all(r.data.tags["tune_dynsdpb.failure"].startswith("training diverged") for r in runs)


def test_compare_epochs_report_matches_mlflow(sweep, capsys):
    assert main(["compare", str(sweep), "--seeds", "2", "--budget", "epochs", "--task", "rte"]) == 0
    report = sweep / "report-epochs" / "rte"
    names = {p.name for p in report.iterdir()}
    assert {"report.md", "report.html", "finals.json", "eval_curve.png", "alpha_tau.png", "best_so_far.png",
            "grad_norms.png", "heatmap_dlb.png", "heatmap_dynsdpb.png"} <= names
    assert not list(sweep.glob(".report-epochs.partial-*"))
    md, html = (report / "report.md").read_text(), (report / "report.html").read_text()
    assert "epochs" in md and "<table>" in html and '<img src="eval_curve.png"' in html
    summary = json.loads((report / "finals.json").read_text())
    assert summary["baseline"] is not None  # a loss: the constant predictor's

    # MLflow: one finals run under the task's run, 3 arms x 2 seeds of trial runs under it, with method + seed
    c = client(sweep)
    (task_run,) = runs_with(c, **{"tune_dynsdpb.role": "task", "tune_dynsdpb.task": "rte"})
    (finals,) = runs_with(c, **{"tune_dynsdpb.arm": "finals-epochs", "tune_dynsdpb.role": "arm"})
    assert finals.data.tags["mlflow.parentRunId"] == task_run.info.run_id
    assert finals.info.run_id == summary["finals_run_id"]
    trials = runs_with(c, **{"tune_dynsdpb.arm": "finals-epochs", "tune_dynsdpb.role": "trial"})
    assert sorted((r.data.params["method"], r.data.params["seed"]) for r in trials) == sorted(
        (m, s) for m in ARMS for s in ("0", "1"))
    assert all(r.data.tags["mlflow.parentRunId"] == finals.info.run_id and r.info.status == "FINISHED" for r in trials)
    assert all(any(k.startswith("grad_norm/layer_") for k in r.data.metrics) for r in trials)  # reached the reports
    assert all("alpha_mean" in r.data.metrics for r in trials if r.data.params["method"] == "dynsdpb")

    # the table's numbers, recomputed from the MLflow runs (the last eval of each seed)
    scores = {m: {int(r.data.params["seed"]): r.data.metrics[METRIC] for r in trials if r.data.params["method"] == m}
              for m in ARMS}
    for m in ARMS:
        values = [scores[m][s] for s in (0, 1)]
        arm = summary["arms"][m]
        assert arm["n"] == 2 and arm["mean"] == pytest.approx(np.mean(values))
        assert arm["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert np.std(values) > 0  # seeds differ on eval loss, so the interval below is a real one
        lo, hi = stats.t.interval(0.95, 1, loc=np.mean(values), scale=stats.sem(values))
        assert (arm["ci_low"], arm["ci_high"]) == pytest.approx((lo, hi))
        assert f"{np.mean(values):.4f}" in md
        passes = [r.data.metrics["sample_passes"] for r in trials if r.data.params["method"] == m]
        assert arm["sample_passes_mean"] == pytest.approx(np.mean(passes))
    for other in ("dlb", "vanilla"):
        diffs = [scores["dynsdpb"][s] - scores[other][s] for s in (0, 1)]
        p = summary["paired"][f"dynsdpb-{other}"]
        assert p["diffs"] == pytest.approx(diffs) and p["mean_diff"] == pytest.approx(np.mean(diffs))
        ref = stats.ttest_rel([scores["dynsdpb"][s] for s in (0, 1)], [scores[other][s] for s in (0, 1)])
        if np.std(diffs):
            assert p["p_ttest"] == pytest.approx(ref.pvalue)
        else:  # identical differences (e.g. dynsdpb's best is dlb's config): no test, stored as None
            assert p["p_ttest"] is None and np.isnan(ref.pvalue)
        assert f"dynsdpb − {other}" in md
    # epochs budget: DLB-style arms make twice vanilla's sample-passes
    arms = summary["arms"]
    assert arms["dlb"]["sample_passes_mean"] == pytest.approx(2 * arms["vanilla"]["sample_passes_mean"])
    # the report is an artifact of the parent run
    logged = {Path(a.path).name for a in c.list_artifacts(state_of(sweep).parent_run_id, "report-epochs/rte")}
    assert {"report.md", "report.html", "eval_curve.png"} <= logged

    # a second run of the same budget is refused, the report stays
    rejected(capsys, ["compare", str(sweep), "--budget", "epochs"], "report-epochs", "already exists")

    # the other task's finals, later: rte's finals runs (and its report's links to them) stay
    assert main(["compare", str(sweep), "--seeds", "1", "--budget", "epochs", "--task", "sst2"]) == 0
    assert (sweep / "report-epochs" / "sst2" / "finals.json").is_file()
    kept = runs_with(c, **{"tune_dynsdpb.arm": "finals-epochs", "tune_dynsdpb.role": "trial",
                           "tune_dynsdpb.task": "rte"})
    assert sorted(r.info.run_id for r in kept) == sorted(r.info.run_id for r in trials)
    assert c.get_run(summary["finals_run_id"]).info.lifecycle_stage == "active"
    assert len(runs_with(c, **{"tune_dynsdpb.arm": "finals-epochs", "tune_dynsdpb.role": "trial",
                               "tune_dynsdpb.task": "sst2"})) == len(ARMS)


def test_compare_compute_budget_equalizes_sample_passes_and_writes_the_cross_task_table(sweep):
    assert main(["compare", str(sweep), "--seeds", "1", "--budget", "compute", "--methods", "vanilla", "dynsdpb"]) == 0
    state = state_of(sweep)
    for task in ("rte", "sst2"):
        summary = json.loads((sweep / "report-compute" / task / "finals.json").read_text())
        best = {m: b.config for m, b in state.scored(task).items()}
        by_arm = {t["method"]: t for t in summary["trials"]}
        assert set(by_arm) == {"vanilla", "dynsdpb"}
        assert by_arm["vanilla"]["num_train_epochs"] == 2 * best["vanilla"]["num_train_epochs"]
        assert by_arm["dynsdpb"]["num_train_epochs"] == best["dynsdpb"]["num_train_epochs"]
        batch = best["vanilla"]["per_device_train_batch_size"]
        assert abs(by_arm["vanilla"]["sample_passes"] - by_arm["dynsdpb"]["sample_passes"]) <= batch
        assert "**compute**" in (sweep / "report-compute" / task / "report.md").read_text()
    table = json.loads((sweep / "cross-task" / "cross_task.json").read_text())
    assert "compute" in table["budgets"]
    assert {r["task"] for r in table["budgets"]["compute"]["rows"]} == {"rte", "sst2"}
    md = (sweep / "cross-task" / "cross_task.md").read_text()
    assert "| rte |" in md and "| sst2 |" in md and "dynsdpb − vanilla" in md
    logged = {Path(a.path).name for a in client(sweep).list_artifacts(state.parent_run_id, "cross-task")}
    assert {"cross_task.md", "cross_task.html", "cross_task.json"} <= logged


def test_compare_bad_input(sweep, diverged, tmp_path, capsys):
    rejected(capsys, ["compare", str(tmp_path)], "holds no sweep")
    rejected(capsys, ["compare", str(sweep), "--methods", "dlb", "sdpb"], "sdpb")
    rejected(capsys, ["compare", str(sweep), "--task", "cola"], "--task", "cola")
    rejected(capsys, ["compare", str(diverged[0])], "has no finished trial")
    (tmp_path / "sweep.json").write_text("{not json")
    rejected(capsys, ["compare", str(tmp_path)], "sweep.json", "corrupt")


# -- export ---------------------------------------------------------------------------------------
def winner(state) -> str:
    scored = {m: b.score for m, b in state.scored("rte").items()}
    return min(scored, key=scored.get)  # eval_loss: lower is better


def test_export_registers_every_arm_and_loads_back(sweep, tmp_path, capsys):
    import mlflow
    import transformers

    from tune_dynsdpb.tracking import fluent_tracking

    rejected(capsys, ["export", str(sweep), "--name", "tiny-rte"], "--task", "several tasks")
    assert main(["export", str(sweep), "--name", "tiny-rte", "--task", "rte"]) == 0
    c, state = client(sweep), state_of(sweep)
    model = c.get_registered_model("tiny-rte")
    assert model.tags["tune_dynsdpb.task"] == "rte"
    assert set(model.aliases) == {"champion", "best-vanilla", "best-dlb", "best-dynsdpb"}
    champion = c.get_model_version_by_alias("tiny-rte", "champion")
    assert champion.tags["tune_dynsdpb.arm"] == winner(state)
    assert champion.version == model.aliases[f"best-{winner(state)}"]
    for m in ARMS:
        v = c.get_model_version_by_alias("tiny-rte", f"best-{m}")
        best = state.scored("rte")[m]
        assert v.tags["tune_dynsdpb.arm"] == m and v.tags["tune_dynsdpb.sweep_id"] == state.sweep_id
        assert v.tags["tune_dynsdpb.metric"] == METRIC
        assert float(v.tags["tune_dynsdpb.metric_value"]) == pytest.approx(best.score)
        assert v.tags["tune_dynsdpb.seed"] == "0" and v.tags["tune_dynsdpb.task"] == "rte"
        assert "RTE" in v.tags["tune_dynsdpb.data_source"]
    assert len({model.aliases[f"best-{m}"] for m in ARMS}) == 3  # one version per arm

    uri = f"sqlite:///{sweep}/mlflow.db"
    with fluent_tracking(uri):
        pipe = mlflow.transformers.load_model("models:/tiny-rte@champion")
        info = mlflow.models.get_model_info("models:/tiny-rte@champion")
    pred = pipe({"text": "the story was told", "text_pair": "a good movie"})
    pred = pred[0] if isinstance(pred, list) else pred
    assert pred["label"] in ("entailment", "not_entailment")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert "huggingface.co" not in json.dumps(info.flavors)

    out = tmp_path / "hf"
    assert main(["export", "--model", "models:/tiny-rte@champion", "--out", str(out), "--tracking-uri", uri]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    local = transformers.pipeline("text-classification", model=str(out))
    assert local({"text": "the story was told", "text_pair": "a good movie"})["label"] == pred["label"]

    # the folder is not empty now: refused, untouched
    before = sorted(p.name for p in out.iterdir())
    rejected(capsys, ["export", "--model", "models:/tiny-rte@champion", "--out", str(out), "--tracking-uri", uri],
             "--out", "not empty")
    assert sorted(p.name for p in out.iterdir()) == before


def registered(c, name) -> bool:
    from mlflow.exceptions import MlflowException
    try:
        c.get_registered_model(name)
        return True
    except MlflowException:
        return False


def test_export_picks_the_winner_mode_aware_or_the_arm_asked_for(sweep):
    from tune_dynsdpb.export import _candidates

    state = state_of(sweep)
    assert _candidates(state, "rte", None, "x")[1] == winner(state)
    assert _candidates(state, "rte", "dlb", "x")[1] == "dlb"
    scored = {m: b.score for m, b in state.scored("sst2").items()}  # accuracy: higher is better
    assert _candidates(state, "sst2", None, "x")[1] == max(scored, key=scored.get)


def test_export_bad_input_registers_nothing(sweep, diverged, capsys):
    c = client(sweep)
    exports = len(runs_with(c, **{"tune_dynsdpb.role": "export"}))
    rejected(capsys, ["export", str(diverged[0]), "--name", "never"], "has no finished trial")
    rejected(capsys, ["export", str(sweep), "--name", "never", "--task", "rte", "--arm", "sdpb"], "--arm", "sdpb")
    assert not registered(c, "never")
    c.create_registered_model("sst2-model", tags={"tune_dynsdpb.task": "sst2"})
    rejected(capsys, ["export", str(sweep), "--name", "sst2-model", "--task", "rte"], "sst2-model", "sst2", "rte")
    assert not c.search_model_versions("name = 'sst2-model'")
    assert len(runs_with(c, **{"tune_dynsdpb.role": "export"})) == exports  # nothing logged either
    rejected(capsys, ["export", "--model", "models:/x@champion"], "--out")


def test_export_failing_midway_deletes_what_it_registered(sweep, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tune_dynsdpb.export import export_sweep

    c = client(sweep)
    export_sweep(sweep, "midway", task="sst2")  # an existing model, with versions and aliases
    versions = {v.version for v in c.search_model_versions("name = 'midway'")}
    aliases = c.get_registered_model("midway").aliases
    real, calls = MlflowClient.create_model_version, []

    def flaky(self, *args, **kwargs):  # the second registration fails
        calls.append(1)
        if len(calls) == 2:
            raise MlflowException("registry went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_model_version", flaky)
    with pytest.raises(MlflowException, match="went away"):
        export_sweep(sweep, "half", task="sst2")  # a new name: the model goes too
    assert len(calls) == 2 and not registered(c, "half") and not c.search_model_versions("name = 'half'")
    calls.clear()
    with pytest.raises(MlflowException, match="went away"):
        export_sweep(sweep, "midway", task="sst2")  # the existing model keeps its versions and aliases
    assert {v.version for v in c.search_model_versions("name = 'midway'")} == versions
    assert c.get_registered_model("midway").aliases == aliases


def test_an_export_that_loses_the_race_for_a_name_leaves_the_winners_model(sweep, monkeypatch):
    """Another task's export creates the name between this export's check and its own create: this
    one is refused, and its roll-back leaves the other's registered model (it did not create it)."""
    from mlflow import MlflowClient

    from tune_dynsdpb.export import export_sweep

    c = client(sweep)
    real = MlflowClient.create_registered_model

    def raced(self, name, *args, **kwargs):
        if name == "raced" and not registered(c, "raced"):  # the other export wins, just before this one
            real(self, name, tags={"tune_dynsdpb.task": "cola"})
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_registered_model", raced)
    with pytest.raises(UserError, match="registered model 'raced' holds cola models"):
        export_sweep(sweep, "raced", task="sst2")
    assert registered(c, "raced") and c.get_registered_model("raced").tags["tune_dynsdpb.task"] == "cola"


def test_config_notes_flag_zero_rates_and_identical_arms():
    dlb = {"method": "dlb", "learning_rate": 1e-4, "alpha0": 1.0, "tau0": 3.0}
    dyn = {**dlb, "method": "dynsdpb", "lambda_alpha": 0.0, "lambda_tau": 0.0, "granularity": "sample"}
    notes = config_notes({"dlb": dlb, "dynsdpb": dyn})
    assert len(notes) == 2 and "static DLB" in notes[0] and "identical" in notes[1]
    # zero rates but another learning rate: static DLB, yet not the same runs
    assert len(config_notes({"dlb": dlb, "dynsdpb": {**dyn, "learning_rate": 2e-4}})) == 1
    assert config_notes({"dlb": dlb, "dynsdpb": {**dyn, "lambda_tau": 0.3}}) == []
    assert config_notes({"dlb": dlb}) == []
    pbt = {**dlb, "method": "pbt"}  # a winner PBT never perturbed, started at dlb's best point
    (note,) = config_notes({"dlb": dlb, "pbt": pbt}, pbt_schedule=[[0, dlb["alpha0"], dlb["tau0"]]])
    assert note.startswith("On this task, pbt's winning member was never perturbed") and "by construction" in note
    assert config_notes({"dlb": dlb, "pbt": pbt}, pbt_schedule=[[0, dlb["alpha0"], dlb["tau0"]], [8, 2.0, 3.0]]) == []
    ties = config_notes({"dlb": dlb}, {"vanilla": [0.0, 0.0, None], "dlb": [0.5, 0.6]})
    assert len(ties) == 1 and ties[0].startswith("All 2 sweep trials of vanilla tied")
