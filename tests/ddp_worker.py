"""One rank of the DDP test in ``test_ddp.py``; started by ``torch.distributed.run`` with 2 processes:

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/ddp_worker.py OUT_DIR

Each rank builds the same tiny BERT (``helpers.write_tiny_bert`` under ``OUT_DIR/model_rank<r>``,
seeded, so identical) and ``DynSDPBTrainer`` (dynsdpb, gloo, CPU), then writes two files:

``control_rank<r>.json``, the negative control, before any training: a plain
``PreviousBatchSampler(num_replicas=1)`` DataLoader handed to the trainer's own
``accelerator.prepare`` and left as accelerate makes it, so its ``BatchSamplerShard`` deals whole
batches out round-robin. Only the batches are recorded (no model runs): the chain must break.

``train_rank<r>.json``: the sample ids of every training micro-batch on this rank, this rank's
own CE and consistency term at each step, the Trainer's logs, what step 1 must log (computed by
hand), a digest of the final parameters, two whole epochs of the trainer's DataLoader, and
under ``dlb`` the logs and parameter digest of the same run with ``method="dlb"``.
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


def write(out: Path, name: str, payload: dict) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(payload))
    tmp.rename(out / name)


def make_classification(tokenizer, n: int, seed: int = 0):
    import helpers
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [helpers._sentence(rng, i % 2) for i in range(n)]
    enc = tokenizer(rows, truncation=True, max_length=32)
    return Dataset.from_dict({**enc, "labels": [i % 2 for i in range(n)]})


def control(trainer, n: int, batch: int, seed: int) -> dict:
    """The loader without the trainer's fix: accelerate's batch sharding left in place."""
    from torch.utils.data import DataLoader

    from tune_dynsdpb.sampler import PreviousBatchSampler

    sampler = PreviousBatchSampler(n, batch, seed=seed)  # one chain over all the data
    loader = trainer.accelerator.prepare(DataLoader(list(range(n)), batch_size=batch, sampler=sampler,
                                                    drop_last=False))
    shard = loader.batch_sampler
    return {"rank": trainer.accelerator.process_index, "world_size": trainer.accelerator.num_processes,
            "shard": type(shard).__name__, "shard_num_processes": getattr(shard, "num_processes", None),
            "batches": [b.tolist() for b in loader], "unsharded": sampler.epoch_batches(0)}


def first_step_reference(trainer, ids_key: str) -> dict:
    """What step 1 must log, computed by hand before training: the plain cross-entropy of the
    initial model on this rank's first batch (step 1 has no consistency term), and the norm of
    the gradient DDP should apply, the mean over ranks of the per-rank gradients of that mean CE."""
    import torch.nn.functional as F

    batch = dict(next(iter(trainer.get_train_dataloader())))
    ids = batch.pop(ids_key).tolist()
    labels = batch.pop("labels")
    model = trainer.model
    model.zero_grad(set_to_none=True)
    ce = F.cross_entropy(model(**batch).logits, labels)
    ce.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    return {"ids": ids, "ce": ce.item(), "mean_grad_norm": flat.norm().item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    # (named so that none is a prefix of a torch.distributed.run option: its parser would take it)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=2e-2)  # large enough for a clearly positive term
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        run(args, out)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, out: Path) -> None:
    import helpers
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

    model_dir = helpers.write_tiny_bert(out / f"model_rank{os.environ['RANK']}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    def create_trainer(method: str, folder: str, model, rec):
        config = DynSDPBConfig(
            output_dir=str(out / folder), method=method, per_device_train_batch_size=args.batch_size,
            max_steps=args.max_steps, use_cpu=True, ddp_backend="gloo", logging_steps=1, report_to=[],
            save_strategy="no", learning_rate=args.learning_rate, seed=args.seed, disable_tqdm=True)
        return DynSDPBTrainer(model=model, args=config, train_dataset=make_classification(tok, args.samples),
                              data_collator=DataCollatorWithPadding(tok), callbacks=[rec])

    rec = Logs()
    trainer = create_trainer("dynsdpb", "trainer", model, rec)
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    rank = trainer.args.process_index
    write(out, f"control_rank{rank}.json", control(trainer, args.samples, args.batch_size, args.seed))

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
    first = first_step_reference(trainer, SAMPLE_IDS)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    params = [p.detach().cpu().contiguous() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.numpy().tobytes())

    # The trainer's own loader for two whole epochs, driven as the Trainer does (set_epoch each epoch).
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([b[SAMPLE_IDS].tolist() for b in loader])

    # The same start, data and seed with dlb: dynsdpb at its default (non-zero) rates must differ
    dlb_model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    dlb_rec = Logs()
    dlb_trainer = create_trainer("dlb", "trainer-dlb", dlb_model, dlb_rec)
    dlb_trainer.train()
    dlb_digest = hashlib.sha256()
    for p in dlb_trainer.accelerator.unwrap_model(dlb_trainer.model).parameters():
        dlb_digest.update(p.detach().cpu().contiguous().numpy().tobytes())

    write(out, f"train_rank{rank}.json", {
        "dlb": {"logs": dlb_rec.logs, "param_sha256": dlb_digest.hexdigest()},
        "rank": rank, "world_size": trainer.args.world_size, "global_step": trainer.state.global_step,
        "batches": batches, "terms": terms, "logs": rec.logs, "first_step": first,
        "param_sha256": digest.hexdigest(), "param_checksum": float(sum(p.double().sum() for p in params)),
        "params_changed": any(not torch.equal(a, b) for a, b in zip(before, params)), "epochs": epochs})


if __name__ == "__main__":
    main()
