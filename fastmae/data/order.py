"""Which samples each rank reads in each epoch (one rule for every loader)."""
from __future__ import annotations

import numpy as np

from fastmae.errors import UsageError


def epoch_order(n: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1,
                shuffle: bool = True, drop_last: bool = False) -> np.ndarray:
    """Sample indices for ``rank`` in ``epoch``, a whole number of batches.

    One permutation, seeded by ``(seed, epoch)`` and so the same on every rank, is padded by wrapping
    around to a multiple of ``world_size`` (as ``DistributedSampler``) and dealt out round-robin.
    ``drop_last`` (the original's training loaders): each rank's incomplete last batch is left out.
    Otherwise each rank's share is padded to whole batches by repeating its last sample (as DALI's
    ``pad_last_batch``): every sample is read once per epoch across the ranks, plus at most
    ``world_size - 1 + world_size * (batch_size - 1)`` repeats. Either way every rank has the same
    number of batches.
    """
    if n <= 0:
        raise UsageError("the dataset is empty")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = -(-n // world_size)
    mine = np.resize(order, per_rank * world_size)[rank::world_size]
    if drop_last:
        return mine[: len(mine) // batch_size * batch_size]
    return np.concatenate([mine, np.repeat(mine[-1:], -len(mine) % batch_size)])


def batches_per_epoch(n: int, *, world_size: int, batch_size: int, drop_last: bool = False) -> int:
    per_rank = -(-n // world_size)  # ceil
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)
