"""Does one Tune experiment for every (task, arm) keep a large cluster full? Before/after, stand-in trials.

The sweep runs through the driver's own pieces: ``SweepSpec`` from ``parse_search_space``,
``experiment.create_trainable`` (data by reference, resources from the spec), ``sweep.create_tuner``
(``RoundRobinSearcher`` with one ``OptunaSearch`` per group on an Optuna journal, ``GroupedASHA``,
``reuse_actors``, ``FailureConfig``/``CheckpointConfig``), ``sweep._configure_tune``
(``TUNE_MAX_PENDING_TRIALS_PG``), ``sweep.fit_tuner``, the ``SweepTracker``'s MLflow trial callback
(background writer, SQLite store in a temp dir), the ``_ProgressCallback`` feeding a
``ProgressTable`` (``enabled=False``: no rendering) and ``sweep.collect_outcomes``. Only the trial
is a stand-in (:mod:`benchmarks.standin`): the real trial's report keys, number of reports and
a checkpoint per report, but ``time.sleep`` instead of training.

The cluster is simulated: ``ray.init(num_cpus=SLOTS[, num_gpus=G])`` logical CPUs on this machine,
one CPU per trial.

Designs:

- **after**: one ``create_tuner`` over every (task, arm) group, one ``fit_tuner``;
- **before**: the old sweep, one Tuner per arm in sequence: ``create_tuner`` with one group at a
  time, back to back (its own Tune experiment folder each; one MLflow tracker and journal).

Figures (per design):

- work = Σ over trials of reports made × seconds per report (ASHA-stopped trials count only what
  they ran); **minimum** = work / slots; **ratio** = wall / minimum, wall = ``create_tuner`` +
  ``fit_tuner`` (+ the MLflow flush), Ray's start excluded;
- **utilization** = work / (slots × wall) (= minimum / wall);
- **occupancy** = Σ over trials of (last report − trial function entered) / (slots × wall): the
  slot time trials held, including the time a trial waits in ``tune.report`` for the driver;
- list-scheduling bound = the makespan of the same trial durations, in the order they started,
  on SLOTS slots with zero overhead (per group and summed for *before*): the best any FIFO
  driver could do with these trials, tail included;
- **after the ramp**: the same ratio and utilization from the moment all slots were first busy
  (or concurrency peaked) to the end of each fit, with the work of the reports made in that span:
  the driver's steady state, without the start of the trial actors. On this 2-core machine Ray
  starts at most 2 worker processes at a time, each importing Ray Tune (about 1.4 CPU-s), so 32
  actors take about 25 s to come up; a cluster's nodes start theirs in parallel;
- start = first trial entered − fit start; tail = fit end − last report; max concurrency from
  the trials' own entry / last-report timestamps;
- **driver CPU** = ``getrusage(RUSAGE_SELF)`` user+system over create+fit (all driver threads,
  the MLflow writer included; the sampler thread below subtracted) per 1,000 results; Ray's own
  processes (GCS, raylet, workers) sampled with psutil once a second; the machine's busy CPU
  fraction (other users included) from ``psutil.cpu_times``.

Cases: ``arms`` (1 task × 3 arms × TRIALS), ``tasks`` (3 tasks × 3 arms × TRIALS), ``gpu``
(logical GPUs: 0.25-GPU trials must pack 4 per GPU; 2-GPU trials must take whole, disjoint GPUs).

    python benchmarks/sweep_scale.py --case arms --trials 100 --seconds 10 --reports 10 --slots 32 \
        --json benchmarks/results/sweep_scale_arms.json
    python benchmarks/sweep_scale.py --case tasks --trials 32 --json benchmarks/results/sweep_scale_tasks.json
    python benchmarks/sweep_scale.py --case gpu --json benchmarks/results/sweep_scale_gpu.json
    python benchmarks/sweep_scale.py --case arms --trials 6 --seconds 2 --reports 2 --slots 8   # smoke
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from benchmarks.timing import machine_cpu_s, write_json  # noqa: E402
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

METHODS = ["vanilla", "dlb", "dynsdpb"]
TASKS = ["rte", "mrpc", "sst2"]


# -- the sweep file, built in code ----------------------------------------------------------------
def build_spec(name: str, tasks: list[str], methods: list[str], trials: int, reports: int, grace: int,
               cpus: float = 1, gpus: float = 0):
    from tune_dynsdpb.search_space import parse_search_space

    raw = {"name": name, "tasks": [{"task": t, "metric": "eval_accuracy", "mode": "max"} for t in tasks],
           "model": "standin", "methods": methods, "seed": 0,
           "budget": {"num_samples": trials, "evals_per_epoch": reports, "grace_period": grace,
                      "reduction_factor": 2},
           "resources": {"cpus_per_trial": cpus, "gpus_per_trial": gpus},
           "params": {"common": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}, "num_train_epochs": 1,
                                 "per_device_train_batch_size": 16, "weight_decay": 0.01},
                      "dlb": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 5.0}},
                      "dlb_warmup": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 5.0}},
                      "dynsdpb": {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 5.0},
                                  "lambda_alpha": {"low": 0.0, "high": 1.0},
                                  "lambda_tau": {"low": -0.5, "high": 0.5}, "granularity": "sample"}}}
    return parse_search_space(raw, f"<{name}>")


def build_state(spec, storage: str, uri: str):
    from tune_dynsdpb.state import ArmState, SweepState, TaskState

    tasks = {t.task: TaskState(name=t.task, metric="eval_accuracy", mode="max") for t in spec.task_specs()}
    state = SweepState(sweep_id=uuid.uuid4().hex[:12], spec=spec.model_dump(mode="json", by_alias=True),
                       spec_path=f"<{spec.name}>", methods=list(spec.methods), num_samples=spec.budget.num_samples,
                       tracking_uri=uri, model_path="standin", storage_path=storage, tasks=tasks, created=time.time())
    for n in tasks:
        for m in spec.methods:
            state.arms[f"{n}/{m}"] = ArmState(task=n, method=m)
    return state


# -- CPU accounting -------------------------------------------------------------------------------
def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RaySampler(threading.Thread):
    """Samples the CPU seconds of this driver's descendants (GCS, raylet, workers) once a second."""

    def __init__(self, period: float = 1.0):
        super().__init__(daemon=True, name="ray-cpu-sampler")
        import psutil
        self.psutil, self.period = psutil, period
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.own_cpu = 0.0
        self.stop = threading.Event()
        self.machine0 = machine_cpu_s()
        self._sample()

    def _sample(self) -> None:
        for p in self.psutil.Process(os.getpid()).children(recursive=True):
            try:
                c = p.cpu_times()
            except self.psutil.Error:
                continue
            self.first.setdefault(p.pid, c.user + c.system)
            self.last[p.pid] = c.user + c.system
            if p.pid not in self.names:
                self.names[p.pid] = self._title(p)

    def _title(self, p) -> str:
        """A worker's title is ray::<what it runs>; GCS, raylet and Python helpers go by their program."""
        try:
            cmd = p.cmdline() or [p.name()]
        except self.psutil.Error:
            return "?"
        if cmd[0].startswith("ray::"):
            return cmd[0]
        if os.path.basename(cmd[0]).startswith("python"):  # the script: the first argument not a flag
            cmd = [a for a in cmd[1:] if not a.startswith("-")] or cmd
        return os.path.basename(cmd[0])

    def run(self) -> None:
        t = time.thread_time()
        while not self.stop.wait(self.period):
            self._sample()
        self._sample()
        self.own_cpu = time.thread_time() - t

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        (busy0, total0), (busy1, total1) = self.machine0, machine_cpu_s()
        span = total1 - total0
        by_name: dict[str, float] = {}
        for p in self.last:
            name = self.names.get(p, "?")
            by_name[name] = by_name.get(name, 0.0) + self.last[p] - self.first[p]
        return {"ray_processes_cpu_s": sum(self.last[p] - self.first[p] for p in self.last),
                "ray_processes_cpu_s_by_name": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:8]),
                "machine_busy_fraction": (busy1 - busy0) / span if span > 0 else None,
                "sampler_cpu_s": self.own_cpu}


# -- one design -----------------------------------------------------------------------------------
def make_trainable(spec, shape, gpu_resources: dict | None):
    from ray import tune

    from benchmarks.standin import standin_trainable
    from tune_dynsdpb.experiment import create_trainable

    tasks = {t.task: SimpleNamespace(job=shape, train=None, eval=None) for t in spec.task_specs()}
    if gpu_resources is None:
        return create_trainable(spec, tasks, trainable=standin_trainable)  # the driver's own wrapping
    jobs = {n: t.job for n, t in tasks.items()}
    return tune.with_resources(tune.with_parameters(standin_trainable, jobs=jobs, data={}), gpu_resources)


def run_design(design: str, spec, shape, slots: int, work: Path, gpu_resources: dict | None = None) -> dict:
    from tune_dynsdpb import sweep
    from tune_dynsdpb.sweep import ProgressTable, _ProgressCallback, collect_outcomes, create_tuner, fit_tuner
    from tune_dynsdpb.tracking import SweepTracker

    folder = work / design
    folder.mkdir(parents=True)
    uri = "sqlite:///" + str(folder / "mlflow.db")
    storage = str(folder / "ray")
    groups = [(t.task, m) for t in spec.task_specs() for m in spec.methods]
    state = build_state(spec, storage, uri)
    tracker = SweepTracker(uri, spec.name, state.sweep_id, artifact_location=(folder / "mlartifacts").as_uri())
    state.parent_run_id = tracker.start_sweep({"spec": state.spec}, tags={"tune_dynsdpb.output_dir": str(folder)})
    for g in groups:
        tracker.start_arm(*g)
    trainable = make_trainable(spec, shape, gpu_resources)
    table = ProgressTable(state, enabled=False)  # the callback path runs; nothing is drawn
    callback = tracker.trial_callback(groups)
    sweep._configure_tune(spec)
    journal = str(folder / "optuna.journal")
    runs = [groups] if design == "after" else [[g] for g in groups]

    sampler = RaySampler()
    sampler.start()
    cpu0, t0 = _self_cpu(), time.time()
    grids, fits = [], []
    for i, gs in enumerate(runs):
        f0 = time.time()
        tuner = create_tuner(spec, gs, trainable, storage if design == "after" else f"{storage}/{i}",
                             [callback, _ProgressCallback()], journal)
        grids.append(fit_tuner(tuner, len(gs) * spec.budget.num_samples, spec.budget.time_budget_s))
        callback.flush()
        fits.append((f0, time.time()))
    t1 = time.time()
    driver_cpu = _self_cpu() - cpu0
    ray_cpu = sampler.finish()
    driver_cpu -= ray_cpu.pop("sampler_cpu_s")
    table.close()

    trials, outcomes = [], []
    for grid, (f0, f1) in zip(grids, fits):
        outcomes += collect_outcomes(grid, state)
        for r in grid:
            df = r.metrics_dataframe
            c = r.config or {}
            rec = {"group": f"{c.get('task')}/{c.get('method')}", "error": r.error is not None, "fit": [f0, f1],
                   "reports": 0, "t0": None, "end": None, "gpu_ids": None, "pid": None}
            if df is not None and len(df) and "standin_t0" in df:
                rec.update(reports=int(len(df)), t0=float(df["standin_t0"].min()), end=float(df["standin_t"].max()),
                           report_times=[float(x) for x in df["standin_t"]],
                           busy=float(df["standin_busy_s"].max()), pid=int(df["pid"].iloc[-1]),
                           gpu_ids=str(df["standin_gpu_ids"].iloc[-1]) if "standin_gpu_ids" in df else None)
            trials.append(rec)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    per_report = shape.seconds / shape.reports
    ran = [t for t in trials if t["t0"] is not None]
    results = sum(t["reports"] for t in trials)
    work_s = results * per_report
    wall = t1 - t0
    occupancy = sum(t["end"] - t["t0"] for t in ran)
    bound = sum(list_schedule([t["reports"] * per_report for t in sorted(ran, key=lambda t: t["t0"])
                               if t["fit"] == list(f)], slots) for f in fits)
    steady_wall = steady_work = 0.0
    for f in fits:  # each fit from the moment all its slots were first busy (the start-up ramp left out)
        mine = [t for t in ran if t["fit"] == list(f)]
        at = f[0] + full_after(mine, f[0], slots)
        steady_wall += f[1] - at
        steady_work += per_report * sum(x > at for t in mine for x in t["report_times"])
    gaps = []  # an actor's idle time between one trial's last report and the next trial's entry
    for pid in {t["pid"] for t in ran}:
        mine = sorted((t for t in ran if t["pid"] == pid), key=lambda t: t["t0"])
        gaps += [b["t0"] - a["end"] for a, b in zip(mine, mine[1:])]
    gaps.sort()
    mlflow_runs = len(tracker.trial_runs())
    out = {
        "design": design, "tuners": len(runs), "groups": len(groups), "trials": len(trials),
        "trials_ran": len(ran), "outcomes": counts, "errors": sum(t["error"] for t in trials),
        "results": results, "work_s": work_s, "slots": slots, "wall_s": wall, "minimum_s": work_s / slots,
        "ratio": wall / (work_s / slots) if work_s else None,
        "utilization": work_s / (slots * wall), "occupancy": occupancy / (slots * wall),
        "steady_wall_s": steady_wall, "steady_work_s": steady_work,
        "steady_ratio": steady_wall / (steady_work / slots) if steady_work else None,
        "steady_utilization": steady_work / (slots * steady_wall) if steady_wall else None,
        "actor_gaps": {"n": len(gaps), "total_slot_s": sum(gaps),
                       "median_s": gaps[len(gaps) // 2] if gaps else None,
                       "p90_s": gaps[int(len(gaps) * 0.9)] if gaps else None},
        "list_schedule_bound_s": bound, "ratio_to_list_schedule": wall / bound if bound else None,
        "start_s": min(t["t0"] for t in ran) - t0 if ran else None,
        "tail_s": t1 - max(t["end"] for t in ran) if ran else None,
        "report_wait_s": occupancy - work_s,
        "max_concurrency": max_concurrency([(t["t0"], t["end"]) for t in ran]),
        "driver_cpu_s": driver_cpu, "driver_cpu_s_per_1000_results": driver_cpu / results * 1000 if results else None,
        **ray_cpu, "mlflow_trial_runs": mlflow_runs,
        "fit_walls_s": [f1 - f0 for f0, f1 in fits],
        "fit_start_s": [min([t["t0"] for t in ran if t["fit"] == list(f)], default=f[0]) - f[0] for f in fits],
        "full_after_s": [full_after([t for t in ran if t["fit"] == list(f)], f[0], slots) for f in fits],
        "actor_processes": len({t["pid"] for t in ran}),
    }
    out["_trials"] = ran
    return out


def patch_num_to_keep(n: int | None) -> None:
    """For an experiment only: ``create_tuner`` builds ``tune.CheckpointConfig(num_to_keep=2, ...)``;
    make it ``num_to_keep=n`` instead (the product code is not changed)."""
    from ray import tune

    original = tune.CheckpointConfig

    def config(*args, **kwargs):
        kwargs["num_to_keep"] = n
        return original(*args, **kwargs)

    tune.CheckpointConfig = config


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of ``durations`` started in this order, each on the first free slot."""
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        t = heapq.heappop(free)
        heapq.heappush(free, t + d)
        end = max(end, t + d)
    return end


def full_after(trials: list[dict], start: float, slots: int) -> float:
    """Seconds from ``start`` until ``slots`` trials first ran at once (or the peak, if never)."""
    events = sorted([(t["t0"], 1) for t in trials] + [(t["end"], -1) for t in trials], key=lambda e: (e[0], e[1]))
    now, peak, when = 0, 0, start
    for at, d in events:
        now += d
        if now > peak:
            peak, when = now, at
        if now >= slots:
            return at - start
    return when - start


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def check_gpus(trials: list[dict], per_trial: float, gpus: int) -> dict:
    """Whether every running trial had its GPU share: at most 1/per_trial trials per GPU id at
    once (fractions), and disjoint whole GPUs (per_trial >= 1)."""
    ids = {i: [g for g in (t["gpu_ids"] or "").split(",") if g] for i, t in enumerate(trials)}
    ok_count = all(len(v) == max(1, int(per_trial)) for v in ids.values())
    worst = 0
    for i, t in enumerate(trials):  # at each trial's start: who else runs, on which GPU ids
        at = t["t0"]
        running = [j for j, u in enumerate(trials) if u["t0"] <= at < u["end"]]
        per_gpu: dict[str, int] = {}
        for j in running:
            for g in ids[j]:
                per_gpu[g] = per_gpu.get(g, 0) + 1
        worst = max([worst, *per_gpu.values()])
    cap = 1 if per_trial >= 1 else int(round(1 / per_trial))
    return {"ids_per_trial_ok": ok_count, "max_trials_per_gpu": worst, "allowed_per_gpu": cap,
            "distinct_gpu_ids": sorted({g for v in ids.values() for g in v}), "ok": ok_count and worst <= cap}


def _f(xs) -> str:
    return "[" + ", ".join(f"{x:.1f}" for x in xs) + "]"


def show(r: dict) -> None:
    print(f"  [{r['design']}] {r['tuners']} tuner(s), {r['trials']} trials ({r['outcomes']}), {r['results']} results, "
          f"errors {r['errors']}")
    print(f"    wall {r['wall_s']:.1f} s; minimum {r['minimum_s']:.1f} s; ratio {r['ratio']:.3f}; "
          f"utilization {r['utilization']:.1%}; occupancy {r['occupancy']:.1%}")
    print(f"    list-schedule bound {r['list_schedule_bound_s']:.1f} s (wall/bound {r['ratio_to_list_schedule']:.3f}); "
          f"first trial after {r['start_s']:.1f} s; tail {r['tail_s']:.1f} s; max concurrency {r['max_concurrency']}; "
          f"report waits {r['report_wait_s']:.0f} slot-s")
    if r["steady_ratio"]:
        print(f"    after the ramp (all slots first busy → end): wall {r['steady_wall_s']:.1f} s; work "
              f"{r['steady_work_s']:.0f} slot-s; ratio {r['steady_ratio']:.3f}; utilization {r['steady_utilization']:.1%}")
    g = r["actor_gaps"]
    if g["n"]:
        print(f"    an actor between two trials: {g['n']} gaps, {g['total_slot_s']:.0f} slot-s in all, median "
              f"{g['median_s']:.2f} s, p90 {g['p90_s']:.2f} s")
    print(f"    per Tuner: fit {_f(r['fit_walls_s'])} s, first trial after {_f(r['fit_start_s'])} s, all slots busy "
          f"after {_f(r['full_after_s'])} s; trial actor processes {r['actor_processes']}")
    print("    Ray processes by name (CPU-s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                          r["ray_processes_cpu_s_by_name"].items()))
    print(f"    driver CPU {r['driver_cpu_s']:.1f} s = {r['driver_cpu_s_per_1000_results']:.1f} s per 1,000 results; "
          f"Ray processes {r['ray_processes_cpu_s']:.1f} s; machine busy {r['machine_busy_fraction']:.0%} of "
          f"{os.cpu_count()} cores; MLflow trial runs {r['mlflow_trial_runs']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["arms", "tasks", "gpu"], default="arms")
    ap.add_argument("--design", choices=["after", "before", "both"], default="both")
    ap.add_argument("--trials", type=int, help="trials per (task, arm) group (arms: 100, tasks: 32, gpu: 32)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of a trial that runs to the end")
    ap.add_argument("--reports", type=int, default=10, help="reports (evaluations) of a full trial")
    ap.add_argument("--slots", type=int, default=32, help="logical CPUs of the simulated cluster (1 per trial)")
    ap.add_argument("--gpus", type=int, default=4, help="logical GPUs (case gpu)")
    ap.add_argument("--grace-period", type=int, default=1, help="ASHA grace period, in reports")
    ap.add_argument("--checkpoint-kib", type=int, default=64)
    ap.add_argument("--num-to-keep", default="driver",
                    help="experiment: 'driver' (create_tuner's CheckpointConfig as is) or a number / 'none' to "
                         "replace its num_to_keep (Tune forces an experiment snapshot whenever a trial has "
                         "checkpointed num_to_keep times since the last one)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()

    import ray

    from benchmarks.standin import Shape

    if a.num_to_keep != "driver":
        patch_num_to_keep(None if a.num_to_keep == "none" else int(a.num_to_keep))
    trials = a.trials or {"arms": 100, "tasks": 32, "gpu": 32}[a.case]
    tasks = TASKS[:1] if a.case in ("arms", "gpu") else TASKS
    methods = METHODS if a.case != "gpu" else ["dynsdpb"]
    shape = Shape(seconds=a.seconds, reports=a.reports, checkpoint_kib=a.checkpoint_kib)
    work = Path(tempfile.mkdtemp(prefix="sweepscale-"))
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    t = time.time()
    ray.init(num_cpus=a.slots, num_gpus=a.gpus if a.case == "gpu" else 0, _temp_dir=temp,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.time() - t
    print(f"case {a.case}: {len(tasks)} task(s) × {len(methods)} arm(s) × {trials} trials, {a.reports} reports × "
          f"{a.seconds / a.reports:g} s, checkpoint {a.checkpoint_kib} KiB, {a.slots} slots"
          + (f", {a.gpus} logical GPUs" if a.case == "gpu" else "") + f"; Ray start {ray_start:.1f} s")
    figures = {"case": a.case, "args": vars(a), "tasks": tasks, "methods": methods, "trials_per_group": trials,
               "ray_start_s": ray_start, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                    "ray": ray.__version__}, "runs": []}
    if a.case == "gpu":
        for per_trial, res in ((0.25, None), (2, {"cpu": 1, "gpu": 2})):
            spec = build_spec(f"scale-gpu{per_trial:g}".replace(".", "_"), tasks, methods, trials, a.reports,
                              a.grace_period, gpus=per_trial)
            slots = int(min(a.slots, a.gpus / per_trial))  # the trials that fit at once: the minimum's slots
            r = run_design("after", spec, shape, slots, work / f"gpu{per_trial:g}", gpu_resources=res)
            r["gpus_per_trial"] = per_trial
            r["gpu_check"] = check_gpus(r["_trials"], per_trial, a.gpus)
            r["expected_concurrency"] = slots
            show(r)
            print(f"    {per_trial:g} GPU per trial: max concurrency {r['max_concurrency']} (expected "
                  f"{r['expected_concurrency']}); GPU check {r['gpu_check']}")
            figures["runs"].append({k: v for k, v in r.items() if k != "_trials"})
    else:
        designs = ["after", "before"] if a.design == "both" else [a.design]
        for d in designs:
            spec = build_spec(f"scale-{a.case}-{d}", tasks, methods, trials, a.reports, a.grace_period)
            r = run_design(d, spec, shape, a.slots, work)
            show(r)
            figures["runs"].append({k: v for k, v in r.items() if k != "_trials"})
        if len(figures["runs"]) == 2:
            after, before = figures["runs"]
            print(f"  before/after wall: {before['wall_s'] / after['wall_s']:.2f}×")
    figures["load_average_end"] = os.getloadavg()
    ray.shutdown()
    if a.json:
        write_json(a.json, figures)


if __name__ == "__main__":
    main()
