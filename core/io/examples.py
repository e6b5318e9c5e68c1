"""Example images from a dataset (``polymodal data export digits --n 5 --out DIR``): PNGs plus the
``captions.jsonl`` (and ``classes.txt``) that make ``DIR`` a dataset folder of its own (``--data DIR``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymodal.data.folder import CAPTIONS, CLASSES
from polymodal.io.folders import atomic_write


def _png(image: torch.Tensor, path: Path) -> Path:
    """Write a (C, H, W) image in [0, 1] (C = 1 or 3) as an 8-bit PNG, atomically."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (C, H, W)
    img = (
        Image.fromarray(array[0], mode="L")
        if array.shape[0] == 1
        else Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    )
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a box (a tuple of numbers, possibly numpy or torch scalars)."""
    return [v.item() if hasattr(v, "item") else v for v in value]


def export_images(dataset: Any, out: str | Path, *, n: int = 5, split: str = "test", name: str = "") -> list[Path]:
    """Write the first ``n`` images of ``dataset``'s ``split`` into the folder ``out``; returns every file written.

    Files: ``NAME_000.png`` … (``name``, default the dataset's name), a ``captions.jsonl`` line per image
    (``path``, ``caption``, and ``label`` / ``boxes`` where the dataset has them) and, with labels, a
    ``classes.txt`` of the dataset's class names, so ``out`` loads as a dataset folder (``--data out``;
    training needs at least 2 images for a test split). Existing files are never overwritten: if any
    of these names exists in ``out``, a ValueError names them before anything is written.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    part = dataset.split(split)
    if "image" not in part:
        raise ValueError(
            f"the {dataset.name!r} dataset has no images (its fields: {', '.join(sorted(part.fields))}); "
            "export needs a dataset with images, e.g. digits or shapes"
        )
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(part):
        raise ValueError(f"n must be an int from 1 to {len(part)} (the {split} split's size); got {n!r}")
    stem = name or dataset.name
    out = Path(out)
    names = [f"{stem}_{i:03d}.png" for i in range(n)]
    class_names = list(dataset.meta.get("class_names") or [])
    labelled = "label" in part and bool(class_names)
    targets = names + [CAPTIONS] + ([CLASSES] if labelled else [])
    taken = [t for t in targets if os.path.lexists(out / t)]
    if taken:
        shown = ", ".join(taken[:5]) + (f", … ({len(taken)} files)" if len(taken) > 5 else "")
        raise ValueError(f"{out} already holds {shown}; export never overwrites a file, so choose another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; export writes into a folder")
    written, lines = [], []
    for i, file in enumerate(names):
        written.append(_png(part["image"][i], out / file))
        line: dict[str, Any] = {"path": file, "caption": part["caption"][i] if "caption" in part else ""}
        if labelled:
            line["label"] = int(part["label"][i])
        if "boxes" in part:
            line["boxes"] = [_plain(box) for box in part["boxes"][i]]
        lines.append(json.dumps(line))
    if labelled:
        written.append(atomic_write(out / CLASSES, "\n".join(class_names) + "\n"))
    written.append(atomic_write(out / CAPTIONS, "\n".join(lines) + "\n"))
    return written


__all__ = ["export_images"]
