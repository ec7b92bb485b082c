"""Does one Tune experiment for every (task, arm) keep a large cluster full, and what does our
driver cost over a plain ``Tuner``? Stand-in trials on a simulated cluster.

Every design runs the same stand-in trial (:mod:`benchmarks.standin`: the real trial's report
keys, number of reports and a checkpoint per report, but ``time.sleep`` instead of training),
one design after the other in this process, on one ``ray.init(num_cpus=SLOTS[, num_gpus=G])``
(logical CPUs on this machine, one per trial). The designs (:mod:`benchmarks.scale_designs`):

- ``after``: our driver's own pieces (``create_tuner`` over every group, ``fit_tuner``, the MLflow
  trial callback, the progress callback, the checkpoint pruner); ``after:no-mlflow``,
  ``after:pending=200``, ``after:asha``, ... switch one piece at a time;
- ``before``: the old sweep, one Tuner per (task, arm) in sequence;
- ``tune``: a plain ``Tuner``: random search, FIFO or Tune's ``ASHAScheduler`` with the same
  rungs, ``reuse_actors=True``, no callbacks;
- ``tune-optuna``: a plain ``Tuner`` with Tune's ``OptunaSearch`` and ``MLflowLoggerCallback``.

Figures per design (:mod:`benchmarks.scale_figures`): work = Σ over trials of reports made ×
seconds per report; **minimum** = work / slots; **ratio** = wall / minimum (wall: creating and
fitting the Tuner(s), our MLflow flush included, Ray's start excluded); **utilization** = work /
(slots × wall); occupancy (trial function entered → last report, so it includes waits in
``tune.report``); the list-schedule bound; the ratio **after the ramp** (from the moment all slots
were first busy); the actor's idle time between two trials; driver CPU per 1,000 results
(``getrusage``) and Ray's processes' CPU by process title (psutil). Then **ours / each other
design** for the ratio and for utilization: ratios within one run.

    python benchmarks/sweep_scale.py --design after,tune --trials 100 --seconds 10 --reports 10 --slots 32 \
        --grace-period 10 --json benchmarks/results/vs_tune_full.json        # every trial to the end
    python benchmarks/sweep_scale.py --design after,tune-optuna --trials 100 --grace-period 10
    python benchmarks/sweep_scale.py --design after,after:no-mlflow,after:pending=200 --trials 50
    python benchmarks/sweep_scale.py --design after,tune --trials 6 --seconds 2 --reports 2 --slots 8  # smoke
    python benchmarks/sweep_scale.py --case gpu --trials 32 --seconds 4 --reports 2 --grace-period 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from benchmarks.scale_designs import run_design  # noqa: E402
from benchmarks.scale_figures import check_gpus, show  # noqa: E402
from benchmarks.timing import write_json  # noqa: E402
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

METHODS = ["vanilla", "dlb", "dynsdpb"]
TASKS = ["rte", "mrpc", "sst2"]
DESIGNS = ("after", "before", "tune", "tune-optuna")


def build_spec(name: str, tasks: list[str], methods: list[str], trials: int, reports: int, grace: int,
               gpus: float = 0):
    """The sweep file, built in code: the searched ranges of the real sweep files."""
    from tune_dynsdpb.search_space import parse_search_space

    arm = {"alpha0": {"low": 0.5, "high": 2.0}, "tau0": {"low": 1.0, "high": 5.0}}
    raw = {"name": name, "tasks": [{"task": t, "metric": "eval_accuracy", "mode": "max"} for t in tasks],
           "model": "standin", "methods": methods, "seed": 0,
           "budget": {"num_samples": trials, "evals_per_epoch": reports, "grace_period": grace,
                      "reduction_factor": 2},
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus},
           "params": {"common": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}, "num_train_epochs": 1,
                                 "per_device_train_batch_size": 16, "weight_decay": 0.01},
                      "dlb": arm, "dlb_warmup": arm,
                      "dynsdpb": {**arm, "lambda_alpha": {"low": 0.0, "high": 1.0},
                                  "lambda_tau": {"low": -0.5, "high": 0.5}, "granularity": "sample"}}}
    return parse_search_space(raw, f"<{name}>")


def compare(runs: list[dict]) -> list[dict]:
    """Ours (the first design) / each other design: the ratio to the minimum and utilization."""
    ours, out = runs[0], []
    for r in runs[1:]:
        c = {"ours": ours["design"], "peer": r["design"], "ratio": ours["ratio"] / r["ratio"],
             "utilization": ours["utilization"] / r["utilization"], "wall": ours["wall_s"] / r["wall_s"],
             "steady_ratio": (ours["steady_ratio"] / r["steady_ratio"]
                              if ours["steady_ratio"] and r["steady_ratio"] else None)}
        print(f"  {c['ours']} / {c['peer']}: wall/minimum {ours['ratio']:.3f} / {r['ratio']:.3f} = "
              f"**{c['ratio']:.3f}×**; utilization {ours['utilization']:.1%} / {r['utilization']:.1%} = "
              f"**{c['utilization']:.3f}×**; wall {c['wall']:.3f}×"
              + (f"; after the ramp {c['steady_ratio']:.3f}×" if c["steady_ratio"] else ""))
        out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["arms", "tasks", "gpu"], default="arms")
    ap.add_argument("--design", default="after,tune",
                    help=f"comma-separated, run in this order, the first compared with the rest: {', '.join(DESIGNS)}; "
                         "variants of ours: after:no-mlflow, :no-pruner, :no-progress, :asha, :fifo, :pending=N|auto, "
                         ":keep=N|none (combinable: after:no-mlflow:no-pruner)")
    ap.add_argument("--trials", type=int, help="trials per (task, arm) group (arms: 100, tasks: 32, gpu: 32)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of a trial that runs to the end")
    ap.add_argument("--reports", type=int, default=10, help="reports (evaluations) of a full trial")
    ap.add_argument("--slots", type=int, default=32, help="logical CPUs of the simulated cluster (1 per trial)")
    ap.add_argument("--gpus", type=int, default=4, help="logical GPUs (case gpu)")
    ap.add_argument("--grace-period", type=int, default=1,
                    help="ASHA grace period, in reports (= --reports: every trial runs to the end)")
    ap.add_argument("--checkpoint-kib", type=int, default=64)
    ap.add_argument("--tune-loggers", choices=["default", "json"], default="default",
                    help="the plain Tuners' loggers: Tune's default (CSV, JSON, TensorBoard) or JSON only, as ours")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    designs = [d.strip() for d in a.design.split(",") if d.strip()]
    bad = [d for d in designs if d.split(":")[0] not in DESIGNS]
    if bad:
        ap.error(f"--design: unknown {', '.join(bad)} (known: {', '.join(DESIGNS)})")

    import ray

    from benchmarks.standin import Shape

    trials = a.trials or {"arms": 100, "tasks": 32, "gpu": 32}[a.case]
    tasks = TASKS[:1] if a.case in ("arms", "gpu") else TASKS
    methods = METHODS if a.case != "gpu" else ["dynsdpb"]
    shape = Shape(seconds=a.seconds, reports=a.reports, checkpoint_kib=a.checkpoint_kib)
    work = Path(tempfile.mkdtemp(prefix="sweepscale-"))
    t = time.time()
    ray.init(num_cpus=a.slots, num_gpus=a.gpus if a.case == "gpu" else 0, _temp_dir=tempfile.mkdtemp(prefix="r"),
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.time() - t
    print(f"case {a.case}: {len(tasks)} task(s) × {len(methods)} arm(s) × {trials} trials, {a.reports} reports × "
          f"{a.seconds / a.reports:g} s, checkpoint {a.checkpoint_kib} KiB, {a.slots} slots"
          + (f", {a.gpus} logical GPUs" if a.case == "gpu" else "")
          + f"; Ray start {ray_start:.1f} s; load average {os.getloadavg()[0]:.1f}")
    figures = {"case": a.case, "args": vars(a), "tasks": tasks, "methods": methods, "trials_per_group": trials,
               "ray_start_s": ray_start, "load_average_start": os.getloadavg(), "runs": [],
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__}}
    if a.case == "gpu":  # 0.25-GPU trials must pack 4 per GPU; 2-GPU trials take whole, disjoint GPUs
        for per_trial, res in ((0.25, None), (2, {"cpu": 1, "gpu": 2})):
            spec = build_spec(f"scale-gpu{per_trial:g}".replace(".", "_"), tasks, methods, trials, a.reports,
                              a.grace_period, gpus=per_trial)
            slots = int(min(a.slots, a.gpus / per_trial))  # the trials that fit at once: the minimum's slots
            r = run_design("after", spec, shape, slots, work / f"gpu{per_trial:g}", gpu_resources=res)
            r.update(gpus_per_trial=per_trial, gpu_check=check_gpus(r["_trials"], per_trial), expected_concurrency=slots)
            show(r)
            print(f"    {per_trial:g} GPU per trial: max concurrency {r['max_concurrency']} (expected {slots}); "
                  f"GPU check {r['gpu_check']}")
            figures["runs"].append({k: v for k, v in r.items() if k != "_trials"})
    else:
        for i, d in enumerate(designs):
            spec = build_spec(f"scale-{a.case}-{i}", tasks, methods, trials, a.reports, a.grace_period)
            r = run_design(d, spec, shape, a.slots, work, loggers=a.tune_loggers)
            show(r)
            figures["runs"].append({k: v for k, v in r.items() if k != "_trials"})
            print(f"    load average {os.getloadavg()[0]:.1f}", flush=True)
            if a.json:  # after each design: a run cut short keeps what it measured
                write_json(a.json, figures)
        figures["compare"] = compare(figures["runs"])
    figures["load_average_end"] = os.getloadavg()
    ray.shutdown()
    if a.json:
        write_json(a.json, figures)


if __name__ == "__main__":
    main()
