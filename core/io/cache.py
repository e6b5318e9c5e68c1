"""Where trained default parts and judges are kept between runs."""

from __future__ import annotations

import os
import re
from pathlib import Path


def cache_root() -> Path:
    """``$POLYMODAL_CACHE`` or ``~/.cache/polymodal``: where trained default parts and judges live."""
    return Path(os.environ.get("POLYMODAL_CACHE") or Path.home() / ".cache" / "polymodal")


def default_part_folder(variant: str, data: str) -> Path:
    """Where ``"auto"`` keeps the default ``variant`` trained on ``data``."""
    return cache_root() / "parts" / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{variant}-{data}")


__all__ = ["cache_root", "default_part_folder"]
