"""What Ray Tune + Optuna + MLflow add per trial, against the same trials run back to back.

Both sides run the same K trials (tiny BERT, synthetic RTE-shaped data, fixed configs), one at
a time with the same CPU count:

- **baseline**: ``trainables.dynsdpb.fit`` called K times in this process, no Ray, no MLflow;
- **sweep**: ``run_sweep`` on a one-arm sweep file with ``num_samples = K`` and
  ``cpus_per_trial`` = all CPUs, so trials also run one at a time, tracked into SQLite MLflow.

Overhead per trial = (sweep wall time − Ray start − baseline wall time) / K. Ray's start-up is
reported on its own line: it is paid once per sweep, not per trial. Memory: peak RSS of this
driver process, and the summed RSS of Ray's processes at the end of the sweep.

    python benchmarks/sweep_overhead.py --trials 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def rss_mb(pids) -> float:
    import psutil
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def ray_pids() -> list[int]:
    import psutil
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and ("ray::" in cmd or "ray/" in cmd or (p.info["name"] or "").startswith(("raylet", "gcs_server"))):
            out.append(p.pid)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64, help="training samples per trial")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()

    import yaml

    import helpers
    from benchmarks.timing import ru_maxrss_bytes, write_json
    from tune_dynsdpb.data import load_task, tokenize_task
    from tune_dynsdpb.run import load_model

    work = Path(tempfile.mkdtemp(prefix="sweepbench-"))
    model = helpers.write_tiny_bert(work / "model")
    data = helpers.write_glue_dir(work / "data", n_train=a.samples, n_dev=32)
    cpus = os.cpu_count() or 2
    lrs = [1e-4 * (1.5 ** i) for i in range(a.trials)]
    spec = {"name": "bench", "task": "rte", "model": str(model), "max_length": 32, "methods": ["dynsdpb"],
            "budget": {"num_samples": a.trials, "evals_per_epoch": 2, "grace_period": 2},
            "resources": {"cpus_per_trial": cpus},
            "params": {"common": {"learning_rate": {"choices": lrs}, "num_train_epochs": 1,
                                  "per_device_train_batch_size": 16},
                       "dynsdpb": {"alpha0": 1.0, "tau0": 3.0, "lambda_alpha": 1.0, "lambda_tau": 0.5}},
            "points_to_evaluate": {"dynsdpb": []}}
    (work / "bench.yaml").write_text(yaml.safe_dump(spec))

    # -- baseline: the same trials back to back, no Ray -------------------------------------------
    import torch

    from trainables.dynsdpb import Job, fit
    torch.set_num_threads(cpus)
    task = load_task("rte", data)
    _, tok = load_model(str(model), task)
    train, dev = tokenize_task(task, tok, 32, cache_dir=work / "cache")
    job = Job(model_path=str(model), task=task, metric="eval_accuracy", evals_per_epoch=2, cpus_per_trial=cpus)
    t0 = time.perf_counter()
    for lr in lrs:
        config = {"task": "rte", "method": "dynsdpb", "learning_rate": lr, "num_train_epochs": 1,
                  "per_device_train_batch_size": 16, "alpha0": 1.0, "tau0": 3.0, "lambda_alpha": 1.0, "lambda_tau": 0.5}
        fit(config, job, train, dev, lambda m, c: None, None, str(work / "base" / str(lr)))
    baseline = time.perf_counter() - t0

    # -- the sweep ------------------------------------------------------------------------------
    import ray

    from tune_dynsdpb.sweep import run_sweep
    t0 = time.perf_counter()
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    ray.init(num_cpus=cpus, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_sweep(work / "bench.yaml", output_dir=work / "sweep", data_dir=str(data), progress=False)
    sweep = time.perf_counter() - t1
    ray_mem = rss_mb(ray_pids())
    ray.shutdown()
    driver_peak = ru_maxrss_bytes() / 2**20

    per_trial = (sweep - baseline) / a.trials
    figures = {"trials": a.trials, "cpus": cpus, "baseline_s": baseline, "sweep_s": sweep, "ray_start_s": ray_start,
               "overhead_per_trial_s": per_trial, "driver_peak_rss_mb": driver_peak, "ray_rss_mb": ray_mem}
    print(f"{a.trials} trials, {cpus} CPUs")
    print(f"  back to back, no Ray : {baseline:7.1f} s  ({baseline / a.trials:.2f} s/trial)")
    print(f"  Ray start (once)     : {ray_start:7.1f} s")
    print(f"  sweep (Tune+Optuna+MLflow): {sweep:7.1f} s  ({sweep / a.trials:.2f} s/trial)")
    print(f"  overhead per trial   : {per_trial:7.2f} s   target <= 3 s: {'PASS' if per_trial <= 3 else 'FAIL'}")
    print(f"  driver peak RSS      : {driver_peak:7.0f} MiB;  Ray processes RSS: {ray_mem:.0f} MiB")
    if a.json:
        write_json(a.json, figures)


if __name__ == "__main__":
    main()
