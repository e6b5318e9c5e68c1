"""The three ways a family joins modalities, as small modules (TorchMultimodal style).

- :class:`ConcatFusion` — one sequence from several (DALL·E, RuDolph, OFA, ImageBind-style
  prompting): streams are concatenated and tagged with learned segment embeddings.
- :class:`CrossAttentionFusion` — a stream attends to another modality's tokens (Flamingo,
  Kandinsky): pre-norm cross-attention and MLP, each behind a tanh gate that starts at 0,
  so an inserted layer leaves a pretrained model unchanged at initialisation. It can be
  injected into a :class:`polymodal.nn.TransformerStack` with ``stack.inject(i, fusion)``.
- :class:`AdapterFusion` — embeddings of one model become ``k`` input tokens of another
  (FROMAGe, LLaVA-style prefixes, unCLIP's CLIP-embedding tokens).

All attention, MLP and normalisation come from :mod:`polymodal.nn`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import attrs
import torch
from torch import Tensor, nn

from polymodal.config import config, field, in_range, one_of
from polymodal.nn import Attention, Mlp, init_weights, make_norm
from polymodal.nn.mlp import ACTIVATIONS

_optional_dim = attrs.validators.optional(in_range(1, 65536, integer=True))


# --------------------------------------------------------------------------- concatenation
@config
class ConcatFusionConfig:
    """Concatenation of up to ``num_segments`` streams of width ``dim``."""

    dim: int = field(64, "Width of every stream.", check=in_range(1, 65536, integer=True))
    num_segments: int = field(
        2, "How many streams may be joined (one learned embedding each).", check=in_range(1, 1024, integer=True)
    )
    segment_embedding: bool = field(True, "Add a learned per-segment embedding to each stream's tokens.")
    init_std: float = field(
        0.02, "Standard deviation of the segment embeddings at initialisation.", check=in_range(0.0, 10.0)
    )


class ConcatOutput(NamedTuple):
    """What :class:`ConcatFusion` returns."""

    x: Tensor
    """(B, N1 + N2 + …, D) the joined stream."""
    segment_ids: Tensor
    """(B, N) long: which stream each position came from (0, 1, …)."""
    key_padding: Tensor
    """(B, N) bool: True for real tokens (all True where no padding was given)."""


class ConcatFusion(nn.Module):
    """Joins streams ``(B, N_i, D)`` into ``(B, ΣN_i, D)`` with segment embeddings and ids."""

    config_class = ConcatFusionConfig

    def __init__(self, cfg: ConcatFusionConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or ConcatFusionConfig(), **overrides)
        self.cfg = cfg
        self.segments = nn.Embedding(cfg.num_segments, cfg.dim) if cfg.segment_embedding else None
        if self.segments is not None:
            nn.init.normal_(self.segments.weight, std=cfg.init_std)

    def forward(
        self, x: Tensor, context: Tensor, *more: Tensor, paddings: Sequence[Tensor | None] | None = None
    ) -> ConcatOutput:
        """Concatenate ``x, context, *more`` in order; ``paddings`` holds one (B, N_i) mask or None per stream."""
        streams = (x, context, *more)
        if len(streams) > self.cfg.num_segments:
            raise ValueError(f"ConcatFusion was built for at most {self.cfg.num_segments} streams, got {len(streams)}")
        if paddings is not None and len(paddings) != len(streams):
            raise ValueError(f"paddings needs one entry per stream ({len(streams)}), got {len(paddings)}")
        b, d = x.shape[0], self.cfg.dim
        for i, s in enumerate(streams):
            if s.dim() != 3 or s.shape[0] != b or s.shape[2] != d:
                raise ValueError(f"stream {i} must be (B={b}, N, D={d}); got {tuple(s.shape)}")
        parts, ids, masks = [], [], []
        for i, s in enumerate(streams):
            n = s.shape[1]
            if self.segments is not None:
                s = s + self.segments.weight[i]  # (B, N_i, D)
            parts.append(s)
            ids.append(torch.full((n,), i, dtype=torch.long, device=s.device))  # (N_i,)
            pad = paddings[i] if paddings is not None else None
            if pad is not None and tuple(pad.shape) != (b, n):
                raise ValueError(f"padding {i} must be (B={b}, N={n}); got {tuple(pad.shape)}")
            masks.append(pad.bool() if pad is not None else torch.ones(b, n, dtype=torch.bool, device=s.device))
        out = torch.cat(parts, dim=1)  # (B, N, D)
        segment_ids = torch.cat(ids).unsqueeze(0).expand(b, -1)  # (B, N)
        return ConcatOutput(out, segment_ids, torch.cat(masks, dim=1))  # (B, N, D), (B, N), (B, N)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Two random streams of 3 and 5 tokens."""
        d = self.cfg.dim
        return torch.randn(batch_size, 3, d, generator=generator), torch.randn(batch_size, 5, d, generator=generator)


# --------------------------------------------------------------------------- cross-attention
@config
class CrossAttentionFusionConfig:
    """A (gated) pre-norm cross-attention layer with an optional MLP."""

    dim: int = field(64, "Width of the stream that attends.", check=in_range(1, 65536, integer=True))
    context_dim: int | None = field(None, "Width of the context tokens; ``dim`` when None.", check=_optional_dim)
    heads: int = field(4, "Attention heads; must divide ``dim``.", check=in_range(1, 1024, integer=True))
    gate: bool = field(True, "Scale each branch by tanh of a learned scalar initialised to 0 (Flamingo).")
    mlp_ratio: float = field(
        4.0, "Hidden width of the MLP after attention as a multiple of ``dim``; 0 for none.", check=in_range(0.0, 64.0)
    )
    act: str = field("gelu", "MLP activation.", check=one_of(*ACTIVATIONS))
    norm: str = field("layernorm", "Normalisation kind.", check=one_of("layernorm", "rmsnorm"))
    norm_eps: float = field(1e-6, "Norm epsilon.", check=in_range(0.0, 1.0))
    qkv_bias: bool = field(True, "Bias on the query and key/value projections.")
    dropout: float = field(0.0, "Dropout after the attention and MLP projections.", check=in_range(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(
                f"CrossAttentionFusionConfig.heads must divide dim; got dim={self.dim}, heads={self.heads}"
            )


class CrossAttentionFusion(nn.Module):
    """``x + tanh(g_a)·xattn(norm(x), context)`` then ``x + tanh(g_m)·mlp(norm(x))``: (B, N, D) → (B, N, D).

    With ``gate=True`` both gates start at 0, so at initialisation the output is exactly
    the input; with ``gate=False`` the branches are plain residuals.
    """

    config_class = CrossAttentionFusionConfig

    def __init__(self, cfg: CrossAttentionFusionConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or CrossAttentionFusionConfig(), **overrides)
        self.cfg = cfg
        self.context_dim = cfg.context_dim or cfg.dim
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.attn = Attention(
            cfg.dim, cfg.heads, qkv_bias=cfg.qkv_bias, context_dim=self.context_dim, dropout=cfg.dropout
        )
        self.attn_gate = nn.Parameter(torch.zeros(1)) if cfg.gate else None
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if hidden else None
        self.mlp = Mlp(cfg.dim, hidden, cfg.act, dropout=cfg.dropout) if hidden else None
        self.mlp_gate = nn.Parameter(torch.zeros(1)) if cfg.gate and hidden else None
        init_weights(self)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        context_padding: Tensor | None = None,
        mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        """x: (B, N, D); context: (B, M, C).

        ``context_padding`` (B, M) is True for real context tokens; ``mask`` (B, N, M) or
        broadcastable says which context tokens each position may see (Flamingo's "only the
        latest image"). A position that may see no context token gets no update. ``cache`` (a
        generation's :class:`polymodal.nn.KVCache`) keeps the context's keys and values: they are
        projected once per context tensor and reused while the same tensor is passed again
        (decoding steps); None recomputes them every call.
        """
        if context is None:
            raise ValueError("CrossAttentionFusion needs a context tensor (B, M, C); got None")
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must be (B, M, C={self.context_dim}); got {tuple(context.shape)}")
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (B, 1, N, M)
        h = self.attn(self.norm(x), context, key_padding=context_padding, mask=mask, cache=cache)  # (B, N, D)
        x = x + (torch.tanh(self.attn_gate) * h if self.attn_gate is not None else h)
        if self.mlp is not None:
            h = self.mlp(self.mlp_norm(x))  # (B, N, D)
            x = x + (torch.tanh(self.mlp_gate) * h if self.mlp_gate is not None else h)
        return x

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """A stream of 4 tokens and a context of 6 tokens."""
        return (
            torch.randn(batch_size, 4, self.cfg.dim, generator=generator),
            torch.randn(batch_size, 6, self.context_dim, generator=generator),
        )


# --------------------------------------------------------------------------- adapter
@config
class AdapterFusionConfig:
    """A linear map or MLP from one model's embedding space to ``tokens`` input tokens of another."""

    in_dim: int = field(32, "Width of the incoming embeddings.", check=in_range(1, 65536, integer=True))
    out_dim: int = field(64, "Width of the receiving model's input tokens.", check=in_range(1, 65536, integer=True))
    tokens: int = field(
        1,
        "Output tokens per input vector (FROMAGe uses 1; more for richer prefixes).",
        check=in_range(1, 4096, integer=True),
    )
    kind: str = field("linear", "'linear' (FROMAGe) or a two-layer 'mlp'.", check=one_of("linear", "mlp"))
    hidden: int | None = field(None, "MLP hidden width; ``out_dim * tokens`` when None.", check=_optional_dim)
    act: str = field("gelu", "MLP activation.", check=one_of(*ACTIVATIONS))
    dropout: float = field(0.0, "Dropout inside the MLP.", check=in_range(0.0, 1.0))


class AdapterFusion(nn.Module):
    """(B, N, Din) or (B, Din) → (B, N·k, Dout): k tokens per input vector, in order.

    Given the receiving ``stream`` (B, T, Dout), returns the prefix concatenated before it:
    (B, N·k + T, Dout).
    """

    config_class = AdapterFusionConfig

    def __init__(self, cfg: AdapterFusionConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or AdapterFusionConfig(), **overrides)
        self.cfg = cfg
        width = cfg.out_dim * cfg.tokens
        if cfg.kind == "linear":
            self.proj: nn.Module = nn.Linear(cfg.in_dim, width)
        else:
            self.proj = Mlp(cfg.in_dim, cfg.hidden or width, cfg.act, dropout=cfg.dropout, out_dim=width)
        init_weights(self)

    def forward(self, x: Tensor, stream: Tensor | None = None) -> Tensor:
        """Map embeddings ``x`` to prefix tokens; prepend them to ``stream`` when given."""
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, 1, Din)
        if x.dim() != 3 or x.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"adapter input must be (B, N, Din={self.cfg.in_dim}) or (B, Din); got {tuple(x.shape)}")
        b, n, _ = x.shape
        prefix = self.proj(x).reshape(b, n * self.cfg.tokens, self.cfg.out_dim)  # (B, N·k, Dout)
        if stream is None:
            return prefix
        if stream.dim() != 3 or stream.shape[0] != b or stream.shape[-1] != self.cfg.out_dim:
            raise ValueError(f"stream must be (B={b}, T, Dout={self.cfg.out_dim}); got {tuple(stream.shape)}")
        return torch.cat([prefix, stream], dim=1)  # (B, N·k + T, Dout)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Two random embeddings per sample."""
        return (torch.randn(batch_size, 2, self.cfg.in_dim, generator=generator),)


__all__ = [
    "AdapterFusion",
    "AdapterFusionConfig",
    "ConcatFusion",
    "ConcatFusionConfig",
    "ConcatOutput",
    "CrossAttentionFusion",
    "CrossAttentionFusionConfig",
]
