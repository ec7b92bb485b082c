"""tune_dynsdpb.data: loaders for every local layout, bad input, metrics, tokenization and its cache."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from tune_dynsdpb.data import (Task, TruncationCount, accuracy, check_truncation, count_truncation, f1_binary,
                               list_tasks, load_task, macro_f1, matthews, tokenize_task, truncation_summary)
from tune_dynsdpb.errors import UserError
from tune_dynsdpb.run import check_head


def raises_user_error(fn, *needles):
    """Calls fn, expects a one-line UserError containing every needle; returns the message."""
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


@pytest.fixture
def broken(data_dir, tmp_path):
    """A private copy of the synthetic data folder, for corrupting."""
    return shutil.copytree(data_dir, tmp_path / "data")


@pytest.fixture(scope="module")
def bert_tok(tiny_bert):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_gpt2)


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name, canon, kind, text_fields, label_names, metric, first_labels", [
    ("SST-2", "sst2", "classification", ("sentence",), ("negative", "positive"), "accuracy", [0, 1, 0]),
    ("cola", "cola", "classification", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation", [0, 1, 0]),
    ("mrpc", "mrpc", "classification", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1", [0, 1, 0]),
    ("glue-rte", "rte", "classification", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy", [1, 0, 1]),
    ("cb", "cb", "classification", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"), "accuracy", [1, 0, 1]),
    ("sts-b", "stsb", "regression", ("sentence1", "sentence2"), None, "pearson", None),
    ("gsm8k", "gsm8k", "causal_lm", ("prompt", "completion"), None, "loss", None),
])
def test_local_layouts(data_dir, name, canon, kind, text_fields, label_names, metric, first_labels):
    t = load_task(name, data_dir)
    assert (t.name, t.kind, t.text_fields, t.label_names, t.metric) == (canon, kind, text_fields, label_names, metric)
    assert (len(t.train), len(t.eval)) == (64, 32)
    assert t.num_labels == {"classification": len(label_names or ()), "regression": 1, "causal_lm": 0}[kind]
    assert t.metric_mode == ("min" if kind == "causal_lm" else "max")
    assert str(data_dir) in t.source
    assert set(t.train.column_names) == set(text_fields) | ({"label"} if kind != "causal_lm" else set())
    if first_labels:
        assert t.train["label"][:3] == first_labels and t.train.features["label"].dtype == "int64"


def test_mrpc_bom_cola_headerless_stsb_floats_gsm8k_format(data_dir):
    mrpc = load_task("mrpc", data_dir)  # the BOM must not end up in the 'Quality' column name
    assert mrpc.train[0]["sentence1"] == "the film was"
    cola = load_task("cola", data_dir)
    assert len(cola.train) == 64 and " " in cola.train[0]["sentence"]  # 4th column, no header row eaten
    stsb = load_task("stsb", data_dir)
    assert stsb.train.features["label"].dtype == "float32"
    labels = np.asarray(stsb.train["label"])
    assert labels[0] < 1.0 <= 4.0 <= labels[1] < 5.0
    g = load_task("gsm8k", data_dir).train[2]
    assert g["prompt"] == "Question: how many apples has the man if he has 2 and gives 1 ?\nAnswer:"
    assert g["completion"] == " he has 2 - 1 = 1 apples left .\n#### 1"


def test_copa_pair_encoding(broken):
    d = broken / "superglue" / "COPA"
    d.mkdir()
    row = {"premise": "The man fell.", "choice1": "He tripped.", "choice2": "He sang.", "question": "cause", "label": 0}
    for f in ("train.jsonl", "val.jsonl"):
        (d / f).write_text(json.dumps(row) + "\n")
    t = load_task("copa", broken)
    assert t.text_fields == ("text_a", "text_b") and t.num_labels == 2
    assert t.train[0] == {"text_a": "The man fell. What was the cause?", "text_b": "He tripped. or He sang.", "label": 0}


def test_boolq_bools_and_superglue_rte(broken):
    for name, folder, row in (("boolq", "BoolQ", {"question": "q", "passage": "p", "label": True}),
                              ("super_glue-rte", "RTE", {"premise": "a", "hypothesis": "b", "label": "not_entailment"})):
        d = broken / "superglue" / folder
        d.mkdir()
        (d / "val.jsonl").write_text(json.dumps(row) + "\n")
        raises_user_error(lambda: load_task(name, broken), d / "train.jsonl", "not found")
        (d / "train.jsonl").write_text(json.dumps(row) + "\n")
        assert load_task(name, broken).train["label"] == [1]


def test_subsampling_is_seeded(data_dir):
    a = load_task("sst2", data_dir, max_train_samples=10, max_eval_samples=5, seed=1)
    b = load_task("sst2", data_dir, max_train_samples=10, max_eval_samples=5, seed=1)
    c = load_task("sst2", data_dir, max_train_samples=10, seed=2)
    assert (len(a.train), len(a.eval), len(c.eval)) == (10, 5, 32)
    assert a.train["sentence"] == b.train["sentence"] and a.eval["sentence"] == b.eval["sentence"]
    assert a.train["sentence"] != c.train["sentence"]
    assert "max_train_samples=10" in a.source and "seed 1" in a.source
    assert len(load_task("sst2", data_dir, max_train_samples=1000).train) == 64
    raises_user_error(lambda: load_task("sst2", data_dir, max_eval_samples=0), "max_eval_samples", "positive")


def test_unknown_task_and_misplaced_options(data_dir):
    raises_user_error(lambda: load_task("nope", data_dir), "unknown task 'nope'", "rte", "sst2", "gsm8k", "custom")
    raises_user_error(lambda: load_task("rte", data_dir, label_field="x"), "label_field", "custom")
    assert {"rte", "superglue-rte", "stsb", "custom", "qa-jsonl", "gsm8k"} <= set(list_tasks())


# ----------------------------------------------------------------------------- bad input
def test_missing_split_file(broken):
    (broken / "glue" / "RTE" / "dev.tsv").unlink()
    raises_user_error(lambda: load_task("rte", broken), broken / "glue" / "RTE" / "dev.tsv", "eval")


def test_missing_column(broken):
    f = broken / "glue" / "SST-2" / "train.tsv"
    f.write_text(f.read_text().replace("sentence\tlabel", "text\tlabel", 1))
    raises_user_error(lambda: load_task("sst2", broken), f, "missing column 'sentence'")
    g = broken / "superglue" / "CB" / "val.jsonl"
    g.write_text(g.read_text().replace('"hypothesis"', '"hyp"', 1))
    raises_user_error(lambda: load_task("cb", broken), g, "line 1", "'hypothesis'")


@pytest.mark.parametrize("content", ["sentence\tlabel\n", ""])
def test_empty_file(broken, content):
    f = broken / "glue" / "SST-2" / "dev.tsv"
    f.write_text(content)
    raises_user_error(lambda: load_task("sst2", broken), f)


@pytest.mark.parametrize("value, needle", [("", "empty label"), ("nan", "not a finite number"), ("abc", "'abc'")])
def test_bad_regression_label(broken, value, needle):
    f = broken / "glue" / "STS-B" / "train.tsv"
    lines = f.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t" + value
    f.write_text("\n".join(lines) + "\n")
    raises_user_error(lambda: load_task("stsb", broken), f, "column 'score'", "line 4", needle)


def test_unknown_class_and_out_of_range_id(broken):
    f = broken / "glue" / "RTE" / "train.tsv"
    f.write_text(f.read_text().replace("\tentailment\n", "\tmaybe\n", 1))
    raises_user_error(lambda: load_task("rte", broken), f, "column 'label'", "line 3", "unknown class 'maybe'",
                      "entailment, not_entailment")
    g = broken / "glue" / "SST-2" / "dev.tsv"
    g.write_text(g.read_text().replace("\t1\n", "\t2\n", 1))
    raises_user_error(lambda: load_task("sst2", broken), g, "line 3", "class id 2 outside 0..1")


@pytest.mark.parametrize("fix", [lambda s: s + "\textra", lambda s: s.rsplit("\t", 1)[0]])
def test_wrong_number_of_fields(broken, fix):
    f = broken / "glue" / "MRPC" / "train.tsv"
    lines = f.read_text(encoding="utf-8").splitlines()
    lines[5] = fix(lines[5])
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raises_user_error(lambda: load_task("mrpc", broken), f, "line 6", "expected 5")


def test_bad_json_line(broken):
    f = broken / "gsm8k" / "test.jsonl"
    lines = f.read_text().splitlines()
    lines[6] = lines[6][:-3]
    f.write_text("\n".join(lines) + "\n")
    raises_user_error(lambda: load_task("gsm8k", broken), f, "line 7", "not valid JSON")


def test_hub_failure_suggests_data_dir():
    raises_user_error(lambda: load_task("rte"), "nyu-mll/glue", "--data-dir")


# ----------------------------------------------------------------------------- custom / qa-jsonl
def test_custom_files(tmp_path):
    tr, ev = tmp_path / "tr.csv", tmp_path / "ev.csv"
    tr.write_text('text,y\n"good, fun",pos\nbad,neg\nok,meh\n')
    ev.write_text("text,y\nfine,pos\n")
    t = load_task("custom", train_file=tr, eval_file=ev, text_fields=["text"], label_field="y")
    assert (t.label_names, t.train["label"], t.train[0]["text"]) == (("meh", "neg", "pos"), [2, 1, 0], "good, fun")
    ev.write_text("text,y\nfine,great\n")
    raises_user_error(lambda: load_task("custom", train_file=tr, eval_file=ev, text_fields=["text"], label_field="y"),
                      ev, "column 'y'", "unknown class 'great'")
    j = tmp_path / "tr.jsonl"
    j.write_text('{"a": "x", "b": "y", "s": 1}\n{"a": "x", "b": "y", "s": 2}\n')
    raises_user_error(lambda: load_task("custom", train_file=j, eval_file=j, text_fields=["a", "b"], label_field="s"),
                      j, "0..C-1")
    r = load_task("custom", tmp_path, train_file="tr.jsonl", eval_file="tr.jsonl", text_fields=["a", "b"],
                  label_field="s", kind="regression")
    assert (r.kind, r.num_labels, r.metric, r.train["label"]) == ("regression", 1, "pearson", [1.0, 2.0])
    raises_user_error(lambda: load_task("custom", train_file=tr), "text_fields", "label_field")
    raises_user_error(lambda: load_task("custom", train_file=tr, text_fields="text", label_field="y"), "eval_file")


def test_qa_jsonl(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"q": "two plus two", "a": "4"}\n')
    t = load_task("qa-jsonl", train_file=f, eval_file=f, text_fields=["q", "a"])
    assert (t.kind, t.metric, t.train[0]) == ("causal_lm", "loss", {"prompt": "Question: two plus two\nAnswer:", "completion": " 4"})


# ----------------------------------------------------------------------------- metrics
P, Y = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 1, 1, 0])  # tp 2, fp 1, fn 1, tn 2


def test_metric_functions_by_hand():
    assert accuracy(P, Y) == pytest.approx(4 / 6)
    assert f1_binary(P, Y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews(P, Y) == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))
    y3, p3 = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 0])
    assert matthews(p3, y3) == pytest.approx((2 * 4 - 5) / np.sqrt(10 * 10))  # c*s - t.p over sqrt(...)
    assert macro_f1(p3, y3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert matthews(np.ones(4), Y[:4]) == 0.0 and f1_binary(np.zeros(3), np.zeros(3)) == 0.0


def test_compute_metrics(data_dir):
    logits = np.stack([1 - P, P], axis=1).astype(np.float32)
    assert load_task("cola", data_dir).compute_metrics(SimpleNamespace(predictions=logits, label_ids=Y)) == \
        pytest.approx({"matthews_correlation": 1 / 3, "accuracy": 4 / 6})
    assert load_task("mrpc", data_dir).compute_metrics((logits, Y)) == pytest.approx({"f1": 2 / 3, "accuracy": 4 / 6})
    x, y = np.array([[0.1], [0.5], [0.2], [0.9], [0.7]]), np.array([0.0, 1.0, 0.5, 2.0, 1.0])
    got = load_task("stsb", data_dir).compute_metrics(SimpleNamespace(predictions=x, label_ids=y))
    assert got == pytest.approx({"pearson": stats.pearsonr(x[:, 0], y)[0], "spearmanr": stats.spearmanr(x[:, 0], y)[0]})
    assert load_task("gsm8k", data_dir).compute_metrics((None, None)) == {}
    assert set(load_task("cb", data_dir).compute_metrics((np.eye(3), np.arange(3)))) == {"accuracy", "macro_f1"}


def test_check_head(data_dir):
    check_head(load_task("rte", data_dir), 2)
    raises_user_error(lambda: check_head(load_task("rte", data_dir), 1), "train label 1", "num_labels=1")
    check_head(load_task("cb", data_dir), 3)
    raises_user_error(lambda: check_head(load_task("cb", data_dir), 1), "train label 1", "contradiction")
    raises_user_error(lambda: check_head(load_task("stsb", data_dir), 2), "stsb", "num_labels=2")
    check_head(load_task("gsm8k", data_dir), 0)


# ----------------------------------------------------------------------------- tokenization + cache
def test_tokenize_pair_classification_and_regression(data_dir, bert_tok, tmp_path):
    tr, ev = tokenize_task(load_task("rte", data_dir), bert_tok, max_length=16, cache_dir=tmp_path)
    assert set(tr.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert (len(tr), len(ev)) == (64, 32) and tr.features["labels"].dtype == "int64"
    row = tr[0]
    assert row["labels"] == 1 and len(row["input_ids"]) <= 16 and 1 in row["token_type_ids"]
    assert row["input_ids"][0] == bert_tok.cls_token_id
    tr, _ = tokenize_task(load_task("stsb", data_dir), bert_tok, cache_dir=tmp_path)
    assert tr.features["labels"].dtype == "float32"


def test_tokenize_causal_masks_prompt_and_appends_eos(data_dir, gpt2_tok, tmp_path):
    task = load_task("gsm8k", data_dir)
    tr, _ = tokenize_task(task, gpt2_tok, max_length=128, cache_dir=tmp_path)
    assert set(tr.column_names) == {"input_ids", "attention_mask", "labels"}
    p = gpt2_tok(task.train[0]["prompt"], add_special_tokens=False)["input_ids"]
    c = gpt2_tok(task.train[0]["completion"], add_special_tokens=False)["input_ids"]
    row = tr[0]
    eos = gpt2_tok.sep_token_id  # this WordPiece tokenizer has no eos token; [SEP] stands in
    assert row["input_ids"] == p + c + [eos]
    assert row["labels"] == [-100] * len(p) + c + [eos]
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    raises_user_error(lambda: tokenize_task(task, gpt2_tok, max_length=len(p), cache_dir=tmp_path),
                      f"task gsm8k: train: all 64 samples are dropped at max_length={len(p)}", "nothing is left")
    assert not [x for x in (tmp_path / "tokenized").iterdir() if x.name.startswith(".")]  # failed write cleaned up


def test_cache_hit_skips_tokenizer(data_dir, bert_tok, tmp_path, monkeypatch):
    calls = []
    cls = type(bert_tok)
    original = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    task = load_task("sst2", data_dir, max_train_samples=20, max_eval_samples=10)
    first = tokenize_task(task, bert_tok, max_length=32, cache_dir=tmp_path)
    n = len(calls)
    assert n > 0
    again = tokenize_task(load_task("sst2", data_dir, max_train_samples=20, max_eval_samples=10), bert_tok,
                          max_length=32, cache_dir=tmp_path)
    assert len(calls) == n and again[0][:] == first[0][:] and again[1][:] == first[1][:]
    tokenize_task(task, bert_tok, max_length=16, cache_dir=tmp_path)  # new max_length: new key, tokenizes again
    assert len(calls) > n
    keys = {p.name for p in (tmp_path / "tokenized").iterdir()}
    assert len(keys) == 2 and not any(k.startswith(".") for k in keys)  # no temp dirs left behind
    other = load_task("sst2", data_dir, max_train_samples=20, max_eval_samples=10, seed=3)  # different rows
    monkeypatch.setenv("TUNE_DYNSDPB_CACHE", str(tmp_path))
    tokenize_task(other, bert_tok, max_length=32)
    assert len({p.name for p in (tmp_path / "tokenized").iterdir()}) == 3


def test_task_is_frozen(data_dir):
    t = load_task("sst2", data_dir)
    assert isinstance(t, Task)
    with pytest.raises(AttributeError):
        t.name = "x"


# ----------------------------------------------------------------------------- truncation: counted, refused on request
def _answer_lengths(task, tok) -> list[int]:
    """prompt + answer + EOS of every train sample, tokenized as tokenize_task does."""
    rows = task.train[:]
    p = tok(rows["prompt"], add_special_tokens=False)["input_ids"]
    a = tok(rows["completion"], add_special_tokens=False)["input_ids"]
    return [len(x) + len(y) + 1 for x, y in zip(p, a)]


def test_count_truncation_by_hand(bert_tok, tmp_path):
    """Every word of the test vocabulary is one token: the lengths are counted by hand."""
    qa = tmp_path / "qa.jsonl"  # prompt "question : how many apples \n answer :" = 7, answer 5, EOS 1: 13
    qa.write_text(json.dumps({"question": "how many apples", "answer": "the man has 3 apples"}) + "\n")
    task = load_task("qa-jsonl", train_file=qa, eval_file=qa)
    assert count_truncation(task, bert_tok, 13)["train"].truncated == 0
    cut = count_truncation(task, bert_tok, 12)
    assert cut["train"] == TruncationCount("qa-jsonl", "train", 1, 1, 12, "causal_lm")
    assert (cut["train"].dropped, cut["train"].kept, str(cut["train"])) == (1, 0, "train 1 of 1 (100.0%) dropped at max_length=12")

    pairs = tmp_path / "pairs.csv"  # [CLS] a b [SEP] c d e [SEP]: 8 tokens
    pairs.write_text("a,b,label\ngood movie,the film was,0\nbad,dull,1\n")
    task = load_task("custom", train_file=pairs, eval_file=pairs, text_fields=["a", "b"], label_field="label")
    counts = count_truncation(task, bert_tok, 6)
    assert counts["train"] == TruncationCount("custom", "train", 1, 2, 6, "classification")
    assert (counts["train"].dropped, counts["train"].kept) == (0, 2)  # cut as usual, never dropped
    assert str(counts["train"]) == "train 1 of 2 (50.0%) cut at max_length=6"
    assert truncation_summary(counts) == ("task custom: samples cut at max_length=6: train 1 of 2 (50.0%), "
                                          "eval 1 of 2 (50.0%)")
    assert count_truncation(task, bert_tok, 7)["train"].truncated == 1
    assert count_truncation(task, bert_tok, 8)["train"].truncated == 0


def test_check_truncation_refuses_only_over_the_threshold():
    def counts(cut, total=40, kind="classification"):
        return {"train": TruncationCount("t", "train", cut, total, 16, kind),
                "eval": TruncationCount("t", "eval", 0, 8, 16, kind)}

    check_truncation(counts(40))                      # no threshold: never refused, however many are cut
    check_truncation(counts(4), max_fraction=0.1)     # at the threshold: allowed
    check_truncation(counts(0), max_fraction=0.0)
    assert raises_user_error(lambda: check_truncation(counts(4), max_fraction=0.05)) == (
        "task t: train: 4 of 40 samples are cut at max_length=16 (10.0%), more than max_truncated_fraction=0.05; "
        "raise max_length or max_truncated_fraction")
    assert raises_user_error(lambda: check_truncation(counts(1, kind="causal_lm"), max_fraction=0)) == (
        "task t: train: 1 of 40 answers would lose tokens (dropped) at max_length=16 (2.5%), more than "
        "max_truncated_fraction=0; raise max_length or max_truncated_fraction")
    check_truncation(counts(39, kind="causal_lm"))    # one sample left: it trains on that
    for threshold in (None, 1.0):                     # a causal-LM split left empty: always refused
        assert raises_user_error(lambda: check_truncation(counts(40, kind="causal_lm"), threshold)) == (
            "task t: train: all 40 samples are dropped at max_length=16 (every answer would lose tokens); "
            "nothing is left to train on; raise max_length")
    empty_eval = {"eval": TruncationCount("t", "eval", 8, 8, 16, "causal_lm")}
    raises_user_error(lambda: check_truncation(empty_eval), "eval: all 8 samples", "nothing is left to evaluate on")


def test_tokenize_causal_drops_the_samples_whose_answer_would_lose_tokens(data_dir, gpt2_tok, tmp_path):
    task = load_task("gsm8k", data_dir)
    lengths = _answer_lengths(task, gpt2_tok)
    limit = max(lengths) - 1                          # the longest answers would lose their last token
    n = sum(x > limit for x in lengths)
    assert 0 < n < len(lengths)
    counts = count_truncation(task, gpt2_tok, limit)
    assert (counts["train"].truncated, counts["train"].dropped, counts["train"].kept) == (n, n, 64 - n)
    assert truncation_summary(counts).startswith(
        f"task gsm8k: samples dropped (their answer would lose tokens) at max_length={limit}: "
        f"train {n} of 64 ({100 * n / 64:.1f}%), eval ")
    tr, ev = tokenize_task(task, gpt2_tok, max_length=limit, cache_dir=tmp_path)
    assert (len(tr), len(ev)) == (64 - n, counts["eval"].kept)
    eos = gpt2_tok.sep_token_id
    kept = [i for i, x in enumerate(lengths) if x <= limit]
    for row, i in zip(tr, kept):                      # every kept sample whole: its answer and EOS all there
        c = gpt2_tok(task.train[i]["completion"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"][-len(c) - 1:] == c + [eos] and row["labels"][-len(c) - 1:] == c + [eos]
        assert len(row["input_ids"]) == lengths[i] <= limit


def test_max_truncated_fraction_is_a_sweep_file_key_checked_against_params():
    from tune_dynsdpb.params import param
    from tune_dynsdpb.search_space import parse_search_space

    assert param("max_truncated_fraction").default is None and param("max_truncated_fraction").rule == "in [0, 1]"
    base = {"name": "t", "model": "m", "tasks": [{"task": "rte"}, {"task": "gsm8k", "max_truncated_fraction": 0.5}]}
    spec = parse_search_space({**base, "max_truncated_fraction": 0.05})
    assert [t.max_truncated_fraction for t in spec.task_specs()] == [0.05, 0.5]
    assert [t.max_truncated_fraction for t in parse_search_space(base).task_specs()] == [None, 0.5]
    with pytest.raises(UserError, match=r"^<sweep>: max_truncated_fraction: must be in \[0, 1\] \(got 1.5\)$"):
        parse_search_space({**base, "max_truncated_fraction": 1.5})
    with pytest.raises(UserError, match=r"^<sweep>: tasks.0.max_truncated_fraction: must be in \[0, 1\]"):
        parse_search_space({**base, "tasks": [{"task": "rte", "max_truncated_fraction": -0.1}]})
