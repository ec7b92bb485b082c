"""Ray Tune with ``reuse_actors=True`` starts a worker process for nearly every trial when trials
end early (ASHA) and the cluster has free slots: a reproduction, plain Ray Tune only.

What happens (``ray/tune/execution/tune_controller.py``, ``_maybe_add_actors``): every PENDING
trial gets a new actor requested at once (up to ``TUNE_MAX_PENDING_TRIALS_PG``); when a cached
actor frees up first, the trial runs there and the new actor is removed (debug log: "Reusing ACTOR
... Removing ORIGINAL ACTOR"). While a slot is free, Ray has already started a worker process for
that new actor, so each such trial costs one wasted worker start (about 1.4 CPU-s here: a Python
process importing Ray). On a small head node this CPU is taken from the trials and the driver,
which slows the start of the actors that are needed, which keeps slots free: it feeds itself.

``max_concurrent_trials`` = the number of slots bounds the pending trials to the free slots but
does not avoid it: while fewer actors run than there are slots, every pending trial still gets a
new actor requested. (Measured in docs/benchmarks.md, "The worker churn, in both designs".)

The script runs the same plain Tuner (function trainable that sleeps, ``ASHAScheduler``, random
search, ``reuse_actors=True``) without and with ``max_concurrent_trials``, on ``--slots`` logical
CPUs, and counts the worker processes Ray started (distinct pids under the raylet, sampled every
0.1 s), the actors that ran trials, and the wall time.

    python benchmarks/tune_actor_churn.py --slots 16 --trials 120 --seconds 3 --reports 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time


def trainable(config):
    from ray import tune

    for i in range(config["reports"]):
        time.sleep(config["seconds"] / config["reports"])
        tune.report({"score": config["x"] * (i + 1), "pid": os.getpid()})


class Workers(threading.Thread):
    """Distinct worker processes (``default_worker.py`` / ``setup_worker.py`` / ``ray::``) seen."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil
        self.psutil, self.pids, self.stop = psutil, set(), threading.Event()

    def run(self):
        me = self.psutil.Process(os.getpid())
        while not self.stop.wait(0.1):
            for p in me.children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline())
                except self.psutil.Error:
                    continue
                if "default_worker.py" in cmd or "setup_worker.py" in cmd or (cmd.startswith("ray::")
                                                                              and "Agent" not in cmd):
                    self.pids.add(p.pid)


def run(a, concurrent: int | None) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    before = Workers()
    before.start()
    time.sleep(0.5)
    known = set(before.pids)  # idle workers from an earlier run
    t0 = time.time()
    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.uniform(0, 1), "seconds": a.seconds, "reports": a.reports},
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=a.trials, reuse_actors=True,
                                    max_concurrent_trials=concurrent,
                                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=a.reports,
                                                            grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="churn-"), verbose=0))
    grid = tuner.fit()
    wall = time.time() - t0
    before.stop.set()
    before.join()
    ran = {r.metrics.get("pid") for r in grid if r.metrics}
    out = {"max_concurrent_trials": concurrent, "trials": len(grid), "wall_s": wall,
           "actors_that_ran_trials": len(ran), "worker_processes_started": len(before.pids - known)}
    print(f"max_concurrent_trials={concurrent}: {out['trials']} trials in {wall:.1f} s; "
          f"{out['actors_that_ran_trials']} actors ran them; Ray started {out['worker_processes_started']} "
          "worker processes", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--seconds", type=float, default=3.0, help="a trial that runs to the end")
    ap.add_argument("--reports", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=a.slots, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=tempfile.mkdtemp(prefix="r"))
    print(f"ray {ray.__version__}, {a.slots} logical CPUs on {os.cpu_count()} cores; {a.trials} trials of "
          f"{a.reports} reports x {a.seconds / a.reports:g} s, ASHA grace 1, reduction 2", flush=True)
    for concurrent in (None, a.slots):
        run(a, concurrent)
    ray.shutdown()


if __name__ == "__main__":
    main()
