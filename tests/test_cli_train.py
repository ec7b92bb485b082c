"""`tune-dynsdpb train`: a real run, and every bad input ending in one line and exit status 2."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from tune_dynsdpb.cli import main


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenized-cache")


@pytest.fixture(autouse=True)
def no_home_cache(token_cache, monkeypatch):
    """`train` tokenizes into this module's temporary cache, never into ~/.cache (also in subprocesses)."""
    monkeypatch.setenv("TUNE_DYNSDPB_CACHE", str(token_cache))


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def train_args(data_dir, model, out, *extra):
    return ["train", "--task", "rte", "--data-dir", str(data_dir), "--model", str(model), "--output-dir", str(out),
            "--batch-size", "8", "--epochs", "1", "--max-length", "32", "--logging-steps", "2", *extra]


def test_train_writes_metrics_and_a_loadable_model(data_dir, tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, *train_args(data_dir, tiny_bert, out, "--method", "dynsdpb", "--learning-rate", "1e-3"))
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["metric"] == "eval_accuracy" and 0 <= record["score"] <= 1
    assert any("consistency_loss" in h for h in record["log_history"])
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(out))
    assert clf("the movie was good")[0]["label"] in {"entailment", "not_entailment"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


@pytest.mark.slow  # a new interpreter importing torch and transformers: not the in-process fast lane
def test_console_script_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tune_dynsdpb.cli", "train", "--task", "nope", "--model", "x",
                           "--output-dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "nope" in proc.stderr


def corrupt(data_dir, tmp_path, edit):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    edit(d / "glue" / "RTE")
    return d


BAD = {
    "odd batch": (lambda d: None, ["--method", "dlb", "--batch-size", "7"], "--batch-size"),
    "batch below 2": (lambda d: None, ["--method", "dynsdpb", "--batch-size", "1"], "--batch-size"),
    "odd batch, dlb_warmup": (lambda d: None, ["--method", "dlb_warmup", "--batch-size", "5"], "--batch-size"),
    "negative alpha0": (lambda d: None, ["--alpha0", "-1"], "--alpha0"),
    "zero tau0": (lambda d: None, ["--tau0", "0"], "--tau0"),
    "lambda_tau at -1": (lambda d: None, ["--lambda-tau", "-1"], "--lambda-tau"),
    "missing split": (lambda d: (d / "dev.tsv").unlink(), [], "dev.tsv"),
    "missing column": (lambda d: (d / "train.tsv").write_text(
        (d / "train.tsv").read_text().replace("sentence2", "other", 1)), [], "sentence2"),
    "empty dataset": (lambda d: (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"), [], "train.tsv"),
    "unknown class": (lambda d: (d / "train.tsv").write_text(
        (d / "train.tsv").read_text().replace("\tentailment\n", "\tmaybe\n", 1)), [], "maybe"),
    "NaN label": (lambda d: (d / "train.tsv").write_text(
        (d / "train.tsv").read_text().replace("\tentailment\n", "\tNaN\n", 1)), [], "train.tsv"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, data_dir, tiny_bert, tmp_path, capsys):
    edit, extra, expected = BAD[case]
    d = corrupt(data_dir, tmp_path, edit)
    out = tmp_path / "out"
    code, err = run_cli(capsys, *train_args(d, tiny_bert, out, *extra))
    assert code == 2
    assert err.startswith("tune-dynsdpb: error:") and err.strip().count("\n") == 0
    assert expected in err
    if expected.startswith("--"):  # a flag: the message starts with it
        assert err.startswith(f"tune-dynsdpb: error: {expected}: ")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unknown_task(data_dir, tiny_bert, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--task", "glue-nope", "--data-dir", str(data_dir), "--model",
                        str(tiny_bert), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "glue-nope" in err and "rte" in err


def test_missing_model_path(data_dir, tmp_path, capsys):
    code, err = run_cli(capsys, *train_args(data_dir, tmp_path / "no-such-model", tmp_path / "o"))
    assert code == 2 and "--model" in err and "no-such-model" in err


def test_labels_outside_the_head(data_dir, tiny_bert, tmp_path, capsys):
    """CB has 3 classes; tiny_bert carries a trained 2-class head."""
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    cb = d / "superglue" / "CB" / "train.jsonl"
    cb.write_text(cb.read_text().replace('"label": "entailment"', '"label": "neutral"', 1))
    code, err = run_cli(capsys, "train", "--task", "cb", "--data-dir", str(d), "--model", str(tiny_bert),
                        "--output-dir", str(tmp_path / "o"), "--batch-size", "8")
    assert code == 2
    assert err.startswith("tune-dynsdpb: error: task cb: train label 2 does not fit a head of num_labels=2 ")
    assert not (tmp_path / "o").exists()


def test_output_dir_not_empty(data_dir, tiny_bert, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, *train_args(data_dir, tiny_bert, out))
    assert code == 2 and "--output-dir" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_trust_remote_code_is_off_by_default(data_dir, tiny_bert, tmp_path, monkeypatch):
    seen = []
    import transformers
    original = transformers.AutoConfig.from_pretrained

    def spy(*a, **k):
        seen.append(k.get("trust_remote_code"))
        return original(*a, **k)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    from tune_dynsdpb.data import load_task
    from tune_dynsdpb.run import load_model
    load_model(str(tiny_bert), load_task("rte", data_dir))
    assert seen and seen[0] is False


def test_load_model_seeds_a_new_head_whatever_ran_before(data_dir, tmp_path):
    """Sweep trials share reused Ray workers: a new head must not depend on the RNG state that
    earlier trials left behind, or identical configs train different runs."""
    import torch
    from transformers import BertConfig, BertModel

    from tune_dynsdpb.data import load_task
    from tune_dynsdpb.run import load_model
    from helpers import write_tokenizer

    body = tmp_path / "body"  # an encoder without a classification head, like a pretrained checkpoint
    tok = write_tokenizer(body)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(body)
    task = load_task("rte", data_dir)

    def head(seed):
        torch.rand(1000)  # whatever an earlier trial did to the global RNG
        model, _ = load_model(str(body), task, seed=seed)
        return model.classifier.weight.detach().clone()

    assert torch.equal(head(7), head(7))
    assert not torch.equal(head(7), head(8))


# ----------------------------------------------------------------------------- training numbers
NUMBERS = [
    ("--epochs", "0"), ("--epochs", "-1"), ("--max-steps", "0"), ("--max-steps", "-2"),
    ("--batch-size", "0"), ("--batch-size", "-4"), ("--learning-rate", "0"), ("--learning-rate", "-1e-5"),
    ("--gradient-accumulation-steps", "0"), ("--gradient-accumulation-steps", "-1"),
    ("--max-length", "0"), ("--max-length", "-8"), ("--warmup-ratio", "1"), ("--weight-decay", "-0.1"),
    ("--distill-warmup", "1.0"), ("--tau-range", "0", "5"),
    ("--eval-steps", "0"), ("--eval-steps", "-1"), ("--logging-steps", "0"), ("--grad-norm-log-steps", "-1"),
    ("--lora-r", "-1"),
]


@pytest.mark.parametrize("flag_value", NUMBERS, ids=[" ".join(n) for n in NUMBERS])
def test_bad_training_numbers_are_rejected_before_anything_loads(flag_value, tmp_path, capsys):
    """One line naming the flag, exit 2. The model and data folders do not exist: had anything been
    loaded first, the error would name --model or the data instead."""
    flag, *values = flag_value
    out = tmp_path / "out"
    given = [f"{flag}={values[0]}"] if len(values) == 1 else [flag, *values]  # "=": argparse takes -1e-5 as a value
    argv = ["train", "--task", "rte", "--data-dir", str(tmp_path / "no-data"), "--model", str(tmp_path / "no-model"),
            "--output-dir", str(out), "--batch-size", "8", "--method", "dlb_warmup", *given]
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith(f"tune-dynsdpb: error: {flag}: must ") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


RUN_FLAGS = {  # settings that are wrong only together: one line naming a flag, before anything loads
    "fp16 and bf16": (["--fp16", "--bf16"], "--fp16: give --fp16 or --bf16, not both"),
    "LoRA modules without a rank": (["--lora-target-modules", "query"], "--lora-r: must be >= 1 for LoRA (got 0"),
}


@pytest.mark.parametrize("case", list(RUN_FLAGS))
def test_run_flags_that_conflict_are_rejected_before_anything_loads(case, tmp_path, capsys):
    given, line = RUN_FLAGS[case]
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", "--task", "rte", "--data-dir", str(tmp_path / "no-data"), "--model",
                        str(tmp_path / "no-model"), "--output-dir", str(out), *given)
    assert code == 2 and err.startswith(f"tune-dynsdpb: error: {line}") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_max_steps_minus_one_means_unset(data_dir, tiny_bert, tmp_path, capsys):
    code, err = run_cli(capsys, *train_args(data_dir, tiny_bert, tmp_path / "out", "--method", "vanilla",
                                            "--max-steps", "-1", "--epochs", "1", "--batch-size", "16"))
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["log_history"][-1]["step"] == 4  # 64 samples / 16, one epoch: --epochs decided


def test_warmup_ratio_is_a_ratio(data_dir, tiny_bert, tmp_path, capsys):
    """transformers >= 5 reads warmup_steps < 1 as a fraction of the steps: --warmup-ratio 0.5 of
    4 steps is 2 warm-up steps (0, 1/2, 1 of the peak, then linear decay). Read as a step count it
    would be 0 warm-up steps: 1e-3, 7.5e-4, 5e-4, 2.5e-4."""
    code, err = run_cli(capsys, *train_args(data_dir, tiny_bert, tmp_path / "out", "--method", "vanilla",
                                            "--batch-size", "16", "--logging-steps", "1", "--warmup-ratio", "0.5",
                                            "--learning-rate", "1e-3"))
    assert code == 0, err
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["log_history"]
    rates = [h["learning_rate"] for h in history if "loss" in h]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


# ----------------------------------------------------------------------------- divergence
def test_a_diverging_run_exits_1_and_leaves_nothing(data_dir, tiny_bert, tmp_path, capsys):
    """A real divergence: learning rate 1e3 drives the tiny model to NaN within the first epoch."""
    out = tmp_path / "out"
    code, err = run_cli(capsys, *train_args(data_dir, tiny_bert, out, "--learning-rate", "1e3"))
    assert code == 1
    assert "Traceback" not in err
    # stderr also carries the progress bars (\r-separated); the error is one line of its own
    errors = [line for line in re.split(r"[\r\n]", err) if "error" in line]
    assert len(errors) == 1 and re.fullmatch(r"tune-dynsdpb: error: training diverged: non-finite ce_loss at step \d+",
                                             errors[0]), err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))  # no model, no metrics.json


# -- truncation: counted and printed always, refused only over --max-truncated-fraction ----------
def cli_out(capsys, *argv):
    """(exit status, stdout, stderr) of one `tune-dynsdpb` call."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def nothing_left(tmp_path, out):
    assert not out.exists() and not list(tmp_path.glob(f".{out.name}.partial-*"))


def write_custom(folder, long_rows: int, n: int = 40):
    """A custom CSV task whose ``long_rows`` first rows are 30 words long (cut at max_length=16)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [("the movie was " + " ".join(["very"] * 27) if i < long_rows else "the movie was good", i % 2)
            for i in range(n)]
    (folder / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (folder / "dev.csv").write_text("text,label\n" + "".join(f"the film was fun,{i % 2}\n" for i in range(8)))
    return folder / "train.csv", folder / "dev.csv"


def custom_args(train, dev, model, out, *extra):
    return ["train", "--task", "custom", "--train-file", train, "--eval-file", dev, "--text-fields", "text",
            "--label-field", "label", "--model", model, "--output-dir", out, "--batch-size", "8", "--max-steps", "1",
            "--max-length", "16", "--method", "vanilla", *extra]


def test_truncation_is_printed_and_recorded_and_the_run_goes_on(tiny_bert, tmp_path, capsys):
    """10 % of the samples cut (the old guard refused anything over 5 %): counted, printed, no refusal."""
    train, dev = write_custom(tmp_path / "d", long_rows=4)
    out = tmp_path / "out"
    code, stdout, err = cli_out(capsys, *custom_args(train, dev, tiny_bert, out))
    assert code == 0, err
    assert [ln for ln in stdout.splitlines() if ln.startswith("truncation:")] == [
        "truncation: task custom: samples cut at max_length=16: train 4 of 40 (10.0%), eval 0 of 8 (0.0%)"]
    record = json.loads((out / "metrics.json").read_text())
    assert (record["truncated"], record["dropped"], record["samples"]) == (
        {"train": 4, "eval": 0}, {"train": 0, "eval": 0}, {"train": 40, "eval": 8})
    assert record["train_samples"] == 40 and record["config"]["max_truncated_fraction"] is None  # cut, not dropped


def test_truncation_threshold_under_at_and_over(tiny_bert, tmp_path, capsys):
    train, dev = write_custom(tmp_path / "d", long_rows=4)
    out = tmp_path / "out"
    code, stdout, err = cli_out(capsys, *custom_args(train, dev, tiny_bert, out, "--max-truncated-fraction", "0.1"))
    assert code == 0 and "train 4 of 40 (10.0%)" in stdout, err  # at the threshold: allowed
    assert json.loads((out / "metrics.json").read_text())["config"]["max_truncated_fraction"] == 0.1
    out = tmp_path / "over"
    code, stdout, err = cli_out(capsys, *custom_args(train, dev, tiny_bert, out, "--max-truncated-fraction", "0.05"))
    assert (code, err) == (2, "tune-dynsdpb: error: task custom: train: 4 of 40 samples are cut at max_length=16 "
                              "(10.0%), more than max_truncated_fraction=0.05; raise max_length or "
                              "max_truncated_fraction\n")
    nothing_left(tmp_path, out)
    code, _, err = cli_out(capsys, *custom_args(train, dev, tiny_bert, tmp_path / "bad", "--max-truncated-fraction", "1.5"))
    assert (code, err) == (2, "tune-dynsdpb: error: --max-truncated-fraction: must be in [0, 1] (got 1.5)\n")


def gsm8k_args(data_dir, model, out, max_length, *extra):
    return ["train", "--task", "gsm8k", "--data-dir", data_dir, "--model", model, "--output-dir", out,
            "--batch-size", "8", "--max-steps", "1", "--max-length", str(max_length), "--method", "dlb", *extra]


def _longest_answers(data_dir, model):
    """(max_length at which the longest GSM8K answers would lose a token, how many train samples that drops)."""
    from transformers import AutoTokenizer

    from tune_dynsdpb.data import load_task
    tok, rows = AutoTokenizer.from_pretrained(str(model)), load_task("gsm8k", data_dir).train[:]
    lengths = [len(p) + len(a) + 1 for p, a in zip(tok(rows["prompt"], add_special_tokens=False)["input_ids"],
                                                   tok(rows["completion"], add_special_tokens=False)["input_ids"])]
    limit = max(lengths) - 1
    return limit, sum(x > limit for x in lengths)


def test_causal_lm_samples_with_a_cut_answer_are_dropped_and_counted(data_dir, tiny_gpt2, tmp_path, capsys):
    limit, n = _longest_answers(data_dir, tiny_gpt2)
    assert 0 < n < 64
    out = tmp_path / "out"
    code, stdout, err = cli_out(capsys, *gsm8k_args(data_dir, tiny_gpt2, out, limit))
    assert code == 0, err
    line = next(ln for ln in stdout.splitlines() if ln.startswith("truncation:"))
    assert line.startswith(f"truncation: task gsm8k: samples dropped (their answer would lose tokens) at "
                           f"max_length={limit}: train {n} of 64 ({100 * n / 64:.1f}%), eval ")
    record = json.loads((out / "metrics.json").read_text())
    assert record["dropped"]["train"] == record["truncated"]["train"] == n
    assert record["train_samples"] == 64 - n and record["samples"]["train"] == 64
    assert record["eval_samples"] == 32 - record["dropped"]["eval"]
    out = tmp_path / "refused"  # the same drop, refused on request
    code, _, err = cli_out(capsys, *gsm8k_args(data_dir, tiny_gpt2, out, limit, "--max-truncated-fraction", "0"))
    assert (code, err) == (2, f"tune-dynsdpb: error: task gsm8k: train: {n} of 64 answers would lose tokens (dropped) "
                              f"at max_length={limit} ({100 * n / 64:.1f}%), more than max_truncated_fraction=0; "
                              f"raise max_length or max_truncated_fraction\n")
    nothing_left(tmp_path, out)


def test_a_split_left_empty_by_dropping_is_refused(data_dir, tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli_out(capsys, *gsm8k_args(data_dir, tiny_gpt2, out, 12))
    assert (code, err) == (2, "tune-dynsdpb: error: task gsm8k: train: all 64 samples are dropped at max_length=12 "
                              "(every answer would lose tokens); nothing is left to train on; raise max_length\n")
    nothing_left(tmp_path, out)


def test_validate_prints_each_tasks_truncation_and_applies_the_files_threshold(data_dir, tiny_gpt2, tmp_path, capsys):
    import sweeps

    limit, n = _longest_answers(data_dir, tiny_gpt2)
    spec = sweeps.spec_file(tmp_path, tiny_gpt2, name="qa", methods=["vanilla"], max_length=limit,
                            tasks=[{"task": "gsm8k", "data_dir": str(data_dir)}])
    code, stdout, err = cli_out(capsys, "validate", spec)
    assert code == 0, err
    assert f"    truncation: task gsm8k: samples dropped (their answer would lose tokens) at max_length={limit}: " \
           f"train {n} of 64 ({100 * n / 64:.1f}%)" in stdout
    code, stdout, err = cli_out(capsys, "validate", spec, "--set", "max_truncated_fraction=0.01")
    assert code == 2 and err.startswith(f"tune-dynsdpb: error: {spec}: task gsm8k: train: {n} of 64 answers would "
                                        f"lose tokens (dropped)"), err
    code, stdout, err = cli_out(capsys, "validate", spec, "--set", "max_truncated_fraction=2")
    assert (code, err) == (2, f"tune-dynsdpb: error: {spec} (with --set/--methods/--num-samples): "
                              f"max_truncated_fraction: must be in [0, 1] (got 2.0)\n")
