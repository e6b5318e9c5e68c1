"""RuDolph's data-pipeline step: images checked and noised, task layout drawn, captions sampled and tokenised.

:class:`RudolphCollate` does the CPU work of :meth:`Rudolph.loss` before the frozen VQ-VAE and
the transformer run, with the same draws from torch's global generator in the same order (the
text→image layout per sample, the image noise, the caption templates), so
``loss(collate(batch, step))`` equals ``loss(batch)`` under one seed. It holds the config, the
text tokenizer and the tokenizer's image size and channels, never the weights (it pickles).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from polymodal.data.augment import resize

from . import text as tx


def dataset_images(images: Any, size: int) -> Any:
    """A dataset's float images (B, C, H, W) resized to ``size`` (anything else is returned as given)."""
    ok = isinstance(images, Tensor) and images.dim() == 4 and images.is_floating_point()
    return resize(images, size) if ok else images  # (B, C, S, S)


def check_images(images: Any, channels: int, size: int) -> None:
    """ValueError naming the expected shape unless ``images`` is (B, C, S, S) float for the tokenizer."""
    c, s = channels, size
    if (
        not isinstance(images, Tensor)
        or images.dim() != 4
        or tuple(images.shape[1:]) != (c, s, s)
        or not images.is_floating_point()
        or images.shape[0] == 0
    ):
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected float images (B, {c}, {s}, {s}) in [0, 1]; got {got}")


def batch_captions(config: Any, batch: dict[str, Any]) -> list[str]:
    """Training captions: a random template per sample filled with its label, or the dataset's captions."""
    if config.templates and "label" in batch:
        pick = torch.randint(len(config.templates), (len(batch["label"]),)).tolist()
        return [tx.fill(config.templates[j], int(y), config.class_names) for j, y in zip(pick, batch["label"].tolist())]
    return list(batch["caption"])


def text_parts(tokenizer: Any, config: Any, captions: list[str], t2i: Tensor, truncate: bool) -> tuple[Tensor, Tensor]:
    """The left (B, left_len) and right (B, right_len) contexts of each row's layout (``t2i`` (B,) bool)."""
    empty = [""] * len(captions)
    left = torch.where(
        t2i[:, None].cpu(),
        tx.text_context(tokenizer, captions, config.left_len, "lt_t2i", what="prompt", truncate=truncate),
        tx.text_context(tokenizer, empty, config.left_len, "lt_i2t", what="prompt"),
    )  # (B, L)
    right = torch.where(
        t2i[:, None].cpu(),
        tx.text_context(tokenizer, empty, config.right_len, "pad", what="caption"),
        tx.text_context(tokenizer, captions, config.right_len, "rt_i2t", what="caption", truncate=truncate),
    )  # (B, R)
    return left, right


class RudolphCollate:
    """``collate(batch, step) -> batch`` for RuDolph: ``image`` (B, C, S, S) at the tokenizer's size (noised
    on image→text rows when ``augment``), ``t2i`` (B,) bool layouts, ``captions`` the sampled captions and,
    with ``tokenize``, ``left_ids`` (B, left_len) and ``right_ids`` (B, right_len) the text contexts."""

    def __init__(
        self, config: Any, tokenizer: Any, image_size: int, channels: int, augment: bool = True, tokenize: bool = True
    ) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.image_size, self.channels, self.augment, self.tokenize = image_size, channels, augment, tokenize

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch of global step ``step`` (unused: no curriculum) with its layouts and text contexts."""
        c = self.config
        images = dataset_images(batch["image"], self.image_size)  # (B, C, S, S)
        check_images(images, self.channels, self.image_size)
        t2i = torch.rand(images.shape[0]) < c.t2i_fraction  # (B,)
        if self.augment and c.augment_noise:
            noise = torch.randn(images.shape) * c.augment_noise * (~t2i).float()[:, None, None, None]
            images = (images.float() + noise.to(images.device)).clamp(0, 1)  # (B, C, S, S)
        captions = batch_captions(c, batch)
        out = copy.copy(batch)  # a Batch stays a Batch (its missing-field errors name the dataset)
        out.update(image=images, t2i=t2i, captions=captions)
        if self.tokenize:
            out["left_ids"], out["right_ids"] = text_parts(self.tokenizer, c, captions, t2i, truncate=not c.templates)
        return out
