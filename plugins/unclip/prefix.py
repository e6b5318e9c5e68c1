"""Sampling the unCLIP prior with its text prefix computed once per generation.

The prior's transformer is causal over ``[text tokens (n), text embedding, time, noised embedding, query]``: the
first n + 1 positions never see the three after them, so their keys and values are the same at every sampling
step. :class:`PrefixCachedPrior` computes them once per row group (the learned null text, which fills all L
positions, and the prompts) into a :class:`polymodal.nn.KVCache` and runs each step on the last three positions
only — the x0 of :meth:`DiffusionPrior.grouped_forward` at a fraction of the cost (issue 18's cross-attention
reuse, applied to a causal prefix).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polymodal.nn import KVCache

EXTRA = 4
"""Tokens after the text: the text embedding, then the three a sampling step changes (time embedding, noised image
embedding, learned query)."""
STEP = EXTRA - 1
"""The positions a sampling step runs; the text and the text embedding before them are the cached prefix."""


def batch_timesteps(t: Tensor | int, b: int, device: torch.device) -> Tensor:
    """Timesteps (B,) from a scalar, a (1,) or a (B,) ``t``."""
    t = torch.as_tensor(t, device=device)
    return t.reshape(1).expand(b) if t.numel() == 1 else t  # (B,)


def row_groups(mask: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The prior's row groups of a text mask (B, L): (rows, kept) for the rows attending every text position (the
    learned null text) and for the others, ``kept`` (n,) the text positions some row of the group attends (one
    masked position for a group with no text at all)."""
    full = mask.all(1)  # (B,)
    groups = []
    for rows in (full.nonzero().squeeze(1), (~full).nonzero().squeeze(1)):
        if rows.numel():
            kept = mask[rows].any(0).nonzero().squeeze(1)  # (n,)
            groups.append((rows, kept if kept.numel() else kept.new_zeros(1)))
    return groups


def in_batch_order(groups: list[tuple[Tensor, Tensor]], parts: list[Tensor]) -> Tensor:
    """The groups' outputs ``parts`` (b', …) put back in the batch's row order."""
    if len(parts) == 1:
        return parts[0]
    order = torch.cat([rows for rows, _ in groups]).argsort()  # (B,)
    return torch.cat(parts)[order]


class PrefixCachedPrior:
    """``fn(noisy (B, E), t (B,), {"embed", "tokens", "mask"})`` → x0 (B, E) for :func:`polymodal.diffusion.cfg_model`:
    :meth:`DiffusionPrior.grouped_forward`'s result, each row group's text prefix computed on its first call and
    reused while that group's text inputs are the same tensors' values (checked every step)."""

    def __init__(self, prior: Any) -> None:
        self.prior = prior
        self._prefixes: dict[int, tuple[tuple[Tensor, ...], KVCache, int]] = {}  # group -> (inputs, cache, n + 1)

    def _cache(self, group: int, embed: Tensor, tokens: Tensor, mask: Tensor, kept: Tensor) -> tuple[KVCache, int]:
        """The group's prefix cache, computed now unless the same text was cached before."""
        inputs = (embed, tokens, mask, kept)
        held = self._prefixes.get(group)
        if held is not None and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(held[0], inputs)):
            return held[1], held[2]
        prior, b = self.prior, embed.shape[0]
        prefix = prior.text_prefix(embed, tokens, kept)  # (b, n + 1, W)
        cache = KVCache(capacity=prefix.shape[1] + STEP)
        keys = torch.cat([mask, mask.new_ones(b, 1)], dim=1)  # (b, n + 1)
        prior.transformer(prefix, causal=True, key_padding=keys, cache=cache)  # fills the prefix's keys and values
        self._prefixes[group] = (inputs, cache, prefix.shape[1])
        return cache, prefix.shape[1]

    def __call__(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        prior = self.prior
        t = batch_timesteps(t, noisy.shape[0], noisy.device)  # (B,)
        embed, tokens, mask = cond["embed"], cond["tokens"], cond["mask"]
        groups, parts = row_groups(mask), []
        for i, (rows, kept) in enumerate(groups):
            m = mask[rows][:, kept]  # (b', n)
            cache, length = self._cache(i, embed[rows], tokens[rows][:, kept], m, kept)
            cache.set_length(length)  # the last step's three positions are overwritten
            keys = torch.cat([m, m.new_ones(len(rows), EXTRA)], dim=1)  # (b', n + 4)
            h = prior.transformer(prior.step_tokens(noisy[rows], t[rows]), causal=True, key_padding=keys, cache=cache)
            parts.append(prior.proj_to_clip_embeddings(h[:, -1]))  # (b', E)
        return in_batch_order(groups, parts)  # (B, E)
