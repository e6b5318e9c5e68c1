"""Batch augmentations on tensors (no torchvision): random translation and flips, and scenes moved with their boxes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def shift_images(images: Tensor, moves: Tensor, max_shift: int) -> Tensor:
    """Each image moved by its own ``moves`` (B, 2) = (dx, dy) pixels (right and down positive; each within
    ±``max_shift``, a Python int so compiled code does not read the moves), filling with zeros.

    images: (B, C, H, W) → (B, C, H, W).
    """
    s = max_shift
    if s <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (s,) * 4)  # (B, C, H+2s, W+2s)
    dx, dy = (s - moves[:, 0]).to(images.device), (s - moves[:, 1]).to(images.device)  # (B,) offsets into padded
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]  # (B, 1, 1, 1)
    chans = torch.arange(c, device=images.device)[None, :, None, None]  # (1, C, 1, 1)
    return padded[batch, chans, rows, cols]  # (B, C, H, W)


def random_translate(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with zeros.

    images: (B, C, H, W) → (B, C, H, W).
    """
    if max_shift <= 0:
        return images
    b = images.shape[0]
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator, device=images.device)  # (B,)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator, device=images.device)  # (B,)
    moves = max_shift - torch.stack([dx, dy], dim=1)  # (B, 2) in [-max_shift, max_shift]
    return shift_images(images, moves, max_shift)  # (B, C, H, W)


def augment_scenes(
    batch: dict[str, Any], flip: bool, shift: int, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """A copy of ``batch`` with images mirrored (half of them, with ``flip``) and shifted by up
    to ``shift`` pixels (zero fill), boxes moved alike and clipped to the image (``generator``, else torch's RNG).

    Only batches with object ``boxes`` (the shapes scenes) are moved: every kind there is symmetric about a
    vertical axis, so the boxes' classes stay true (text about the scene must be re-made from the moved boxes:
    DALL·E re-samples its captions). Other batches (digits: a mirrored 2 is no digit) are returned as they are.
    """
    if "boxes" not in batch or not (flip or shift):
        return batch
    images = batch["image"]  # (B, C, S, S)
    b, size = images.shape[0], images.shape[-1]
    mirror = (torch.rand(b, generator=generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)  # (B,)
    moves = (
        torch.randint(-shift, shift + 1, (b, 2), generator=generator) if shift else torch.zeros(b, 2, dtype=torch.long)
    )  # (B, 2) dx, dy
    images = torch.where(mirror.to(images.device)[:, None, None, None], images.flip(-1), images)
    images = shift_images(images, moves, shift)  # (B, C, S, S)
    boxes = []
    for i, objects in enumerate(batch["boxes"]):
        dx, dy = moves[i].tolist()
        moved = []
        for x0, y0, x1, y1, *rest in objects:
            if mirror[i]:
                x0, x1 = size - x1, size - x0
            x0, x1 = min(max(x0 + dx, 0), size), min(max(x1 + dx, 0), size)
            y0, y1 = min(max(y0 + dy, 0), size), min(max(y1 + dy, 0), size)
            moved.append((x0, y0, x1, y1, *rest))
        boxes.append(moved)
    return {**batch, "image": images, "boxes": boxes}


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of (B, C, H, W) to (B, C, size, size); unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
