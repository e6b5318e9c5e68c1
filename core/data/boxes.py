"""Boxes as location tokens and their overlap: OFA's ``<bin_0>`` … ``<bin_{B-1}>`` and grounding's IoU.

A box is ``(x0, y0, x1, y1)`` in pixels of a ``size`` × ``size`` image, x1 / y1 exclusive (the shapes' tight
boxes). OFA writes a box as four location tokens, each corner coordinate quantised to one of ``bins`` evenly
spaced values over ``[0, size]``::

    bins = box_to_bins(torch.tensor([[4, 8, 12, 20]]), size=32, bins=33)   # (1, 4): [[4, 8, 12, 20]]
    box = bins_to_box(bins, size=32, bins=33)                              # back to pixels (float)
    box_iou(box, torch.tensor([[4.0, 8, 12, 20]]))                         # (1,): [1.]
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_boxes(boxes: Tensor, size: int, name: str = "box") -> Tensor:
    """``boxes`` (N, 4) as float if every one is ``0 <= x0 < x1 <= size`` and ``0 <= y0 < y1 <= size``, else
    a ValueError naming the first bad box, what was expected and what was given."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name}es must be (N, 4) = (x0, y0, x1, y1) rows; got {got}")
    b = boxes.float()
    x0, y0, x1, y1 = b.unbind(-1)
    bad = ~((x0 >= 0) & (y0 >= 0) & (x1 <= size) & (y1 <= size) & (x0 < x1) & (y0 < y1))  # (N,)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name} {i}: expected 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size} (pixels of a {size}×{size} "
            f"image); got {tuple(round(float(v), 3) for v in b[i])}"
        )
    return b


def box_to_bins(boxes: Tensor, size: int, bins: int) -> Tensor:
    """(N, 4) pixel boxes → (N, 4) long bin ids in ``[0, bins)``: each coordinate rounded to the nearest of
    ``bins`` evenly spaced values over ``[0, size]`` (bin i is ``i · size / (bins − 1)`` pixels)."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2 (two ends of the image); got {bins}")
    b = check_boxes(boxes, size)
    return (b / size * (bins - 1)).round().long().clamp(0, bins - 1)  # (N, 4)


def bins_to_box(bins_ids: Tensor, size: int, bins: int) -> Tensor:
    """(N, 4) bin ids → (N, 4) float pixel boxes (the inverse of :func:`box_to_bins` up to half a bin)."""
    ids = torch.as_tensor(bins_ids)
    if ids.dim() != 2 or ids.shape[1] != 4 or bool((ids < 0).any()) or bool((ids >= bins).any()):
        raise ValueError(f"bin ids must be (N, 4) in [0, {bins}); got {tuple(ids.shape)} {ids.tolist()!r:.80}")
    return ids.float() * size / (bins - 1)  # (N, 4)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of matching rows of ``a`` and ``b`` (N, 4) → (N,); 0 for disjoint or empty boxes."""
    a, b = a.float(), b.float()
    lo = torch.maximum(a[:, :2], b[:, :2])  # (N, 2)
    hi = torch.minimum(a[:, 2:], b[:, 2:])  # (N, 2)
    inter = (hi - lo).clamp(min=0).prod(-1)  # (N,)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter  # (N,)
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


__all__ = ["bins_to_box", "box_iou", "box_to_bins", "check_boxes"]
