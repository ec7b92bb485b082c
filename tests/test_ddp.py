"""DDP: under N processes every rank's batch at step t shares half its samples with that same
rank's batch at step t-1. Two CPU processes over gloo, started by ``torch.distributed.run``
(one launch for the whole module, ``ddp_worker.py``), train a tiny BERT with ``DynSDPBTrainer``.

A negative control in the same launch shows the check has teeth: the same sampler handed to
accelerate with its default batch sharding left in place loses the chain on every rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two processes under torch.distributed.run: not the in-process fast lane

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORLD, N, BATCH, STEPS, SEED = 2, 48, 4, 6, 0
HALF = BATCH // 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    """Runs the 2-process job once; returns {"train": [rank0, rank1], "control": [rank0, rank1]}."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
           "DISABLE_MLFLOW_INTEGRATION": "TRUE",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TESTS / "ddp_worker.py"), str(out),
           "--samples", str(N), "--batch-size", str(BATCH), "--max-steps", str(STEPS), "--seed", str(SEED)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its two workers, all ours
        output, _ = proc.communicate()
        pytest.fail(f"the DDP run timed out:\n{output[-4000:]}")
    assert proc.returncode == 0, f"the DDP run failed (rc {proc.returncode}):\n{output[-6000:]}"
    return {kind: [json.loads((out / f"{kind}_rank{r}.json").read_text()) for r in range(WORLD)]
            for kind in ("train", "control")}


def assert_chain(batches: list[list[int]]) -> None:
    """Consecutive batches overlap by exactly half: the first half of t is the second half of t-1."""
    for t in range(1, len(batches)):
        prev, now = batches[t - 1], batches[t]
        assert len(now) == BATCH, f"step {t}: batch of {len(now)}"
        assert now[:HALF] == prev[HALF:], f"step {t}: {now} does not start with the second half of {prev}"
        assert len(set(now) & set(prev)) == HALF, f"step {t}: {now} and {prev} share more than half"


def permutation(epoch: int) -> list[int]:
    import torch

    return torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


def test_every_rank_keeps_its_own_chain(ddp):
    runs = ddp["train"]
    assert [r["rank"] for r in runs] == [0, 1]
    assert all(r["world_size"] == WORLD and r["global_step"] == STEPS for r in runs)
    for r in runs:
        assert len(r["batches"]) == STEPS  # one micro-batch per step
        assert_chain(r["batches"])


def test_ranks_hold_disjoint_shards_that_cover_the_data(ddp):
    b0, b1 = (r["batches"] for r in ddp["train"])
    for t, (x, y) in enumerate(zip(b0, b1)):
        assert not set(x) & set(y), f"step {t}: ranks share samples {set(x) & set(y)}"
    # Each rank's new (second) halves walk its strided shard of the epoch's permutation, so the
    # ranks together take the permutation's first STEPS * HALF * WORLD samples, each once.
    perm = permutation(0)
    for rank, batches in enumerate((b0, b1)):
        assert [i for b in batches for i in b[HALF:]] == perm[rank:STEPS * HALF * WORLD:WORLD]
    new = [i for b in b0 + b1 for i in b[HALF:]]
    assert len(new) == len(set(new)) and set(new) == set(perm[:STEPS * HALF * WORLD])


def test_chain_holds_across_the_epoch_boundary(ddp):
    """Two whole epochs of the trainer's loader: still one chain per rank, each epoch a fresh
    shuffle, and the ranks' new halves cover every sample exactly once per epoch."""
    runs = ddp["train"]
    per_epoch = N // (HALF * WORLD)
    for r in runs:
        e0, e1 = r["epochs"]
        assert len(e0) == len(e1) == per_epoch
        assert e0[:STEPS] == r["batches"]  # training walked exactly this stream
        assert_chain(e0 + e1)
        assert e0 != e1
    for epoch in range(2):
        new = [i for r in runs for b in r["epochs"][epoch] for i in b[HALF:]]
        assert sorted(new) == list(range(N)), f"epoch {epoch}"
        for t in range(per_epoch):
            assert not set(runs[0]["epochs"][epoch][t]) & set(runs[1]["epochs"][epoch][t])


def test_consistency_term_is_computed_and_reduced_across_ranks(ddp):
    runs = ddp["train"]
    logs = runs[0]["logs"]
    assert [log["step"] for log in logs] == list(range(1, STEPS + 1))
    assert runs[1]["logs"] == logs  # every rank logs the same, all-reduced numbers
    assert "consistency_loss" not in logs[0]  # step 1 has no previous batch
    for r in runs:
        assert r["terms"][0]["consistency"] is None
        assert all(t["consistency"] > 0 for t in r["terms"][1:])
    for t, log in enumerate(logs):
        assert log["ce_loss"] == pytest.approx(sum(r["terms"][t]["ce"] for r in runs) / WORLD, rel=1e-5)
        if t:
            assert log["consistency_loss"] > 0
            assert log["consistency_loss"] == pytest.approx(
                sum(r["terms"][t]["consistency"] for r in runs) / WORLD, rel=1e-5)
            assert log["loss"] == pytest.approx(log["ce_loss"] + log["consistency_loss"], rel=1e-4)


def test_step_one_loss_and_gradient_are_the_mean_over_ranks(ddp):
    """Step 1 against a hand computation: the loss is the mean of the ranks' plain CE and the
    applied gradient the mean of their gradients, not world_size times either."""
    runs = ddp["train"]
    step1 = runs[0]["logs"][0]
    for r in runs:
        assert r["first_step"]["ids"] == r["batches"][0]
        assert r["terms"][0]["ce"] == pytest.approx(r["first_step"]["ce"], rel=1e-5)
    assert step1["loss"] == pytest.approx(sum(r["first_step"]["ce"] for r in runs) / WORLD, rel=1e-4)
    assert step1["grad_norm"] == pytest.approx(runs[0]["first_step"]["mean_grad_norm"], rel=1e-4)


def test_final_parameters_identical_across_ranks(ddp):
    r0, r1 = ddp["train"]
    assert r0["params_changed"] and r1["params_changed"]
    assert r0["param_sha256"] == r1["param_sha256"]  # bit for bit: DDP synchronised every step
    assert r0["param_checksum"] == r1["param_checksum"]


def test_dynsdpb_differs_from_dlb_across_ranks(ddp):
    """The same DDP run with dlb (same start, data and seed): step 1 (no term) agrees, then dynsdpb's
    all-reduced alpha/tau statistics, consistency term, loss and final weights part from dlb's.
    A dynsdpb that trains as dlb (both rates forced to 0) fails here."""
    r0, r1 = ddp["train"]
    dyn, dlb = r0["logs"], r0["dlb"]["logs"]
    assert r1["dlb"]["logs"] == dlb and r1["dlb"]["param_sha256"] == r0["dlb"]["param_sha256"]  # ranks agree
    assert [log["step"] for log in dlb] == [log["step"] for log in dyn] == list(range(1, STEPS + 1))
    assert dyn[0]["loss"] == pytest.approx(dlb[0]["loss"], rel=1e-6)
    for d, s in zip(dlb[1:], dyn[1:]):
        assert d["alpha_min"] == d["alpha_max"] == 1.0 and d["tau_min"] == d["tau_max"] == pytest.approx(3.0)
        assert s["alpha_max"] < 1.0 and s["alpha_min"] < s["alpha_max"]  # alpha0 * c^1, c < 1, per sample
        assert s["tau_min"] > 3.0 and s["tau_min"] < s["tau_max"]  # tau0 * (1 + 0.5 u), u > 0
        assert s["consistency_loss"] != pytest.approx(d["consistency_loss"], rel=1e-6)
        assert s["loss"] != d["loss"]
    assert r0["param_sha256"] != r0["dlb"]["param_sha256"]


def test_negative_control_accelerate_sharding_breaks_the_chain(ddp):
    """The same sampler without the trainer's fix: accelerate's BatchSamplerShard deals the one
    chain out round-robin, so rank r gets batches r, r+2, ... and no two of its consecutive
    batches share a sample. ``assert_chain``, the check used above, fails on every rank."""
    runs = ddp["control"]
    assert [r["rank"] for r in runs] == [0, 1] and all(r["world_size"] == WORLD for r in runs)
    unsharded = runs[0]["unsharded"]
    assert runs[1]["unsharded"] == unsharded
    assert_chain(unsharded)  # the sampler itself is one good chain...
    for rank, r in enumerate(runs):
        assert r["shard"] == "BatchSamplerShard" and r["shard_num_processes"] == WORLD
        assert r["batches"] == unsharded[rank::WORLD]  # ...which accelerate deals out by whole batches
        assert len(r["batches"]) >= 2
        for prev, now in zip(r["batches"], r["batches"][1:]):
            assert not set(prev) & set(now)
        with pytest.raises(AssertionError):
            assert_chain(r["batches"])
