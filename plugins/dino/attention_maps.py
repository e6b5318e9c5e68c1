"""The last layer's [CLS] attention per head ("attention maps work as unsupervised segmentation").

:func:`cls_attention` recomputes the last block's attention probabilities from the block's own
``norm1`` and ``qkv`` projection (the core attention returns only the mixed values), so the
core block stays untouched. :func:`attention_masks` turns them into pixel masks the way DINO's
visualisation does: upsample, then keep the pixels that hold a fraction of the attention mass.
``polymodal dino attention-maps DIR IMAGE... --out OUT`` writes one PNG per head and image.
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.models.inference import inference_options
from polymodal.nn.encoders import ViTEncoder


@torch.no_grad()
def last_attention(encoder: ViTEncoder, images: Tensor) -> Tensor:
    """(B, H, 1 + N, 1 + N) softmax attention probabilities of the encoder's last block, per head."""
    _, hidden = encoder(images, return_hidden=True)
    block = encoder.blocks.blocks[-1]
    return block.attn.probabilities(block.norm1(hidden[-2]))  # (B, H, 1 + N, 1 + N)


def cls_attention(encoder: ViTEncoder, images: Tensor) -> Tensor:
    """(B, H, gh, gw) attention of the [CLS] query over the patches in the last block, per head.

    The [CLS] key's own share is left out, so a head's map sums to at most 1.
    """
    if encoder.prefix != 1:
        raise ValueError("attention maps need an encoder with a [CLS] token")
    probs = last_attention(encoder, images)[:, :, 0, 1:]  # (B, H, N)
    p = encoder.cfg.patch_size
    gh, gw = images.shape[-2] // p, images.shape[-1] // p
    return probs.reshape(*probs.shape[:2], gh, gw)  # (B, H, gh, gw)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, gh, gw) → (B, H, *size) bilinear, renormalised so each map sums to 1."""
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).clamp_min(0)  # (B, H, S, S)
    return up / up.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def mass_mask(maps: Tensor, mass: float) -> Tensor:
    """(…, S, S) bool: per map, the largest values that together hold ``mass`` of its total (DINO's threshold)."""
    flat = maps.flatten(-2)  # (…, S·S)
    flat = flat / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    values, order = flat.sort(-1, descending=True)
    before = values.cumsum(-1) - values  # mass of the strictly larger values
    keep_sorted = before < mass  # (…, S·S) the smallest prefix whose mass reaches ``mass``
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def centred_blobs(areas: Tensor, size: int) -> Tensor:
    """(B, S, S) bool discs centred in the image, each with (about) the given pixel area (B,)."""
    c = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    dist = (c[:, None] ** 2 + c[None, :] ** 2).flatten()  # (S·S,)
    order = dist.argsort()  # pixels from the centre outwards
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    return (ranks[None, :] < areas[:, None]).reshape(len(areas), size, size)  # (B, S, S)


def iou(a: Tensor, b: Tensor) -> Tensor:
    """(B,) intersection over union of two (B, S, S) bool masks (1 when both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def attention_masks(model, images: Tensor, mass: float | None = None) -> tuple[Tensor, Tensor]:
    """(B, H, S, S) per-head masks and (B, S, S) the mask of the head-averaged map, from the teacher."""
    x = model.prepare(images)  # (B, C, S, S)
    maps = upsample(cls_attention(model.teacher.backbone, x), x.shape[-2:])  # (B, H, S, S)
    mass = model.config.iou_mass if mass is None else mass
    return mass_mask(maps, mass), mass_mask(maps.mean(1), mass)


def heat(maps: Tensor) -> Tensor:
    """(N, S, S) maps → (N, 3, S, S) heat images, each scaled to its own maximum."""
    m = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]  # (N, S, S) in [0, 1]
    return torch.stack([m.clamp(0, 1), (2 * m - 1).clamp(0, 1), (4 * m - 3).clamp(0, 1)], dim=1)  # (N, 3, S, S)


MAX_OUTPUT_PIXELS = 89_478_485
"""The most pixels one written PNG may have: Pillow's ``Image.MAX_IMAGE_PIXELS``, above which Pillow
itself warns that an image may be a decompression bomb (so larger maps could not be read back safely)."""


def check_scale(scale: int, images: int, heads: int, size: int) -> None:
    """ValueError unless ``scale`` is an integer >= 1 whose largest PNG, the grid of ``images`` rows of
    ``2 + heads`` tiles of ``size``×``size``, stays within :data:`MAX_OUTPUT_PIXELS`."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"--scale must be an integer >= 1; got {scale!r}")
    width, height = (2 + heads) * (size + 1) + 1, images * (size + 1) + 1  # the grid at scale 1
    if width * height * scale * scale > MAX_OUTPUT_PIXELS:
        largest = math.isqrt(MAX_OUTPUT_PIXELS // (width * height))
        hint = f"use --scale {largest} or less" if largest >= 1 else "map fewer images at a time"
        raise ValueError(
            f"--scale {scale} makes the grid of {images} image(s) {width * scale:,}×{height * scale:,} pixels; "
            f"a PNG may have at most {MAX_OUTPUT_PIXELS:,} pixels ({hint})"
        )


def attention_rows(model, images: Tensor, scale: int = 4) -> Tensor:
    """(B·(2 + H), 3, S·scale, S·scale): per image the input, each head's map and the mean map.

    ``scale`` is checked before any work like :func:`write_attention_maps`'s (:func:`check_scale`).
    """
    e = model.config.encoder
    check_scale(scale, len(images), e.block.heads, e.image_size)
    x = model.prepare(images)  # (B, C, S, S)
    maps = upsample(cls_attention(model.teacher.backbone, x), x.shape[-2:])  # (B, H, S, S)
    rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # (B, 3, S, S)
    rows = []
    for i in range(len(x)):
        rows += [rgb[i : i + 1], heat(maps[i]), heat(maps[i].mean(0, keepdim=True))]
    tiles = torch.cat(rows)  # (B·(2 + H), 3, S, S)
    return F.interpolate(tiles, scale_factor=scale, mode="nearest")


def write_attention_maps(model, images: Tensor, stems: list[str], out: str | Path, scale: int = 8) -> list[Path]:
    """Write ``<stem>_head<h>.png`` per head, ``<stem>_mean.png`` and a ``grid.png`` (one row per image:
    the input, each head, the mean over heads) for images (B, C, H, W).

    ``scale`` enlarges every PNG (nearest); a ValueError is raised before any work when it is not an
    integer >= 1 or would make the grid larger than :data:`MAX_OUTPUT_PIXELS` (see :func:`check_scale`).
    """
    from polymodal.eval.images import make_grid, save_png

    e = model.config.encoder
    check_scale(scale, len(images), e.block.heads, e.image_size)
    x = model.prepare(images)  # (B, C, S, S)
    maps = upsample(cls_attention(model.teacher.backbone, x), x.shape[-2:])  # (B, H, S, S)
    out, written = Path(out), []
    for stem, per_head in zip(stems, maps):
        for h, m in enumerate(heat(per_head)):
            written.append(save_png(m, out / f"{stem}_head{h}.png", scale=scale))
        written.append(save_png(heat(per_head.mean(0, keepdim=True))[0], out / f"{stem}_mean.png", scale=scale))
    rows = attention_rows(model, images, scale=1)
    written.append(save_png(make_grid(rows, nrow=2 + maps.shape[1]), out / "grid.png", scale=scale))
    return written


def _inputs(model, paths: tuple[str, ...], test_images: int) -> tuple[Tensor, list[str]]:
    """The images to map: files, and/or the first ``test_images`` of the test split of the model's data."""
    from polymodal.data import load_dataset
    from polymodal.eval.images import read_image

    if isinstance(test_images, bool) or not isinstance(test_images, int) or test_images < 0:
        raise ValueError(f"--test-images must be an integer >= 0; got {test_images!r}")
    e = model.config.encoder
    images = [read_image(p, e.channels, e.image_size) for p in paths]  # each (C, S, S)
    stems = [Path(p).stem for p in paths]
    if test_images:
        if not model.default_data:
            raise ValueError("--test-images needs a model adapted to a built-in dataset; this one names none")
        test = load_dataset(model.default_data).test
        n = min(test_images, len(test))
        images += list(test.batch(list(range(n)))["image"])
        stems += [f"test_{i:03d}" for i in range(n)]
    return torch.stack(images), stems


@click.command("attention-maps")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", type=click.Path(file_okay=False), default="attention", show_default=True, help="Folder for the PNGs."
)
@click.option(
    "--test-images",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also map the first N test images of the model's dataset.",
)
@click.option(
    "--scale",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help=f"Enlarge the PNGs this many times (nearest); the grid may have at most {MAX_OUTPUT_PIXELS:,} pixels.",
)
@inference_options
def attention_maps_command(directory, images, out, test_images, scale, dtype, compile_) -> None:
    """Write the last layer's [CLS] attention per head of the DINO model folder DIRECTORY for IMAGES."""
    import polymodal
    from polymodal.io.samples import previous_samples, write_samples_folder

    if not images and not test_images:
        raise click.UsageError("give IMAGE files and/or --test-images N")
    try:
        previous_samples(out)  # OUT is a samples folder: a user's own files there are never replaced
        model = polymodal.load(directory, dtype=dtype, compile=compile_)
        if model.family != "dino":
            raise ValueError(f"{directory} holds a {model.family!r} model, not a DINO model")
        batch, stems = _inputs(model, images, test_images)
        paths = write_samples_folder(out, lambda folder: write_attention_maps(model, batch, stems, folder, scale=scale))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for p in paths:
        click.echo(str(p))
