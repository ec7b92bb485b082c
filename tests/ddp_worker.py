"""One rank of the DDP tests in ``test_ddp.py``; started by ``torch.distributed.run`` with 2 processes.

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/ddp_worker.py \
        {train,control} OUT_DIR [--model DIR] [--n N] [--steps S]

``train``: a tiny BERT trained by ``DynSDPBTrainer`` (dynsdpb, gloo, CPU). Every rank records the
sample ids of each training micro-batch, its own consistency term at each step, the Trainer's
logs and a digest of its final parameters; then it walks two whole epochs of the trainer's own
DataLoader (no model) to check the chain across the epoch boundary.

``control``: no training. A plain ``PreviousBatchSampler(num_replicas=1)`` DataLoader handed to
``accelerator.prepare`` as is, so accelerate's ``BatchSamplerShard`` deals whole batches out
round-robin: each rank records the batches it gets. This is the bug the trainer works around.

Each rank writes ``OUT_DIR/<mode>_rank<r>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers

import torch  # noqa: E402

torch.set_num_threads(1)


def write(out: Path, mode: str, rank: int, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{mode}_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(payload))
    tmp.rename(out / f"{mode}_rank{rank}.json")


def control(args) -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from tune_dynsdpb.sampler import PreviousBatchSampler

    accelerator = Accelerator(cpu=True)
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    ids = list(range(args.n))
    sampler = PreviousBatchSampler(args.n, args.batch, seed=args.seed)  # one chain, num_replicas=1
    loader = accelerator.prepare(DataLoader(ids, batch_size=args.batch, sampler=sampler, drop_last=False))
    batches = [b.tolist() for b in loader]
    write(Path(args.out), "control", accelerator.process_index, {
        "rank": accelerator.process_index, "world_size": accelerator.num_processes, "batches": batches,
        "shard": type(loader.batch_sampler).__name__,
        "unsharded_batches": sampler.epoch_batches(0)})


def make_classification(tokenizer, n: int, seed: int = 0):
    import helpers
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [helpers._sentence(rng, i % 2) for i in range(n)]
    enc = tokenizer(rows, truncation=True, max_length=32)
    return Dataset.from_dict({**enc, "labels": [i % 2 for i in range(n)]})


def train(args) -> None:
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              TrainerCallback)

    from tune_dynsdpb import DynSDPBConfig, DynSDPBTrainer
    from tune_dynsdpb.trainer import SAMPLE_IDS

    class Logs(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs, step=state.global_step))

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    config = DynSDPBConfig(
        output_dir=str(Path(args.out) / "trainer"), method="dynsdpb", per_device_train_batch_size=args.batch,
        max_steps=args.steps, use_cpu=True, ddp_backend="gloo", logging_steps=1, report_to=[],
        save_strategy="no", learning_rate=1e-3, seed=args.seed, disable_tqdm=True)
    rec = Logs()
    trainer = DynSDPBTrainer(model=model, args=config, train_dataset=make_classification(tok, args.n),
                             data_collator=DataCollatorWithPadding(tok), callbacks=[rec])
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"

    batches, terms = [], []
    compute_loss, stats_add = trainer.compute_loss, trainer._stats_add

    def recording_compute_loss(model, inputs, *a, **kw):
        if model.training:
            batches.append(inputs[SAMPLE_IDS].tolist())
        return compute_loss(model, inputs, *a, **kw)

    def recording_stats_add(ce, term, num_items_in_batch):
        terms.append({"ce": ce.item(), "consistency": None if term is None else term.loss.item()})
        return stats_add(ce, term, num_items_in_batch)

    trainer.compute_loss, trainer._stats_add = recording_compute_loss, recording_stats_add
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    params = [p.detach().cpu().contiguous() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.numpy().tobytes())
    changed = any(not torch.equal(a, b.cpu()) for a, b in zip(before, params))

    # The trainer's own loader for two whole epochs, as the Trainer drives it (set_epoch each epoch).
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([b[SAMPLE_IDS].tolist() for b in loader])

    rank = trainer.args.process_index
    write(Path(args.out), "train", rank, {
        "rank": rank, "world_size": trainer.args.world_size, "batches": batches, "terms": terms,
        "logs": rec.logs, "param_sha256": digest.hexdigest(),
        "param_checksum": float(sum(p.double().sum() for p in params)), "params_changed": changed,
        "epochs": epochs, "global_step": trainer.state.global_step})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "control"])
    parser.add_argument("out")
    parser.add_argument("--model")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        (train if args.mode == "train" else control)(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
