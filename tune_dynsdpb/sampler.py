"""The DLB batch stream and the cache of soft targets that rides on it."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class PreviousBatchSampler(Sampler[int]):
    """Yields sample indices so that every batch reuses the second half of the batch before it.

    Use it with ``DataLoader(dataset, batch_size=B, sampler=PreviousBatchSampler(dataset, B))``
    and ``drop_last=False``: the stream is a whole number of batches of exactly B. Each epoch
    shuffles under ``seed + epoch`` and cuts the permutation into halves of size B/2::

        epoch e     perm_e = shuffle(range(N), seed + e)  ->  h0 h1 h2 ... h{H-1}      H = ceil(N / (B/2))
        carry       the last half of epoch e-1 (epoch 0: its own last half, h{H-1})

        step        0             1           2                 H-1
        batch     [carry | h0]  [h0 | h1]   [h1 | h2]   ...   [h{H-2} | h{H-1}]
                          \\______/     \\______/
                    the first half of every step is the second half of the step before

    So the chain never breaks, not even across epochs: the last half of epoch e is the first
    half of the first step of epoch e+1. Each epoch has H steps and H*B sample-passes; every
    sample enters as a new (second) half once and is reused in the very next step.

    Edges, and what they cost:

    - The first step of training has no previous step: its first half (h{H-1} of epoch 0) gets
      cross-entropy only, and comes round again at the end of epoch 0.
    - The last half of the last epoch is never reused (training stops).
    - If N is not a multiple of B/2 (times the number of replicas), the permutation is padded
      with its own first indices, as ``DistributedSampler`` does: no sample is dropped, and a
      few are seen once more in that epoch.

    Under DDP (``num_replicas`` > 1) each rank keeps its own chain over a strided shard of the
    same permutation, so every rank's batch at step t shares half its samples with that rank's
    batch at step t-1. Hand the loader to accelerate with its batch sharding disabled
    (:class:`tune_dynsdpb.DynSDPBTrainer` does this): re-sharding batches would break the chain.
    """

    def __init__(self, data_source: Sized | int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size: must be even and >= 2 for the previous-batch stream (got {batch_size})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank: must be in [0, {num_replicas}) (got {rank})")
        self.num_samples = data_source if isinstance(data_source, int) else len(data_source)
        if self.num_samples < 1:
            raise ValueError("data_source: the dataset is empty")
        self.batch_size, self.half = batch_size, batch_size // 2
        self.seed, self.shuffle = seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        # Halves per rank per epoch, H; the shard size is H * half.
        self.halves_per_epoch = math.ceil(self.num_samples / (self.half * num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _halves(self, epoch: int) -> list[list[int]]:
        """This rank's halves h0 .. h{H-1} for ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            perm = list(range(self.num_samples))
        total = self.halves_per_epoch * self.half * self.num_replicas
        while len(perm) < total:  # pad by wrapping; the loop covers N smaller than the padding
            perm += perm[: total - len(perm)]
        shard = perm[self.rank:total:self.num_replicas]
        return [shard[k * self.half:(k + 1) * self.half] for k in range(self.halves_per_epoch)]

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of one epoch, each of ``batch_size`` indices (see the diagram)."""
        epoch = self.epoch if epoch is None else epoch
        halves = self._halves(epoch)
        carry = self._halves(epoch - 1)[-1] if epoch > 0 else halves[-1]
        return [prev + new for prev, new in zip([carry] + halves[:-1], halves)]

    def __iter__(self) -> Iterator[int]:
        for batch in self.epoch_batches():
            yield from batch

    def __len__(self) -> int:
        return self.halves_per_epoch * self.batch_size


class SoftTargetCache:
    """The detached outputs that step t-1 computed for the half that step t reuses, keyed by sample id.

    ``put`` stores one half; ``get`` hands the targets back only for exactly the same ids in
    the same order (and, for causal LMs, the same number of target tokens per sample), and
    raises otherwise: the wrong targets are never paired silently.
    """

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.outputs: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def put(self, ids: torch.Tensor, outputs: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """ids: (K,); outputs: (M, ...) detached rows (M = K, or the target tokens of K samples);
        counts: (K,) rows per sample when M != K."""
        self.ids = ids.detach().clone()
        self.outputs = outputs.detach()
        self.counts = None if counts is None else counts.detach().clone()

    def get(self, ids: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor | None:
        """The cached outputs for ``ids``; None when the cache is empty (the first step)."""
        if self.ids is None:
            return None
        if self.ids.shape != ids.shape or not torch.equal(self.ids.to(ids.device), ids):
            raise KeyError(f"soft-target cache holds samples {self.ids.tolist()[:8]}... but the batch reuses "
                           f"{ids.tolist()[:8]}...: the batch stream is not the previous-batch chain")
        if counts is not None and self.counts is not None and not torch.equal(self.counts.to(counts.device), counts):
            raise KeyError("soft-target cache: the reused samples have a different number of target tokens "
                           f"than when they were cached ({self.counts.tolist()} vs {counts.tolist()})")
        return self.outputs.to(ids.device)

    def clear(self) -> None:
        self.ids = self.outputs = self.counts = None

    def state_dict(self) -> dict:
        return {k: None if v is None else v.cpu() for k, v in
                (("ids", self.ids), ("outputs", self.outputs), ("counts", self.counts))}

    def load_state_dict(self, state: dict) -> None:
        self.ids, self.outputs, self.counts = state["ids"], state["outputs"], state["counts"]
