"""PIXEL's span masking and the visually similar character substitutions used to test robustness.

Span masking (Rust et al., 2023): spans of 1–6 consecutive patches are hidden until about
``ratio`` of the *text* patches are; span lengths follow PIXEL's cumulative weights
(0.2, 0.4, 0.6, 0.8, 0.9, 1.0), so short spans are commoner. Spans lie on text patches only — the
first one always does, and neither padding nor the end-of-sequence patch is ever hidden.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polymodal.nn.mae import MAE, MAEOutput, noise_from_mask

SPAN_WEIGHTS = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
"""Cumulative probabilities of span lengths 1…6 (PIXEL's defaults)."""


def span_mask(
    num_text: int, num_patches: int, *, ratio: float = 0.25, max_span: int = 6, rng: random.Random | None = None
) -> Tensor:
    """(num_patches,) bool: about ``ratio · num_text`` patches hidden in spans of at most ``max_span``.

    At least one patch is hidden and at least one text patch stays visible (when there are two
    or more). Spans are drawn inside ``[0, num_text)`` and never touch each other, so each run of
    hidden patches is one span; a span that finds no room is shortened.
    """
    if not 1 <= num_text <= num_patches:
        raise ValueError(f"num_text must be in [1, {num_patches}] (the strip's patches); got {num_text}")
    if not 0.0 < ratio < 1.0 or not 1 <= max_span:
        raise ValueError(f"expected 0 < ratio < 1 and max_span >= 1; got ratio={ratio}, max_span={max_span}")
    rng = rng or random.Random()
    weights = [w for w in SPAN_WEIGHTS[:max_span]]
    weights += [1.0] * (max_span - len(weights))
    target = min(max(1, round(ratio * num_text)), max(num_text - 1, 1))
    mask = torch.zeros(num_patches, dtype=torch.bool)
    while int(mask.sum()) < target:
        u = rng.random()
        length = next(i + 1 for i, w in enumerate(weights) if u <= w or i == len(weights) - 1)
        length = min(length, target - int(mask.sum()), num_text)
        while length:  # spans never touch, so every run of hidden patches is one span (≤ max_span)
            starts = [s for s in range(num_text - length + 1) if not mask[max(s - 1, 0) : s + length + 1].any()]
            if starts:
                start = rng.choice(starts)
                mask[start : start + length] = True
                break
            length -= 1
        if not length:
            break  # no room left for a separate span
    return mask


def batch_span_masks(
    num_text: Tensor | Sequence[int],
    num_patches: int,
    *,
    ratio: float = 0.25,
    max_span: int = 6,
    rng: random.Random | None = None,
) -> Tensor:
    """(B, num_patches) bool: one :func:`span_mask` per strip."""
    rng = rng or random.Random()
    counts = num_text.tolist() if isinstance(num_text, Tensor) else list(num_text)
    return torch.stack([span_mask(int(t), num_patches, ratio=ratio, max_span=max_span, rng=rng) for t in counts])


LETTER_LOOKALIKES = {"g": "q", "i": "l", "w": "vv", "u": "v", "v": "u"}
"""Letters drawn as other letters that look alike ("eiqht", "tvvo", "nlne")."""

DIGIT_LOOKALIKES = {"o": "0", "e": "3", "s": "5", "z": "2"}
"""Letters drawn as digits that look alike ("s3ven", "f0ur", "2ero")."""

LOOKALIKES = {**LETTER_LOOKALIKES, **DIGIT_LOOKALIKES}
"""Every visually similar ASCII substitution used here; all drawn by the bundled font."""


def perturb_word(
    word: str, *, substitutions: int = 2, rng: random.Random | None = None, table: dict[str, str] | None = None
) -> str:
    """``word`` with up to ``substitutions`` of its letters replaced by a look-alike from ``table``
    (:data:`LOOKALIKES` by default); a word with no replaceable letter comes back unchanged."""
    rng, table = rng or random.Random(), LOOKALIKES if table is None else table
    places = [i for i, c in enumerate(word) if c in table]
    chosen = set(rng.sample(places, min(substitutions, len(places))))
    return "".join(table[c] if i in chosen else c for i, c in enumerate(word))


def perturb(
    text: str,
    words: Sequence[str],
    *,
    substitutions: int = 2,
    rng: random.Random | None = None,
    table: dict[str, str] | None = None,
) -> str:
    """``text`` with every occurrence of each of ``words`` perturbed by :func:`perturb_word`."""
    rng = rng or random.Random()
    out = []
    for token in text.split(" "):
        core = token.rstrip(".,!?")
        if core.lower() in words:
            token = perturb_word(core, substitutions=substitutions, rng=rng, table=table) + token[len(core) :]
        out.append(token)
    return " ".join(out)


def masked_forward(mae: MAE, model: Any, rendered: Any, rng: random.Random) -> tuple[MAEOutput, Tensor]:
    """Span-mask a rendered batch (``model`` renders: its config, ``max_patches``, ``prepare``) and run the
    MAE on it; returns ``(MAEOutput, span mask (B, N))``."""
    cfg = model._render_config()
    dev = mae.mask_token.device
    mask = batch_span_masks(rendered.num_text, model.max_patches, ratio=cfg.mask_ratio, max_span=cfg.max_span, rng=rng)
    noise, len_keep = noise_from_mask(mask, rendered.valid)
    out = mae(
        model.prepare(rendered.images.to(dev)), noise=noise.to(dev), len_keep=len_keep, valid=rendered.valid.to(dev)
    )
    return out, mask


__all__ = [
    "DIGIT_LOOKALIKES",
    "LETTER_LOOKALIKES",
    "LOOKALIKES",
    "SPAN_WEIGHTS",
    "batch_span_masks",
    "masked_forward",
    "perturb",
    "perturb_word",
    "span_mask",
]
