"""The pieces of ``benchmarks/step_overhead.py``: the MiniLM-sized model, the data, the four
trainers, the step clock, the memory runs (fresh processes) and the isolated extras
(``compute_loss`` on stub logits, the DataLoader alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.timing import proc_status_kib, reset_peak_rss, ru_maxrss_bytes

VARIANTS = ("plain", "vanilla", "dlb", "dynsdpb")
MEM_MARK = "STEP_OVERHEAD_MEMORY "

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


def measure_memory(a, script: str) -> dict:
    """``--memory-repeats`` rounds of one fresh process per variant; per variant the run with the
    median peak (CUDA: max allocated) is kept, with every sample under ``samples``."""
    key = "cuda_max_memory_allocated_bytes" if a.device == "cuda" else "peak_rss_bytes"
    runs = {v: [] for v in VARIANTS}
    flags = ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
             "--warmup-steps", str(a.warmup_steps), "--threads", str(a.threads), "--device", a.device]
    for r in range(a.memory_repeats):
        for v in VARIANTS:
            print(f"memory: fresh process for {v} ({r + 1}/{a.memory_repeats})", flush=True)
            proc = subprocess.run([sys.executable, script, "--only", v, *flags],
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
    return out

