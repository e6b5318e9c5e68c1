"""Batch augmentations on tensors (no torchvision): random translation and flips."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_translate(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with zeros.

    images: (B, C, H, W) → (B, C, H, W).
    """
    if max_shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (B, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator, device=images.device)  # (B,)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator, device=images.device)  # (B,)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]  # (B, 1, 1, 1)
    chans = torch.arange(c, device=images.device)[None, :, None, None]  # (1, C, 1, 1)
    return padded[batch, chans, rows, cols]  # (B, C, H, W)


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of (B, C, H, W) to (B, C, size, size); unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
