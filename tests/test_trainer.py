"""DynSDPBTrainer end to end on tiny models: every method on every head, resume, accumulation."""

import math
import random

import pytest
import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorForSeq2Seq, DataCollatorWithPadding, TrainerCallback)

import helpers
from tune_dynsdpb import DynSDPBConfig, DynSDPBTrainer, UserError
from tune_dynsdpb.trainer import SAMPLE_IDS

METHODS = ["vanilla", "dlb", "dynsdpb"]


def make_classification(tokenizer, n=32, regression=False, seed=0):
    rng = random.Random(seed)
    rows = [helpers._sentence(rng, i % 2) for i in range(n)]
    enc = tokenizer(rows, truncation=True, max_length=32)
    labels = [float(i % 2) * 4.0 + 0.5 for i in range(n)] if regression else [i % 2 for i in range(n)]
    return Dataset.from_dict({**enc, "labels": labels})


def make_causal(tokenizer, n=32):
    ids, labels = [], []
    for i in range(n):
        prompt = tokenizer(f"how many apples has the man {i % 5}", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f"he has {i % 5} apples", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels})


class Recorder(TrainerCallback):
    """Keeps every training log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.logs.append(dict(logs, step=state.global_step))


def build(kind, model_dir, out, method, steps=4, batch=4, **kw):
    tok = AutoTokenizer.from_pretrained(model_dir)
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        ds, collator = make_causal(tok), DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        ds, collator = make_classification(tok, regression=kind == "regression"), DataCollatorWithPadding(tok)
    kw = {"save_strategy": "no", "learning_rate": 1e-3, **kw}
    args = DynSDPBConfig(output_dir=str(out), method=method, per_device_train_batch_size=batch, max_steps=steps,
                         logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kw)
    rec = Recorder()
    trainer = DynSDPBTrainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[rec])
    return trainer, rec


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["classification", "regression", "causal"])
def test_four_steps_each_method_and_head(kind, method, tiny_bert, tiny_bert_regression, tiny_gpt2, tmp_path):
    model_dir = {"classification": tiny_bert, "regression": tiny_bert_regression, "causal": tiny_gpt2}[kind]
    trainer, rec = build(kind, model_dir, tmp_path, method)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"
    assert [log["step"] for log in rec.logs] == [1, 2, 3, 4]
    assert all(math.isfinite(log["loss"]) for log in rec.logs)
    if method == "vanilla":
        assert "consistency_loss" not in rec.logs[-1]
        return
    first, *rest = rec.logs
    assert "consistency_loss" not in first  # step 1 has no previous step to learn from
    for log in rest:
        assert log["consistency_loss"] > 0
        for key in ("ce_loss", "alpha_mean", "alpha_min", "alpha_max", "tau_mean", "tau_min", "tau_max",
                    "u_mean", "c_mean"):
            assert math.isfinite(log[key]), key
        assert log["alpha_min"] <= log["alpha_mean"] <= log["alpha_max"]
        assert log["tau_min"] <= log["tau_mean"] <= log["tau_max"]
        if method == "dlb":
            assert log["alpha_min"] == log["alpha_max"] == 1.0 and log["tau_mean"] == pytest.approx(3.0)


def test_batches_follow_the_previous_batch_chain(tiny_bert, tmp_path):
    trainer, _ = build("classification", tiny_bert, tmp_path, "dynsdpb", batch=6)
    batches = [b[SAMPLE_IDS].tolist() for b, _ in zip(trainer.get_train_dataloader(), range(6))]
    for prev, now in zip(batches, batches[1:]):
        assert now[:3] == prev[3:]


def test_zero_rates_give_dlb_losses(tiny_bert, tmp_path):
    runs = {}
    for method, extra in (("dlb", {}), ("dynsdpb", {"lambda_alpha": 0.0, "lambda_tau": 0.0})):
        trainer, rec = build("classification", tiny_bert, tmp_path / method, method, **extra)
        trainer.train()
        runs[method] = [(log["loss"], log.get("consistency_loss")) for log in rec.logs]
    assert runs["dlb"] == runs["dynsdpb"]


def test_gradient_accumulation_keeps_chain_and_scale(tiny_bert, tmp_path):
    """Accumulating 2 micro-batches of 4 walks the same chain as 2 steps of 4, so the same
    samples meet the same targets; the logged loss is the mean over the micro-batches."""
    acc, rec_acc = build("classification", tiny_bert, tmp_path / "acc", "dlb", steps=2, gradient_accumulation_steps=2)
    acc.train()
    assert len(rec_acc.logs) == 2
    for log in rec_acc.logs:
        assert math.isfinite(log["loss"])
    # the second optimizer step has two micro-batches with a consistency term
    assert rec_acc.logs[1]["consistency_loss"] > 0
    # ce + consistency is what the step optimised (up to the per-log averaging of the Trainer)
    log = rec_acc.logs[1]
    assert log["loss"] == pytest.approx(log["ce_loss"] + log["consistency_loss"], rel=1e-4)


def test_resume_continues_the_same_chain(tiny_bert, tmp_path):
    """Stop at step 3 with a checkpoint, resume: the next batches and losses equal an uninterrupted run."""
    def run(out, steps, resume=None, save=False):
        trainer, rec = build("classification", tiny_bert, out, "dynsdpb", steps=8,
                             save_strategy="steps" if save else "no", save_steps=3)
        seen = []
        original = trainer.compute_loss

        def spy(model, inputs, *a, **k):
            if SAMPLE_IDS in inputs:
                seen.append(inputs[SAMPLE_IDS].tolist())
            return original(model, inputs, *a, **k)

        trainer.compute_loss = spy
        if steps < 8:
            class Stop(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    control.should_training_stop = state.global_step >= steps
            trainer.add_callback(Stop())
        trainer.train(resume_from_checkpoint=resume)
        return seen, rec.logs

    full_ids, full_logs = run(tmp_path / "full", 8)
    run(tmp_path / "cut", 3, save=True)
    resumed_ids, resumed_logs = run(tmp_path / "cut", 8, resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert resumed_ids == full_ids[3:]
    for a, b in zip(resumed_logs, full_logs[3:]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["consistency_loss"] == pytest.approx(b["consistency_loss"], rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision(precision, tiny_bert, tmp_path):
    trainer, rec = build("classification", tiny_bert, tmp_path, "dynsdpb", **{precision: True})
    trainer.train()
    assert all(math.isfinite(log["consistency_loss"]) for log in rec.logs[1:])


def test_lora_causal_lm(tiny_gpt2, tmp_path):
    peft = pytest.importorskip("peft")
    # LoRA starts with B = 0, so outputs move slowly: use a LoRA-sized learning rate
    trainer, rec = build("causal", tiny_gpt2, tmp_path, "dynsdpb", learning_rate=5e-2)
    model = peft.get_peft_model(trainer.model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                               target_modules=["c_attn"]))
    trainer2 = DynSDPBTrainer(model=model, args=trainer.args, train_dataset=trainer.train_dataset,
                              data_collator=trainer.data_collator, callbacks=[rec])
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    trainer2.train()
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters() if v.requires_grad)
    assert rec.logs[-1]["consistency_loss"] > 0


@pytest.mark.parametrize("field,value,match", [
    ("per_device_train_batch_size", 3, "per_device_train_batch_size"),
    ("per_device_train_batch_size", 1, "per_device_train_batch_size"),
    ("alpha0", -0.1, "alpha0"),
    ("tau0", 0.0, "tau0"),
    ("lambda_tau", -1.0, "lambda_tau"),
    ("lambda_alpha", -0.5, "lambda_alpha"),
    ("granularity", "token", "granularity"),
    ("tau_range", (4.0, 10.0), "tau_range"),
])
def test_config_rejects_bad_values(field, value, match, tmp_path):
    with pytest.raises(UserError, match=match) as e:
        DynSDPBConfig(output_dir=str(tmp_path), method="dynsdpb", report_to=[], **{field: value})
    assert "\n" not in str(e.value)


def test_vanilla_accepts_odd_batch(tmp_path):
    DynSDPBConfig(output_dir=str(tmp_path), method="vanilla", per_device_train_batch_size=3, report_to=[])


def test_grad_norm_logging_per_layer(tiny_bert, tmp_path):
    trainer, _ = build("classification", tiny_bert, tmp_path, "dynsdpb", grad_norm_log_steps=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if any(k.startswith("grad_norm/") for k in h)]
    assert [h["step"] for h in logged] == [1, 3]  # logged before the optimizer steps 2 and 4
    keys = {k for k in logged[0] if k.startswith("grad_norm/")}
    assert keys == {"grad_norm/embeddings", "grad_norm/layer_00", "grad_norm/layer_01", "grad_norm/head"}
    assert all(logged[0][k] > 0 for k in keys)
