"""CLIP's data-pipeline step: images prepared and shifted, captions re-sampled and tokenised.

:class:`CLIPCollate` does what :meth:`CLIPModel.loss` otherwise does on the CPU before the
towers run, in the same order and with the same draws from torch's global generator (the
random shift first, then the caption views), so ``loss(collate(batch, step))`` equals
``loss(batch)`` under the same seed. It holds the config and the tokenizer, never the weights,
and pickles, so DataLoader workers can run it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from polymodal.data.augment import random_translate, resize

from . import captions as cap


def tokenize_texts(tokenizer: Any, context_length: int, texts: list[str] | str, truncate: bool = False) -> Tensor:
    """LongTensor (B, L) of ``[bos] text [eos] pad…``, L = the longest row (at most ``context_length``).

    A text longer than the context raises ValueError (length and limit) unless ``truncate``;
    truncation always keeps the end-of-text token.
    """
    if tokenizer is None:
        raise ValueError("this CLIP model has no tokenizer (converted without a tokenizer.json); pass token ids")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("expected at least one text to tokenize; got an empty list")
    rows = [tokenizer.encode(t, context_length, truncate) for t in texts]
    out = torch.full((len(rows), max(map(len, rows))), tokenizer.special_tokens["pad"], dtype=torch.long)  # (B, L)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out  # (B, L)


def prepare_images(images: Tensor, image_size: int, channels: int) -> Tensor:
    """Float images resized to the tower's size; grey images feed an RGB tower as three equal channels."""
    images = images.float()  # (B, C, H, W)
    if images.dim() == 4 and images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    return resize(images, image_size)  # (B, C, S, S)


class CLIPCollate:
    """``collate(batch, step) -> batch`` for CLIP training: adds ``pixels`` (B, C, S, S), the prepared and
    randomly shifted images; ``text_ids``, one (B, L) LongTensor per caption view of step ``step``
    (the batch's own captions when nothing is re-sampled); ``positives``, each view's
    :class:`~.objective.PositiveKeys` (per-sample rows; gathered across ranks by the loss) or None
    (plain InfoNCE)."""

    def __init__(self, config: Any, tokenizer: Any) -> None:
        self.config, self.tokenizer = config, tokenizer

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The training batch ``batch`` of global step ``step`` with its pixels, caption ids and positives."""
        c = self.config
        pixels = prepare_images(batch["image"], c.vision.image_size, c.vision.channels)  # (B, C, S, S)
        if c.augment_shift:
            pixels = random_translate(pixels, c.augment_shift)  # (B, C, S, S)
        views = cap.resample_views(c, batch, step, keys=True) or [(list(batch["caption"]), None)]
        ids = [tokenize_texts(self.tokenizer, c.text.context_length, texts, truncate=True) for texts, _ in views]
        out = copy.copy(batch)  # a Batch stays a Batch (its missing-field errors name the dataset)
        out.update(pixels=pixels, text_ids=ids, positives=[p for _, p in views])
        return out
