"""Kernel launches and ATen calls of one training step's ``compute_loss`` (forward + backward)
per variant, on stub logits (as ``step_overhead.py``'s isolated extras), from ``torch.profiler``;
the 40 most frequent ops each. On a GPU every launch costs CPU time, which bounds a small model's
step (docs/benchmarks.md, "On a GPU").

    python benchmarks/loss_profile.py > loss_profile.txt
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
import torch
from torch.profiler import profile, ProfilerActivity
from transformers.modeling_outputs import SequenceClassifierOutput
from benchmarks.step_parts import make_dataset, make_model, make_trainer
from tune_dynsdpb.trainer import SAMPLE_IDS

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
a = argparse.Namespace(batch_size=16, seq_len=128, warmup_steps=1, steps=3, threads=4, device=dev.type)
B, half = 16, 8
ds = make_dataset(64, 128)
out = tempfile.mkdtemp()


class Stub(torch.nn.Module):
    """The same logits every call; the loss is their cross-entropy, as BERT's head computes it."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(B, 2, device=dev))

    def forward(self, labels=None, **kw):
        return SequenceClassifierOutput(loss=torch.nn.functional.cross_entropy(self.logits, labels), logits=self.logits)


labels = torch.randint(0, 2, (B,), device=dev)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
for v in ("vanilla", "dlb", "dynsdpb"):
    tr = make_trainer(v, make_model(), ds, a, out)
    tr.current_gradient_accumulation_steps = 1
    stub = Stub().train()

    def step(k):
        ids = torch.arange(k * half, (k + 2) * half, device=dev)  # [previous half | new half]
        inputs = {"labels": labels, SAMPLE_IDS: ids} if v != "vanilla" else {"labels": labels}
        tr.compute_loss(stub, inputs).backward()
        stub.logits.grad = None

    for k in range(20):  # warm-up
        step(k)
    n = 50
    with profile(activities=acts) as p:
        for k in range(20, 20 + n):
            step(k)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    ev = p.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in ev if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync", "cudaStreamSynchronize"))
    aten = sum(e.count for e in ev if e.key.startswith("aten::"))
    print(f"== {v}: per step {launches / n:.1f} kernel launches, {syncs / n:.2f} sync/memcpy calls, {aten / n:.1f} aten calls")
    rows = sorted((e for e in ev if e.key.startswith("aten::") or e.key.startswith("cuda")), key=lambda e: -e.count)[:40]
    for e in rows:
        print(f"   {e.key:45s} calls/step {e.count / n:6.2f}  self CPU us/step {e.self_cpu_time_total / n:8.1f}")
shutil.rmtree(out, ignore_errors=True)
