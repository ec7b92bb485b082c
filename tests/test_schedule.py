"""Issue 20, item 2: a piecewise-constant alpha/tau schedule (dlb, pbt), defined once in params.py,
applied by DynSDPBTrainer.compute_loss, carried in checkpoints, and extended by a PBT restore."""

import json

import pytest

from test_trainer import build
from tune_dynsdpb import DynSDPBConfig, UserError, params
from tune_dynsdpb.searching import replay_config
from tune_dynsdpb.trainer import SCHEDULE_FILE


@pytest.mark.parametrize("value, problem", [
    ([(0, 1.0, 3.0), (10, 0.5, 2.0)], None),
    ((), None),
    ([(10, 1.0, 3.0), (5, 1.0, 3.0)], "must be ordered by step: entry 1 (step 5) comes after step 10"),
    ([(5, 1.0, 3.0), (5, 2.0, 3.0)], "must be ordered by step: entry 1 (step 5) comes after step 5"),
    ([(0, -1.0, 3.0)], "entry 0: alpha must be >= 0 (got -1.0)"),
    ([(0, 1.0, 0.0)], "entry 0: tau must be > 0 (got 0.0)"),
    ([(1.5, 1.0, 3.0)], "entry 0: step must be a whole number >= 0 (got 1.5)"),
    ([(-1, 1.0, 3.0)], "entry 0: step must be a whole number >= 0 (got -1)"),
    ([(0, 1.0)], "entry 0 must be three numbers (step, alpha, tau) (got (0, 1.0))"),
    ("0:1:3", "must be a list of (step, alpha, tau) (got '0:1:3')"),
])
def test_schedule_validation(value, problem):
    assert params.check_value("schedule", value) == problem


def test_reading_and_extending_a_schedule():
    s = ((0, 1.0, 3.0), (10, 2.0, 2.5))
    assert params.alpha_tau_at((), 7, 1.5, 4.0) == (1.5, 4.0)
    assert params.alpha_tau_at(((5, 2.0, 2.0),), 4, 1.0, 3.0) == (1.0, 3.0)
    assert [params.alpha_tau_at(s, k, 9.0, 9.0) for k in (0, 9, 10, 99)] == [(1.0, 3.0)] * 2 + [(2.0, 2.5)] * 2
    assert params.effective_schedule((), 1.0, 3.0) == ((0, 1.0, 3.0),)
    assert params.effective_schedule(((4, 2.0, 2.0),), 1.0, 3.0) == ((0, 1.0, 3.0), (4, 2.0, 2.0))
    assert params.continue_schedule(s, 20, 2.0, 2.5) == s  # a retry with the same config: nothing new
    assert params.continue_schedule(s, 20, 0.5, 2.5) == s + ((20, 0.5, 2.5),)
    assert params.continue_schedule(s + ((20, 0.5, 2.5),), 20, 0.7, 2.5) == s + ((20, 0.7, 2.5),)
    assert params.parse_schedule_entry("10:0.5:2") == (10, 0.5, 2.0)


def test_config_checks_the_schedule(tmp_path):
    args = DynSDPBConfig(output_dir=str(tmp_path), method="dlb", schedule=[[0, 1, 3], [4, 0.5, 2]], report_to=[])
    assert args.schedule == ((0, 1.0, 3.0), (4, 0.5, 2.0))
    with pytest.raises(UserError) as e:
        DynSDPBConfig(output_dir=str(tmp_path), method="dlb", schedule=[[4, 1, 3], [2, 0.5, 2]], report_to=[])
    assert str(e.value) == "schedule: must be ordered by step: entry 1 (step 2) comes after step 4"
    with pytest.raises(UserError, match="^schedule: only dlb and pbt follow a schedule"):
        DynSDPBConfig(output_dir=str(tmp_path), method="dynsdpb", schedule=[[0, 1, 3]], report_to=[])


def test_train_refuses_an_unordered_schedule_before_anything_loads(tmp_path, capsys):
    from test_cli_train import run_cli

    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", "--task", "rte", "--data-dir", str(tmp_path / "no-data"), "--model",
                        str(tmp_path / "no-model"), "--output-dir", str(out), "--method", "dlb", "--batch-size", "8",
                        "--schedule", "10:1:3", "5:0.5:2")
    assert code == 2 and err == "tune-dynsdpb: error: --schedule: must be ordered by step: entry 1 (step 5) " \
                                "comes after step 10\n", err
    assert not out.exists()


@pytest.mark.parametrize("method", ["dlb", "pbt"])
def test_the_trainer_follows_the_schedule_step_by_step(method, tiny_bert, tmp_path):
    """Logged every step: the log at step k covers the step taken at global_step k-1."""
    schedule = [[2, 0.5, 2.0], [4, 2.0, 1.5]]
    trainer, rec = build("classification", tiny_bert, tmp_path, method, steps=6, schedule=schedule)
    trainer.train()
    got = [(log["step"], log.get("alpha_mean"), log.get("tau_mean")) for log in rec.logs]
    assert [g[0] for g in got] == [1, 2, 3, 4, 5, 6]
    assert got[0][1] is None  # the first step has no targets
    assert [(a, round(t, 5)) for _, a, t in got[1:]] == [(1.0, 3.0), (0.5, 2.0), (0.5, 2.0), (2.0, 1.5), (2.0, 1.5)]
    for log in rec.logs[1:]:
        assert log["alpha_min"] == log["alpha_max"] == log["alpha_mean"]


def test_a_pbt_run_restored_with_a_mutated_config_trains_on_with_it(tiny_bert, tmp_path):
    """PBT's exploit: a member restarts from another member's checkpoint with a perturbed config.
    It keeps the checkpoint's schedule up to the checkpoint's step, trains on with its own
    alpha0/tau0, and its next checkpoint carries the whole lineage."""
    donor, rec = build("classification", tiny_bert, tmp_path / "donor", "pbt", steps=2, alpha0=1.0, tau0=3.0,
                       save_strategy="steps", save_steps=2)
    donor.train()
    ckpt = tmp_path / "donor" / "checkpoint-2"
    assert json.loads((ckpt / SCHEDULE_FILE).read_text()) == [[0, 1.0, 3.0]]
    member, rec = build("classification", tiny_bert, tmp_path / "member", "pbt", steps=4, alpha0=2.5, tau0=1.5,
                        save_strategy="steps", save_steps=2)
    member.train(resume_from_checkpoint=str(ckpt))
    assert [(log["step"], log["alpha_mean"], round(log["tau_mean"], 5)) for log in rec.logs] == [
        (3, 2.5, 1.5), (4, 2.5, 1.5)]
    assert member.args.schedule == ((0, 1.0, 3.0), (2, 2.5, 1.5))
    saved = json.loads((tmp_path / "member" / "checkpoint-4" / SCHEDULE_FILE).read_text())
    assert saved == [[0, 1.0, 3.0], [2, 2.5, 1.5]]
    # a plain retry of the member from its own checkpoint, same config: the schedule is unchanged
    again, _ = build("classification", tiny_bert, tmp_path / "again", "pbt", steps=4, alpha0=2.5, tau0=1.5)
    again.train(resume_from_checkpoint=str(tmp_path / "member" / "checkpoint-4"))
    assert again.args.schedule == ((0, 1.0, 3.0), (2, 2.5, 1.5))


def test_replay_config_fixes_the_learned_schedule(tiny_bert, tmp_path):
    best = {"config": {"task": "rte", "method": "pbt", "alpha0": 2.0, "tau0": 2.0, "learning_rate": 1e-3},
            "schedule": [[0, 1.0, 3.0], [2, 2.0, 2.0]]}
    config = replay_config(best)
    assert config == {**best["config"], "schedule": [[0, 1.0, 3.0], [2, 2.0, 2.0]]}
    assert replay_config({"config": {"method": "dlb", "alpha0": 1.0}}) == {"method": "dlb", "alpha0": 1.0}
    with pytest.raises(UserError) as e:  # a hand-edited state: refused in one line, before any final runs
        replay_config({**best, "schedule": [[4, 1.0, 3.0], [2, 2.0, 2.0]]})
    assert str(e.value) == ("sweep.json: the pbt arm's best.schedule: must be ordered by step: entry 1 (step 2) "
                            "comes after step 4")
    # the replay follows the schedule from step 0 and a retry of it keeps the schedule (no extension)
    run, rec = build("classification", tiny_bert, tmp_path / "r", "pbt", steps=4, alpha0=2.0, tau0=2.0,
                     schedule=config["schedule"], save_strategy="steps", save_steps=2)
    run.train()
    assert [log.get("alpha_mean") for log in rec.logs] == [None, 1.0, 2.0, 2.0]
    retry, _ = build("classification", tiny_bert, tmp_path / "r2", "pbt", steps=4, alpha0=2.0, tau0=2.0,
                     schedule=config["schedule"])
    retry.train(resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-2"))
    assert retry.args.schedule == ((0, 1.0, 3.0), (2, 2.0, 2.0))
