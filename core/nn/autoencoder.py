"""Convolutional autoencoder trunks laid out like diffusers' VAE ``Encoder`` / ``Decoder`` (weights map 1:1).

The first stages of latent diffusion compose these: the KL-VAE (Kandinsky 2.0, LDM) and the MoVQ decoder
(Kandinsky 2.1). Built from the core UNet's blocks (:mod:`polymodal.nn.unet`): its residual block without time
conditioning (``ResBlock(..., time_conditioned=False)``: norm, SiLU, 3×3 conv, norm, SiLU, 3×3 conv, a 1×1
shortcut when the width changes) and its self-attention (``SelfAttention2d``: norm, attention through the
dispatcher, residual), with one head as wide as the level, as diffusers' VAE. Every norm has ε = 1e-6
(diffusers' VAE; the UNet's default is 1e-5)::

    Encoder: conv_in ─ down[0..L-1] (ResBlock × layers_per_block, then, but for the last level,
             pad (0, 1, 0, 1) and a stride-2 3×3 conv without padding) ─ mid (ResBlock, attention, ResBlock)
             ─ GroupNorm ─ SiLU ─ conv_out ──► (B, out_channels, h, w)
    Decoder: conv_in ─ mid ─ up[0..L-1] (widest level first; ResBlock × (layers_per_block + 1), then, but for
             the last level, nearest ×2 and a 3×3 conv) ─ norm ─ SiLU ─ conv_out ──► (B, C, H, W)

Either trunk may add self-attention after each ResBlock of chosen levels (``level_attention``: diffusers'
``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``, as the published Kandinsky 2.1 MoVQ has at its lowest
resolution). The decoder's norm is an option: plain GroupNorm (``condition_channels=0``, the KL-VAE), or, with
``condition_channels > 0``, MoVQ's spatially conditioned norm (Zheng et al. 2022, "MoVQ") everywhere in the
decoder — in every residual block, the middle attention and before ``conv_out``:
``SpatialNorm(f, z_q) = GroupNorm(f) · conv_y(z_q↑) + conv_b(z_q↑)``, z_q (the latent the decoder decodes,
before its ``post_quant_conv``) nearest-upsampled to f's size and the two 1×1 convs mapping its channels to
f's. Conditioned blocks are the core blocks with their norms swapped for :class:`SpatialNorm` and a forward
that hands z_q to them (the core blocks' norms take one input).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.nn.unet import ResBlock, SelfAttention2d, UNetConfig

NORM_EPS = 1e-6
"""GroupNorm ε of every norm in diffusers' VAE encoder and decoder (SpatialNorm's too)."""


def cpu_channels_last(x: Tensor) -> Tensor:
    """``x`` in channels-last memory on the CPU, where the trunks' convolutions run faster (as the core UNet's)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def block_config(widths: tuple[int, ...], groups: int) -> UNetConfig:
    """The settings the core blocks read (GroupNorm groups and ε, one attention head as wide as the last level)."""
    return UNetConfig(
        channels=tuple(widths),
        attention_levels=(False,) * len(widths),
        attention_head_dim=widths[-1],
        norm_groups=groups,
        norm_eps=NORM_EPS,
    )


class SpatialNorm(nn.Module):
    """MoVQ's spatially conditioned GroupNorm: ``norm(f) · conv_y(z_q↑) + conv_b(z_q↑)`` (diffusers' ``SpatialNorm``).

    ``channels``: f's channels; ``condition_channels``: z_q's; ``groups``: the GroupNorm's groups (diffusers fixes
    32). z_q is nearest-upsampled to f's spatial size.
    """

    def __init__(self, channels: int, condition_channels: int, groups: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.conv_y = nn.Conv2d(condition_channels, channels, 1)
        self.conv_b = nn.Conv2d(condition_channels, channels, 1)

    def forward(self, f: Tensor, zq: Tensor) -> Tensor:
        """f (B, C, H, W), z_q (B, Cz, h, w) → (B, C, H, W)."""
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")  # (B, Cz, H, W)
        return self.norm(f) * self.conv_y(zq) + self.conv_b(zq)  # (B, C, H, W)


class SpatialResBlock(ResBlock):
    """The core ``ResBlock`` (no time conditioning) with both norms :class:`SpatialNorm`; takes (x, z_q)."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, condition_channels: int) -> None:
        super().__init__(cin, cout, cfg, time_conditioned=False)
        self.norm1 = SpatialNorm(cin, condition_channels, cfg.norm_groups, cfg.norm_eps)
        self.norm2 = SpatialNorm(cout, condition_channels, cfg.norm_groups, cfg.norm_eps)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:  # type: ignore[override]
        """x (B, Cin, H, W), z_q (B, Cz, h, w) → (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x, zq)))  # (B, Cout, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq))))  # (B, Cout, H, W)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention2d(SelfAttention2d):
    """The core ``SelfAttention2d`` with its norm :class:`SpatialNorm`; takes (x, z_q)."""

    def __init__(self, channels: int, cfg: UNetConfig, condition_channels: int) -> None:
        super().__init__(channels, cfg)
        self.norm = SpatialNorm(channels, condition_channels, cfg.norm_groups, cfg.norm_eps)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:  # type: ignore[override]
        """x (B, C, H, W), z_q (B, Cz, h, w) → (B, C, H, W): x + attention(norm(x, z_q)) over the H·W positions."""
        b, c, h, w = x.shape
        seq = self.norm(x, zq).flatten(2).transpose(1, 2)  # (B, H·W, C)
        return x + self.attn(seq).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


def _resblock(cin: int, cout: int, cfg: UNetConfig, condition_channels: int) -> nn.Module:
    if condition_channels:
        return SpatialResBlock(cin, cout, cfg, condition_channels)
    return ResBlock(cin, cout, cfg, time_conditioned=False)


def _attention(width: int, cfg: UNetConfig, condition_channels: int) -> nn.Module:
    """Self-attention with one head as wide as ``width`` (diffusers' VAE levels), spatially normed if conditioned."""
    level = attrs.evolve(cfg, channels=(width,), attention_levels=(False,), attention_head_dim=width)
    if condition_channels:
        return SpatialSelfAttention2d(width, level, condition_channels)
    return SelfAttention2d(width, level)


def _run(block: nn.Module, h: Tensor, zq: Tensor | None) -> Tensor:
    """``block(h)``, or ``block(h, z_q)`` for a spatially conditioned block."""
    return block(h) if zq is None else block(h, zq)


class MidBlock(nn.Module):
    """ResBlock, self-attention (optional: diffusers' ``mid_block_add_attention``), ResBlock at the lowest resolution."""

    def __init__(self, width: int, cfg: UNetConfig, attention: bool = True, condition_channels: int = 0) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resblock(width, width, cfg, condition_channels) for _ in range(2))
        self.attentions = nn.ModuleList([_attention(width, cfg, condition_channels)] if attention else [])

    def forward(self, h: Tensor, zq: Tensor | None = None) -> Tensor:
        """(B, C, h, w) → (B, C, h, w); z_q (B, Cz, h', w') only for a conditioned block."""
        h = _run(self.resnets[0], h, zq)  # (B, C, h, w)
        for attention in self.attentions:
            h = _run(attention, h, zq)  # (B, C, h, w)
        return _run(self.resnets[1], h, zq)


class DownLevel(nn.Module):
    """diffusers' ``DownEncoderBlock2D`` (``attention``: ``AttnDownEncoderBlock2D``, self-attention after each
    ResBlock): ResBlocks, then (``downsample``) pad right/bottom by one and a stride-2 conv."""

    def __init__(
        self, cin: int, cout: int, layers: int, cfg: UNetConfig, downsample: bool, attention: bool = False
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resblock(c, cout, cfg, 0) for c in [cin] + [cout] * (layers - 1))
        self.attentions = nn.ModuleList(_attention(cout, cfg, 0) for _ in range(layers if attention else 0))
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=0) if downsample else None

    def forward(self, h: Tensor) -> Tensor:
        """(B, Cin, H, W) → (B, Cout, H/2, W/2), or (B, Cout, H, W) without downsampling."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(h)  # (B, Cout, H, W)
            if self.attentions:
                h = self.attentions[i](h)  # (B, Cout, H, W)
        if self.downsample is not None:
            h = self.downsample(F.pad(h, (0, 1, 0, 1)))  # (B, Cout, H/2, W/2)
        return h


class UpLevel(nn.Module):
    """diffusers' ``UpDecoderBlock2D`` (``attention``: ``AttnUpDecoderBlock2D``, self-attention after each ResBlock):
    ResBlocks (spatially conditioned with ``condition_channels``), then (``upsample``) nearest ×2 and a 3×3 conv."""

    def __init__(
        self,
        cin: int,
        cout: int,
        layers: int,
        cfg: UNetConfig,
        upsample: bool,
        condition_channels: int = 0,
        attention: bool = False,
    ) -> None:
        super().__init__()
        cins = [cin] + [cout] * (layers - 1)
        self.resnets = nn.ModuleList(_resblock(c, cout, cfg, condition_channels) for c in cins)
        n_attn = layers if attention else 0
        self.attentions = nn.ModuleList(_attention(cout, cfg, condition_channels) for _ in range(n_attn))
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, h: Tensor, zq: Tensor | None = None) -> Tensor:
        """(B, Cin, H, W) → (B, Cout, 2H, 2W), or (B, Cout, H, W) without upsampling."""
        for i, resnet in enumerate(self.resnets):
            h = _run(resnet, h, zq)  # (B, Cout, H, W)
            if self.attentions:
                h = _run(self.attentions[i], h, zq)  # (B, Cout, H, W)
        if self.upsample is not None:
            h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, Cout, 2H, 2W)
        return h


def _level_flags(flags: tuple[bool, ...], widths: tuple[int, ...]) -> tuple[bool, ...]:
    """``flags`` (one per level, or empty for none) as one bool per level; ValueError naming both counts."""
    if not flags:
        return (False,) * len(widths)
    if len(flags) != len(widths):
        raise ValueError(f"level_attention needs one flag per level ({len(widths)} for {widths}); got {flags!r}")
    return tuple(bool(f) for f in flags)


class Encoder(nn.Module):
    """Images (B, channels, H, W) in [-1, 1] → (B, out_channels, H / 2^(L-1), W / 2^(L-1)).

    ``widths``: each level's width; ``layers``: ResBlocks per level; ``out_channels``: the output's channels (a
    KL-VAE's 2·latent moments, a MoVQ's latent); ``groups``: GroupNorm groups; ``mid_attention``: self-attention
    in the middle block; ``level_attention``: per level, self-attention after each of its ResBlocks (empty: none).
    """

    def __init__(
        self,
        channels: int,
        widths: tuple[int, ...],
        layers: int,
        out_channels: int,
        groups: int,
        mid_attention: bool,
        level_attention: tuple[bool, ...] = (),
    ) -> None:
        super().__init__()
        cfg = block_config(widths, groups)
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        cins = [widths[0], *widths[:-1]]
        last = len(widths) - 1
        attn = _level_flags(level_attention, widths)
        self.down = nn.ModuleList(DownLevel(cins[i], w, layers, cfg, i < last, attn[i]) for i, w in enumerate(widths))
        self.mid = MidBlock(widths[-1], cfg, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, out_channels, h, w)."""
        h = self.conv_in(x)  # (B, W0, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, W_last, h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h, w)


class Decoder(nn.Module):
    """Latents (B, latent, h, w) → images (B, channels, h·2^(L-1), w·2^(L-1)), about [-1, 1] (unbounded).

    Arguments as :class:`Encoder`'s (``latent``: the input's channels; each level has ``layers + 1`` ResBlocks);
    ``condition_channels > 0``: every norm is a :class:`SpatialNorm` on a z_q of that many channels, which
    ``forward`` then requires; ``level_attention``: the encoder's per-level flags (in the encoder's level order:
    the decoder's levels run the other way).
    """

    def __init__(
        self,
        channels: int,
        widths: tuple[int, ...],
        layers: int,
        latent: int,
        groups: int,
        mid_attention: bool,
        condition_channels: int = 0,
        level_attention: tuple[bool, ...] = (),
    ) -> None:
        super().__init__()
        cfg = block_config(widths, groups)
        self.condition_channels = condition_channels
        attn = tuple(reversed(_level_flags(level_attention, widths)))
        rev = tuple(reversed(widths))  # widest (lowest resolution) first
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid = MidBlock(rev[0], cfg, mid_attention, condition_channels)
        cins = [rev[0], *rev[:-1]]
        last = len(rev) - 1
        self.up = nn.ModuleList(
            UpLevel(cins[i], w, layers + 1, cfg, i < last, condition_channels, attn[i]) for i, w in enumerate(rev)
        )
        if condition_channels:
            self.conv_norm_out: nn.Module = SpatialNorm(widths[0], condition_channels, groups)
        else:
            self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, z: Tensor, zq: Tensor | None = None) -> Tensor:
        """(B, latent, h, w) → (B, C, H, W); ``zq`` (B, condition_channels, h, w): the spatial norms' condition,
        required exactly when the decoder was built with ``condition_channels > 0``."""
        if (zq is None) != (not self.condition_channels):
            need = f"a z_q of {self.condition_channels} channels" if self.condition_channels else "no z_q"
            got = "None" if zq is None else tuple(zq.shape)
            raise ValueError(f"this decoder takes {need} (condition_channels={self.condition_channels}); got {got}")
        if zq is not None and (zq.dim() != 4 or zq.shape[1] != self.condition_channels):
            raise ValueError(f"expected z_q (B, {self.condition_channels}, h, w); got {tuple(zq.shape)}")
        h = self.mid(self.conv_in(z), zq)  # (B, W_last, h, w)
        for level in self.up:
            h = level(h, zq)
        return self.conv_out(F.silu(_run(self.conv_norm_out, h, zq)))  # (B, C, H, W)


__all__ = [
    "NORM_EPS",
    "Decoder",
    "DownLevel",
    "Encoder",
    "MidBlock",
    "SpatialNorm",
    "SpatialResBlock",
    "SpatialSelfAttention2d",
    "UpLevel",
    "block_config",
    "cpu_channels_last",
]
