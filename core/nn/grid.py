"""Fitting a ViT encoder to the data's image size: the input size follows the images and the
patch size is chosen so the grid keeps about the variant's number of patches per side.

A family's ``config_for_data`` calls :func:`fit_encoder` with the dataset's ``meta`` and the
config keys the user set (``--set encoder.image_size=8`` keeps the variant's size, and the
images are resized to it instead).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import attrs

from polymodal.nn.encoders import ViTEncoderConfig


def _candidates(image_size: int, grid: int) -> list[int]:
    """Patch sizes dividing ``image_size`` into between ``grid / 2`` and ``2 · grid`` patches per
    side, closest to ``grid`` patches first (ties: the smaller patch)."""
    ps = [p for p in range(1, image_size + 1) if image_size % p == 0 and grid <= 2 * (image_size // p) <= 4 * grid]
    return sorted(ps, key=lambda p: (abs(math.log(image_size / p / grid)), p))


def patch_size_for(image_size: int, grid: int, *, key: str = "encoder") -> int:
    """The patch size that divides ``image_size`` with the number of patches per side closest to
    ``grid`` (at least half and at most twice ``grid``).

    Raises ValueError when no patch size does, naming the nearest image sizes that have one (as the
    ``--set {key}.image_size=…`` that resizes the images to them).
    """
    if image_size < 1 or grid < 1:
        raise ValueError(f"image_size and grid must be positive; got image_size={image_size}, grid={grid}")
    found = _candidates(image_size, grid)
    if found:
        return found[0]
    near = []
    for step in (-1, 1):
        s = image_size + step
        while 1 <= s and not _candidates(s, grid):
            s += step
        if s >= 1:
            near.append(f"--set {key}.image_size={s} (patch {_candidates(s, grid)[0]})")
    lo, hi = max(1, math.ceil(grid / 2)), 2 * grid
    raise ValueError(
        f"no patch size divides image size {image_size} into {lo}–{hi} patches per side (the variant "
        f"has {grid}); resize the images with {' or '.join(near)}"
    )


def fit_encoder(
    encoder: ViTEncoderConfig, meta: dict[str, Any], *, family: str, key: str = "encoder", fixed: Collection[str] = ()
) -> tuple[ViTEncoderConfig, str]:
    """``encoder`` for the dataset's ``meta['image_size']`` square images, and a line saying what was
    chosen ('' when the size already matches or the dataset names none).

    The input size becomes the images' size and the patch size comes from :func:`patch_size_for`
    with the variant's patches per side. ``fixed`` holds the config keys the user set: with
    ``{key}.image_size`` among them the encoder is left as it is (the images are resized to it);
    with ``{key}.patch_size`` the size follows the images and the patch is left to the user's value.
    """
    size = meta.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size == encoder.image_size:
        return encoder, ""
    seen = f"{family}: images are {size}×{size}×{meta.get('channels', encoder.channels)}"
    if f"{key}.image_size" in fixed:
        return encoder, f"{seen}; resized to {key}.image_size as set"
    if f"{key}.patch_size" in fixed:
        patch = size if size % encoder.patch_size else encoder.patch_size  # valid until the user's value replaces it
        return attrs.evolve(
            encoder, image_size=size, patch_size=patch
        ), f"{seen}; image_size {size}, {key}.patch_size as set"
    patch = patch_size_for(size, encoder.image_size // encoder.patch_size, key=key)
    line = (
        f"{seen}; image_size {size}, patch {patch} → {size // patch}×{size // patch} patches "
        f"(set --set {key}.image_size={encoder.image_size} to resize instead)"
    )
    return attrs.evolve(encoder, image_size=size, patch_size=patch), line


__all__ = ["fit_encoder", "patch_size_for"]
