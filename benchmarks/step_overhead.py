"""Step overhead of DLB / DynSDPB against plain fine-tuning, on a MiniLM-L6-sized BERT.

What is compared (same per-step batch B, same data, same initial weights, same TrainingArguments):

- ``plain``:   the stock ``transformers.Trainer`` with ``TrainingArguments``;
- ``vanilla``: ``DynSDPBTrainer`` with ``method="vanilla"`` (should cost what ``plain`` costs);
- ``dlb``:     ``DynSDPBTrainer`` with ``method="dlb"`` (static alpha0 / tau0);
- ``dynsdpb``: ``DynSDPBTrainer`` with ``method="dynsdpb"`` (the default knobs).

The model is ``BertForSequenceClassification`` built from a ``BertConfig`` the size of
all-MiniLM-L6 (hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522), random weights,
``num_labels=2``; nothing is downloaded. Every sample is exactly ``--seq-len`` tokens (random ids,
attention mask all ones), so every batch of every variant has the same shape and the same FLOPs.
All methods see B samples per step: for dlb/dynsdpb half of them are the previous step's second
half, which changes the data, not the compute.

How the time is measured, and why this way
------------------------------------------
Each variant runs through its Trainer's real training loop, ``trainer.train()``: nothing is
re-implemented here. A callback stamps ``time.perf_counter()`` (and the process CPU time) at every
``on_step_end``. In the Trainer loop the stretch between two consecutive ``on_step_end`` calls is
one whole optimizer step as training pays for it: logging/saving hooks of the previous step, the
DataLoader fetch (sampler + collator, where dlb/dynsdpb differ), ``on_step_begin``, forward, the
loss (where the consistency term lives), backward, gradient clipping, the optimizer and the
scheduler. Timing ``on_step_begin`` -> ``on_step_end`` instead would leave the data fetch out, and
timing whole ``train()`` calls would fold in per-call setup (optimizer wrapping, DataLoader
creation, the first step) that would then have to be subtracted as a separately measured, noisy
constant. So one ``train()`` call runs ``--warmup-steps + --steps`` optimizer steps and only the
last ``--steps`` end-to-end intervals count; the first step of every call (iterator start-up and,
for dlb/dynsdpb, the step with nothing cached yet to distil from) is never timed. Before the
repeats each trainer runs one untimed ``train()`` call of ``--warmup-steps + 1`` steps, which
creates the AdamW state and warms the allocator.

The four trainers live in one process and are interleaved: ``for r in repeats: for variant in a
rotating order: train()`` for K steps. A drift in machine load (this box is shared) then hits all
variants alike, and each repeat yields its own ratio ``t_variant / t_vanilla`` from measurements
taken seconds apart. The report gives the median step time per variant, and for each ratio the
median over repeats of the per-repeat ratios with its inter-quartile range. Between ``train()``
calls the soft-target cache of dlb/dynsdpb is cleared: each call restarts the sampler's chain at
epoch 0, so the cache of the previous call belongs to another chain (in one real run the chain is
never cut). Logging and checkpointing are off for all variants (``logging_strategy="no"``).

Threads and clocks
------------------
Every step is stamped on two clocks: wall time and the CPU time of this process. By default
torch runs one intra-op thread (``--threads 1``), and the targets are judged on CPU time
(``--clock auto``). On a machine that other processes share, a multi-threaded CPU step stalls at
every parallel region while one of its threads waits to be scheduled: on the loaded 2-core
development box a MiniLM step took 14-26 s wall with 2 threads against 3.5-6 s with 1, and
with 2 threads even the CPU time is inflated by spin-waiting. With one thread the work is done
by the calling thread alone (``dataloader_num_workers=0``, CPU autograd runs in the caller), so
process CPU time is the time of the step's work, and barely moves with the load of other
processes; on an idle machine it equals wall time. Pass ``--threads N --clock wall`` for
absolute multi-threaded throughput on a dedicated machine; on CUDA, ``auto`` means wall time
(with a ``torch.cuda.synchronize()`` before each stamp) since CPU time says nothing there.

Because the end-to-end ratio on a loaded 2-core machine cannot resolve 1 %, the script also
times the method's extra work in isolation, at high repetition: ``compute_loss`` of each trainer
on a stub model that returns fixed logits (so the difference to vanilla is exactly the
consistency term, the cache and the statistics, forward and backward; the difference of vanilla
to plain is our override's bookkeeping), and the training DataLoader alone (sampler +
collator). Their excess over the reference, divided by vanilla's measured step time, is a
high-resolution estimate of the overhead.

Peak memory: every variant also runs in a fresh subprocess (this script with ``--only VARIANT``)
that builds the same model/data/trainer and trains ``--warmup-steps + 2`` steps (every step after
the first has the same footprint, so that reaches the peak). It reports the peak RSS of the
process (``VmHWM``, imports and setup included), the increase of RSS during ``train()`` (VmHWM is
reset right before it), ``ru_maxrss``, and on CUDA ``torch.cuda.max_memory_allocated``. The peak
is read from VmHWM because on Linux a child's ``ru_maxrss`` starts from the RSS its parent had at
fork and survives execve: spawned from the parent after it built four trainers, every child
reported the parent's 2.4 GiB. The subprocesses therefore run first, while the parent is small,
and then ``ru_maxrss`` agrees with VmHWM. Identical fresh runs differ by about 2 % in peak RSS
(allocator), so ``--memory-repeats N`` runs N rounds and keeps each variant's median run.

Targets: dynsdpb/vanilla step time <= 1.03, dynsdpb/vanilla peak memory <= 1.05 (peak RSS on
CPU, max_memory_allocated on CUDA), vanilla/plain step time <= 1.02. A time verdict is marked
"not resolved" when the bootstrap 95 % interval of the median per-repeat ratio contains the
limit; ``--from-json`` pools the repeats of several saved runs to narrow it.

Defaults: B=16, seq 128, 1 thread, 3 timed steps + 1 warm-up step per call, 5 repeats; that is
about 100 optimizer steps of ~2.3 s CPU each, roughly 5 minutes on an idle 2-core machine and
up to ~10 when it is heavily shared. Examples::

    python benchmarks/step_overhead.py --json step_overhead.json
    python benchmarks/step_overhead.py --from-json step_overhead.json     # re-print a saved run
    python benchmarks/step_overhead.py --from-json run1.json run2.json    # pool the repeats of two runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from benchmarks.timing import (fmt_iqr, machine_cpu_s, print_table, proc_status_kib,  # noqa: E402
                               ratio_stats, reset_peak_rss, ru_maxrss_bytes, write_json)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("WANDB_DISABLED", "true")

VARIANTS = ("plain", "vanilla", "dlb", "dynsdpb")
TARGETS = {  # name -> (description, limit)
    "time_dynsdpb_vs_vanilla": ("dynsdpb / vanilla step time", 1.03),
    "mem_dynsdpb_vs_vanilla": ("dynsdpb / vanilla peak memory", 1.05),
    "time_vanilla_vs_plain": ("vanilla / plain Trainer step time", 1.02),
}
MEM_MARK = "STEP_OVERHEAD_MEMORY "
RATIOS = {"dynsdpb/vanilla": ("dynsdpb", "vanilla"), "dlb/vanilla": ("dlb", "vanilla"),
          "vanilla/plain": ("vanilla", "plain")}  # name -> (numerator, denominator)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="per-step batch B, even (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample, all samples full (default 128)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per train() call (default 3)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps at the start of each call (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds over the variants (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: see 'Threads and clocks' in the module docstring)")
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


# -- model, data, trainers ---------------------------------------------------------------------
def make_model(seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def make_dataset(n: int, seq_len: int, seed: int = 0):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30522, (n, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    labels = torch.randint(0, 2, (n,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "token_type_ids": torch.zeros_like(ids).tolist(),
                              "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()})


def make_trainer(variant: str, model, dataset, a: argparse.Namespace, out_dir: str, callbacks=()):
    from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

    from tune_dynsdpb import DynSDPBConfig, DynSDPBTrainer

    common = dict(output_dir=os.path.join(out_dir, variant), per_device_train_batch_size=a.batch_size,
                  max_steps=a.warmup_steps + a.steps, learning_rate=2e-5, logging_strategy="no",
                  save_strategy="no", report_to=[], disable_tqdm=True, seed=0, use_cpu=a.device == "cpu",
                  dataloader_num_workers=0)
    if variant == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=default_data_collator, callbacks=list(callbacks))
    else:
        trainer = DynSDPBTrainer(model=model, args=DynSDPBConfig(method=variant, **common), train_dataset=dataset,
                                 data_collator=default_data_collator, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # the end-of-train() metrics print, same for all variants
    return trainer


def dataset_size(a) -> int:
    # enough for one call of warmup + steps batches of fresh samples, so no call crosses an epoch
    return max(256, 2 * a.batch_size * (a.warmup_steps + a.steps))


class StepClock:
    """A TrainerCallback (built lazily) stamping wall and process-CPU time at every on_step_end."""

    def __new__(cls, device: str):
        import torch
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.wall, self.cpu = [], []

            def on_train_begin(self, args, state, control, **kw):
                self.wall, self.cpu = [], []

            def on_step_end(self, args, state, control, **kw):
                if device == "cuda":
                    torch.cuda.synchronize()
                self.wall.append(time.perf_counter())
                self.cpu.append(time.process_time())

        return _Clock()


# -- memory (first: measured in fresh processes while this one is small) -----------------------
def memory_only(a) -> None:
    """The --only run: one variant, fresh process, one train() call; prints a JSON line.

    Peak RSS comes from VmHWM, the high-water mark of this process's own address space. On Linux
    ``ru_maxrss`` is not that: a child starts from the RSS its parent had when it forked (and
    execve keeps it), so a child of a big parent reports the parent's size. It is recorded too.
    """
    import torch

    torch.set_num_threads(a.threads)
    kib = 1024
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(a.only, make_model(), make_dataset(dataset_size(a), a.seq_len), a, out_dir)
        # Every step after the first has the same footprint (AdamW state exists from step 1 on; dlb/dynsdpb
        # distil from step 2 on), so two steps after the warm-up ones reach the peak.
        trainer.args.max_steps = a.warmup_steps + 2
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        setup_peak = proc_status_kib("VmHWM")
        rss_before = proc_status_kib("VmRSS")
        reset = reset_peak_rss()
        trainer.train()
        train_peak = proc_status_kib("VmHWM")
    ru = ru_maxrss_bytes()
    if train_peak is None:  # not Linux: ru_maxrss is all there is
        rec = {"peak_rss_bytes": ru, "train_rss_increase_bytes": None, "peak_source": "ru_maxrss"}
    else:
        peak = max(setup_peak, train_peak) if reset else train_peak
        rec = {"peak_rss_bytes": peak * kib, "peak_source": "VmHWM",
               "setup_peak_rss_bytes": setup_peak * kib, "rss_before_train_bytes": rss_before * kib,
               "train_peak_rss_bytes": train_peak * kib if reset else None,
               "train_rss_increase_bytes": (train_peak - rss_before) * kib if reset else None}
    rec = {"variant": a.only, **rec, "ru_maxrss_bytes": ru}
    if a.device == "cuda":
        rec["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(MEM_MARK + json.dumps(rec), flush=True)


def measure_memory(a) -> dict:
    """``--memory-repeats`` rounds of one fresh process per variant; per variant the run with the
    median peak (CUDA: max allocated) is kept, with every sample under ``samples``."""
    key = "cuda_max_memory_allocated_bytes" if a.device == "cuda" else "peak_rss_bytes"
    runs = {v: [] for v in VARIANTS}
    flags = ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
             "--warmup-steps", str(a.warmup_steps), "--threads", str(a.threads), "--device", a.device]
    for r in range(a.memory_repeats):
        for v in VARIANTS:
            print(f"memory: fresh process for {v} ({r + 1}/{a.memory_repeats})", flush=True)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", v, *flags],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEM_MARK)]
            if proc.returncode or not lines:
                raise RuntimeError(f"memory run for {v} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[v].append(json.loads(lines[-1][len(MEM_MARK):]))
    out = {}
    for v, recs in runs.items():
        recs = sorted(recs, key=lambda rec: rec[key])
        out[v] = {**recs[(len(recs) - 1) // 2], "samples": [rec[key] for rec in recs]}
    return out


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


def time_components(a, trainers: dict, dataset) -> dict:
    """compute_loss (stub model with fixed logits, forward+backward) and the DataLoader, in isolation."""
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    from tune_dynsdpb.trainer import SAMPLE_IDS

    dev = torch.device("cuda" if a.device == "cuda" else "cpu")
    B, half = a.batch_size, a.batch_size // 2

    class Stub(torch.nn.Module):
        """Returns the same logits every call; the loss is the model's own CE, as BERT's head computes it."""

        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.randn(B, 2, device=dev))

        def forward(self, labels=None, **kw):
            loss = torch.nn.functional.cross_entropy(self.logits.view(-1, 2), labels.view(-1))
            return SequenceClassifierOutput(loss=loss, logits=self.logits)

    labels = torch.randint(0, 2, (B,), device=dev)
    n = 300

    def loss_time(trainer) -> float:
        stub = Stub().train()
        trainer.soft_targets.clear() if hasattr(trainer, "soft_targets") else None
        trainer.current_gradient_accumulation_steps = 1
        best = []
        for rnd in range(5):
            t0 = time.perf_counter()
            for i in range(n):
                k = rnd * n + i
                ids = torch.arange(k * half, (k + 2) * half, device=dev)  # [previous half | new half]
                # as in training: only the dlb/dynsdpb loader puts sample ids into the batch
                inputs = {"labels": labels, SAMPLE_IDS: ids} if hasattr(trainer, "soft_targets") and \
                    trainer.args.method != "vanilla" else {"labels": labels}
                loss = trainer.compute_loss(stub, inputs)
                loss.backward()
                stub.logits.grad = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best.append((time.perf_counter() - t0) / n)
        return min(best)

    def loader_time(trainer) -> float:
        best = []
        for _ in range(3):
            loader = trainer.get_train_dataloader()
            t0 = time.perf_counter()
            k = 0
            for batch in loader:
                k += 1
                if k == 40:
                    break
            best.append((time.perf_counter() - t0) / k)
        return min(best)

    out = {"compute_loss_stub_s": {}, "dataloader_batch_s": {}}
    order = VARIANTS
    for _ in range(2):  # interleave, keep the best of both rounds
        for v in order:
            for key, fn in (("compute_loss_stub_s", loss_time), ("dataloader_batch_s", loader_time)):
                t = fn(trainers[v])
                out[key][v] = min(out[key].get(v, float("inf")), t)
    for v in order:
        if hasattr(trainers[v], "_stats_reset"):
            trainers[v]._stats_reset()
    return out


# -- report ------------------------------------------------------------------------------------
def summarize(a, timing: dict, memory: dict | None) -> dict:
    runs = timing["runs"]
    per_repeat = {v: [statistics.fmean(x) for x in runs[v]["wall"]] for v in VARIANTS}
    per_repeat_cpu = {v: [statistics.fmean(x) for x in runs[v]["cpu"]] for v in VARIANTS}
    step = {v: {"median_s": statistics.median(per_repeat[v]), "min_s": min(per_repeat[v]),
                "median_cpu_s": statistics.median(per_repeat_cpu[v])} for v in VARIANTS}

    ratios = {k: ratio_stats(per_repeat[n], per_repeat[d]) for k, (n, d) in RATIOS.items()}
    ratios_cpu = {k: ratio_stats(per_repeat_cpu[n], per_repeat_cpu[d]) for k, (n, d) in RATIOS.items()}
    ratios_of_min = {k: step[n]["min_s"] / step[d]["min_s"] for k, (n, d) in RATIOS.items()}
    res = {"step_time": step, "ratios_wall": ratios, "ratios_cpu": ratios_cpu, "ratios_of_min_wall": ratios_of_min,
           "clock": a.clock}
    judged = ratios if a.clock == "wall" else ratios_cpu
    res["targets"] = {"time_dynsdpb_vs_vanilla": judged["dynsdpb/vanilla"]["median"],
                      "time_vanilla_vs_plain": judged["vanilla/plain"]["median"]}
    comp = timing.get("components")
    if comp:
        base = step["vanilla"]["median_s" if a.clock == "wall" else "median_cpu_s"]
        pairs = {"dlb/vanilla": ("dlb", "vanilla"), "dynsdpb/vanilla": ("dynsdpb", "vanilla")}
        if "plain" in comp["compute_loss_stub_s"]:
            pairs["vanilla/plain"] = ("vanilla", "plain")
        res["component_overhead"] = {
            k: {"compute_loss_extra_s": comp["compute_loss_stub_s"][v] - comp["compute_loss_stub_s"][ref],
                "dataloader_extra_s": comp["dataloader_batch_s"][v] - comp["dataloader_batch_s"][ref]}
            for k, (v, ref) in pairs.items()}
        for v, d in res["component_overhead"].items():
            d["fraction_of_vanilla_step"] = (d["compute_loss_extra_s"] + d["dataloader_extra_s"]) / base
    if memory:
        key = "cuda_max_memory_allocated_bytes" if a.device == "cuda" else "peak_rss_bytes"
        res["memory_metric"] = key
        res["memory_ratio"] = memory["dynsdpb"][key] / memory["vanilla"][key]
        inc = [memory[v].get("train_rss_increase_bytes") for v in ("dynsdpb", "vanilla")]
        res["memory_increase_ratio"] = inc[0] / max(1, inc[1]) if None not in inc else None
        res["targets"]["mem_dynsdpb_vs_vanilla"] = res["memory_ratio"]
    res["pass"] = {k: v <= TARGETS[k][1] for k, v in res["targets"].items()}
    # A time verdict is "resolved" when the bootstrap 95 % interval of the median ratio lies on one
    # side of the limit.
    res["ci95"] = {"time_dynsdpb_vs_vanilla": judged["dynsdpb/vanilla"], "time_vanilla_vs_plain": judged["vanilla/plain"]}
    res["resolved"] = {k: not (q["ci95_lo"] <= TARGETS[k][1] < q["ci95_hi"]) for k, q in res["ci95"].items()}
    return res


def print_report(a, timing, memory, summary) -> None:
    mib = 2 ** 20
    judged, other = ("wall", "cpu") if a.clock == "wall" else ("cpu", "wall")
    head = ["variant", "median step s", "min step s", "median CPU s/step", f"x vanilla, {judged} clock (IQR)"]
    if memory:
        head += ["peak RSS MiB", "train() RSS +MiB", "ru_maxrss MiB"]
        head += ["CUDA max alloc MiB"] if a.device == "cuda" else []
    rows = []
    for v in VARIANTS:
        s = summary["step_time"][v]
        if v == "vanilla":
            rel = "1"
        elif v == "plain":
            r = summary[f"ratios_{judged}"]["vanilla/plain"]
            rel = f"vanilla/plain {fmt_iqr(r)}"
        else:
            rel = fmt_iqr(summary[f"ratios_{judged}"][f"{v}/vanilla"])
        row = [v, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['median_cpu_s']:.3f}", rel]
        if memory:
            m = memory[v]
            inc = m.get("train_rss_increase_bytes")
            row += [f"{m['peak_rss_bytes'] / mib:.0f}", "-" if inc is None else f"{inc / mib:.0f}",
                    f"{m.get('ru_maxrss_bytes', m['peak_rss_bytes']) / mib:.0f}"]
            if a.device == "cuda":
                row.append(f"{m['cuda_max_memory_allocated_bytes'] / mib:.0f}")
        rows.append(row)
    title = (f"Step overhead: B={a.batch_size}, seq {a.seq_len}, {a.steps} timed steps x {a.repeats} repeats, "
             f"{a.device}, {timing['threads']} threads")
    print_table(title, head, rows)
    print(f"{other}-clock ratios (median of repeats, IQR): " + ", ".join(
        f"{k} {fmt_iqr(r)}" for k, r in summary[f"ratios_{other}"].items()))
    print("ratios of the fastest repeats (wall): "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["ratios_of_min_wall"].items()))
    if summary.get("component_overhead"):
        comp = timing["components"]
        print("isolated extras per step (best of rounds):")
        for v in comp["compute_loss_stub_s"]:
            print(f"  {v:8s} compute_loss on stub logits (fwd+bwd) {comp['compute_loss_stub_s'][v] * 1e6:8.1f} us, "
                  f"DataLoader {comp['dataloader_batch_s'][v] * 1e6:8.1f} us/batch")
        for k, d in summary["component_overhead"].items():
            print(f"  {k}: {d['compute_loss_extra_s'] * 1e6:+.1f} us loss, {d['dataloader_extra_s'] * 1e6:+.1f} us "
                  f"data per step = {100 * d['fraction_of_vanilla_step']:+.3f} % of a vanilla step")
    if memory:
        inc = summary["memory_increase_ratio"]
        print(f"memory dynsdpb/vanilla: {summary['memory_metric']} {summary['memory_ratio']:.3f}"
              + ("" if inc is None else f", RSS increase during train() {inc:.3f}")
              + " (peak RSS: VmHWM of each fresh process)")
    m = timing["machine_during_timing"]
    if "cpu_busy_fraction_others" in m:
        print(f"machine during timing: all CPUs {100 * m['cpu_busy_fraction_all']:.0f} % busy, "
              f"{100 * m['cpu_busy_fraction_others']:.0f} % by other processes; load avg 1 min "
              f"{min(m['loadavg_1min_per_repeat']):.2f}-{max(m['loadavg_1min_per_repeat']):.2f}")
    print(f"targets (time: median of per-repeat ratios on the {a.clock} clock, bootstrap 95 % interval):")
    for k, val in summary["targets"].items():
        desc, lim = TARGETS[k]
        ci = summary["ci95"].get(k)
        ci_txt = f" [{ci['ci95_lo']:.3f}, {ci['ci95_hi']:.3f}]" if ci else " " * 16
        note = "" if summary["resolved"].get(k, True) else "  (not resolved: the interval contains the limit)"
        print(f"  {desc:38s} {val:.3f}{ci_txt} <= {lim:.2f}  {'PASS' if summary['pass'][k] else 'FAIL'}{note}")


def reprint(paths: list[str], clock: str | None) -> int:
    """The report of one saved run, or of several pooled (their repeats concatenated)."""
    saved = []
    for path in paths:
        with open(path) as f:
            saved.append(json.load(f))
    same = ("batch_size", "seq_len", "threads", "device")
    for path, s in zip(paths[1:], saved[1:]):
        if any(s["args"][k] != saved[0]["args"][k] for k in same):
            raise SystemExit(f"--from-json: {path} differs from {paths[0]} in one of {', '.join(same)}")
    last = saved[-1]
    timing = {**last["timing"],
              "runs": {v: {c: [rep for s in saved for rep in s["timing"]["runs"][v][c]] for c in ("wall", "cpu")}
                       for v in VARIANTS},
              "machine_during_timing": {
                  "loadavg_1min_per_repeat": [x for s in saved
                                              for x in s["timing"]["machine_during_timing"]["loadavg_1min_per_repeat"]]}}
    clock = last["args"]["clock"] if clock is None else clock
    if clock == "auto":
        clock = "cpu" if last["args"]["threads"] == 1 and last["args"]["device"] == "cpu" else "wall"
    a = argparse.Namespace(**{**last["args"], "clock": clock, "repeats": sum(s["args"]["repeats"] for s in saved)})
    summary = summarize(a, timing, last["memory"])
    print_report(a, timing, last["memory"], summary)
    print(f"(re-printed from {', '.join(paths)}: torch {last['env']['torch']}"
          + (f"; {len(paths)} runs pooled, {a.repeats} repeats" if len(paths) > 1 else "") + ")")
    return 0


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
    memory = None if a.skip_memory else measure_memory(a)
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
