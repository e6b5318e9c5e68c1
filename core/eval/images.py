"""Images on disk: PNG read/write (Pillow, atomic), sample grids, and a samples folder.

Tensors are float (C, H, W) or (N, C, H, W) in [0, 1] with C = 1 (grey) or 3 (RGB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polymodal.data.images import open_image
from polymodal.io import atomic_write


def _check(images: Tensor, dims: int, what: str) -> None:
    """Raise a ValueError unless ``images`` has ``dims`` dims and 1 or 3 channels."""
    if not isinstance(images, Tensor) or images.dim() != dims or images.shape[-3] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        want = "(C, H, W)" if dims == 3 else "(N, C, H, W)"
        raise ValueError(f"{what} must be a {want} tensor with C = 1 or 3; got {shape}")


def to_pil(image: Tensor):
    """A Pillow image ("L" or "RGB") from a (C, H, W) tensor in [0, 1] (values outside are clipped)."""
    from PIL import Image

    _check(image, 3, "image")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (C, H, W)
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


def save_png(image: Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write a (C, H, W) image as a PNG atomically; ``scale`` > 1 enlarges it (nearest)."""
    img = to_pil(image)
    if scale > 1:
        from PIL import Image

        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def read_image(path: str | Path, channels: int, size: int | None = None) -> Tensor:
    """(channels, H, W) float in [0, 1] from an image file, converted and (with ``size``) resized.

    With ``size`` None the image keeps its size; otherwise it is resized to
    ``size × size`` (bilinear). The file is opened with :func:`polymodal.data.images.open_image`:
    an image over the pixel limit (a decompression bomb) or an unreadable file raises a ValueError
    naming it.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"images are read with 1 or 3 channels; the model expects {channels}")
    img = open_image(path).convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)  # (C, H, W)


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """Tile (N, C, H, W) images into one (C, H', W') image, ``nrow`` per row (default ≈ √N)."""
    _check(images, 4, "images")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image; got an empty batch")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=images.dtype)
    for i, img in enumerate(images.detach().cpu()):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[:, y : y + h, x : x + w] = img  # (C, H, W)
    return out


def write_samples(
    images: Tensor, out: str | Path, *, names: Sequence[str] | None = None, grid_scale: int = 4
) -> list[Path]:
    """Write each of (N, C, H, W) at its native size as ``sample_000.png`` … and a ``grid.png``.

    ``names`` replaces the file stems; the grid is enlarged ``grid_scale`` times so small
    images stay visible. Returns every path written, the grid last.
    """
    _check(images, 4, "images")
    out = Path(out)
    stems = list(names) if names is not None else [f"sample_{i:03d}" for i in range(len(images))]
    if len(stems) != len(images):
        raise ValueError(f"need one name per image: {len(images)} images, {len(stems)} names")
    paths = [save_png(img, out / f"{stem}.png") for stem, img in zip(stems, images)]
    paths.append(save_png(make_grid(images), out / "grid.png", scale=grid_scale))
    return paths


__all__ = ["make_grid", "read_image", "save_png", "to_pil", "write_samples"]
