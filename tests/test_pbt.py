"""Issue 20, item 1: the pbt arm. Unit tests of its schema and scheduler plumbing, and one sweep
end to end (real Ray, Optuna, MLflow) with dlb, dlb_warmup, dynsdpb and pbt in one experiment."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweeps import check_tree, client_for, runs_by_role, spec_dict
from tune_dynsdpb.errors import UserError
from tune_dynsdpb.search_space import parse_search_space

PBT = {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 4.0}}
ARMS = ["dlb", "dlb_warmup", "dynsdpb", "pbt"]


def raw(model="m", **kw):
    d = spec_dict(Path(model), methods=ARMS, **kw)
    d["params"]["pbt"] = dict(PBT)
    return d


def error(d) -> str:
    with pytest.raises(UserError) as info:
        parse_search_space(d, "f.yaml")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_pbt_input_is_one_line():
    parse_search_space(raw(), "f.yaml")
    assert error(raw(num_samples=1)) == ("f.yaml: budget.num_samples: the pbt arm needs a population of at "
                                         "least 2 trials (got 1)")
    d = raw(budget={"perturbation_interval": 2})  # 1 epoch x 2 evaluations
    assert error(d) == ("f.yaml: budget.perturbation_interval: 2 evaluation(s) is not shorter than the trial "
                        "(2 evaluations): PBT would never perturb")
    d = raw()
    d["params"]["pbt"]["lambda_alpha"] = {"low": 0.1, "high": 1.0}
    assert error(d) == ("f.yaml: params.pbt.lambda_alpha: PBT cannot mutate 'lambda_alpha': the pbt arm is dlb's "
                        "loss with alpha0 and tau0 changed during training")
    d = raw()
    d["params"]["pbt"] = {"alpha0": 1.0, "tau0": 3.0}
    assert error(d) == "f.yaml: params.pbt: give alpha0 or tau0 a range or choices: PBT has nothing to mutate"
    d = raw()
    d["params"]["pbt"]["alpha0"] = {"low": -1.0, "high": 2.0}
    assert error(d) == "f.yaml: params.pbt.alpha0: alpha0 must be >= 0 (got -1.0)"
    # PB2: a pbt arm, ranges, and at least two perturbation points (its GP needs a reward change)
    d = raw(budget={"pbt_scheduler": "pb2"})
    d["methods"] = ["dlb"]
    assert error(d) == "f.yaml: budget.pbt_scheduler: pb2 is how the pbt arm explores, and pbt is not in methods"
    d = raw(budget={"pbt_scheduler": "pb2", "evals_per_epoch": 4})
    d["params"]["pbt"]["tau0"] = {"choices": [2.0, 3.0]}
    assert error(d) == ("f.yaml: params.pbt.tau0: PB2 explores within ranges: give {low, high}, not choices "
                        "(budget.pbt_scheduler: pb2)")
    assert error(raw(budget={"pbt_scheduler": "pb2"})) == (
        "f.yaml: budget.pbt_scheduler: PB2 explores from its second perturbation point on, and a trial of 2 "
        "evaluations has one every 1: lower budget.perturbation_interval or evaluate more often")
    assert "pbt_scheduler" in error(raw(budget={"pbt_scheduler": "pb3"}))
    parse_search_space(raw(budget={"pbt_scheduler": "pb2", "evals_per_epoch": 3}), "f.yaml")
    # a file without pbt keeps the default arms, which do not include it
    d = spec_dict(Path("m"))
    d.pop("methods")
    assert "pbt" not in parse_search_space(d, "f.yaml").methods


def test_the_cli_sweep_refuses_bad_pbt_input_with_exit_2(tmp_path, capsys):
    import yaml

    from tune_dynsdpb.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(raw(num_samples=1)))
    code = main(["sweep", str(f), "--output-dir", str(tmp_path / "out")])  # refused before Ray starts
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "budget.num_samples: the pbt arm needs a population of at least 2 trials (got 1)"), err
    assert not (tmp_path / "out").exists()


def test_scheduler_gives_pbt_its_own_population_and_searcher_hands_it_out_whole():
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    from tune_dynsdpb.searching import ClipToRanges, _GroupView, create_scheduler, create_searcher

    spec = parse_search_space(raw(num_samples=3), "f.yaml")
    groups = [("rte", m) for m in spec.methods]
    sched = create_scheduler(spec, groups)
    assert isinstance(sched.schedulers[("rte", "pbt")], PopulationBasedTraining)
    assert all(isinstance(sched.schedulers[g], ASHAScheduler) for g in groups[:3])
    pbt = sched.schedulers[("rte", "pbt")]
    assert pbt._perturbation_interval == 1 and pbt._synch and set(pbt._hyperparam_mutations) == {"alpha0", "tau0"}
    assert ClipToRanges({"alpha0": (0.5, 2.0)})({"alpha0": 2.4, "tau0": 9.0}) == {"alpha0": 2.0, "tau0": 9.0}

    pb2 = create_scheduler(parse_search_space(raw(num_samples=3, budget={"pbt_scheduler": "pb2", "evals_per_epoch": 3}),
                                              "f.yaml"), groups).schedulers[("rte", "pbt")]
    assert type(pb2).__name__ == "PB2" and isinstance(pb2, PopulationBasedTraining)  # GroupedASHA treats it as PBT
    assert pb2._synch and pb2._perturbation_interval == 1
    assert pb2._hyperparam_bounds == {"alpha0": [0.5, 2.0], "tau0": [1.0, 4.0]}  # params.pbt's ranges

    searcher = create_searcher(spec, groups)
    order = []
    for i in range(12):
        config = searcher.suggest(f"t{i}")
        order.append(config["method"])
    # round-robin, except that the population of 3 goes out in one block
    assert order == ["dlb", "dlb_warmup", "dynsdpb", "pbt", "pbt", "pbt", "dlb", "dlb_warmup", "dynsdpb",
                     "dlb", "dlb_warmup", "dynsdpb"]

    # a member's last report never reaches PBT (it would clone an older checkpoint into a finished trial)
    member = SimpleNamespace(config={"task": "rte", "method": "pbt"})
    assert sched.on_trial_result(None, member, {"objective": 0.5, "final": True, "training_iteration": 2}) == "CONTINUE"
    with pytest.raises((KeyError, TypeError)):  # (not added to PBT here: a report that reaches it fails on the lookup)
        sched.on_trial_result(SimpleNamespace(get_trials=list), member, {"objective": 0.5, "training_iteration": 1})

    # a resumed population that PBT can no longer move (its restored PBT knows nothing of the
    # members' progress): the member that trained least goes on; never while a member runs
    from ray.tune.experiment import Trial

    from tune_dynsdpb.searching import GroupedASHA

    def trial(method, status, iteration=None):
        return SimpleNamespace(config={"task": "rte", "method": method}, status=status,
                               last_result={"training_iteration": iteration} if iteration else {})

    done, waiting, fresh = trial("pbt", Trial.TERMINATED, 2), trial("pbt", Trial.PAUSED, 1), trial("pbt", Trial.PENDING)
    g = ("rte", "pbt")
    assert sched.population == 3
    assert GroupedASHA._stalled([done, waiting, trial("dlb", Trial.PENDING)], g, 2) is waiting
    assert GroupedASHA._stalled([done, waiting, fresh], g, 3) is fresh
    assert GroupedASHA._stalled([done, waiting], g, 3) is None  # a member still to come: wait for it
    assert GroupedASHA._stalled([trial("pbt", Trial.RUNNING, 1), waiting], g, 2) is None
    assert GroupedASHA._stalled([done, done, trial("dlb", Trial.PAUSED)], g, 2) is None

    trials = [SimpleNamespace(config={"task": "rte", "method": m}) for m in ("dlb", "pbt", "pbt")]
    view = _GroupView(SimpleNamespace(get_trials=lambda: trials, get_live_trials=lambda: set(trials),
                                      search_alg="a searcher"), ("rte", "pbt"))
    assert view.get_trials() == trials[1:] and view.search_alg is None


# -- one sweep end to end, shared by the slow tests below ----------------------------------------

LOGGING = 4  # = the evaluation interval (64 sentences, B/2 = 8 new a step: 8 steps, 2 evaluations)


class TrainLog:
    """A TrainerCallback: every start of a trial's training (a first start, or a restart from a
    checkpoint: a retry, or PBT's exploit) and every evaluation appends one line: the trial, the
    global step, the config's alpha0/tau0, the schedule the trainer follows and a fingerprint of
    the weights (so a restart shows whose checkpoint it restored). At an evaluation the weights
    are those of the checkpoint saved right after it; the save itself is reported to Tune first,
    and a member that PBT pauses there never runs the callbacks after that report."""

    def __init__(self, path: str):
        self.path = path

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def _write(self, event: str, args, state, model) -> None:
        import hashlib

        import torch
        from ray import tune

        try:
            trial = tune.get_context().get_trial_id()
        except Exception:  # noqa: BLE001 - the driver's preflight: no trial
            trial = None
        if trial is None or args.method != "pbt":
            return
        weights = torch.cat([p.detach().flatten().float() for p in model.parameters()])
        row = {"trial": trial, "event": event, "step": state.global_step, "alpha0": args.alpha0, "tau0": args.tau0,
               "schedule": [list(e) for e in args.schedule],
               "weights": hashlib.sha1(weights.numpy().tobytes()).hexdigest()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._write("begin", args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kw):
        self._write("eval", args, state, model)


def install_train_log() -> None:
    """Ray's worker_process_setup_hook for the pbt sweep below: every DynSDPBTrainer a worker builds
    gets a :class:`TrainLog` writing to ``$TRAIN_LOG`` (test plumbing stays out of the product)."""
    import os

    from tune_dynsdpb.trainer import DynSDPBTrainer

    path, init = os.environ["TRAIN_LOG"], DynSDPBTrainer.__init__

    def with_log(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(TrainLog(path))

    DynSDPBTrainer.__init__ = with_log


@pytest.fixture(scope="module")
def pbt_sweep(ray_session, tiny_bert, data_dir, tmp_path_factory):
    """dlb, dlb_warmup, dynsdpb and pbt in one Tune experiment (sweep.run_sweep as the CLI runs it):
    pbt's population of 2 perturbs α0/τ0 once, after the first of its 2 evaluations. The session's
    Ray is restarted for it with :func:`install_train_log` as the workers' setup hook."""
    import os

    import ray
    import yaml

    import helpers
    from tune_dynsdpb.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("pbt-sweep")
    d = raw(model=str(tiny_bert), name="pbt", grace_period=2)
    d["task"] = "sst2"
    d["training"] = {"logging_steps": LOGGING}  # one α per report
    spec = tmp / "pbt.yaml"
    spec.write_text(yaml.safe_dump(d))
    out = tmp / "out"
    log = tmp / "train.jsonl"
    ray.shutdown()
    helpers.init_ray(os.environ["RAY_TMPDIR"], env={"TRAIN_LOG": str(log)},
                     setup_hook=f"{__name__}.install_train_log")
    try:
        state = run_sweep(spec, output_dir=out, data_dir=str(data_dir), progress=False)
    finally:
        ray.shutdown()
        helpers.init_ray(os.environ["RAY_TMPDIR"])  # the session's Ray, as the other tests expect it
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return SimpleNamespace(out=out, state=state, client=client_for(f"sqlite:///{out}/mlflow.db"), log=rows)


def _history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def _follows(client, run_id: str, schedule: list) -> list:
    """Each logged window of the run's α and τ (min, max) against the schedule's values over the
    steps it covers: a log at step k covers the steps taken at global steps k-LOGGING .. k-1 (the
    first step has no targets)."""
    from tune_dynsdpb.params import alpha_tau_at

    seen = []
    lo_a, hi_a, lo_t, hi_t = (_history(client, run_id, k) for k in ("alpha_min", "alpha_max", "tau_min", "tau_max"))
    assert lo_a and [m.step for m in lo_a] == [m.step for m in hi_a] == [m.step for m in lo_t]
    for a0, a1, t0, t1 in zip(lo_a, hi_a, lo_t, hi_t):
        want = [alpha_tau_at(tuple(map(tuple, schedule)), k, -1.0, -1.0) for k in range(max(1, a0.step - LOGGING),
                                                                                        a0.step)]
        got = (a0.value, a1.value, t0.value, t1.value)
        alphas, taus = [w[0] for w in want], [w[1] for w in want]
        expected = (min(alphas), max(alphas), min(taus), max(taus))
        assert got == pytest.approx(expected, rel=1e-5), (a0.step, got, expected)
        seen.append((a0.step, a0.value))
    return seen


@pytest.mark.slow
def test_a_sweep_with_a_pbt_arm_learns_a_schedule(pbt_sweep):
    """Exactly the population of 2 trial runs for pbt (as for every arm), none RUNNING; no member
    trains longer than the others' trials; α visibly changes inside a pbt trial; the winning
    lineage's schedule lands in the state and in MLflow."""
    from tune_dynsdpb.state import open_sweep

    out, state, client = pbt_sweep.out, pbt_sweep.state, pbt_sweep.client
    assert state.status == "finished"
    runs = check_tree(client, "pbt", ["sst2"], ARMS, 2)  # exactly 2 trial runs per arm, none RUNNING
    steps = {}
    alphas = []
    for r in runs["trial"]:
        arm = r.data.tags["tune_dynsdpb.arm"]
        assert r.info.status == "FINISHED", (arm, r.info.status)
        steps.setdefault(arm, []).append(max(m.step for m in client.get_metric_history(r.info.run_id, "step")))
        if arm == "pbt":
            alphas.append([m.value for m in _history(client, r.info.run_id, "alpha_mean")])
    assert steps["pbt"] == [8, 8] and max(steps["pbt"]) <= max(steps["dlb"])  # equal compute: 8 steps a trial
    assert any(len(set(a)) > 1 for a in alphas), alphas  # PBT changed α inside a trial
    assert state.arms["sst2/pbt"].counts == {"FINISHED": 2}
    best = state.arms["sst2/pbt"].best
    assert best.schedule and best.schedule[0][0] == 0 and all(len(e) == 3 for e in best.schedule)
    assert [e[0] for e in best.schedule] in ([0], [0, LOGGING])  # a breakpoint only where PBT perturbed
    assert open_sweep(out).arms["sst2/pbt"].best.schedule == best.schedule
    tag = client.get_run(best.run_id).data.tags["best.schedule"]
    assert json.loads(tag) == best.schedule
    assert [m.step for m in _history(client, best.run_id, "schedule_alpha")] == [e[0] for e in best.schedule]
    assert [m.value for m in _history(client, best.run_id, "schedule_alpha")] == pytest.approx(
        [e[1] for e in best.schedule])
    assert all(state.arms[f"sst2/{m}"].best.schedule is None for m in ARMS[:3])


@pytest.mark.slow
def test_an_exploited_member_trains_on_from_the_cloned_checkpoint_with_its_mutated_config(pbt_sweep):
    """PBT's exploit through the real scheduler (GroupedASHA's PopulationBasedTraining) and the real
    trainable: the weaker member restarts from the stronger member's checkpoint at its step (the
    same weights), with a perturbed alpha0/tau0 inside params.pbt's ranges; it keeps the donor's
    schedule up to that step and then follows its own mutated values, and trains to the same 8
    steps as every trial."""
    log = pbt_sweep.log
    first = {r["trial"]: r for r in log if r["event"] == "begin" and r["step"] == 0}
    assert len(first) == 2, log  # the population
    saves = {(r["trial"], r["step"]): r for r in log if r["event"] == "eval"}  # = each checkpoint
    restarts = [r for r in log if r["event"] == "begin" and r["step"] > 0]
    exploited = [r for r in restarts if (r["alpha0"], r["tau0"]) != (first[r["trial"]]["alpha0"],
                                                                      first[r["trial"]]["tau0"])]
    assert len(exploited) == 1, restarts
    (e,) = exploited
    (donor,) = set(first) - {e["trial"]}
    assert e["step"] == LOGGING  # the perturbation point: after the first evaluation
    cloned = saves[(donor, LOGGING)]
    assert e["weights"] == cloned["weights"] != saves[(e["trial"], LOGGING)]["weights"]  # the donor's checkpoint
    assert PBT["alpha0"]["low"] <= e["alpha0"] <= PBT["alpha0"]["high"]
    assert PBT["tau0"]["low"] <= e["tau0"] <= PBT["tau0"]["high"]
    assert e["schedule"] == [[0, cloned["alpha0"], cloned["tau0"]], [LOGGING, e["alpha0"], e["tau0"]]]
    end = saves[(e["trial"], 2 * LOGGING)]  # trains on to the trial's end, carrying the lineage
    assert (end["alpha0"], end["tau0"]) == (e["alpha0"], e["tau0"]) and end["schedule"] == e["schedule"]
    assert not [k for k in saves if k[1] > 2 * LOGGING]  # no member trains past its budget
    run = next(r for r in runs_by_role(pbt_sweep.client, "pbt")["trial"] if r.data.tags["ray.trial_id"] == e["trial"])
    own = first[e["trial"]]  # its MLflow run: its own α/τ up to the exploit, the mutated ones after it
    _follows(pbt_sweep.client, run.info.run_id, [[0, own["alpha0"], own["tau0"]], [LOGGING, e["alpha0"], e["tau0"]]])


@pytest.mark.slow
def test_compare_replays_the_learned_schedule_over_seeds(pbt_sweep, capsys):
    """`compare --seeds 2`: each pbt final is dlb's loss following the winning schedule from step 0;
    the α and τ it logs per step are the schedule's."""
    from tune_dynsdpb.cli import main

    out, state, client = pbt_sweep.out, pbt_sweep.state, pbt_sweep.client
    schedule = state.arms["sst2/pbt"].best.schedule
    assert main(["compare", str(out), "--seeds", "2", "--budget", "epochs", "--methods", "dlb", "pbt"]) == 0, \
        capsys.readouterr().err
    finals = json.loads((out / "report-epochs" / "finals.json").read_text())  # one task: no task folder
    assert {t["method"] for t in finals["trials"]} == {"dlb", "pbt"}
    configs = [json.loads((p.parent / "params.json").read_text())
               for p in (out / "ray" / "finals-epochs").rglob("result.json")]
    pbt_configs = [c for c in configs if c.get("method") == "pbt"]
    assert sorted(c["seed"] for c in pbt_configs) == [0, 1]
    assert all(c["schedule"] == schedule for c in pbt_configs)
    trials = runs_by_role(client, "pbt")["trial"]
    replays = [r for r in trials if r.data.tags["tune_dynsdpb.arm"] == "finals-epochs"
               and r.data.params["method"] == "pbt"]
    assert sorted(r.data.params["seed"] for r in replays) == ["0", "1"]
    for r in replays:
        assert r.info.status == "FINISHED"
        assert json.loads(r.data.params["schedule"]) == schedule
        logged = _follows(client, r.info.run_id, schedule)
        assert [s for s, _ in logged] == [LOGGING, 2 * LOGGING]


@pytest.mark.slow
def test_export_carries_the_learned_schedule(pbt_sweep):
    """The pbt arm's registered model version carries its replay config, the schedule included."""
    from tune_dynsdpb.cli import main

    out, state, client = pbt_sweep.out, pbt_sweep.state, pbt_sweep.client
    assert main(["export", str(out), "--name", "pbt-sst2", "--arm", "pbt"]) == 0
    champion = client.get_model_version_by_alias("pbt-sst2", "champion")
    assert champion.tags["tune_dynsdpb.arm"] == "pbt"
    config = json.loads(champion.tags["tune_dynsdpb.config"])
    assert config["schedule"] == state.arms["sst2/pbt"].best.schedule and config["method"] == "pbt"
    dlb = client.get_model_version_by_alias("pbt-sst2", "best-dlb")
    assert "schedule" not in json.loads(dlb.tags["tune_dynsdpb.config"])


def _pbt_checkpoint(out: Path) -> bool:
    """Whether a pbt member has reported a checkpoint (Tune's trial folders under OUT/ray/sweep)."""
    for params in (out / "ray" / "sweep").glob("*/params.json"):
        if json.loads(params.read_text()).get("method") == "pbt" and list(params.parent.glob("checkpoint_*")):
            return True
    return False


@pytest.mark.slow
def test_a_pbt_sweep_interrupted_then_resumed_has_exactly_its_population(tiny_bert, data_dir, tmp_path):
    """Ctrl-C of the driver once a pbt member has a checkpoint (its population is then waiting at
    its first perturbation point), then `sweep --resume`: exactly the population of 2 pbt trial
    runs in MLflow (and 2 dlb ones), none RUNNING, no member past its 8 steps. One trial runs at a
    time, so the interrupt comes while the second member has its first half to run (with two at
    once, the sweep could end within 3 s of the first checkpoint, before the signal)."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    import guards
    from helpers import signal_driver, start_sweep, wait_for

    d = raw(model=str(tiny_bert), name="pbtresume", grace_period=2)
    d["methods"] = ["dlb", "pbt"]
    d["resources"] = {"cpus_per_trial": 2}  # one trial at a time: the first member's checkpoint comes
    # while the second member is still to run its first half, well before the sweep's end
    d["training"] = {"logging_steps": LOGGING}
    spec = tmp_path / "pbtresume.yaml"
    spec.write_text(yaml.safe_dump(d))
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_TMPDIR": guards.short_dir(), "RAY_AUTH_MODE": "disabled"}
    proc = start_sweep(spec, data_dir, out, env)
    try:
        wait_for(lambda: proc.poll() is not None or _pbt_checkpoint(out), 300, "a pbt member's checkpoint")
        assert proc.poll() is None, "the sweep ended before it could be interrupted: " + proc.stderr.read()[-2000:]
    finally:
        code, err = signal_driver(proc, signal.SIGINT)
    assert code == 130, err[-2000:]
    assert json.loads((out / "sweep.json").read_text())["status"] == "interrupted"
    resumed = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "sweep", "--resume", "--output-dir",
                              str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print("\n".join(line for line in resumed.stderr.splitlines() if "after the resume" in line))  # (a race)
    client = client_for(f"sqlite:///{out}/mlflow.db")
    runs = check_tree(client, "pbtresume", ["rte"], ["dlb", "pbt"], 2)  # none RUNNING, no trial id twice
    for r in runs["trial"]:
        assert max(m.step for m in client.get_metric_history(r.info.run_id, "step")) == 2 * LOGGING
    state = json.loads((out / "sweep.json").read_text())
    assert state["status"] == "finished"
    assert state["arms"]["rte/pbt"]["started"] == 2 and state["arms"]["rte/pbt"]["best"]["schedule"]


@pytest.mark.slow
def test_a_pb2_population_explores_within_the_ranges(ray_session, tiny_bert, data_dir, tmp_path):
    """``budget.pbt_scheduler: pb2``: Tune's PB2 under GroupedASHA and the real trainable. A
    population of 2, 4 evaluations, perturbed after each of the first 3 (PB2's GP picks α0/τ0 from
    the second on): both members train their 8 steps, α changes inside a trial and stays in the
    ranges, and the winner's schedule is recorded like PBT's."""
    import yaml

    from tune_dynsdpb.sweep import run_sweep

    d = raw(model=str(tiny_bert), name="pb2", budget={"pbt_scheduler": "pb2", "evals_per_epoch": 4})
    d["methods"], d["task"], d["training"] = ["pbt"], "sst2", {"logging_steps": LOGGING // 2}
    spec = tmp_path / "pb2.yaml"
    spec.write_text(yaml.safe_dump(d))
    state = run_sweep(spec, output_dir=tmp_path / "out", data_dir=str(data_dir), progress=False)
    assert state.status == "finished" and state.arms["sst2/pbt"].counts == {"FINISHED": 2}
    client = client_for(f"sqlite:///{tmp_path}/out/mlflow.db")
    alphas = []
    for r in check_tree(client, "pb2", ["sst2"], ["pbt"], 2)["trial"]:
        assert max(m.step for m in client.get_metric_history(r.info.run_id, "step")) == 2 * LOGGING
        alphas.append([m.value for m in _history(client, r.info.run_id, "alpha_mean")])
    assert any(len(set(a)) > 1 for a in alphas), alphas
    schedule = state.arms["sst2/pbt"].best.schedule
    assert schedule and schedule[0][0] == 0
    for _, alpha, tau in schedule:
        assert PBT["alpha0"]["low"] <= alpha <= PBT["alpha0"]["high"] and PBT["tau0"]["low"] <= tau <= PBT["tau0"]["high"]


def test_the_report_plots_the_learned_schedule_beside_dynsdpb_and_dlb(tmp_path):
    import pandas as pd

    from tune_dynsdpb import plots
    from tune_dynsdpb.report import _dlb_constants, _last_step

    h = [pd.DataFrame({"step": [2, 4], "alpha_mean": [0.8, 0.9], "alpha_min": [0.5, 0.6], "alpha_max": [1.0, 1.0],
                       "tau_mean": [3.0, 3.1], "tau_min": [3.0, 3.0], "tau_max": [3.5, 3.5]})]
    schedule = [[0, 1.0, 3.0], [3, 1.5, 2.0]]
    assert plots.alpha_tau(h, tmp_path / "a.png", schedule=schedule, constants=(1.2, 2.5)).stat().st_size > 0
    assert plots.alpha_tau([], tmp_path / "b.png", schedule=schedule) is not None  # a sweep without dynsdpb
    assert plots.alpha_tau([], tmp_path / "c.png") is None
    assert _dlb_constants({"config": {"alpha0": 1.2, "tau0": 2.5}}) == (1.2, 2.5) and _dlb_constants(None) is None
    # the last piece is held to the finals' last step (a schedule perturbed half-way is half the run)
    assert plots.schedule_line(schedule, 0, 150) == ([0, 3, 150], [1.0, 1.5, 1.5])
    assert plots.schedule_line(schedule, 1, 0) == ([0, 3, 4], [3.0, 2.0, 2.0])
    assert _last_step({"dlb": h, "pbt": [None, pd.DataFrame({"step": [75, 150]})]}) == 150 and _last_step({}) == 0
    assert plots.alpha_tau([], tmp_path / "d.png", schedule=schedule, last_step=150) is not None
