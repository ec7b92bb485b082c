"""The driver's MLflow writer alone: what it costs per result when many trials report in turn.

``--trials`` trials (32) report in turn, each once per ``--period`` seconds (1), ``--reports`` times
(10), through the package's own trial callback (``SweepTracker.trial_callback``: ``on_trial_start``,
``on_trial_result``, ``on_trial_complete``, as Tune calls them) into a SQLite store. Every report
has the stand-in trial's keys (:mod:`benchmarks.standin`) and Tune's own. Printed: the process's
CPU time per 1,000 results (the feeding loop sleeps between reports, so nearly all of it is the
writer thread's and MLflow's), and how long the final flush took after the last result.
No Ray: nothing but MLflow runs.

    python benchmarks/mlflow_writer.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from benchmarks.standin import Shape, standin_report  # noqa: E402
from tune_dynsdpb import results as R  # noqa: E402
from tune_dynsdpb.tracking import SweepTracker  # noqa: E402


class Trial:
    """What the callback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config, self.last_result = trial_id, config, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--reports", type=int, default=10)
    ap.add_argument("--period", type=float, default=1.0, help="seconds between two reports of one trial")
    a = ap.parse_args()

    uri = f"sqlite:///{tempfile.mkdtemp(prefix='mlflow-writer-')}/mlflow.db"
    tracker = SweepTracker(uri, "writer", "writer1")
    tracker.start_sweep({})
    tracker.start_arm("rte", "dlb")
    callback = tracker.trial_callback([("rte", "dlb")])
    config = {R.TASK: "rte", R.METHOD: "dlb", "learning_rate": 1e-4, "alpha0": 1.0, "tau0": 3.0}
    trials = [Trial(f"t{i:05d}", config) for i in range(a.trials)]
    shape = Shape(seconds=a.reports * a.period, reports=a.reports)

    cpu0, t0 = time.process_time(), time.time()
    for t in trials:
        callback.on_trial_start(0, trials, t)
    for k in range(1, a.reports + 1):
        for t in trials:
            time.sleep(a.period / a.trials)
            now = time.time()
            result = {**standin_report(config, shape, k, t0), "training_iteration": k, "time_this_iter_s": a.period,
                      "time_total_s": k * a.period, "time_since_restore": k * a.period, "iterations_since_restore": k,
                      "timestamp": now, "pid": 1, "done": k == a.reports}
            t.last_result = result
            callback.on_trial_result(0, trials, t, result)
    for t in trials:
        callback.on_trial_complete(0, trials, t)
    fed = time.time()
    assert callback.flush(600), "the writer did not drain in 10 minutes"
    results = a.trials * a.reports
    print(f"{results} results from {a.trials} trials: {1000 * (time.process_time() - cpu0) / results:.1f} s of CPU "
          f"per 1,000 results; flush {time.time() - fed:.1f} s after the last result; "
          f"{len(tracker.trial_runs())} trial runs")


if __name__ == "__main__":
    main()
