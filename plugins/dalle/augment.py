"""Training augmentation for DALL·E that keeps captions true: mirror and shift scenes with their boxes.

Only batches with object ``boxes`` (the shapes scenes) are augmented: every kind there is
symmetric about a vertical axis, and captions are re-sampled from the moved boxes
(:func:`polymodal.plugins.dalle.text.resample_captions`), so "left" stays left. Other
batches (digits: a mirrored 2 is no digit) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def augment_scenes(batch: dict[str, Any], flip: bool, shift: int) -> dict[str, Any]:
    """A copy of ``batch`` with images mirrored (half of them, with ``flip``) and shifted by up
    to ``shift`` pixels (zero fill), boxes moved alike and clipped to the image (torch's RNG)."""
    if "boxes" not in batch or not (flip or shift):
        return batch
    images = batch["image"]  # (B, C, S, S)
    b, size = images.shape[0], images.shape[-1]
    mirror = (torch.rand(b) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)  # (B,)
    moves = torch.randint(-shift, shift + 1, (b, 2)) if shift else torch.zeros(b, 2, dtype=torch.long)  # (B, 2) dx, dy
    images = torch.where(mirror.to(images.device)[:, None, None, None], images.flip(-1), images)
    if shift:
        padded = F.pad(images, (shift, shift, shift, shift))  # (B, C, S + 2s, S + 2s)
        images = torch.stack(
            [
                padded[i, :, shift - dy : shift - dy + size, shift - dx : shift - dx + size]
                for i, (dx, dy) in enumerate(moves.tolist())
            ]
        )  # (B, C, S, S)
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
