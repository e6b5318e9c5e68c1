"""The one way the core opens an image file: Pillow, with a pixel limit checked before decoding.

A PNG of a few kilobytes can declare 20000×20000 pixels and decode to gigabytes (a
"decompression bomb"). Pillow warns above ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 M pixels)
and refuses only above twice that; :func:`open_image` refuses anything above the limit, from
the size in the file's header, before a pixel is decoded. Nothing is ever unpickled.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any


def pixel_limit() -> int | None:
    """The largest number of pixels an image may have: Pillow's ``Image.MAX_IMAGE_PIXELS``
    (None when a program switched Pillow's check off)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def _millions(n: int) -> str:
    """``n`` pixels for a message: in millions when large."""
    return f"{n / 1e6:.0f} M pixels" if n >= 10_000_000 else f"{n} pixels"


def _too_large(name: str, pixels: int, limit: int, size: tuple[int, int] | None, prefix: str) -> ValueError:
    """The error for an image of ``pixels`` (``size`` = width, height when known) over ``limit``."""
    dims = f"{size[0]}×{size[1]} = " if size else ""
    source = " (PIL.Image.MAX_IMAGE_PIXELS)" if limit in (pixel_limit(), 2 * (pixel_limit() or 0)) else ""
    return ValueError(
        f"{prefix}image {name!r} is {dims}{_millions(pixels)}; the limit is {_millions(limit)}{source}; "
        f"use a smaller image"
    )


def open_image(path: str | Path, *, max_pixels: int | None = None, where: str = "") -> Any:
    """The image at ``path`` as a fully read Pillow image in its own mode.

    ``max_pixels`` bounds width × height (default :func:`pixel_limit`, Pillow's own limit, which a
    program lifts the documented way: ``PIL.Image.MAX_IMAGE_PIXELS = None``). A larger
    image, a missing or unreadable file, or one Pillow cannot identify raises a ValueError naming
    the file (after ``where``, e.g. ``captions.jsonl:3``); the size is checked from the header,
    before any pixel is decoded.
    """
    from PIL import Image

    limit = pixel_limit() if max_pixels is None else max_pixels
    prefix = f"{where}: " if where else ""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            img = Image.open(path)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: Pillow refuses to open it
        found = re.search(r"\((\d+) pixels\)", str(exc))
        if found is None:  # another wording of Pillow's: pass it on as it is
            raise ValueError(f"{prefix}image {name!r} is over the pixel limit: {exc}") from None
        pillow = 2 * (pixel_limit() or 0)
        shown = limit if limit is not None and limit < pillow else pillow
        raise _too_large(name, int(found[1]), shown, None, prefix) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{prefix}cannot read image {name!r} ({path}): {exc}") from None
    with img:
        width, height = img.size
        if limit is not None and width * height > limit:
            raise _too_large(name, width * height, limit, (width, height), prefix)
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{prefix}cannot read image {name!r} ({path}): {exc}") from None
        return img.copy()


__all__ = ["open_image", "pixel_limit"]
