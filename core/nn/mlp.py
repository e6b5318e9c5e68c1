"""The feed-forward part of a transformer block: GELU, QuickGELU, ReLU, or a gated unit (SwiGLU, GEGLU)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu", "geglu", "geglu_tanh")
"""Activation names the core MLP understands."""

GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
"""Gated activations → the activation of their gate: ``act(gate(x)) * fc1(x)``. ``geglu_tanh`` is T5 v1.1's and
mT5's ``gated-gelu`` (tanh-approximated GELU)."""


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation OpenAI's CLIP and iGPT were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """An activation module by name (see :data:`ACTIVATIONS`; the gated ones are handled by :class:`Mlp`)."""
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


class Mlp(nn.Module):
    """``fc2(dropout(act(fc1(x))))``; with a gated ``act`` (:data:`GATED`), ``fc2(dropout(g(gate(x)) * fc1(x)))``:
    ``swiglu`` gates with SiLU, ``geglu`` with GELU, ``geglu_tanh`` with tanh-approximated GELU. ``mid_norm``
    (NormFormer's) normalises the hidden activations before ``fc2``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        out_dim: int | None = None,
        mid_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.swiglu = act == "swiglu"
        gated = act in GATED
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.gate = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.act = make_activation(GATED[act] if gated else act)
        self.drop = nn.Dropout(dropout)
        self.mid_norm = mid_norm  # NormFormer's norm of the hidden activations (None: none)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # (..., hidden)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        if self.mid_norm is not None:
            h = self.mid_norm(h)
        return self.fc2(self.drop(h) if self.training else h)  # (..., out_dim); eval-mode dropout is the identity
