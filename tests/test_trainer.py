"""DynSDPBTrainer end to end on tiny models: every method on every head, resume, accumulation."""

import json
import math
import random
import re

import pytest
import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorForSeq2Seq, DataCollatorWithPadding, TrainerCallback)

import helpers
from tune_dynsdpb import DynSDPBConfig, DynSDPBTrainer, UserError
from tune_dynsdpb.params import METHODS
from tune_dynsdpb.trainer import SAMPLE_IDS, TrainingDiverged

assert METHODS == ("vanilla", "dlb", "dlb_warmup", "dynsdpb", "pbt")


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


def build(kind, model_dir, out, method, steps=4, batch=4, model_kw=None, evaluate=False, **kw):
    tok = AutoTokenizer.from_pretrained(model_dir)
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(model_dir, **(model_kw or {}))
        ds, collator = make_causal(tok), DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **(model_kw or {}))
        ds, collator = make_classification(tok, regression=kind == "regression"), DataCollatorWithPadding(tok)
    kw = {"save_strategy": "no", "learning_rate": 1e-3, "logging_steps": 1, **kw}
    args = DynSDPBConfig(output_dir=str(out), method=method, per_device_train_batch_size=batch, max_steps=steps,
                         report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kw)
    rec = Recorder()
    trainer = DynSDPBTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds if evaluate else None,
                             data_collator=collator, callbacks=[rec])
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
        if method in ("dlb", "dlb_warmup"):  # dlb_warmup's default 0.25 of 4 steps is step 1, which has no term anyway
            assert log["alpha_min"] == log["alpha_max"] == 1.0 and log["tau_mean"] == pytest.approx(3.0)


def test_batches_follow_the_previous_batch_chain(tiny_bert, tmp_path):
    trainer, _ = build("classification", tiny_bert, tmp_path, "dynsdpb", batch=6)
    batches = [b[SAMPLE_IDS].tolist() for b, _ in zip(trainer.get_train_dataloader(), range(6))]
    for prev, now in zip(batches, batches[1:]):
        assert now[:3] == prev[3:]


def test_zero_rates_give_dlb_losses(tiny_bert, tmp_path):
    """The math: dynsdpb at zero rates is dlb (which is why a config refuses zero rates: an arm
    must not train another arm; the rates are set past the check here)."""
    runs = {}
    for method in ("dlb", "dynsdpb"):
        trainer, rec = build("classification", tiny_bert, tmp_path / method, method)
        trainer.args.lambda_alpha = trainer.args.lambda_tau = 0.0
        trainer.train()
        runs[method] = [(log["loss"], log.get("consistency_loss")) for log in rec.logs]
    assert runs["dlb"] == runs["dynsdpb"]


def test_dynsdpb_at_nonzero_rates_differs_from_dlb(tiny_bert, tmp_path):
    """The same seed, batches and start, default rates (lambda_alpha=1, lambda_tau=0.5): step 1 (no
    term yet) is identical, then dynsdpb's per-sample alpha/tau, its consistency term, its loss and
    its weights part from dlb's. A dynsdpb that silently trains as dlb (both rates 0) fails here."""
    runs = {}
    for method in ("dlb", "dynsdpb"):
        trainer, rec = build("classification", tiny_bert, tmp_path / method, method, steps=4)
        trainer.train()
        runs[method] = rec.logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    (dlb, dlb_weights), (dyn, dyn_weights) = runs["dlb"], runs["dynsdpb"]
    assert [log["step"] for log in dlb] == [log["step"] for log in dyn] == [1, 2, 3, 4]
    assert dyn[0]["loss"] == dlb[0]["loss"]  # step 1: same model, same batch, no term for either
    # step 2 distils from the same previous logits: u and c agree, only the rates make the difference
    assert dyn[1]["u_mean"] == pytest.approx(dlb[1]["u_mean"], rel=1e-6)
    assert dyn[1]["c_mean"] == pytest.approx(dlb[1]["c_mean"], rel=1e-6)
    for d, s in zip(dlb[1:], dyn[1:]):
        assert d["alpha_min"] == d["alpha_max"] == 1.0 and d["tau_min"] == d["tau_max"] == pytest.approx(3.0)
        # alpha = alpha0 * c^1 with c < 1 for every sample, not one value for all
        assert s["alpha_max"] < 1.0 and s["alpha_min"] < s["alpha_max"] and s["alpha_mean"] < 1.0 - 1e-3
        # tau = tau0 * (1 + 0.5 u) with u > 0: above tau0, and per sample
        assert s["tau_min"] > 3.0 and s["tau_min"] < s["tau_max"]
        assert abs(s["consistency_loss"] - d["consistency_loss"]) > 1e-6 * max(d["consistency_loss"], 1e-9)
        assert s["loss"] != d["loss"]
    assert any(not torch.equal(dlb_weights[k], dyn_weights[k]) for k in dlb_weights), "same weights as dlb"


def spy_ids(trainer):
    """Records the sample ids of every training micro-batch, in order."""
    seen, original = [], trainer.compute_loss

    def spy(model, inputs, *a, **k):
        if SAMPLE_IDS in inputs:
            seen.append(inputs[SAMPLE_IDS].tolist())
        return original(model, inputs, *a, **k)

    trainer.compute_loss = spy
    return seen


def test_gradient_accumulation_keeps_chain_and_scale(tiny_bert, tmp_path):
    """Accumulating 2 micro-batches of 4 walks the same chain as 4 steps of 4 without
    accumulation, and each logged value is the mean over the step's micro-batches.

    Both runs use learning rate 0, so they see the same weights and their micro-batch losses must
    agree. Dropout (same seed, same order of forward passes) makes the soft targets differ from
    the current outputs, so the consistency term is not zero."""
    common = dict(learning_rate=0.0, model_kw={"hidden_dropout_prob": 0.1})
    # build and train one after the other: building seeds the global RNG that dropout draws from
    acc, rec_acc = build("classification", tiny_bert, tmp_path / "acc", "dlb", steps=2,
                         gradient_accumulation_steps=2, **common)
    ids_acc = spy_ids(acc)
    acc.train()
    plain, rec_plain = build("classification", tiny_bert, tmp_path / "plain", "dlb", steps=4, **common)
    ids_plain = spy_ids(plain)
    plain.train()
    assert len(ids_acc) == len(ids_plain) == 4 and ids_acc == ids_plain  # the same chain, link by link
    a, p = rec_acc.logs, rec_plain.logs
    assert [log["step"] for log in a] == [1, 2] and [log["step"] for log in p] == [1, 2, 3, 4]
    for step in (0, 1):
        first, second = p[2 * step], p[2 * step + 1]
        assert a[step]["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2, rel=1e-5)
        assert a[step]["ce_loss"] == pytest.approx((first["ce_loss"] + second["ce_loss"]) / 2, rel=1e-5)
    # the accumulated step 1: only its second micro-batch has a term (the first is the very first link)
    assert "consistency_loss" not in p[0]
    assert a[0]["consistency_loss"] == pytest.approx(p[1]["consistency_loss"], rel=1e-5)
    assert a[1]["consistency_loss"] == pytest.approx((p[2]["consistency_loss"] + p[3]["consistency_loss"]) / 2,
                                                     rel=1e-5)
    assert a[1]["consistency_loss"] > 1e-6
    # ce + consistency is what the step optimised
    assert a[1]["loss"] == pytest.approx(a[1]["ce_loss"] + a[1]["consistency_loss"], rel=1e-5)


def test_resume_continues_the_same_chain(tiny_bert, tmp_path):
    """Stop at step 3 with a checkpoint, resume: the next batches and losses equal an uninterrupted run."""
    def run(out, steps, resume=None, save=False):
        trainer, rec = build("classification", tiny_bert, out, "dynsdpb", steps=8,
                             save_strategy="steps" if save else "no", save_steps=3)
        seen = spy_ids(trainer)
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


def test_bf16_autocast_takes_effect(tiny_bert, tmp_path):
    """bf16=True must reach the accelerator and the forward pass: the classifier computes in
    bfloat16 under autocast, while the consistency term stays float32 and finite."""
    trainer, rec = build("classification", tiny_bert, tmp_path, "dynsdpb", bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    dtypes = []
    hook = trainer.model.classifier.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer.train()
    hook.remove()
    assert len(dtypes) == 4 and set(dtypes) == {torch.bfloat16}
    assert len(rec.logs) == 4 and all(math.isfinite(log["consistency_loss"]) for log in rec.logs[1:])


def test_without_bf16_the_forward_is_float32(tiny_bert, tmp_path):
    """The control of the test above: the same hook sees float32 when bf16 is off."""
    trainer, _ = build("classification", tiny_bert, tmp_path, "dynsdpb", steps=1)
    assert trainer.accelerator.mixed_precision == "no"
    dtypes = []
    trainer.model.classifier.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer.train()
    assert dtypes == [torch.float32]


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
    ("tau_range", (10.0, 4.0), "tau_range"),
    ("distill_warmup", 1.0, "distill_warmup"),
    ("distill_warmup", -0.1, "distill_warmup"),
    ("method", "dlb-warmup", "method"),
])
@pytest.mark.parametrize("method", ["dynsdpb", "dlb_warmup"])
def test_config_rejects_bad_values(field, value, match, method, tmp_path):
    with pytest.raises(UserError) as e:
        DynSDPBConfig(output_dir=str(tmp_path), **{"method": method, field: value}, report_to=[])
    assert str(e.value).startswith(f"{match}: ") and "\n" not in str(e.value)


def test_tau0_outside_tau_range_is_refused_for_dynsdpb_alone(tmp_path):
    """tau_range clamps dynsdpb's tau; the other methods never read it (tau0 3 outside [4, 10])."""
    for method in ("vanilla", "dlb", "dlb_warmup", "pbt"):
        DynSDPBConfig(output_dir=str(tmp_path), method=method, tau_range=(4.0, 10.0), report_to=[])
    with pytest.raises(UserError) as e:
        DynSDPBConfig(output_dir=str(tmp_path), method="dynsdpb", tau_range=(4.0, 10.0), report_to=[])
    assert str(e.value).startswith("tau_range: must satisfy 0 < low <= tau0 <= high")


def test_the_logged_statistics_take_a_per_gpu_loss_and_a_term_without_target_tokens(tiny_bert, tmp_path):
    """Under DataParallel (several GPUs, one process) the model's loss is one value per GPU; a causal
    LM's reused half may hold no target token (all -100), leaving a term over 0 rows. Neither may
    crash the statistics: the CE is averaged, and an empty term counts as a step without one."""
    from tune_dynsdpb.losses import Consistency

    trainer, rec = build("classification", tiny_bert, tmp_path, "dlb")
    empty = torch.zeros(0)
    trainer._stats_add(torch.tensor([1.0, 3.0]), None, None)  # two GPUs' losses: 2.0
    trainer._stats_add(torch.tensor(4.0), Consistency(torch.tensor(0.0), empty, empty, empty, empty), None)
    trainer.log({"loss": 3.0})
    (logged,) = rec.logs
    assert logged["ce_loss"] == pytest.approx(3.0) and "alpha_mean" not in logged


def test_vanilla_accepts_odd_batch(tiny_bert, tmp_path):
    """Vanilla does not split batches: a batch of 3 trains as batches of 3 (dlb rejects it)."""
    trainer, rec = build("classification", tiny_bert, tmp_path / "v", "vanilla", batch=3, steps=2)
    sizes, original = [], trainer.compute_loss

    def spy(model, inputs, *a, **k):
        sizes.append(inputs["labels"].shape[0])
        return original(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.train()
    assert sizes == [3, 3] and [log["step"] for log in rec.logs] == [1, 2]
    with pytest.raises(UserError, match="^per_device_train_batch_size: must be even"):
        DynSDPBConfig(output_dir=str(tmp_path / "d"), method="dlb", per_device_train_batch_size=3, report_to=[])


def test_nan_inf_filter_is_always_off(tmp_path):
    args = DynSDPBConfig(output_dir=str(tmp_path), logging_nan_inf_filter=True, report_to=[])
    assert args.logging_nan_inf_filter is False


# ----------------------------------------------------------------------------- dlb_warmup
class GradRecorder(TrainerCallback):
    """Every parameter's gradient right before each optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        params = self.trainer.model.named_parameters()
        self.steps.append({n: p.grad.detach().clone() for n, p in params if p.grad is not None})


def test_dlb_warmup_over_the_first_step_only_is_dlb(tiny_bert, tmp_path):
    """Same seed, a warm-up of only the first step (which has no targets anyway): the same losses
    and the same gradients as dlb, bit for bit (a warm-up of 0 is refused by the config)."""
    runs = {}
    for method in ("dlb", "dlb_warmup"):
        trainer, rec = build("classification", tiny_bert, tmp_path / method, method, distill_warmup=0.25)
        grads = GradRecorder(trainer)
        trainer.add_callback(grads)
        trainer.train()
        runs[method] = ([(log["loss"], log["ce_loss"], log.get("consistency_loss")) for log in rec.logs], grads.steps)
    (logs_dlb, grads_dlb), (logs_wu, grads_wu) = runs["dlb"], runs["dlb_warmup"]
    assert logs_dlb == logs_wu and len(logs_dlb) == 4 and logs_dlb[1][2] > 0
    assert len(grads_dlb) == len(grads_wu) == 4
    for g_dlb, g_wu in zip(grads_dlb, grads_wu):
        assert g_dlb.keys() == g_wu.keys() and all(torch.equal(g_dlb[k], g_wu[k]) for k in g_dlb)


def test_dlb_warmup_term_is_off_before_the_warmup_ends(tiny_bert, tmp_path):
    """distill_warmup=0.5 of 8 steps: steps 1-4 are CE only, steps 5-8 have dlb's term at full
    weight; the cache kept filling during the warm-up, so step 5 already has its targets."""
    trainer, rec = build("classification", tiny_bert, tmp_path, "dlb_warmup", steps=8, distill_warmup=0.5)
    trainer.train()
    assert [log["step"] for log in rec.logs] == list(range(1, 9))
    for log in rec.logs[:4]:
        assert "consistency_loss" not in log and log["loss"] == pytest.approx(log["ce_loss"], rel=1e-5)
    for log in rec.logs[4:]:
        assert "consistency_loss" in log and log["alpha_min"] == log["alpha_max"] == 1.0
        assert log["loss"] == pytest.approx(log["ce_loss"] + log["consistency_loss"], rel=1e-5)
    assert rec.logs[4]["consistency_loss"] > 1e-6  # the first step after the warm-up already has targets


# ----------------------------------------------------------------------------- divergence
MESSAGE = re.compile(r"^training diverged: non-finite (\w+) at step (\d+)$")


@pytest.mark.parametrize("method", ["vanilla", "dynsdpb"])
def test_a_real_divergence_raises(method, tiny_bert, tmp_path):
    """A learning rate of 1e6 (AdamW) sends the tiny model to NaN within a few steps: training
    stops at the first logging step that sees it, instead of logging a filtered, finite loss."""
    trainer, rec = build("classification", tiny_bert, tmp_path, method, steps=8, learning_rate=1e6)
    with pytest.raises(TrainingDiverged) as e:
        trainer.train()
    assert isinstance(e.value, RuntimeError)
    m = MESSAGE.match(str(e.value))
    assert m and m.groups() == (e.value.what, str(e.value.step))
    assert e.value.what == "ce_loss"  # the training CE is checked first, also for vanilla
    assert 1 <= e.value.step < 8 and e.value.step == trainer.state.global_step
    assert math.isnan(rec.logs[-1]["loss"]) and rec.logs[-1]["step"] == e.value.step  # logged as it was
    assert all(math.isfinite(log["loss"]) for log in rec.logs[:-1])


def test_a_real_divergence_caught_by_evaluation(tiny_bert, tmp_path):
    """No training log before the evaluation at step 4: the NaN weights show in eval_loss."""
    trainer, _ = build("classification", tiny_bert, tmp_path, "dlb", steps=8, learning_rate=1e6,
                       logging_steps=100, eval_strategy="steps", eval_steps=4, evaluate=True)
    with pytest.raises(TrainingDiverged, match=r"^training diverged: non-finite eval_loss at step 4$") as e:
        trainer.train()
    assert (e.value.what, e.value.step) == ("eval_loss", 4)


def test_grad_norm_logging_per_layer(tiny_bert, tmp_path):
    trainer, _ = build("classification", tiny_bert, tmp_path, "dynsdpb", grad_norm_log_steps=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if any(k.startswith("grad_norm/") for k in h)]
    assert [h["step"] for h in logged] == [1, 3]  # logged before the optimizer steps 2 and 4
    keys = {k for k in logged[0] if k.startswith("grad_norm/")}
    assert keys == {"grad_norm/embeddings", "grad_norm/layer_00", "grad_norm/layer_01", "grad_norm/head"}
    assert all(logged[0][k] > 0 for k in keys)


def test_the_last_report_carries_the_last_steps_training_stats(tiny_bert, data_dir, tmp_path):
    """The trial's reports (trainables.dynsdpb.fit, no Ray): 64 samples, batch 16, dlb: 8 steps,
    evaluations (and logs) every 3, so the last step (8) is no multiple of logging_steps. Its report
    must hold step 8's training log (its learning rate), not step 6's again."""
    from sweeps import spec_file
    from trainables.dynsdpb import fit
    from tune_dynsdpb.experiment import prepare_tasks
    from tune_dynsdpb.search_space import load_search_space

    spec = load_search_space(spec_file(tmp_path, tiny_bert, name="last", methods=["dynsdpb"],
                                       budget={"evals_per_epoch": 3}))
    (prepared,) = prepare_tasks(spec, str(tiny_bert), tmp_path / "cache", "spec", data_dir=str(data_dir)).values()
    reports = []
    config = {"task": "rte", "method": "dynsdpb", "learning_rate": 1e-3, "num_train_epochs": 1,
              "per_device_train_batch_size": 16, "lr_scheduler_type": "linear"}
    fit(config, prepared.job, prepared.train, prepared.eval, lambda m, ckpt: reports.append(m), None,
        str(tmp_path / "out"))
    assert [r["step"] for r in reports] == [3, 6, 8] and reports[-1]["final"]
    lrs = [r["learning_rate"] for r in reports]
    assert lrs == pytest.approx([1e-3 * 6 / 8, 1e-3 * 3 / 8, 1e-3 / 8]), lrs  # linear decay, as of steps 3, 6, 8
    # the trainer's own training logs, beside the reports: the last checkpoint's log history
    history = json.loads((tmp_path / "out" / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    logs = {log["step"]: log for log in history if "loss" in log}
    assert sorted(logs) == [3, 6, 8]
    for r in reports:  # each report holds its own step's training statistics
        for key in ("loss", "ce_loss", "consistency_loss", "alpha_mean", "tau_mean", "u_mean", "c_mean"):
            assert r[key] == logs[r["step"]][key], (r["step"], key)
    assert reports[-1]["u_mean"] != reports[-2]["u_mean"]  # (so step 6's would not pass as step 8's)
