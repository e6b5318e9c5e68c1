"""Render text into one row of square grey patches (PIXEL's input), with Pillow's bundled font.

A sentence is drawn black on white from the left edge of a strip ``patch`` pixels high and
``max_patches · patch`` wide. The patches the text spans are its *text patches*; the next one is
a black end-of-sequence patch; the rest is white padding. Pillow ≥ 10.1 bundles a scalable
font (Aileron Regular, used through FreeType) — no system Pango, Cairo or font files are
needed. It draws ASCII only: characters it lacks (Cyrillic, Greek …) would come out as the same
empty box, so :func:`render` refuses them with a ValueError instead of drawing look-alike boxes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Rendered:
    """A batch of rendered strips."""

    images: Tensor
    """(B, 1, patch, max_patches · patch) float in [0, 1]: white background, black text."""
    text: Tensor
    """(B, N) bool: patches the text spans."""
    valid: Tensor
    """(B, N) bool: text patches and the end-of-sequence patch (everything but padding)."""
    num_text: Tensor
    """(B,) long: text patches per strip (the end-of-sequence patch is at this index)."""


@functools.lru_cache(maxsize=8)
def load_font(size: int, path: str = ""):
    """The bundled scalable font at ``size`` pixels, or the TrueType file ``path`` when given."""
    from PIL import ImageFont

    if path:
        if not Path(path).is_file():
            raise ValueError(f"font must be a TrueType file or '' (Pillow's bundled font); {path} does not exist")
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError as exc:  # Pillow < 10.1 has no sized default font
        raise ValueError("rendering text needs Pillow >= 10.1 with FreeType (its bundled scalable font)") from exc


@functools.lru_cache(maxsize=8)
def _missing_glyph(size: int, path: str) -> bytes:
    """The bitmap the font draws for a character it lacks (a private-use code point)."""
    return np.asarray(load_font(size, path).getmask("\ue000")).tobytes()


@functools.lru_cache(maxsize=4096)
def _has_glyph(char: str, size: int, path: str) -> bool:
    if char.isspace():
        return True
    return np.asarray(load_font(size, path).getmask(char)).tobytes() != _missing_glyph(size, path)


def missing_glyphs(text: str, size: int, path: str = "") -> list[str]:
    """Characters of ``text`` the font cannot draw (they would all look like the same box)."""
    return sorted({c for c in text if not _has_glyph(c, size, path)})


def render_one(
    text: str, *, patch: int, max_patches: int, font_size: int, font: str = "", truncate: bool = False
) -> tuple[np.ndarray, int]:
    """One strip (patch, max_patches · patch) float32 in [0, 1] and its number of text patches."""
    from PIL import Image, ImageDraw

    if not isinstance(text, str):
        raise ValueError(f"expected a str to render; got {type(text).__name__}")
    missing = missing_glyphs(text, font_size, font)
    if missing:
        raise ValueError(
            f"the font cannot draw {''.join(missing)!r} in {text!r}; use characters it renders "
            "or pass a font file that covers them"
        )
    face = load_font(font_size, font)
    margin = 1
    width = int(np.ceil(margin + face.getlength(text))) if text else 0
    num_text = max(1, -(-width // patch))
    if num_text + 1 > max_patches:
        if not truncate:
            raise ValueError(
                f"text renders to {num_text} patches plus the end-of-sequence patch = {num_text + 1}, "
                f"more than max_patches={max_patches}: {text!r}; pass truncate=True to cut it"
            )
        num_text = max_patches - 1
    canvas = Image.new("L", (max_patches * patch, patch), 255)
    ascent, descent = face.getmetrics()
    ImageDraw.Draw(canvas).text((margin, (patch - ascent - descent) // 2), text, fill=0, font=face)
    strip = np.asarray(canvas, dtype=np.float32) / 255.0  # (p, N·p)
    strip[:, num_text * patch :] = 1.0  # truncated ink beyond the text patches is cut
    strip[:, num_text * patch : (num_text + 1) * patch] = 0.0  # the black end-of-sequence patch
    return strip, num_text


def render(
    texts: str | Sequence[str],
    *,
    patch: int = 12,
    max_patches: int = 24,
    font_size: int = 10,
    font: str = "",
    truncate: bool = False,
) -> Rendered:
    """Render each text into a 1×``max_patches`` strip of ``patch``×``patch`` grey patches.

    Text wider than ``max_patches - 1`` patches raises a ValueError naming both numbers unless
    ``truncate`` (then the text is cut at the last patch before the end-of-sequence patch).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("expected at least one text to render; got an empty list")
    strips, counts = zip(
        *(
            render_one(t, patch=patch, max_patches=max_patches, font_size=font_size, font=font, truncate=truncate)
            for t in texts
        )
    )
    images = torch.from_numpy(np.stack(strips)).unsqueeze(1)  # (B, 1, p, N·p)
    num_text = torch.tensor(counts, dtype=torch.long)  # (B,)
    index = torch.arange(max_patches).unsqueeze(0)  # (1, N)
    text = index < num_text.unsqueeze(1)  # (B, N)
    return Rendered(images, text, index <= num_text.unsqueeze(1), num_text)


def valid_from_images(images: Tensor, patch: int) -> Tensor:
    """(B, 1, p, N·p) strips → (B, N) bool, True up to and including the first all-black patch
    (the end-of-sequence patch); a strip without one is valid throughout."""
    b, n = images.shape[0], images.shape[-1] // patch
    cells = images.reshape(b, images.shape[1], patch, n, patch).amax(dim=(1, 2, 4))  # (B, N) brightest pixel
    black = cells <= 1e-3  # (B, N)
    first = torch.where(black.any(1), black.float().argmax(1), torch.full((b,), n - 1, device=images.device))  # (B,)
    return torch.arange(n, device=images.device).unsqueeze(0) <= first.unsqueeze(1)  # (B, N)


__all__ = ["Rendered", "load_font", "missing_glyphs", "render", "render_one", "valid_from_images"]
