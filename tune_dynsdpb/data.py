"""Tasks: GLUE, SuperGLUE, GSM8K and user files, loaded into one shape, scored and tokenized once.

:func:`load_task` reads a task from the original release layout on disk (``<data_dir>/glue/RTE/
train.tsv``, ``<data_dir>/superglue/CB/val.jsonl``, ``<data_dir>/gsm8k/test.jsonl``), from the
Hugging Face hub when no folder is given, or from any CSV/TSV/JSONL pair (``custom``, ``qa-jsonl``).
Every task becomes a :class:`Task`: raw text columns plus ``label``, or ``prompt``/``completion``
for causal LMs. Bad input raises :class:`UserError` with one line naming the file and the field.

COPA is encoded as a text pair (``"<premise> What was the <question>?"``, ``"<choice1> or
<choice2>"``) for sequence classification: a simplification, not multiple choice.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import datasets
import numpy as np

from .errors import UserError
from .params import check_value

TaskKind = Literal["classification", "regression", "causal_lm"]
_CACHE_VERSION = 2  # bump when the tokenized layout changes (2: causal-LM samples with a cut answer dropped)


# ----------------------------------------------------------------------------- metrics (GLUE definitions)
# scikit-learn computes them; these wrappers only fix the GLUE conventions (which class is
# positive, 0 rather than NaN or an exception where a score is undefined or there are no rows).
def accuracy(preds, labels) -> float:
    from sklearn.metrics import accuracy_score  # here: scikit-learn, ~1.1 s, only when a metric is computed
    return float(accuracy_score(np.asarray(labels), np.asarray(preds))) if len(labels) else 0.0


def f1_binary(preds, labels) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP; 0 when undefined."""
    from sklearn.metrics import f1_score  # here: see accuracy
    if not len(labels):
        return 0.0
    return float(f1_score(np.asarray(labels), np.asarray(preds), labels=[1], average="macro", zero_division=0))


def macro_f1(preds, labels) -> float:
    """Unweighted mean of per-class F1 over the classes seen in labels or predictions."""
    from sklearn.metrics import f1_score  # here: see accuracy
    p, y = np.asarray(preds), np.asarray(labels)
    if not len(y):
        return 0.0
    return float(f1_score(y, p, labels=np.union1d(p, y), average="macro", zero_division=0))


def matthews(preds, labels) -> float:
    """Matthews correlation (multi-class form); 0 when undefined, as scikit-learn reports it."""
    from sklearn.metrics import matthews_corrcoef  # here: see accuracy
    return float(matthews_corrcoef(np.asarray(labels), np.asarray(preds))) if len(labels) else 0.0


def _corr(fn):
    # A constant prediction has no correlation; report 0 rather than NaN so searches can rank it.
    def score(preds, labels) -> float:
        if len(labels) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
            return 0.0
        return float(fn(preds, labels)[0])
    return score


def _metric_table():
    from scipy import stats  # here: ~0.7 s, only for the correlation metrics
    return {"accuracy": accuracy, "f1": f1_binary, "macro_f1": macro_f1, "matthews_correlation": matthews,
            "pearson": _corr(stats.pearsonr), "spearmanr": _corr(stats.spearmanr)}


# ----------------------------------------------------------------------------- the Task
@dataclass(frozen=True, eq=False)
class Task:
    """One loaded task: raw train/eval splits plus what a trainer needs to build a head and score it."""

    name: str
    kind: TaskKind
    train: datasets.Dataset
    eval: datasets.Dataset
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    num_labels: int
    metric: str
    metric_mode: Literal["max", "min"]
    source: str
    metrics: tuple[str, ...] = ()  # everything compute_metrics reports, primary first

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        """HF-Trainer-compatible scorer; ``{}`` for causal LMs, whose metric is the eval loss."""
        if self.kind == "causal_lm":
            return {}
        preds = getattr(eval_pred, "predictions", None)
        labels = getattr(eval_pred, "label_ids", None)
        if preds is None:
            preds, labels = eval_pred[0], eval_pred[1]
        if isinstance(preds, (tuple, list)):  # models that return extra outputs
            preds = preds[0]
        preds, labels = np.asarray(preds), np.asarray(labels).reshape(-1)
        if self.kind == "regression":
            preds = preds.reshape(-1).astype(np.float64)
        elif preds.ndim > 1:
            preds = preds.argmax(-1)
        table = _metric_table()
        return {m: table[m](preds, labels) for m in self.metrics}


# ----------------------------------------------------------------------------- the task table
def _copa(c: dict) -> dict:
    return {"text_a": [f"{p} What was the {q}?" for p, q in zip(c["premise"], c["question"])],
            "text_b": [f"{a} or {b}" for a, b in zip(c["choice1"], c["choice2"])]}


def _qa(question: str, answer: str) -> Callable[[dict], dict]:
    def build(c: dict) -> dict:
        return {"prompt": [f"Question: {q}\nAnswer:" for q in c[question]],
                "completion": [" " + a for a in c[answer]]}
    return build


@dataclass(frozen=True)
class _Spec:
    kind: TaskKind
    folder: str                                # under data_dir
    files: tuple[str, str]                     # train, eval file names
    inputs: tuple[str, ...]                    # columns read, named as on the hub
    label_names: tuple[str, ...] | None        # hub label order
    metrics: tuple[str, ...] = ("accuracy",)   # primary first
    hub: tuple[str, str, str, str] | None = None  # dataset id, config, train split, eval split
    rename: dict = field(default_factory=dict)    # hub name -> column name in the local files
    header: tuple[str, ...] | None = None       # column names for files without a header row
    build: Callable[[dict], dict] | None = None  # derives the text fields from the inputs


_G, _SG, _TSV, _JSONL = "nyu-mll/glue", "aps/super_glue", ("train.tsv", "dev.tsv"), ("train.jsonl", "val.jsonl")
_ENT = ("entailment", "not_entailment")
_TASKS: dict[str, _Spec] = {
    "cola": _Spec("classification", "glue/CoLA", _TSV, ("sentence",), ("unacceptable", "acceptable"),
                  ("matthews_correlation", "accuracy"), (_G, "cola", "train", "validation"),
                  header=("source", "label", "original_mark", "sentence")),
    "sst2": _Spec("classification", "glue/SST-2", _TSV, ("sentence",), ("negative", "positive"),
                  hub=(_G, "sst2", "train", "validation")),
    "mrpc": _Spec("classification", "glue/MRPC", _TSV, ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                  ("f1", "accuracy"), (_G, "mrpc", "train", "validation"),
                  rename={"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "stsb": _Spec("regression", "glue/STS-B", _TSV, ("sentence1", "sentence2"), None, ("pearson", "spearmanr"),
                  (_G, "stsb", "train", "validation"), rename={"label": "score"}),
    "qqp": _Spec("classification", "glue/QQP", _TSV, ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("f1", "accuracy"), (_G, "qqp", "train", "validation"), rename={"label": "is_duplicate"}),
    "mnli": _Spec("classification", "glue/MNLI", ("train.tsv", "dev_matched.tsv"), ("premise", "hypothesis"),
                  ("entailment", "neutral", "contradiction"), hub=(_G, "mnli", "train", "validation_matched"),
                  rename={"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}),
    "qnli": _Spec("classification", "glue/QNLI", _TSV, ("question", "sentence"), _ENT,
                  hub=(_G, "qnli", "train", "validation")),
    "rte": _Spec("classification", "glue/RTE", _TSV, ("sentence1", "sentence2"), _ENT,
                 hub=(_G, "rte", "train", "validation")),
    "wnli": _Spec("classification", "glue/WNLI", _TSV, ("sentence1", "sentence2"), _ENT[::-1],
                  hub=(_G, "wnli", "train", "validation")),
    "boolq": _Spec("classification", "superglue/BoolQ", _JSONL, ("question", "passage"), ("False", "True"),
                   hub=(_SG, "boolq", "train", "validation")),
    "cb": _Spec("classification", "superglue/CB", _JSONL, ("premise", "hypothesis"),
                ("entailment", "contradiction", "neutral"), ("accuracy", "macro_f1"), (_SG, "cb", "train", "validation")),
    "copa": _Spec("classification", "superglue/COPA", _JSONL, ("premise", "choice1", "choice2", "question"),
                  ("choice1", "choice2"), hub=(_SG, "copa", "train", "validation"), build=_copa),
    "superglue-rte": _Spec("classification", "superglue/RTE", _JSONL, ("premise", "hypothesis"), _ENT,
                           hub=(_SG, "rte", "train", "validation")),
    "gsm8k": _Spec("causal_lm", "gsm8k", ("train.jsonl", "test.jsonl"), ("question", "answer"), None, ("loss",),
                   ("openai/gsm8k", "main", "train", "test"), build=_qa("question", "answer")),
}
_FILE_TASKS = ("custom", "qa-jsonl")  # built from the user's own files and options
_ALIASES = {k.replace("-", ""): k for k in (*_TASKS, *_FILE_TASKS)}


def list_tasks() -> list[str]:
    """Canonical task names accepted by :func:`load_task`."""
    return sorted((*_TASKS, *_FILE_TASKS))


def _canonical(name: str) -> str:
    n = str(name).strip().lower().replace("_", "-").replace("super-glue-", "superglue-")
    if n.startswith("glue-"):
        n = n[5:]
    elif n.startswith("superglue-") and n != "superglue-rte":
        n = n[10:]
    if n.replace("-", "") not in _ALIASES:
        raise UserError(f"unknown task {name!r} (known: {', '.join(list_tasks())})")
    return _ALIASES[n.replace("-", "")]


# ----------------------------------------------------------------------------- reading files
def _read(path: Path, need: dict[str, str], header: tuple[str, ...] | None = None):
    """Reads a TSV/CSV/JSONL file: (file line numbers, {name: values}) for ``need`` = {name: column}.

    TSV is split on tabs with no quote handling (like pandas ``quoting=QUOTE_NONE``, all strings);
    the csv module is used rather than pandas because pandas pads short rows silently, and every
    row here must have exactly the header's number of fields.
    """
    lines, rows, want = [], [], list(need.values())
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: the MRPC header starts with a BOM
            if path.suffix.lower() in (".jsonl", ".json"):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
                    missing = [c for c in want if c not in row]
                    if missing:
                        raise UserError(f"{path}: line {n}: missing field '{missing[0]}'")
                    lines.append(n)
                    rows.append([row[c] for c in want])
            else:
                tsv = path.suffix.lower() != ".csv"
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
                names = list(header) if header else next(reader, None)
                if names is None:
                    raise UserError(f"{path}: file is empty (no header row)")
                missing = [c for c in want if c not in names]
                if missing:
                    raise UserError(f"{path}: missing column '{missing[0]}' (columns: {', '.join(names)})")
                pos = [names.index(c) for c in want]
                for fields in reader:
                    if not any(fields):  # blank line
                        continue
                    if len(fields) != len(names):
                        raise UserError(f"{path}: line {reader.line_num}: expected {len(names)} "
                                        f"{'tab-' if tsv else ''}separated fields, found {len(fields)}")
                    lines.append(reader.line_num)
                    rows.append([fields[i] for i in pos])
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: unreadable CSV/TSV ({e})") from None
    if not rows:
        raise UserError(f"{path}: no data rows")
    return lines, {c: [r[i] for r in rows] for i, c in enumerate(need)}


def _as_label(v, where: str, kind: TaskKind, index: dict[str, int]):
    """One label value (string from a TSV, JSON value or hub int) -> class id or float."""
    s = v.strip() if isinstance(v, str) else v
    if s is None or s == "":
        raise UserError(f"{where}: empty label")
    if kind == "regression":
        try:
            x = float(s) if not isinstance(s, bool) else None
        except (TypeError, ValueError):
            x = None
        if x is None or not np.isfinite(x):
            raise UserError(f"{where}: label {v!r} is not a finite number")
        return x
    if isinstance(s, str) and s in index:
        return index[s]
    try:
        i = int(s) if isinstance(s, (bool, int)) or str(s).lstrip("+-").isdigit() else None
    except ValueError:
        i = None
    if i is None:
        raise UserError(f"{where}: unknown class {v!r} (expected one of: {', '.join(index)})")
    if not 0 <= i < len(index):
        raise UserError(f"{where}: class id {i} outside 0..{len(index) - 1} ({', '.join(index)})")
    return i


def _infer_names(values, where: str) -> tuple[str, ...]:
    """Custom tasks: class names sorted from the train labels, or "0".."C-1" for integer labels."""
    vals = {v.strip() if isinstance(v, str) else v for v in values} - {"", None}
    if all(isinstance(v, (bool, int)) or (isinstance(v, str) and v.lstrip("+-").isdigit()) for v in vals):
        ids = sorted({int(v) for v in vals})
        if ids != list(range(len(ids))):
            raise UserError(f"{where}: integer labels must be 0..C-1, found {ids[:10]} (or pass label_names)")
        return tuple(str(i) for i in ids)
    return tuple(sorted(str(v) for v in vals))


def _to_dataset(spec: _Spec, names, where: str, unit: str, lines, cols) -> datasets.Dataset:
    """Validated columns -> Dataset of the text fields (after ``build``) plus a typed ``label``."""
    kind, text = spec.kind, {}
    for c in spec.inputs:
        src = spec.rename.get(c, c)
        for n, v in zip(lines, cols[c]):
            if v is None:
                raise UserError(f"{where}: {unit} {n}: field '{src}' is empty (null)")
        text[c] = [v if isinstance(v, str) else str(v) for v in cols[c]]
    data = spec.build(text) if spec.build else text
    feats = {c: datasets.Value("string") for c in data}
    if kind != "causal_lm":
        index = {nm: i for i, nm in enumerate(names or ())}
        label_src = spec.rename.get("label", "label")
        data["label"] = [_as_label(v, f"{where}: column '{label_src}' {unit} {n}", kind, index)
                         for n, v in zip(lines, cols["label"])]
        feats["label"] = datasets.Value("float32" if kind == "regression" else "int64")
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


def _from_hub(spec: _Spec):
    hub_id, cfg, train_split, eval_split = spec.hub
    try:
        dd = datasets.load_dataset(hub_id, cfg)
        splits = [dd[train_split], dd[eval_split]]
    except Exception as e:  # offline, unknown id, missing split: all mean "use a local copy"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load {hub_id} ({cfg}) from the Hugging Face hub: {msg}; "
                        f"pass --data-dir with a local copy") from None
    need = [*spec.inputs, *(("label",) if spec.kind != "causal_lm" else ())]
    out = [(f"hf://{hub_id}/{cfg}[{split}]", "row", list(range(len(ds))), ds.select_columns(need)[:])
           for split, ds in zip((train_split, eval_split), splits)]
    return out, f"hf://{hub_id} ({cfg}: {train_split}, {eval_split})"


def _subsample(ds: datasets.Dataset, n, what: str, seed: int):
    if n is None:
        return ds, ""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"{what} must be a positive integer, got {n!r}")
    if n >= len(ds):
        return ds, f"; {what}={n} >= {len(ds)} rows: kept all"
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(idx.tolist()), f"; {what}={n}: random {n} of {len(ds)} rows (seed {seed})"


# ----------------------------------------------------------------------------- load_task
def _user_spec(key: str, text_fields, label_field, label_names, kind) -> _Spec:
    """The spec of a ``custom`` or ``qa-jsonl`` task, built from the user's options."""
    fields = (text_fields,) if isinstance(text_fields, str) else tuple(text_fields or ())
    if key == "qa-jsonl":
        if label_field or label_names or kind not in (None, "causal_lm"):
            raise UserError("task qa-jsonl is a causal LM over question/answer pairs: "
                            "label_field, label_names and kind do not apply")
        fields = fields or ("question", "answer")
        if len(fields) != 2:
            raise UserError(f"task qa-jsonl: text_fields must name 2 columns (question, answer), got {list(fields)}")
        return _Spec("causal_lm", "", ("", ""), fields, None, ("loss",), build=_qa(*fields))
    kind = kind or "classification"
    if kind not in ("classification", "regression"):
        raise UserError(f"task custom: kind must be classification or regression, got {kind!r}")
    missing = [k for k, v in (("text_fields", fields), ("label_field", label_field)) if not v]
    if missing:
        raise UserError(f"task custom needs text_fields and label_field; missing: {', '.join(missing)}")
    if len(fields) not in (1, 2):
        raise UserError(f"task custom: text_fields must name 1 or 2 columns, got {list(fields)}")
    return _Spec(kind, "", ("", ""), fields, tuple(label_names) if label_names else None,
                 ("accuracy",) if kind == "classification" else ("pearson", "spearmanr"), rename={"label": label_field})


def load_task(name: str, data_dir: str | os.PathLike | None = None, *, train_file=None, eval_file=None,
              text_fields: Sequence[str] | None = None, label_field: str | None = None,
              label_names: Sequence[str] | None = None, kind: TaskKind | None = None,
              max_train_samples: int | None = None, max_eval_samples: int | None = None, seed: int = 0) -> Task:
    """Loads a task by name (see :func:`list_tasks`) from ``data_dir``, the hub or the user's files.

    Built-in tasks read ``<data_dir>/<folder>/<file>``; ``train_file``/``eval_file`` replace those
    paths (relative ones resolve against ``data_dir``). ``data_dir=None`` without files: the hub.
    """
    key = _canonical(name)
    if key in _FILE_TASKS:
        spec = _user_spec(key, text_fields, label_field, label_names, kind)
        if not (train_file and eval_file):
            raise UserError(f"task {key} needs train_file and eval_file")
    else:
        spec = _TASKS[key]
        given = {"text_fields": text_fields, "label_field": label_field, "label_names": label_names, "kind": kind}
        if any(v is not None for v in given.values()):
            raise UserError(f"task {key}: {', '.join(k for k, v in given.items() if v is not None)} "
                            f"only apply to the custom and qa-jsonl tasks")

    if data_dir is None and train_file is None and eval_file is None:
        raw, source = _from_hub(spec)
    else:
        root, paths = Path(data_dir) if data_dir is not None else None, []
        for split, f, default in (("train", train_file, spec.files[0]), ("eval", eval_file, spec.files[1])):
            if f is None and root is None:
                raise UserError(f"task {key}: give both train_file and eval_file, or data_dir")
            p = root / spec.folder / default if f is None else Path(f) if root is None else root / f
            if not p.is_file():
                raise UserError(f"{p}: {split} split file not found (task {key})")
            paths.append(p)
        need = {c: spec.rename.get(c, c) for c in (*spec.inputs, *(("label",) if spec.kind != "causal_lm" else ()))}
        raw = [(str(p), "line", *_read(p, need, spec.header)) for p in paths]
        source = f"{paths[0]}, {paths[1]}"

    names = spec.label_names
    if spec.kind == "classification" and names is None:  # custom: infer from the train labels
        names = _infer_names(raw[0][3]["label"], f"{raw[0][0]}: column '{label_field}'")
    train, evals = (_to_dataset(spec, names, *r) for r in raw)
    train, note_t = _subsample(train, max_train_samples, "max_train_samples", seed)
    evals, note_e = _subsample(evals, max_eval_samples, "max_eval_samples", seed)
    return Task(name=key, kind=spec.kind, train=train, eval=evals,
                text_fields=tuple(c for c in train.column_names if c != "label"),
                label_names=names if spec.kind == "classification" else None,
                num_labels={"classification": len(names or ()), "regression": 1, "causal_lm": 0}[spec.kind],
                metric=spec.metrics[0], metric_mode="min" if spec.kind == "causal_lm" else "max",
                source=source + note_t + note_e, metrics=spec.metrics)


# ----------------------------------------------------------------------------- tokenization + cache
@functools.lru_cache(maxsize=32)
def _rows_hash(ds: datasets.Dataset) -> str:
    h = hashlib.sha256()
    for batch in ds.iter(batch_size=1024):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint(task: Task) -> str:
    """sha256 of the task's (subsampled) raw rows, train then eval: the tokenization cache's key,
    and what a resumed sweep checks to train on the same data."""
    return hashlib.sha256((_rows_hash(task.train) + _rows_hash(task.eval)).encode()).hexdigest()


def _cache_key(task: Task, tokenizer, max_length: int) -> str:
    parts = [_CACHE_VERSION, task.name, task.kind, task.text_fields, fingerprint(task),
             str(getattr(tokenizer, "name_or_path", "")), type(tokenizer).__name__, len(tokenizer),
             getattr(tokenizer, "truncation_side", "right"), max_length]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _encode(task: Task, ds: datasets.Dataset, split: str, tokenizer, max_length: int, key: str) -> datasets.Dataset:
    if task.kind != "causal_lm":
        def fn(batch):
            enc = tokenizer(*(batch[c] for c in task.text_fields), truncation=True, max_length=max_length)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            out["labels"] = batch["label"]
            return out
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise UserError(f"tokenizer {tokenizer.name_or_path}: has no eos_token (or sep_token) to end completions")

        def fn(batch):
            prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
            answers = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for p, a in zip(prompts, answers):
                if len(p) + len(a) + 1 > max_length:  # the answer would lose tokens: dropped (count_truncation counts it)
                    continue
                ids = p + a + [eos]
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append([-100] * len(p) + a + [eos])
            return out
    enc = ds.map(fn, batched=True, remove_columns=ds.column_names, new_fingerprint=f"{key}-{split}",
                 desc=f"tokenizing {task.name} {split}")
    if not len(enc):
        raise UserError(_nothing_left(task.name, split, len(ds), max_length))
    # Class ids and token ids come out int64; regression targets need float32 for the MSE head.
    return enc.cast_column("labels", datasets.Value("float32")) if task.kind == "regression" else enc


# ----------------------------------------------------------------------------- truncation, counted
@dataclass(frozen=True)
class TruncationCount:
    """How many samples of one split :func:`tokenize_task` cuts or drops at ``max_length``.

    Classification and regression: samples (the text pair, special tokens included) longer than
    ``max_length``; they are truncated, as usual. Causal LMs: samples whose answer (completion +
    EOS) would lose tokens; they are dropped from the tokenized split, never cut silently."""

    task: str
    split: str            # "train" or "eval"
    truncated: int        # samples cut (classification/regression) or dropped (causal LMs)
    total: int            # samples before tokenization
    max_length: int
    kind: TaskKind

    @property
    def fraction(self) -> float:
        return self.truncated / self.total if self.total else 0.0

    @property
    def dropped(self) -> int:
        """Samples left out of the tokenized split (causal LMs only)."""
        return self.truncated if self.kind == "causal_lm" else 0

    @property
    def kept(self) -> int:
        return self.total - self.dropped

    @property
    def verb(self) -> str:
        return "dropped" if self.kind == "causal_lm" else "cut"

    def __str__(self) -> str:  # e.g. "train 12 of 800 (1.5%) cut at max_length=64"
        return (f"{self.split} {self.truncated} of {self.total} ({100 * self.fraction:.1f}%) {self.verb} "
                f"at max_length={self.max_length}")


def _lengths(tokenizer, columns: list[list[str]], special: bool) -> list[int]:
    import transformers  # here: loaded by the tokenizer's maker; ~2.5 s data.py alone skips

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum": that is the point
    try:
        enc = tokenizer(*columns, truncation=False, add_special_tokens=special)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return [len(ids) for ids in enc["input_ids"]]


def count_truncation(task: Task, tokenizer, max_length: int, batch_size: int = 1000) -> dict[str, TruncationCount]:
    """{"train": count, "eval": count}: samples that tokenization at ``max_length`` cuts, or for
    causal LMs drops (see :class:`TruncationCount`). Tokenizes every split once more, without truncation."""
    out = {}
    for split, ds in (("train", task.train), ("eval", task.eval)):
        cut = 0
        for start in range(0, len(ds), batch_size):
            rows = ds[start:start + batch_size]
            if task.kind == "causal_lm":
                prompts = _lengths(tokenizer, [rows["prompt"]], False)
                answers = _lengths(tokenizer, [rows["completion"]], False)
                cut += sum(p + a + 1 > max_length for p, a in zip(prompts, answers))  # + 1: the EOS
            else:
                cut += sum(n > max_length for n in _lengths(tokenizer, [rows[c] for c in task.text_fields], True))
        out[split] = TruncationCount(task.name, split, cut, len(ds), max_length, task.kind)
    return out


def truncation_summary(counts: dict[str, TruncationCount]) -> str:
    """One line for every split, e.g. ``task rte: samples cut at max_length=128: train 304 of 2490
    (12.2%), eval 33 of 277 (11.9%)``; causal LMs say how many samples are dropped and why."""
    first = next(iter(counts.values()))
    what = ("samples dropped (their answer would lose tokens)" if first.kind == "causal_lm" else "samples cut")
    splits = ", ".join(f"{c.split} {c.truncated} of {c.total} ({100 * c.fraction:.1f}%)" for c in counts.values())
    return f"task {first.task}: {what} at max_length={first.max_length}: {splits}"


def _nothing_left(task: str, split: str, total: int, max_length: int) -> str:
    return (f"task {task}: {split}: all {total} samples are dropped at max_length={max_length} (every answer "
            f"would lose tokens); nothing is left to {'train' if split == 'train' else 'evaluate'} on; "
            f"raise max_length")


def check_truncation(counts: dict[str, TruncationCount], max_fraction: float | None = None) -> None:
    """Raises a one-line UserError when dropping leaves a causal-LM split empty, or when a split's
    share of cut (or dropped) samples exceeds ``max_fraction`` (``max_truncated_fraction``; None:
    never: the counts are only reported)."""
    for c in counts.values():
        if c.kind == "causal_lm" and c.total and not c.kept:
            raise UserError(_nothing_left(c.task, c.split, c.total, c.max_length))
    if max_fraction is None:
        return
    for c in counts.values():
        if c.fraction > max_fraction:
            what = "answers would lose tokens (dropped)" if c.kind == "causal_lm" else "samples are cut"
            raise UserError(f"task {c.task}: {c.split}: {c.truncated} of {c.total} {what} at max_length="
                            f"{c.max_length} ({100 * c.fraction:.1f}%), more than max_truncated_fraction="
                            f"{max_fraction:g}; raise max_length or max_truncated_fraction")


def tokenize_task(task: Task, tokenizer, max_length: int = 128,
                  cache_dir: str | os.PathLike | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Tokenized (train, eval), unpadded, with ``labels``; cached on disk by data + tokenizer + max_length."""
    problem = check_value("max_length", max_length)
    if problem or not isinstance(max_length, int):
        raise UserError(f"max_length: {problem or f'must be an integer (got {max_length!r})'}")
    key = _cache_key(task, tokenizer, max_length)
    root = Path(cache_dir or os.environ.get("TUNE_DYNSDPB_CACHE") or Path.home() / ".cache" / "tune_dynsdpb") / "tokenized"
    final = root / key
    if not final.is_dir():  # only ever created whole, by the rename below
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            for split, ds in (("train", task.train), ("eval", task.eval)):
                _encode(task, ds, split, tokenizer, max_length, key).save_to_disk(str(tmp / split))
            (tmp / "source.json").write_text(json.dumps({"task": task.name, "source": task.source,
                                                         "tokenizer": str(tokenizer.name_or_path), "max_length": max_length}))
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # not a lost race with another process
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(final / "train")), datasets.load_from_disk(str(final / "eval"))
