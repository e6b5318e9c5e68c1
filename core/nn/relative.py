"""Relative position biases on self-attention logits: T5's bucketed 1-D one, and a 2-D one for image patches.

The offset ``key - query`` between two positions is mapped to one of ``num_buckets`` buckets (exact for
small offsets, log-spaced up to ``max_distance``, the rest in the last bucket); one learned table
(num_buckets, heads) turns buckets into a per-head bias. Bidirectional bucketing (T5's encoder) spends
half the buckets on each side; causal bucketing (T5's decoder) spends all of them on past offsets.

A :class:`~polymodal.nn.stack.TransformerStack` whose blocks ask for it (``BlockConfig.position_bias="t5"``)
owns one table, computes the bias once per call and gives it to every block (as T5's layers share the
first layer's); the bias reaches :func:`polymodal.attention.attention` as its additive ``mask``, which
every backend that declares ``"additive"`` masks runs, combined with causal and padding masks there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from polymodal.nn.cache import KVCache


def bucket_layout(num_buckets: int, max_distance: int, bidirectional: bool) -> str | None:
    """``None`` when the bucket settings are usable, else what is wrong (expected vs given).

    Each direction needs at least one exact bucket (``max_exact = half // 2 >= 1``, ``half`` being the
    buckets per direction) and a log range beyond it (``max_distance > max_exact``)."""
    half = num_buckets // 2 if bidirectional else num_buckets
    need = 4 if bidirectional else 2
    if num_buckets < need:
        kind = "bidirectional" if bidirectional else "causal"
        return f"{kind} buckets need relative_buckets >= {need}; got {num_buckets}"
    if max_distance <= half // 2:
        return (
            f"relative_max_distance must exceed the {half // 2} exact buckets of {num_buckets} "
            f"{'bidirectional' if bidirectional else 'causal'} buckets; got {max_distance}"
        )
    return None


def relative_position_bucket(
    relative: Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Bucket ids (long, same shape) of offsets ``relative = key - query`` (integer tensor), as T5 computes them.

    Bidirectional: buckets ``[0, n/2)`` hold offsets <= 0 and ``[n/2, n)`` positive ones. Causal: positive
    offsets (the future) share bucket 0 with offset 0. Within a direction, distances below ``max_exact``
    (half of its buckets) have a bucket each; larger ones are log-spaced up to ``max_distance``.
    """
    buckets: Tensor | int = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative > 0).to(torch.long) * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.clamp(relative, max=0)  # past offsets as distances >= 0; the future is 0
    max_exact = num_buckets // 2
    small = distance < max_exact
    # Same float operations, in the same order, as T5 (so the same buckets); clamped below at max_exact,
    # where log is finite (smaller distances take the exact bucket instead).
    scaled = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(small, distance, large)


def token_positions(n: int, cache: KVCache | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Query positions (n,) and key positions (Nk,) of ``n`` new tokens after what ``cache`` holds.

    Without a cache: ``0 … n-1`` for both. With one: the queries continue at ``cache.length`` and the keys
    are every position so far; in a static step, the cache's tensor ``positions`` and its ``keys`` bucket.
    """
    if cache is not None and cache.static:
        return cache.positions, torch.arange(cache.keys, device=device)
    start = cache.length if cache is not None else 0
    return torch.arange(start, start + n, device=device), torch.arange(start + n, device=device)


def add_bias(mask: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """An attention ``mask`` (bool: True = attend, or additive) with an additive ``bias`` folded in:
    additive, ``-inf`` where a bool mask forbids. Either may be None."""
    if bias is None:
        return mask
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))  # broadcast (B?, H?, Nq, Nk)
    return mask + bias


class RelativePositionBias(nn.Module):
    """T5's relative position bias: positions → (1, heads, Nq, Nk) additive logits bias.

    ``embedding`` (num_buckets, heads) is initialised N(0, ``init_std``) (T5: ``d_model ** -0.5``).
    """

    def __init__(
        self,
        heads: int,
        *,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        why = bucket_layout(num_buckets, max_distance, bidirectional)
        if why is not None:
            raise ValueError(f"RelativePositionBias: {why}")
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, heads)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """Query positions (Nq,) and key positions (Nk,) → bias (1, H, Nq, Nk)."""
        relative = key_positions[None, :] - query_positions[:, None]  # (Nq, Nk): key minus query, as T5
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )  # (Nq, Nk)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, Nq, Nk)

    def for_tokens(self, n: int, cache: KVCache | None = None, device: torch.device | None = None) -> Tensor:
        """The bias (1, H, n, Nk) of ``n`` new tokens attending over themselves and ``cache``'s past."""
        return self(*token_positions(n, cache, device or self.embedding.weight.device))

    def extra_repr(self) -> str:
        return f"buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"


def grid_relative_index(rows: int, cols: int) -> Tensor:
    """(N, N) long, N = rows·cols patches in row-major order: the id of the 2-D offset (Δrow, Δcol) from query
    patch i to key patch j, one id per offset — ``(Δrow + rows − 1)·(2·cols − 1) + Δcol + cols − 1``, in
    ``[0, (2·rows − 1)(2·cols − 1))`` (BEiT's and OFA's image relative position index, without their extra
    class-token ids)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"grid_relative_index needs rows, cols >= 1; got {rows}, {cols}")
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()  # (N,) each
    d_row = r[None, :] - r[:, None] + rows - 1  # (N, N) key minus query, shifted to >= 0
    d_col = c[None, :] - c[:, None] + cols - 1  # (N, N)
    return d_row * (2 * cols - 1) + d_col  # (N, N)


class GridRelativePositionBias(nn.Module):
    """A learned bias per head and 2-D offset between image patches: (1, heads, N, N) for a rows × cols grid.

    What OFA adds to its image patches' self-attention logits (and BEiT to its ViT's): one table of
    ``(2·rows − 1)(2·cols − 1)`` offsets × heads, looked up by :func:`grid_relative_index`, so the bias between
    two patches depends on their relative position only. A family places it on the patch block of a longer
    sequence's additive mask (OFA: image patches, then text with its own 1-D :class:`RelativePositionBias`).
    """

    def __init__(self, heads: int, rows: int, cols: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.register_buffer("index", grid_relative_index(rows, cols), persistent=False)  # (N, N)
        self.embedding = nn.Embedding((2 * rows - 1) * (2 * cols - 1), heads)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def forward(self) -> Tensor:
        """The bias (1, H, N, N) between every pair of the grid's patches (row-major)."""
        return self.embedding(self.index).permute(2, 0, 1).unsqueeze(0)  # (1, H, N, N)

    def extra_repr(self) -> str:
        return f"grid={self.rows}x{self.cols}"


def block_diagonal_bias(biases: list[Tensor]) -> Tensor:
    """Per-head biases (1, H, n_i, n_i) of consecutive token blocks → one (1, H, Σn_i, Σn_i) bias over the joined
    sequence: each block keeps its own bias (say a 2-D one on image patches, a 1-D one on text), 0 between blocks."""
    heads = biases[0].shape[1] if biases and biases[0].dim() == 4 else None
    for b in biases:
        if b.dim() != 4 or b.shape[0] != 1 or b.shape[1] != heads or b.shape[2] != b.shape[3]:
            raise ValueError(f"block_diagonal_bias: expected (1, {heads}, n, n) biases; got {tuple(b.shape)}")
    if not biases:
        raise ValueError("block_diagonal_bias: expected at least one (1, H, n, n) bias; got none")
    n = sum(b.shape[-1] for b in biases)
    out = biases[0].new_zeros(1, heads, n, n)  # (1, H, N, N)
    at = 0
    for b in biases:
        k = b.shape[-1]
        out[:, :, at : at + k, at : at + k] = b
        at += k
    return out


__all__ = [
    "GridRelativePositionBias",
    "RelativePositionBias",
    "add_bias",
    "block_diagonal_bias",
    "bucket_layout",
    "grid_relative_index",
    "relative_position_bucket",
    "token_positions",
]
