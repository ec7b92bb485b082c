"""Tiny offline models, tokenizers and task folders for the tests.

Nothing here touches the network: the tokenizer is a WordPiece vocabulary written to disk, the
models are built from configs with random weights, and the data are synthetic sentences whose
label is decided by a keyword, so a tiny model can learn them in a few steps.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

WORDS = (
    "the a movie film plot actor story scene was is very quite really good great fine bad awful "
    "poor dull fun boring and but it this that man woman dog cat ran sat on in of to what why "
    "question answer how many apples has have gives left total"
).split()
POSITIVE, NEGATIVE = ("good", "great", "fine", "fun"), ("bad", "awful", "poor", "dull")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(path: Path):
    """A BERT WordPiece tokenizer over WORDS + digits + punctuation, saved to ``path``."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(WORDS)) + list("0123456789") + list(".,?!:#$%-+*/=()'\"")
    # transformers 5 takes the vocabulary itself (a vocab_file is silently ignored).
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    return tok


def write_tiny_bert(path: Path, num_labels: int = 2, problem_type: str | None = None) -> Path:
    """Saves a 2-layer, hidden-32 BERT sequence classifier plus its tokenizer to ``path``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = write_tokenizer(path)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    if problem_type:
        cfg.problem_type = problem_type
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def write_tiny_gpt2(path: Path) -> Path:
    """Saves a 2-layer, hidden-32 GPT-2 causal LM with the WordPiece tokenizer to ``path``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = write_tokenizer(path)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _sentence(rng: random.Random, label: int) -> str:
    filler = [rng.choice(WORDS[:12]) for _ in range(rng.randint(3, 8))]
    filler.insert(rng.randint(0, len(filler)), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(filler)


def write_glue_dir(root: Path, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> Path:
    """Writes a small synthetic ``<root>/glue/{SST-2,RTE,STS-B,CoLA,MRPC}`` and
    ``<root>/superglue/CB`` and ``<root>/gsm8k`` in the original release layouts."""
    rng = random.Random(seed)
    glue = root / "glue"
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [(_sentence(rng, i % 2), i % 2) for i in range(n)]
        d = glue / "SST-2"; d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
        d = glue / "CoLA"; d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.tsv").write_text("".join(f"src\t{y}\t{'' if y else '*'}\t{s}\n" for s, y in rows))
        d = glue / "RTE"; d.mkdir(parents=True, exist_ok=True)
        names = ("not_entailment", "entailment")
        (d / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
            f"{i}\tthe story was told\t{s}\t{names[y]}\n" for i, (s, y) in enumerate(rows)))
        d = glue / "MRPC"; d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
            f"{y}\t{i}\t{i + 1}\tthe film was\t{s}\n" for i, (s, y) in enumerate(rows)), encoding="utf-8")
        d = glue / "STS-B"; d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.tsv").write_text(
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            + "".join(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tthe film was\t{s}\t{4.0 * y + rng.random():.3f}\n"
                      for i, (s, y) in enumerate(rows)))
        cb = root / "superglue" / "CB"; cb.mkdir(parents=True, exist_ok=True)
        cb_names = ("contradiction", "entailment", "neutral")
        (cb / f"{'val' if split == 'dev' else 'train'}.jsonl").write_text("".join(
            json.dumps({"premise": "the story was told", "hypothesis": s, "label": cb_names[y], "idx": i}) + "\n"
            for i, (s, y) in enumerate(rows)))
        gsm = root / "gsm8k"; gsm.mkdir(parents=True, exist_ok=True)
        (gsm / f"{'test' if split == 'dev' else 'train'}.jsonl").write_text("".join(
            json.dumps({"question": f"how many apples has the man if he has {i % 7} and gives 1 ?",
                        "answer": f"he has {i % 7} - 1 = {i % 7 - 1} apples left .\n#### {i % 7 - 1}"}) + "\n"
            for i in range(n)))
    return root


def init_ray(tmp: str, env: dict | None = None, setup_hook: str | None = None) -> None:
    """The tests' local Ray (2 CPUs), its files in ``tmp``. Tune's trial actors, Train's controller
    and workers import test modules by name (cloudpickle pickles module-level functions by
    reference): they get tests/ and the root on their path. ``setup_hook`` ("module.function"):
    Ray's worker_process_setup_hook, run in every worker process as it starts."""
    import os

    import ray

    from tune_dynsdpb.experiment import WORKER_ENV

    tests = Path(__file__).resolve().parent
    env = {**WORKER_ENV, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # the Train controller polls reports every 2 s
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",  # fewer processes
           **(env or {})}
    runtime_env = {"env_vars": env, **({"worker_process_setup_hook": setup_hook} if setup_hook else {})}
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc, timeout: float = 15, leader: bool = False) -> None:
    """Stops a process started with ``start_new_session=True`` and every process it forked:
    SIGTERM to the group (``leader``: to the process alone, for `ray start --block`, which stops its
    node's processes itself and waits 30 s for a drain when they die under it), SIGKILL to the
    group if the process is still there after ``timeout`` seconds, and to what it left behind."""
    import os
    import signal
    import subprocess

    if leader:
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Polls ``condition()`` until it returns something truthy, and returns that; fails the test
    naming ``what`` after ``timeout`` seconds. The synchronisation for tests: a condition with a
    deadline, never a fixed sleep. ``condition`` may raise (e.g. a file not written yet): that
    counts as not yet."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - not ready yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_for_finished_trials(out: Path, proc, n: int = 1, timeout: float = 300) -> None:
    """Until ``n`` trials have ended (COMPLETE or PRUNED) in the Optuna journal of the sweep folder
    ``out``, which the driver writes the moment Tune hands it a trial's end. (Not Tune's
    ``result.json`` on the storage path: on S3 Tune uploads it in the background, so a small sweep
    could be over before the first one shows; not MLflow, written in turns of up to 5 s.) Fails if
    ``proc`` ends first."""
    import optuna
    import pytest

    from tune_dynsdpb.searching import create_journal_storage
    from tune_dynsdpb.state import JOURNAL_FILE

    journal = Path(out) / JOURNAL_FILE
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def finished() -> bool:
        if proc.poll() is not None:
            pytest.fail("the sweep ended before it could be interrupted: " + proc.stderr.read()[-2000:])
        if not journal.is_file():
            return False
        storage = create_journal_storage(str(journal))
        done = sum(len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False, states=ended))
                   for name in optuna.get_all_study_names(storage))
        return done >= n

    wait_for(finished, timeout, f"{n} finished trial(s)", interval=0.3)


def start_sweep(spec: Path, data_dir: Path, out: Path, env: dict):
    """``tune-dynsdpb sweep SPEC`` as a driver process in its own process group (stderr piped)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tune_dynsdpb.cli", "sweep", str(spec), "--data-dir", str(data_dir),
           "--output-dir", str(out), "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def signal_driver(proc, sig) -> tuple[int, str]:
    """Sends ``sig`` to the driver, waits for it, then SIGKILLs its group (whatever Ray left behind);
    returns (exit status, stderr)."""
    import contextlib
    import os
    import signal

    try:
        with contextlib.suppress(ProcessLookupError):  # (it ended by itself)
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=180)
        err = proc.stderr.read()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return code, err
