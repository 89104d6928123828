"""Samplers of the SR pipeline and the counter-based randomness behind every training sample.

A training sample is ``SampleKey(epoch, position, index)``; ``position`` is its place in the epoch's global
draw order over all ranks, and :func:`sample_random` turns (seed, epoch, position, stream) into its crop
and dihedral element (``effsr.data.datasets``), so a sample does not depend on workers, ranks or resumes.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from effsr.data.sources import check_batch_size
from effsr.errors import ConfigError

__all__ = ["EvalSampler", "SampleKey", "TrainBatchSampler", "TrainSampler", "sample_random"]

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_random(seed: int, epoch: int, position: int, stream: int) -> int:
    """64 random bits that depend only on (seed, epoch, position, stream) (counter-based, splitmix64)."""
    state = 0
    for value in (seed, epoch, position, stream):
        state = _splitmix64(state ^ (value & _MASK64))
    return state


class SampleKey(NamedTuple):
    """What the train sampler yields: epoch, global position in the epoch's draw order, dataset index."""

    epoch: int
    position: int
    index: int


def _distributed_rank(rank: int | None, num_replicas: int | None) -> tuple[int, int]:
    if num_replicas is None:
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = torch.distributed.get_world_size() if ready else 1
        if rank is None:
            rank = torch.distributed.get_rank() if ready else 0
    rank = 0 if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ConfigError(f"sampler rank {rank} is outside [0, {num_replicas})")
    return rank, num_replicas


class TrainSampler(Sampler[SampleKey]):
    """Iteration-based epochs: ``samples_per_epoch`` draws over all ranks (``// num_replicas`` per rank).

    The epoch's global draw order concatenates seeded permutations of the pool (all indices, or the subset
    set with ``set_subset``); rank r takes positions r, r + W, r + 2W, ... A subset change takes effect at
    the next draw (minus what the DataLoader already prefetched).
    """

    def __init__(
        self, dataset_size: int, samples_per_epoch: int, seed: int = 0, rank: int | None = None,
        num_replicas: int | None = None,
    ) -> None:
        if samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.dataset_size = dataset_size
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.rank, self.num_replicas = _distributed_rank(rank, num_replicas)
        self.epoch = 0
        self.subset: np.ndarray | None = None
        self._subset_version = 0
        if samples_per_epoch < self.num_replicas:
            raise ConfigError(f"data.samples_per_epoch ({samples_per_epoch}) is below the number of ranks")

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch (Lightning calls it at each epoch start)."""
        self.epoch = epoch

    def set_subset(self, indices: np.ndarray | Sequence[int] | None) -> None:
        """Draw only from ``indices`` (None: from the whole dataset)."""
        if indices is not None:
            indices = np.unique(np.asarray(indices, dtype=np.int64))
            if len(indices) == 0:
                raise ConfigError("set_train_subset got an empty index set: every class needs at least one sample")
            if indices[0] < 0 or indices[-1] >= self.dataset_size:
                raise ConfigError(f"set_train_subset indices must lie in [0, {self.dataset_size})")
        self.subset = indices
        self._subset_version += 1

    def __len__(self) -> int:
        return self.samples_per_epoch // self.num_replicas

    def __iter__(self):
        return self.draws(len(self))

    def draws(self, count: int | None = None):
        """This rank's draws of the current epoch in order: the first ``count`` (None: unbounded).

        Past ``len(self)`` the draw order continues with further seeded permutations of the pool, so a
        :class:`TrainBatchSampler` whose batches grew can take more than ``samples_per_epoch`` in an epoch.
        """
        epoch, version = self.epoch, None
        pool: np.ndarray = np.zeros(0, dtype=np.int64)
        permutations: dict[int, np.ndarray] = {}
        pool_key = 0
        positions = itertools.count(self.rank, self.num_replicas) if count is None else range(
            self.rank, count * self.num_replicas, self.num_replicas)
        for position in positions:
            if version != self._subset_version:
                version = self._subset_version
                pool = np.arange(self.dataset_size) if self.subset is None else self.subset
                pool_key = 0 if self.subset is None else zlib.crc32(pool.tobytes()) + 1
                permutations = {}
            cycle, offset = divmod(position, len(pool))
            permutation = permutations.get(cycle)
            if permutation is None:
                generator = np.random.default_rng([self.seed, epoch, cycle, pool_key])
                permutation = permutations[cycle] = generator.permutation(len(pool))
            yield SampleKey(epoch, position, int(pool[permutation[offset]]))


class TrainBatchSampler(Sampler[list[SampleKey]]):
    """Batches of a :class:`TrainSampler` whose per-rank batch size can change mid-run (``set_batch_size``).

    An epoch is a fixed number of steps, ``ceil(len(sampler) / base_batch_size)`` (what the trainer counts
    with); every step takes the next ``batch_size`` draws of the sampler's order. At ``base_batch_size``
    the epoch's last batch is partial exactly as in ``DataLoader(batch_size=base_batch_size,
    sampler=sampler)`` (same batches when the size never changes); at another size every batch is full,
    so an epoch draws proportionally more or fewer samples. A change takes effect at the next batch drawn
    (minus what the DataLoader already prefetched), like :meth:`TrainSampler.set_subset`.
    """

    def __init__(self, sampler: TrainSampler, base_batch_size: int, batch_size: int | None = None) -> None:
        self.sampler = sampler  # Lightning calls sampler.set_epoch through batch_sampler.sampler
        self.base_batch_size = self._check(base_batch_size)
        self.batch_size = self._check(base_batch_size if batch_size is None else batch_size)

    @staticmethod
    def _check(batch_size: int) -> int:
        return check_batch_size(batch_size, "the training batch size")

    def set_batch_size(self, batch_size: int) -> None:
        """Per-rank batch size of the batches drawn from now on."""
        self.batch_size = self._check(batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.base_batch_size)

    def __iter__(self):
        draws = self.sampler.draws(None)
        steps = len(self)
        last = len(self.sampler) - (steps - 1) * self.base_batch_size  # in (0, base_batch_size]
        for step in range(steps):
            size = self.batch_size
            if step == steps - 1 and size == self.base_batch_size:
                size = last
            yield list(itertools.islice(draws, size))


class EvalSampler(Sampler[int]):
    """Splits images across ranks without padding: rank r gets r, r + W, ... (every image exactly once)."""

    def __init__(self, dataset_size: int, rank: int | None = None, num_replicas: int | None = None) -> None:
        self.dataset_size = dataset_size
        self.rank, self.num_replicas = _distributed_rank(rank, num_replicas)

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.dataset_size, self.num_replicas))
