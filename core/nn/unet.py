"""A diffusion UNet from core parts, laid out like diffusers' ``UNet2DModel`` (so weights map 1:1).

The structure (Ho et al.'s DDPM UNet, with ADM's options)::

    t ──sinusoid──► Linear ─ SiLU ─ Linear ──► emb  (+ class embedding, + projected vector embedding,
                                                      + a per-call additive embedding, added as is)
    x ─ conv_in ─┬─ down[0]: ResBlock (+ attention) × layers_per_block, Downsample ─┐ (skips pushed)
                 │   …                                                             │
                 │   down[L-1]: … (no Downsample)                                  │
                 │  mid: ResBlock, attention, ResBlock                              │
                 └─ up[0..L-1]: (concat skip, ResBlock (+ attention)) × (layers_per_block + 1), Upsample
                     GroupNorm ─ SiLU ─ conv_out ──► (B, out_channels, H, W)

Residual blocks: GroupNorm, SiLU, 3×3 conv, the time embedding projected and added (or, with
``scale_shift``, ADM's ``norm(h)·(1 + scale) + shift``), GroupNorm, SiLU, dropout, 3×3 conv, and a
1×1 shortcut when the width changes. Self-attention (GroupNorm, then multi-head attention through
:class:`polymodal.nn.Attention`, i.e. the attention dispatcher and fused SDPA, then a residual) sits
at the levels ``attention_levels`` marks and always in the middle. With ``context_dim > 0`` each
attention site is followed by cross-attention to a context sequence (text tokens), a
:class:`polymodal.nn.fusion.CrossAttentionFusion` with ``gate=False`` and no MLP (pre-LayerNorm,
residual), as in GLIDE / Imagen text-conditioned UNets; ``context_mask`` marks the real context tokens
(a key padding mask). ``additive_embedding`` (per call, no config field and no weights) is a vector at the
time embedding's width added to it as is, diffusers' ``class_embed_type="identity"``: the unCLIP decoder
adds its own projection of the CLIP embeddings this way.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import as_tuple, config, field, in_range, one_of
from polymodal.nn.block import Attention
from polymodal.nn.fusion import CrossAttentionFusion

_pos = in_range(1, 65536, integer=True)
_count = in_range(0, 1_000_000, integer=True)


@config
class UNetConfig:
    """A diffusion UNet: widths per resolution level, attention sites and conditioning inputs."""

    in_channels: int = field(
        1, "Channels of the input image (SR3: image + upsampled low-res, concatenated).", check=_pos
    )
    out_channels: int = field(1, "Channels of the output (2× the image channels for a learned variance).", check=_pos)
    sample_size: int = field(8, "Side of the square images the model is built for (informational).", check=_pos)
    channels: tuple[int, ...] = field(
        (32, 64),
        "Width of each resolution level (diffusers' block_out_channels); one level per entry.",
        converter=as_tuple,
    )
    layers_per_block: int = field(
        2, "Residual blocks per down level (up levels get one more).", check=in_range(1, 64, integer=True)
    )
    attention_levels: tuple[bool, ...] = field(
        (False, True),
        "Self-attention after each residual block of these levels (one flag per level).",
        converter=as_tuple,
    )
    attention_head_dim: int = field(8, "Width of one attention head; heads = level width // this.", check=_pos)
    norm_groups: int = field(8, "GroupNorm groups; must divide every level width.", check=_pos)
    norm_eps: float = field(1e-5, "GroupNorm epsilon.", check=in_range(0.0, 1.0))
    time_embedding: str = field(
        "positional", "Timestep embedding: sinusoidal ('positional', as DDPM).", check=one_of("positional")
    )
    flip_sin_to_cos: bool = field(True, "Order the sinusoid as (cos, sin) instead of (sin, cos), as diffusers' option.")
    freq_shift: int = field(
        0,
        "diffusers' downscale_freq_shift: frequencies exp(-ln(1e4)·i / (half - shift)).",
        check=in_range(0, 1, integer=True),
    )
    scale_shift: bool = field(
        False, "ADM's time conditioning: norm(h)·(1 + scale) + shift instead of adding the embedding."
    )
    num_classes: int = field(
        0, "> 0: a learned class embedding (class_labels) added to the time embedding.", check=_count
    )
    embedding_dim: int = field(
        0, "> 0: a vector embedding of this width, projected and added to the time embedding.", check=_count
    )
    context_dim: int = field(
        0, "> 0: cross-attention to a context sequence of this width at every attention site.", check=_count
    )
    dropout: float = field(0.0, "Dropout inside the residual blocks.", check=in_range(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        if not self.channels or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in self.channels):
            raise ValueError(f"UNetConfig.channels must be positive integers, one per level; got {self.channels!r}")
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"UNetConfig.attention_levels needs one flag per level ({len(self.channels)} for channels="
                f"{self.channels}); got {self.attention_levels!r}"
            )
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"UNetConfig.channels must be multiples of norm_groups={self.norm_groups}; got {bad} in {self.channels}"
            )
        sites = [c for c, a in zip(self.channels, self.attention_levels, strict=True) if a] + [self.channels[-1]]
        bad = sorted({c for c in sites if c % self.attention_head_dim})
        if bad:
            raise ValueError(
                f"UNetConfig.attention_head_dim={self.attention_head_dim} must divide the width of every attention "
                f"level (and the last level, for the middle); got widths {bad}"
            )

    @property
    def time_dim(self) -> int:
        """Width of the time embedding (4 × the first level's width, as DDPM)."""
        return 4 * self.channels[0]


def timestep_embedding(t: Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding (B,) → (B, dim) of (possibly fractional) timesteps, as DDPM / diffusers."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class TimeEmbedding(nn.Module):
    """Linear → SiLU → Linear on the sinusoidal embedding."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x: Tensor) -> Tensor:
        """(B, dim) sinusoid → (B, out) time embedding."""
        return self.linear_2(F.silu(self.linear_1(x)))  # (B, out)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, time conditioning, GroupNorm-SiLU-dropout-conv, plus a (1×1) shortcut.

    ``time_conditioned=False`` builds it without the time projection (diffusers' ``temb_channels=None``, as in
    an autoencoder's blocks): it then takes no embedding.
    """

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, time_conditioned: bool = True) -> None:
        super().__init__()
        self.scale_shift = cfg.scale_shift
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = (
            nn.Linear(cfg.time_dim, 2 * cout if cfg.scale_shift else cout) if time_conditioned else None
        )
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, emb_act: Tensor | None = None) -> Tensor:
        """x (B, Cin, H, W), emb_act = SiLU(time embedding) (B, T), None without time conditioning → (B, Cout, H, W)."""
        if (emb_act is None) != (self.time_emb_proj is None):
            need = "no time embedding (time_conditioned=False)" if self.time_emb_proj is None else "a time embedding"
            raise ValueError(f"this ResBlock takes {need}; got {'None' if emb_act is None else tuple(emb_act.shape)}")
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        if self.time_emb_proj is None:
            h = self.norm2(h)
        elif self.scale_shift:
            scale, shift = self.time_emb_proj(emb_act)[:, :, None, None].chunk(2, dim=1)  # (B, Cout, 1, 1) each
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # (B, Cout, H, W)
        else:
            h = self.norm2(h + self.time_emb_proj(emb_act)[:, :, None, None])  # (B, Cout, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, Cout, H, W)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention2d(nn.Module):
    """GroupNorm, then multi-head self-attention over the H·W positions (the dispatcher), residual."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.attn = Attention(channels, channels // cfg.attention_head_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W): x + attention(norm(x)) over the H·W positions."""
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        out = self.attn(seq).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out


class CrossAttention2d(nn.Module):
    """Cross-attention of the H·W positions to a context sequence (CrossAttentionFusion, no gate, no MLP)."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.fusion = CrossAttentionFusion(
            dim=channels,
            context_dim=cfg.context_dim,
            heads=channels // cfg.attention_head_dim,
            gate=False,
            mlp_ratio=0.0,
            norm_eps=cfg.norm_eps,
        )

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        """x (B, C, H, W), context (B, M, D), context_mask (B, M) True for real tokens → (B, C, H, W)."""
        b, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        out = self.fusion(seq, context, context_padding=context_mask)  # (B, H·W, C)
        return out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class Level(nn.Module):
    """One resolution level: residual blocks with optional (cross-)attention, then a resampler."""

    def __init__(self, cins: list[int], cout: int, attend: bool, cfg: UNetConfig, resample: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin, cout, cfg) for cin in cins)
        self.attentions = nn.ModuleList(SelfAttention2d(cout, cfg) for _ in cins) if attend else None
        self.cross = nn.ModuleList(CrossAttention2d(cout, cfg) for _ in cins) if attend and cfg.context_dim else None
        self.resample = resample
        stride = 2 if resample == "down" else 1
        self.sampler = nn.Conv2d(cout, cout, 3, stride=stride, padding=1) if resample else None

    def attend(self, h: Tensor, i: int, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        """The attention (and cross-attention) after residual block ``i``."""
        if self.attentions is not None:
            h = self.attentions[i](h)
        if self.cross is not None:
            h = self.cross[i](h, context, context_mask)
        return h

    def down(self, h, emb_act, skips, context, context_mask) -> Tensor:
        """Down path: every block's output and the downsampled map are pushed on ``skips``."""
        for i, resnet in enumerate(self.resnets):
            h = self.attend(resnet(h, emb_act), i, context, context_mask)  # (B, C, H, W)
            skips.append(h)
        if self.sampler is not None:
            h = self.sampler(h)  # (B, C, H/2, W/2)
            skips.append(h)
        return h

    def up(self, h, emb_act, skips, context, context_mask) -> Tensor:
        """Up path: each block first concatenates the latest skip."""
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + Cskip, H, W)
            h = self.attend(resnet(h, emb_act), i, context, context_mask)  # (B, C, H, W)
        if self.sampler is not None:
            h = self.sampler(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
        return h


class MidBlock(nn.Module):
    """ResBlock, self-attention (and cross-attention), ResBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, cfg), ResBlock(channels, channels, cfg)])
        self.attentions = nn.ModuleList([SelfAttention2d(channels, cfg)])
        self.cross = nn.ModuleList([CrossAttention2d(channels, cfg)]) if cfg.context_dim else None

    def forward(self, h, emb_act, context, context_mask) -> Tensor:
        """(B, C, H, W) → (B, C, H, W) at the lowest resolution."""
        h = self.attentions[0](self.resnets[0](h, emb_act))  # (B, C, H, W)
        if self.cross is not None:
            h = self.cross[0](h, context, context_mask)
        return self.resnets[1](h, emb_act)


class UNet(nn.Module):
    """The diffusion UNet: ``(x (B, in, H, W), t (B,)) → (B, out, H, W)``; see the module docstring."""

    config_class = UNetConfig

    def __init__(self, cfg: UNetConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or UNetConfig(), **overrides)
        self.cfg = cfg
        ch, n = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(ch[0], cfg.time_dim)
        self.class_embedding = nn.Embedding(cfg.num_classes, cfg.time_dim) if cfg.num_classes else None
        self.embedding_proj = nn.Linear(cfg.embedding_dim, cfg.time_dim) if cfg.embedding_dim else None
        self.down = nn.ModuleList()
        cin = ch[0]
        for i in range(n):
            cins = [cin] + [ch[i]] * (cfg.layers_per_block - 1)
            self.down.append(Level(cins, ch[i], cfg.attention_levels[i], cfg, "down" if i < n - 1 else ""))
            cin = ch[i]
        self.mid = MidBlock(ch[-1], cfg)
        self.up = nn.ModuleList()
        prev = ch[-1]
        for i in range(n):
            level = n - 1 - i
            out, skip_last = ch[level], ch[max(level - 1, 0)]
            layers = cfg.layers_per_block + 1
            cins = [(prev if j == 0 else out) + (skip_last if j == layers - 1 else out) for j in range(layers)]
            self.up.append(Level(cins, out, cfg.attention_levels[level], cfg, "up" if i < n - 1 else ""))
            prev = out
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _timesteps(self, t, b: int, device: torch.device) -> Tensor:
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise ValueError(f"UNet expects t as a number or a tensor of shape () or (B,); got {type(t).__name__}")
            t = torch.tensor([t], device=device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"UNet expects t of shape () or (B,) = ({b},); got {tuple(t.shape)}")
        return t.to(device).expand(b)  # (B,)

    def _check(self, x: Tensor, class_labels, embedding, context, context_mask, additive=None) -> None:
        cfg = self.cfg
        factor = 2 ** (len(cfg.channels) - 1)
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"UNet expects x of shape (B, in_channels={cfg.in_channels}, H, W) with H and W multiples of "
                f"{factor} (2^(levels - 1)); got {tuple(x.shape)}"
            )
        for name, value, width in (
            ("class_labels", class_labels, cfg.num_classes),
            ("embedding", embedding, cfg.embedding_dim),
            ("context", context, cfg.context_dim),
        ):
            option = {"class_labels": "num_classes", "embedding": "embedding_dim", "context": "context_dim"}[name]
            if width and value is None:
                raise ValueError(f"this UNet was built with {option}={width}: {name} is required; got None")
            if not width and value is not None:
                raise ValueError(f"this UNet was built with {option}=0: expected no {name}, got one")
        b = x.shape[0]
        if class_labels is not None and tuple(class_labels.shape) != (b,):
            raise ValueError(f"class_labels must be (B,) = ({b},); got {tuple(class_labels.shape)}")
        if embedding is not None and tuple(embedding.shape) != (b, cfg.embedding_dim):
            raise ValueError(f"embedding must be (B, D) = ({b}, {cfg.embedding_dim}); got {tuple(embedding.shape)}")
        if context is not None and (context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim):
            raise ValueError(f"context must be (B, M, C) = ({b}, M, {cfg.context_dim}); got {tuple(context.shape)}")
        if context_mask is not None and (context is None or tuple(context_mask.shape) != tuple(context.shape[:2])):
            want = tuple(context.shape[:2]) if context is not None else "(B, M) with a context"
            raise ValueError(f"context_mask must be {want}; got {tuple(context_mask.shape)}")
        if additive is not None and tuple(additive.shape) != (b, cfg.time_dim):
            raise ValueError(
                f"additive_embedding must be (B, time_dim) = ({b}, {cfg.time_dim}) (4 × channels[0]); "
                f"got {tuple(additive.shape)}"
            )

    def forward(
        self,
        x: Tensor,
        t: Tensor | int | float,
        *,
        class_labels: Tensor | None = None,
        embedding: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        additive_embedding: Tensor | None = None,
    ) -> Tensor:
        """x (B, in_channels, H, W), t (B,) or a number → (B, out_channels, H, W).

        ``class_labels`` (B,) int, ``embedding`` (B, embedding_dim), ``context`` (B, M, context_dim)
        with ``context_mask`` (B, M) True for real tokens: each required exactly when configured.
        ``additive_embedding`` (B, time_dim), optional with any config: added to the time embedding as is
        (diffusers' ``class_embed_type="identity"``); None leaves the output exactly as without it.
        """
        self._check(x, class_labels, embedding, context, context_mask, additive_embedding)
        cfg = self.cfg
        t = self._timesteps(t, x.shape[0], x.device)  # (B,)
        temb = timestep_embedding(t, cfg.channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        emb = self.time_embedding(temb.to(x.dtype))  # (B, T)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)  # (B, T)
        if self.embedding_proj is not None:
            emb = emb + self.embedding_proj(embedding.to(x.dtype))  # (B, T)
        if additive_embedding is not None:
            emb = emb + additive_embedding.to(x.dtype)  # (B, T)
        emb_act = F.silu(emb)  # every residual block's projection reads SiLU(emb)
        if context_mask is not None:
            context_mask = context_mask.bool()
        if x.device.type == "cpu":  # channels-last: faster CPU convolutions, and attention's transposes are views
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for level in self.down:
            h = level.down(h, emb_act, skips, context, context_mask)
        h = self.mid(h, emb_act, context, context_mask)  # (B, C_last, H/f, W/f)
        for level in self.up:
            h = level.up(h, emb_act, skips, context, context_mask)
        out = self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)
        return out.contiguous()

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A random image batch of ``sample_size`` and random timesteps in [0, 1000)."""
        s = self.cfg.sample_size
        x = torch.randn(batch_size, self.cfg.in_channels, s, s, generator=generator)  # (B, C, S, S)
        return x, torch.randint(0, 1000, (batch_size,), generator=generator)
