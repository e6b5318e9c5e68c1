"""The pre-norm transformer block and its attention module, with an optional KV cache
(:class:`polymodal.nn.cache.KVCache`: self-attention keys and values written in place, cross-attention keys and
values of a constant context computed once).

Block: ``x = x + drop_path(attn(norm1(x)))``; optionally
``x = x + gate * drop_path(cross_attn(norm_cross(x), context))``; then
``x = x + drop_path(mlp(norm2(x)))``. With ``normformer`` (NormFormer, Shleifer et al. 2021; OFA's blocks) each
attention output is scaled per head and normalised before its residual add, and the MLP's hidden activations are
normalised before its second layer. Every attention goes through
:func:`polymodal.attention.attention`. A relative position bias (``position_bias="t5"``,
:mod:`polymodal.nn.relative`) is added to the self-attention logits; the stack computes it once per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polymodal.attention import attention
from polymodal.config import config, field, in_range, one_of
from polymodal.nn.cache import KVCache
from polymodal.nn.mlp import ACTIVATIONS, Mlp
from polymodal.nn.norm import make_norm
from polymodal.nn.relative import add_bias, bucket_layout

POSITION_BIASES = ("none", "t5")
"""Relative position biases a block's self-attention can add to its logits."""


def _optional_scale(instance, attribute, value) -> None:
    """Validator: None or a positive finite number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be None or a positive number; got {value!r}")


@config
class BlockConfig:
    """Shape and options of one transformer block."""

    dim: int = field(64, "Width of the token stream.", check=in_range(1, 65536, integer=True))
    heads: int = field(4, "Attention heads; must divide ``dim``.", check=in_range(1, 1024, integer=True))
    mlp_ratio: float = field(4.0, "MLP hidden width as a multiple of ``dim``.", check=in_range(0.25, 64))
    norm: str = field("layernorm", "Normalisation: 'layernorm' or 'rmsnorm'.", check=one_of("layernorm", "rmsnorm"))
    norm_eps: float = field(1e-6, "Epsilon of every norm in the block.", check=in_range(0.0, 1.0))
    norm_bias: bool = field(True, "Whether LayerNorms have a bias.")
    act: str = field("gelu", "MLP activation: " + ", ".join(ACTIVATIONS) + ".", check=one_of(*ACTIVATIONS))
    qkv_bias: bool = field(True, "Bias on the query/key/value projections.")
    proj_bias: bool = field(True, "Bias on the attention output projection.")
    mlp_bias: bool = field(True, "Bias on the MLP layers.")
    dropout: float = field(0.0, "Dropout after the attention and MLP projections.", check=in_range(0.0, 1.0))
    attn_dropout: float = field(0.0, "Dropout on the attention weights.", check=in_range(0.0, 1.0))
    drop_path: float = field(0.0, "Stochastic-depth rate of the block's residual branches.", check=in_range(0.0, 1.0))
    cross_attention: bool = field(False, "Add a cross-attention sub-layer over a context sequence.")
    cross_dim: int | None = field(None, "Width of the context; ``dim`` when None.")
    cross_gate: bool = field(False, "Scale the cross-attention branch by tanh of a learned scalar initialised to 0.")
    attn_scale: float | None = field(
        None,
        "Scale of the attention logits q·k; None: 1/sqrt(head width). T5 uses 1.0 (its initialisation "
        "absorbs the scaling).",
        check=_optional_scale,
        backfill=True,
    )
    position_bias: str = field(
        "none",
        "Relative position bias added to the self-attention logits: 'none', or 't5' (T5's bucketed bias: one "
        "learned (relative_buckets, heads) table per TransformerStack, computed once per call and shared by "
        "every block). Cross-attention gets none.",
        check=one_of(*POSITION_BIASES),
        backfill=True,
    )
    relative_buckets: int = field(
        32,
        "Buckets of the 't5' bias (T5: 32): per direction, half for exact offsets, half log-spaced up to "
        "relative_max_distance.",
        check=in_range(2, 4096, integer=True),
        backfill=True,
    )
    relative_max_distance: int = field(
        128,
        "Offsets at or beyond this distance share the last bucket of their direction (T5: 128).",
        check=in_range(1, 1 << 20, integer=True),
        backfill=True,
    )
    relative_bidirectional: bool = field(
        True,
        "Bucket earlier and later keys apart (T5's encoder); False buckets past offsets only and gives every "
        "later key bucket 0 (T5's causal decoder).",
        backfill=True,
    )

    normformer: bool = field(
        False,
        "NormFormer's extra norms (OFA's blocks): a learned per-head scale on every attention's output (initialised "
        "to 1), a norm of each attention branch before its residual add, and a norm of the MLP's hidden activations.",
        backfill=True,
    )

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"BlockConfig.heads must divide dim; got dim={self.dim}, heads={self.heads}")
        if self.position_bias == "t5":
            why = bucket_layout(self.relative_buckets, self.relative_max_distance, self.relative_bidirectional)
            if why is not None:
                raise ValueError(f"BlockConfig: {why}")


class Attention(nn.Module):
    """Multi-head attention: fused ``qkv`` for self-attention, ``q`` + ``kv`` for cross-attention."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        context_dim: int | None = None,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        layer_index: int = 0,
        scale: float | None = None,
        head_scale: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.head_scale = nn.Parameter(torch.ones(heads)) if head_scale else None  # NormFormer's
        self.scale = scale  # logit scale; None: 1/sqrt(head_dim)
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)
        self.layer_index = layer_index

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, H, M, Dh) each of a context (B, M, C)."""
        k, v = self.kv(context).chunk(2, dim=-1)  # (B, M, D) each
        return self._heads(k), self._heads(v)  # (B, H, M, Dh)

    def probabilities(self, x: Tensor) -> Tensor:
        """Self-attention probabilities (B, H, N, N) of ``x`` (B, N, D), unmasked, for inspection
        (attention maps); the forward pass goes through the fused dispatcher instead."""
        if self.cross:
            raise ValueError("probabilities() is for self-attention; this layer is cross-attention")
        q, k, _ = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, N, Dh)
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        return (q @ k.transpose(-2, -1) * scale).softmax(-1)  # (B, H, N, N)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        key_padding: Tensor | None = None,
        seqlens: Sequence[int] | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        b, n, d = x.shape  # (B, N, D)
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor (B, M, C); got None")
            q = self._heads(self.q(x))  # (B, H, N, Dh)
            k, v = self.context_kv(context) if cache is None else cache.cross_kv(self, context, self.context_kv)
        else:
            qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
            q, k, v = qkv.unbind(0)  # (B, H, N, Dh) each
            if cache is not None:
                k, v = cache.update(self.layer_index, k, v)  # (B, H, N_past+N, Dh)
        out = attention(
            q,
            k,
            v,
            causal=causal,
            key_padding=key_padding,
            seqlens=seqlens,
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
        )  # (B, H, N, Dh)
        if self.head_scale is not None:
            out = out * self.head_scale.to(out.dtype)[:, None, None]  # (B, H, N, Dh)
        out = self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)
        return self.proj_drop(out) if self.training else out  # (dropout is the identity in eval: no call per step)


def _unchanged(x: Tensor) -> Tensor:
    """The identity, called where an eval-mode dropout module would be (a function call costs less per step)."""
    return x


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)  # (B, 1, 1)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """A pre-norm transformer block (see the module docstring for the exact wiring)."""

    def __init__(self, cfg: BlockConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, bias=cfg.norm_bias)
        self.attn = Attention(
            cfg.dim,
            cfg.heads,
            qkv_bias=cfg.qkv_bias,
            proj_bias=cfg.proj_bias,
            attn_dropout=cfg.attn_dropout,
            dropout=cfg.dropout,
            layer_index=layer_index,
            scale=cfg.attn_scale,
            head_scale=cfg.normformer,
        )
        norm = lambda width: make_norm(cfg.norm, width, cfg.norm_eps, bias=cfg.norm_bias)  # noqa: E731
        self.attn_out_norm = norm(cfg.dim) if cfg.normformer else None  # None, not Identity: no call per step
        if cfg.cross_attention:
            self.norm_cross = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, bias=cfg.norm_bias)
            self.cross_attn = Attention(
                cfg.dim,
                cfg.heads,
                qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias,
                context_dim=cfg.cross_dim or cfg.dim,
                attn_dropout=cfg.attn_dropout,
                dropout=cfg.dropout,
                scale=cfg.attn_scale,
                head_scale=cfg.normformer,
            )
            self.cross_out_norm = norm(cfg.dim) if cfg.normformer else None
            self.cross_gate = nn.Parameter(torch.zeros(1)) if cfg.cross_gate else None
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, bias=cfg.norm_bias)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        mid = norm(hidden) if cfg.normformer else None
        self.mlp = Mlp(cfg.dim, hidden, cfg.act, bias=cfg.mlp_bias, dropout=cfg.dropout, mid_norm=mid)
        self.drop_path = DropPath(cfg.drop_path)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        key_padding: Tensor | None = None,
        seqlens: Sequence[int] | None = None,
        mask: Tensor | None = None,
        context_padding: Tensor | None = None,
        cache: KVCache | None = None,
        position_bias: Tensor | None = None,
    ) -> Tensor:
        """x: (B, N, D); context: (B, M, C) for cross-attention. Returns (B, N, D).

        ``position_bias`` (1, H, N, N_keys) is added to the self-attention logits (with ``mask`` folded in);
        a block configured with ``position_bias="t5"`` needs it (a TransformerStack passes its shared one).
        """
        if position_bias is None and self.cfg.position_bias != "none":
            raise ValueError(
                f"this block has BlockConfig.position_bias={self.cfg.position_bias!r}: pass the shared bias "
                "position_bias= (1, heads, N, N_keys), as TransformerStack does (RelativePositionBias.for_tokens)"
            )
        mask = add_bias(mask, position_bias)  # additive (B?, H, N, N_keys) when a bias is given
        path = self.drop_path if self.training else _unchanged  # stochastic depth is the identity in eval
        h = self.attn(self.norm1(x), causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask, cache=cache)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        x = x + path(h)  # (B, N, D)
        if self.cfg.cross_attention:
            h = self.cross_attn(self.norm_cross(x), context, key_padding=context_padding, cache=cache)  # (B, N, D)
            if self.cross_out_norm is not None:
                h = self.cross_out_norm(h)
            if self.cross_gate is not None:
                h = torch.tanh(self.cross_gate) * h
            x = x + path(h)
        return x + path(self.mlp(self.norm2(x)))
