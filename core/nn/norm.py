"""Normalisation layers: LayerNorm and RMSNorm behind one factory."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (no centring), with an optional learned gain.

    ``weight=False`` gives the bias-free, gain-free form; iGPT-style models keep the gain.
    """

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: Tensor) -> Tensor:
        # one fused op instead of six (same float32 numbers): normalised in float32, rounded, then scaled
        y = torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)  # (..., D)
        return y * self.weight if self.weight is not None else y


def make_norm(kind: str, dim: int, eps: float, *, bias: bool = True) -> nn.Module:
    """A ``"layernorm"`` or ``"rmsnorm"`` of width ``dim``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
