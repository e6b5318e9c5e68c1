"""DINO's multi-crop views on tensors (no torchvision): random resized crops, flips, brightness jitter.

Two global views cover a large part of the image at the model's ``image_size``; several
local views cover a small part at ``local_size``. Every crop is one affine sampling of the
batch (``affine_grid`` + bilinear ``grid_sample``), so a whole batch is cropped at once with
per-image random boxes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def check_images(images: Tensor, local_size: int, channels: int | None = None) -> None:
    """Raise a ValueError naming expected vs given for a batch that cannot be multi-cropped."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected an image batch (B, C, H, W); got {got}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"expected {channels} image channels; got {images.shape[1]} (shape {tuple(images.shape)})")
    h, w = images.shape[-2:]
    if h < local_size or w < local_size:
        raise ValueError(
            f"expected images of at least {local_size}×{local_size} pixels (the local crop size); got {h}×{w}"
        )


def random_resized_crop(
    images: Tensor,
    size: int,
    scale: tuple[float, float],
    *,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, C, H, W) → (B, C, size, size): each image cropped to a random box and resized.

    The box covers a fraction of the image area drawn uniformly from ``scale`` with an
    aspect ratio drawn log-uniformly from ``ratio`` (sides clipped to the image), at a
    uniformly random position; with probability ``flip`` it is mirrored left-right.
    """
    b, dev = images.shape[0], images.device

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator).to(dev)  # (B,)

    area = uniform(*scale)  # (B,)
    log_ratio = uniform(math.log(ratio[0]), math.log(ratio[1])).exp()  # (B,)
    w = (area * log_ratio).sqrt().clamp(max=1.0)  # (B,) half-extent in [-1, 1] coordinates
    h = (area / log_ratio).sqrt().clamp(max=1.0)  # (B,)
    cx = (2 * torch.rand(b, generator=generator).to(dev) - 1) * (1 - w)  # (B,) centre within the image
    cy = (2 * torch.rand(b, generator=generator).to(dev) - 1) * (1 - h)  # (B,)
    mirror = torch.where(torch.rand(b, generator=generator).to(dev) < flip, -1.0, 1.0)  # (B,)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=images.dtype)  # (B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * mirror, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, S, S)


def jitter_brightness(images: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Scale each image's intensities by a factor in ``[1 − strength, 1 + strength]``, clipped to [0, 1]."""
    if strength <= 0:
        return images
    factor = 1 + strength * (2 * torch.rand(images.shape[0], 1, 1, 1, generator=generator) - 1)  # (B, 1, 1, 1)
    return (images * factor.to(images.device, images.dtype)).clamp(0, 1)


def multi_crop(
    images: Tensor,
    *,
    global_size: int,
    local_size: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
    local_crops: int,
    flip: float = 0.0,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Two global views (B, C, global_size, global_size) and ``local_crops`` local views (B, C, local_size, local_size).

    Raises a ValueError when the images are smaller than a local crop.
    """
    check_images(images, local_size)
    images = images.float()

    def view(size: int, scale: tuple[float, float]) -> Tensor:
        crop = random_resized_crop(images, size, scale, flip=flip, generator=generator)  # (B, C, size, size)
        return jitter_brightness(crop, jitter, generator)

    globals_ = [view(global_size, global_scale) for _ in range(2)]
    locals_ = [view(local_size, local_scale) for _ in range(local_crops)]
    return globals_, locals_
