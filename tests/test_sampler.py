"""PreviousBatchSampler's stream and the SoftTargetCache's refusal to mis-pair."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from tune_dynsdpb import PreviousBatchSampler, SoftTargetCache


@pytest.mark.parametrize("n,batch", [(20, 4), (21, 6), (7, 8), (100, 32), (3, 2)])
def test_overlap_and_coverage(n, batch):
    s = PreviousBatchSampler(n, batch, seed=3)
    stream = []
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = [b.tolist() for b in DataLoader(list(range(n)), batch_size=batch, sampler=s)]
        assert all(len(b) == batch for b in batches)
        assert len(batches) * batch == len(s)
        # every sample of the epoch enters as a new (second) half at least once
        new = Counter(i for b in batches for i in b[batch // 2:])
        assert set(new) == set(range(n))
        stream += batches
    # the chain holds across steps and across epoch boundaries
    for prev, now in zip(stream, stream[1:]):
        assert now[:batch // 2] == prev[batch // 2:]


def test_each_sample_new_once_and_2n_passes_per_epoch_when_divisible():
    s = PreviousBatchSampler(24, 8, seed=0)
    s.set_epoch(1)
    batches = s.epoch_batches()
    assert sum(len(b) for b in batches) == 2 * 24
    new = Counter(i for b in batches for i in b[4:])
    assert set(new.values()) == {1} and len(new) == 24
    # the reused half of the first step is the last new half of epoch 0
    assert batches[0][:4] == s.epoch_batches(0)[-1][4:]


def test_determinism_and_epochs_differ():
    a, b = PreviousBatchSampler(50, 10, seed=7), PreviousBatchSampler(50, 10, seed=7)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(PreviousBatchSampler(50, 10, seed=8)) != list(a)


def test_len():
    assert len(PreviousBatchSampler(20, 4)) == 10 * 4
    assert len(PreviousBatchSampler(21, 4)) == 11 * 4
    assert len(PreviousBatchSampler(21, 4, num_replicas=2, rank=1)) == 6 * 4


def test_replicas_keep_their_own_chains_and_cover_the_data():
    n, batch, world = 30, 4, 2
    per_rank = [PreviousBatchSampler(n, batch, seed=1, num_replicas=world, rank=r).epoch_batches(0) for r in range(world)]
    for batches in per_rank:
        for prev, now in zip(batches, batches[1:]):
            assert now[:2] == prev[2:]
    new = {i for batches in per_rank for b in batches for i in b[2:]}
    assert new == set(range(n))


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_bad_batch_size(batch):
    with pytest.raises(ValueError, match="batch_size"):
        PreviousBatchSampler(10, batch)


def test_cache_roundtrip_and_mismatch_raises():
    cache = SoftTargetCache()
    assert cache.get(torch.tensor([1, 2])) is None
    logits = torch.randn(2, 3)
    cache.put(torch.tensor([4, 9]), logits)
    assert torch.equal(cache.get(torch.tensor([4, 9])), logits)
    with pytest.raises(KeyError, match="soft-target cache"):
        cache.get(torch.tensor([9, 4]))
    with pytest.raises(KeyError):
        cache.get(torch.tensor([4, 9, 1]))
    cache.put(torch.tensor([1, 2]), torch.randn(5, 3), counts=torch.tensor([2, 3]))
    with pytest.raises(KeyError, match="target tokens"):
        cache.get(torch.tensor([1, 2]), counts=torch.tensor([3, 2]))
    state = cache.state_dict()
    fresh = SoftTargetCache()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.get(torch.tensor([1, 2]), torch.tensor([2, 3])), state["outputs"])
