"""The order in which training reads samples: a pure function of ``(seed, epoch)``, shared by every rank.

:func:`global_batches` yields the sample indices of each *global* batch (the whole ``batch_size``
of one optimiser step, over all ranks); :func:`local_indices` is the part of a global batch one rank
reads. Rank ``r`` of ``W`` reads samples ``[r*b, (r+1)*b)`` with ``b = batch_size // W``, so the
ranks together read exactly the global batch a single process reads, and a run resumed at another
world size reads the same samples at every step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

EPOCH_SEED = 1_000_003
"""The epoch's permutation is drawn from ``seed * EPOCH_SEED + epoch`` (a prime, so seeds and epochs
do not collide for any realistic run)."""


def global_batches(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
    """Index batches forever: each epoch a fresh permutation from ``(seed, epoch)``, last partial batch dropped.

    ``n`` samples, ``batch_size`` indices per batch (each a ``(batch_size,)`` long tensor; fewer when
    ``batch_size > n``), starting at global step ``start_step`` (the batch that step reads, so a
    resumed run continues the same order). An epoch has ``max(n // batch_size, 1)`` batches.
    """
    if n < 1:
        raise ValueError(f"global_batches needs at least one sample; got n={n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be ≥ 0; got {start_step}")
    per_epoch = max(n // batch_size, 1)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED + epoch))  # (n,)
        yield order[offset * batch_size : (offset + 1) * batch_size]  # (batch_size,)
        step += 1


def local_indices(global_index: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s part of one global batch: samples ``[rank*b, (rank+1)*b)``, ``b = len // world``.

    A global batch that does not split evenly over ``world`` ranks is a ValueError naming both sizes.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world ≥ 1; got rank={rank}, world={world}")
    size = len(global_index)
    if size % world:
        raise ValueError(
            f"a global batch of {size} samples does not split over {world} ranks; "
            f"use a batch_size that is a multiple of the world size {world}"
        )
    b = size // world
    return global_index[rank * b : (rank + 1) * b]  # (b,)


__all__ = ["EPOCH_SEED", "global_batches", "local_indices"]
