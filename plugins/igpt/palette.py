"""iGPT's colour palette: k-means over pixel colours, and images ↔ raster-order palette tokens.

iGPT (Chen et al., 2020) cuts the colour space into ``K`` clusters (9-bit, 512 colours for
RGB ImageNet) so that a pixel is one token. Here the clusters come from a weighted
k-means over the *distinct* colours of the training pixels (each weighted by how often it
occurs): exact, deterministic and fast, since the embedded datasets have few distinct
colours (the digits have 17 grey levels).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def distinct_colours(images: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct pixel colours (U, C) of ``images`` (B, C, H, W) and how often each occurs (U,)."""
    if images.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W); got shape {tuple(images.shape)}")
    pixels = images.detach().float().permute(0, 2, 3, 1).reshape(-1, images.shape[1])  # (B·H·W, C)
    colours, counts = torch.unique(pixels, dim=0, return_counts=True)  # (U, C), (U,)
    return colours, counts.float()


def kmeans(points: Tensor, k: int, weights: Tensor | None = None, *, iters: int = 100, seed: int = 0) -> Tensor:
    """Weighted k-means (k-means++ start, Lloyd steps) of ``points`` (P, C); returns centres (k, C).

    Deterministic for a given ``seed``. With at most ``k`` distinct points every point is a
    centre (the rest repeat the last one, tokens that are never used). Centres are sorted
    by brightness (sum of channels), so token 0 is the darkest colour.
    """
    if points.dim() != 2 or len(points) == 0:
        raise ValueError(f"kmeans needs points (P, C) with P >= 1; got shape {tuple(points.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    points = points.double()
    w = torch.ones(len(points), dtype=torch.float64) if weights is None else weights.double()  # (P,)
    if len(points) <= k:
        centres = torch.cat([points, points[-1:].expand(k - len(points), -1)])  # (k, C)
        return _sorted(centres).float()
    g = torch.Generator().manual_seed(seed)
    centres = points[torch.multinomial(w / w.sum(), 1, generator=g)]  # (1, C)
    while len(centres) < k:  # k-means++: draw the next centre ∝ weight · squared distance
        d2 = torch.cdist(points, centres).pow(2).min(1).values  # (P,)
        p = w * d2
        nxt = torch.multinomial(p / p.sum(), 1, generator=g) if p.sum() > 0 else p.argmax().view(1)
        centres = torch.cat([centres, points[nxt]])  # (c + 1, C)
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)  # (P,)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w)  # (k,)
        sums = torch.zeros_like(centres).index_add_(0, assign, points * w[:, None])  # (k, C)
        new = torch.where(mass[:, None] > 0, sums / mass.clamp(min=1e-12)[:, None], centres)  # (k, C)
        for empty in (mass == 0).nonzero().flatten().tolist():  # re-seed at the worst-served point
            d2 = torch.cdist(points, new).pow(2).min(1).values * w  # (P,)
            new[empty] = points[d2.argmax()]
        if torch.allclose(new, centres, atol=1e-10, rtol=0):
            break
        centres = new
    return _sorted(centres).float()


def _sorted(centres: Tensor) -> Tensor:
    """Centres ordered by brightness (sum of channels; a stable, readable token order)."""
    return centres[torch.argsort(centres.sum(1), stable=True)]


def fit_palette(images: Tensor, size: int, seed: int = 0) -> Tensor:
    """A palette (size, C) in [0, 1] by weighted k-means over the colours of ``images`` (B, C, H, W)."""
    colours, counts = distinct_colours(images)
    return kmeans(colours, size, counts, seed=seed).clamp(0, 1)


def to_tokens(images: Tensor, palette: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H·W) ids of the nearest palette colour, in raster order (row by row)."""
    if images.dim() != 4 or images.shape[1] != palette.shape[1]:
        raise ValueError(
            f"expected images (B, {palette.shape[1]}, H, W) for a {palette.shape[1]}-channel palette; "
            f"got shape {tuple(images.shape)}"
        )
    b, c, h, w = images.shape
    pixels = images.float().permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, N, C)
    d2 = (pixels[:, :, None, :] - palette[None, None].float()).pow(2).sum(-1)  # (B, N, K)
    return d2.argmin(-1)  # (B, N)


def to_images(ids: Tensor, palette: Tensor, size: int) -> Tensor:
    """(B, size·size) palette ids in raster order → images (B, C, size, size) in [0, 1]."""
    k, c = palette.shape
    if ids.dim() != 2 or ids.shape[1] != size * size:
        raise ValueError(f"expected ids (B, {size * size}) for {size}×{size} images; got shape {tuple(ids.shape)}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= k):
        raise ValueError(f"palette ids must lie in [0, {k - 1}]; got values in [{int(ids.min())}, {int(ids.max())}]")
    pixels = palette[ids]  # (B, N, C)
    return pixels.reshape(len(ids), size, size, c).permute(0, 3, 1, 2).contiguous()  # (B, C, S, S)


def unigram_bits(train_ids: Tensor, test_ids: Tensor, k: int) -> float:
    """Bits per token of ``test_ids`` under the palette histogram of ``train_ids`` (add-one smoothed)."""
    counts = torch.bincount(train_ids.reshape(-1), minlength=k).double() + 1.0  # (K,)
    logp = (counts / counts.sum()).log()  # (K,)
    return float(-logp[test_ids.reshape(-1)].mean() / math.log(2))


__all__ = ["distinct_colours", "fit_palette", "kmeans", "to_images", "to_tokens", "unigram_bits"]
