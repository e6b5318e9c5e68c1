"""Attention masks: what a call asks for, and the dense reference form every backend agrees with.

Conventions (shared by every backend):
    q: (B, H, Nq, D); k, v: (B, H, Nk, D).
    ``causal``: query i sees key j when j <= i + (Nk - Nq) (bottom-right aligned, so a
        query block appended after a KV cache sees everything before it).
    ``key_padding``: (B, Nk) bool, True where the key is real.
    ``seqlens``: lengths of packed sequences along N (B must be 1, Nq == Nk == sum):
        block-diagonal, so no token sees another sequence.
    ``mask``: bool (True = may attend) or additive float, broadcastable to (B, H, Nq, Nk).
A query row that may attend to no key returns zeros, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """The parts of an attention call a backend needs to decide whether it can run it."""

    device: str
    dtype: torch.dtype
    grad: bool
    causal: bool
    padding: bool
    packed: bool
    dense: str  # "", "bool" or "additive"
    dropout: bool
    nq: int
    nk: int
    head_dim: int

    @property
    def kinds(self) -> tuple[str, ...]:
        """Mask kinds present in this call, e.g. ``("causal", "padding")``; ``("none",)`` when bare."""
        kinds = tuple(
            name
            for name, on in (
                ("causal", self.causal),
                ("padding", self.padding),
                ("block", self.packed),
                (self.dense, bool(self.dense)),
            )
            if on
        )
        return kinds or ("none",)


def causal_mask(nq: int, nk: int, device: torch.device | str | None = None) -> Tensor:
    """(Nq, Nk) bool, bottom-right aligned lower triangle: query i sees keys j <= i + Nk - Nq."""
    offset = nk - nq
    rows = torch.arange(nq, device=device).unsqueeze(1)  # (Nq, 1)
    cols = torch.arange(nk, device=device).unsqueeze(0)  # (1, Nk)
    return cols <= rows + offset


def block_diagonal_mask(seqlens: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """(N, N) bool with N = sum(seqlens): tokens attend only within their own sequence."""
    ids = torch.repeat_interleave(
        torch.arange(len(seqlens), device=device), torch.tensor(list(seqlens), device=device)
    )  # (N,)
    return ids.unsqueeze(1) == ids.unsqueeze(0)


def combine(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    key_padding: Tensor | None = None,
    seqlens: Sequence[int] | None = None,
    mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Every requested mask folded into one, broadcastable to (B, H, Nq, Nk).

    Returns a bool tensor (True = may attend) unless ``mask`` is additive, in which case
    the result is additive too (``-inf`` where forbidden). ``None`` when nothing is masked.
    """
    allowed: Tensor | None = None

    def meet(m: Tensor) -> None:
        nonlocal allowed
        allowed = m if allowed is None else allowed & m

    if causal:
        meet(causal_mask(nq, nk, device))  # (Nq, Nk)
    if seqlens is not None:
        meet(block_diagonal_mask(seqlens, device))  # (N, N)
    if key_padding is not None:
        meet(key_padding[:, None, None, :].to(torch.bool))  # (B, 1, 1, Nk)
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        meet(mask)
        return allowed
    if allowed is None:
        return mask
    return mask.masked_fill(~allowed, float("-inf"))  # additive, broadcast


def as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as an additive one (0 where allowed, -inf where not)."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def rows_with_keys(mask: Tensor) -> Tensor:
    """Bool, same shape as ``mask`` without its last dim: rows that may attend to at least one key."""
    if mask.dtype == torch.bool:
        return mask.any(dim=-1)
    return (mask > float("-inf")).any(dim=-1)


IMAGE_PATTERNS: tuple[str, ...] = ("full", "row", "column", "conv")
"""Sparse image-to-image attention patterns (DALL·E, RuDolph); every one is also causal."""


def image_pattern_mask(
    pattern: str,
    grid: tuple[int, int],
    *,
    prefix: int = 0,
    suffix: int = 0,
    kernel: int = 3,
    device: torch.device | str | None = None,
) -> Tensor:
    """(N, N) bool for a causal stream ``[prefix tokens][h·w image tokens, raster order][suffix tokens]``.

    Every token sees only earlier tokens (and itself). Among image tokens ``pattern`` keeps:
    ``"full"`` all earlier ones; ``"row"`` the earlier ones of the same row; ``"column"``
    those of the same column; ``"conv"`` those within a ``kernel × kernel`` window centred
    on the query. Image tokens always see the whole prefix (the text); suffix tokens see
    everything before them. N = prefix + h·w + suffix.
    """
    if pattern not in IMAGE_PATTERNS:
        raise ValueError(f"image attention pattern must be one of {', '.join(IMAGE_PATTERNS)}; got {pattern!r}")
    h, w = grid
    if h < 1 or w < 1 or prefix < 0 or suffix < 0 or kernel < 1 or kernel % 2 == 0:
        raise ValueError(
            f"need grid >= (1, 1), prefix/suffix >= 0 and an odd kernel; got grid={grid}, "
            f"prefix={prefix}, suffix={suffix}, kernel={kernel}"
        )
    n = prefix + h * w + suffix
    allowed = causal_mask(n, n, device)  # (N, N)
    if pattern == "full":
        return allowed
    pos = torch.arange(h * w, device=device)
    row, col = pos // w, pos % w  # (h·w,) each
    if pattern == "row":
        keep = row[:, None] == row[None, :]  # (h·w, h·w)
    elif pattern == "column":
        keep = col[:, None] == col[None, :]
    else:
        r = kernel // 2
        keep = ((row[:, None] - row[None, :]).abs() <= r) & ((col[:, None] - col[None, :]).abs() <= r)
    image = slice(prefix, prefix + h * w)
    allowed[image, image] &= keep
    return allowed


def pattern_schedule(
    depth: int, cycle: Sequence[str] = ("row", "column", "row", "row"), last: str | None = "conv"
) -> list[str]:
    """One image pattern per layer: ``cycle`` repeated, the last layer ``last`` (DALL·E's schedule by default)."""
    for p in (*cycle, *([last] if last else [])):
        if p not in IMAGE_PATTERNS:
            raise ValueError(f"image attention pattern must be one of {', '.join(IMAGE_PATTERNS)}; got {p!r}")
    if depth < 1 or not cycle:
        raise ValueError(f"need depth >= 1 and a non-empty cycle; got depth={depth}, cycle={tuple(cycle)}")
    out = [cycle[i % len(cycle)] for i in range(depth)]
    if last:
        out[-1] = last
    return out
