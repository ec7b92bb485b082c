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
