"""Step overhead of DLB / DynSDPB against plain fine-tuning, on a MiniLM-L6-sized BERT.

Compared at the same per-step batch B, data, initial weights and TrainingArguments: ``plain``
(the stock ``transformers.Trainer``), ``vanilla``, ``dlb`` and ``dynsdpb`` (``DynSDPBTrainer``,
default knobs). The model is ``BertForSequenceClassification`` from a ``BertConfig`` the size of
all-MiniLM-L6 (random weights, nothing downloaded); every sample is exactly ``--seq-len`` random
tokens, so every batch of every variant has the same shape (:mod:`benchmarks.step_parts`).

- **Time**: the real ``trainer.train()`` loop; a callback stamps wall and process-CPU time at every
  ``on_step_end``, so one step is the stretch between two stamps (DataLoader fetch, forward, loss,
  backward, clipping, optimizer, scheduler). Each ``train()`` call runs ``--warmup-steps`` untimed
  + ``--steps`` timed steps; the four trainers live in one process and are interleaved in a
  rotating order for ``--repeats`` rounds, so load drift hits all alike. Ratios are medians of
  per-repeat ratios, with IQR and a bootstrap 95 % interval (:mod:`benchmarks.step_report`).
  With ``--threads 1`` (default) the targets are judged on process CPU time, the steady clock on a
  shared machine; ``--threads N --clock wall`` for a dedicated one (CUDA: wall, synchronized).
- **Isolated extras**: each trainer's ``compute_loss`` on a stub model with fixed logits (the
  difference to vanilla is exactly the consistency term, the cache and the statistics), and the
  training DataLoader alone.
- **Memory**: each variant in a fresh process (``--only VARIANT``, run first, while this process
  is small): peak RSS from ``VmHWM`` (a child's ``ru_maxrss`` starts at its parent's RSS on
  Linux), the RSS increase during ``train()``; ``--memory-repeats N`` keeps each one's median.

Targets: dynsdpb/vanilla step time <= 1.03, dynsdpb/vanilla peak memory <= 1.05, vanilla/plain
step time <= 1.02; a time verdict is "not resolved" when the 95 % interval contains the limit.
The method's full reasoning and the recorded runs are in docs/benchmarks.md.

    python benchmarks/step_overhead.py --json step_overhead.json
    python benchmarks/step_overhead.py --from-json step_overhead.json     # re-print a saved run
    python benchmarks/step_overhead.py --from-json run1.json run2.json    # pool the repeats of two runs
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from benchmarks.step_parts import (VARIANTS, StepClock, dataset_size, make_dataset, make_model,  # noqa: E402
                                   make_trainer, measure_memory, memory_only, time_components)
from benchmarks.step_report import TARGETS, print_report, reprint, summarize  # noqa: E402
from benchmarks.timing import machine_cpu_s, write_json  # noqa: E402

for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
             ("TOKENIZERS_PARALLELISM", "false"), ("DISABLE_MLFLOW_INTEGRATION", "TRUE"), ("WANDB_DISABLED", "true")):
    os.environ.setdefault(k, v)

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="per-step batch B, even (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample, all samples full (default 128)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per train() call (default 3)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps at the start of each call (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds over the variants (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the steady clock on a shared machine)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default=None,
                   help="the clock the time targets are judged on; both are always reported. auto: process CPU "
                        "time with --threads 1 on cpu, else wall time (default auto; with --from-json: as saved)")
    p.add_argument("--from-json", metavar="IN", nargs="+",
                   help="re-print the report of saved --json runs, no training; several runs (same batch, "
                        "sequence, threads, device) are pooled: their repeats are concatenated, memory and "
                        "isolated timings come from the last")
    p.add_argument("--json", metavar="OUT", help="write every measurement and the summary to OUT")
    p.add_argument("--memory-repeats", type=int, default=1,
                   help="fresh processes per variant for memory; the median one is reported (default 1; "
                        "identical runs differ by about 2 %% in peak RSS)")
    p.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    p.add_argument("--skip-components", action="store_true", help="no isolated compute_loss/DataLoader timing")
    p.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: memory run of one variant
    a = p.parse_args(argv)
    if a.batch_size < 2 or a.batch_size % 2:
        p.error("--batch-size must be even and >= 2 (dlb/dynsdpb reuse half of every batch)")
    if not 2 <= a.seq_len <= 512:
        p.error("--seq-len must be in [2, 512]")
    if min(a.steps, a.repeats, a.warmup_steps, a.memory_repeats) < 1:
        p.error("--steps, --repeats, --warmup-steps and --memory-repeats must be >= 1")
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.threads < 1:
        p.error("--threads must be >= 1")
    if a.clock in (None, "auto") and not a.from_json:
        a.clock = "cpu" if a.threads == 1 and a.device == "cpu" else "wall"
    return a


# -- timing ------------------------------------------------------------------------------------
def time_steps(a, out_dir: str) -> dict:
    import torch

    model0 = make_model()
    dataset = make_dataset(dataset_size(a), a.seq_len)
    trainers, clocks = {}, {}
    for v in VARIANTS:
        clocks[v] = StepClock(a.device)
        trainers[v] = make_trainer(v, copy.deepcopy(model0), dataset, a, out_dir, [clocks[v]])
    del model0

    def one_call(v, steps=a.steps):
        t = trainers[v]
        if hasattr(t, "soft_targets"):
            t.soft_targets.clear()  # each train() restarts the chain at epoch 0 (see the docstring)
        t.args.max_steps = a.warmup_steps + steps
        t.train()
        c = clocks[v]
        w, p = c.wall[a.warmup_steps - 1:], c.cpu[a.warmup_steps - 1:]
        assert len(w) == steps + 1, (v, len(c.wall))
        return ([w[i + 1] - w[i] for i in range(steps)], [p[i + 1] - p[i] for i in range(steps)])

    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other processes compete; "
              "wall-clock ratios will be noisy", flush=True)
    print(f"warm-up: one untimed train() of {a.warmup_steps + 1} steps per variant", flush=True)
    for v in VARIANTS:
        one_call(v, steps=1)
    runs = {v: {"wall": [], "cpu": []} for v in VARIANTS}  # per repeat: list of per-step seconds
    load = []
    machine0, wall0, self_cpu0 = machine_cpu_s(), time.perf_counter(), time.process_time()
    for r in range(a.repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            wall, cpu = one_call(v)
            runs[v]["wall"].append(wall)
            runs[v]["cpu"].append(cpu)
        load.append(os.getloadavg()[0])
        print(f"repeat {r + 1}/{a.repeats}: " + "  ".join(
            f"{v} {statistics.fmean(runs[v]['wall'][-1]):.3f}s" for v in VARIANTS)
            + f"   (load avg 1 min {load[-1]:.2f})", flush=True)
    machine1, wall1, self_cpu1 = machine_cpu_s(), time.perf_counter(), time.process_time()
    machine = {"loadavg_1min_per_repeat": load}
    if machine0 is not None:
        busy, capacity = machine1[0] - machine0[0], (wall1 - wall0) * (os.cpu_count() or 1)
        machine["cpu_busy_fraction_all"] = busy / capacity
        machine["cpu_busy_fraction_others"] = max(0.0, busy - (self_cpu1 - self_cpu0)) / capacity

    components = None if a.skip_components else time_components(a, trainers, dataset)
    return {"runs": runs, "machine_during_timing": machine, "components": components,
            "threads": torch.get_num_threads()}



def main(argv=None) -> int:
    a = parse_args(argv)
    if a.only:
        memory_only(a)
        return 0
    if a.from_json:
        return reprint(a.from_json, a.clock)
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    t0 = time.time()
    # Memory first: the children are spawned while this process is still small (see memory_only).
    memory = None if a.skip_memory else measure_memory(a, os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out_dir:
        timing = time_steps(a, out_dir)
    summary = summarize(a, timing, memory)
    print_report(a, timing, memory, summary)
    print(f"total {time.time() - t0:.0f} s")
    if a.json:
        env = {"python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "processor": platform.processor()}
        write_json(a.json, {"args": {k: v for k, v in vars(a).items() if k not in ("only", "from_json")},
                            "env": env, "timing": timing, "memory": memory, "summary": summary, "targets": TARGETS,
                            "total_s": time.time() - t0}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
