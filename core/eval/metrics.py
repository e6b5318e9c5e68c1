"""Generic metrics registered by the core."""

from __future__ import annotations

from torch import Tensor


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of ``logits`` (B, K) whose arg-max equals ``labels`` (B,)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"accuracy expects logits (B, K) and labels (B,); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return (logits.argmax(-1) == labels).float().mean().item()
