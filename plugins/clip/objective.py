"""Symmetric InfoNCE with several positives per row (captions that are true of more than one image).

With re-sampled shapes captions the same text (``"a circle"``) is often true of several
images in a batch; plain InfoNCE would push those images away from it. Here every row and
every column spreads its target evenly over its positives (as in UniCL / SupCon-style
contrastive learning); with one positive per row (the identity matrix) it equals the core
:func:`polymodal.objectives.info_nce`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.objectives import similarity_logits


def multi_positive_info_nce(a: Tensor, b: Tensor, logit_scale: float | Tensor, positives: Tensor) -> Tensor:
    """Mean of the a→b and b→a soft-target cross-entropies; ``positives`` (B, B') bool, ``[i, j]``: b_j fits a_i.

    Every row and every column needs at least one positive (ValueError otherwise).
    """
    logits = similarity_logits(a, b, logit_scale)  # (B, B')
    if positives.shape != logits.shape or positives.dtype != torch.bool:
        raise ValueError(
            f"expected a bool positives matrix of shape {tuple(logits.shape)}; "
            f"got {positives.dtype} {tuple(positives.shape)}"
        )
    pos = positives.to(logits.device).float()  # (B, B')
    rows, cols = pos.sum(1, keepdim=True), pos.sum(0, keepdim=True)  # (B, 1), (1, B')
    if bool((rows == 0).any()) or bool((cols == 0).any()):
        raise ValueError("every image and every text needs at least one positive")
    a_to_b = F.cross_entropy(logits, pos / rows)
    b_to_a = F.cross_entropy(logits.t(), (pos / cols).t())
    return (a_to_b + b_to_a) / 2
