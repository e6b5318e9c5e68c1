"""The KL autoencoder's encoder, decoder and posterior, laid out like diffusers' ``AutoencoderKL`` (weights map 1:1).

Composed from the core UNet's blocks (:mod:`polymodal.nn.unet`): its residual block built without time
conditioning (``ResBlock(..., time_conditioned=False)``: GroupNorm, SiLU, 3×3 conv, GroupNorm, SiLU, 3×3 conv,
a 1×1 shortcut when the width changes) and its self-attention (``SelfAttention2d``: GroupNorm, attention through
the dispatcher, residual), here with one head as wide as the level, as diffusers' VAE. Every GroupNorm has
ε = 1e-6 (diffusers' VAE; the UNet's default is 1e-5)::

    Encoder: conv_in ─ down[0..L-1] (ResBlock × layers_per_block, then, but for the last level,
             pad (0, 1, 0, 1) and a stride-2 3×3 conv without padding) ─ mid (ResBlock, attention, ResBlock)
             ─ GroupNorm ─ SiLU ─ conv_out ──► (B, 2·latent_channels, h, w)   (mean and log-variance)
    Decoder: conv_in ─ mid ─ up[0..L-1] (widest level first; ResBlock × (layers_per_block + 1), then, but for
             the last level, nearest ×2 and a 3×3 conv) ─ GroupNorm ─ SiLU ─ conv_out ──► (B, C, H, W)

The model adds diffusers' 1×1 ``quant_conv`` / ``post_quant_conv`` around the latent (see :mod:`.model`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.nn.unet import ResBlock, SelfAttention2d, UNetConfig

NORM_EPS = 1e-6
"""GroupNorm ε of every norm in diffusers' VAE encoder and decoder."""

LOGVAR_RANGE = (-30.0, 20.0)
"""The posterior's log-variance is clamped to this range (as diffusers' DiagonalGaussianDistribution)."""


def block_config(widths: tuple[int, ...], groups: int) -> UNetConfig:
    """The settings the core blocks read (GroupNorm groups and ε, one attention head as wide as the last level)."""
    return UNetConfig(
        channels=tuple(widths),
        attention_levels=(False,) * len(widths),
        attention_head_dim=widths[-1],
        norm_groups=groups,
        norm_eps=NORM_EPS,
    )


def _resnets(cins: list[int], cout: int, cfg: UNetConfig) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(cin, cout, cfg, time_conditioned=False) for cin in cins)


class MidBlock(nn.Module):
    """ResBlock, self-attention (optional: diffusers' ``mid_block_add_attention``), ResBlock at the lowest resolution."""

    def __init__(self, width: int, cfg: UNetConfig, attention: bool = True) -> None:
        super().__init__()
        self.resnets = _resnets([width, width], width, cfg)
        self.attentions = nn.ModuleList([SelfAttention2d(width, cfg)] if attention else [])

    def forward(self, h: Tensor) -> Tensor:
        """(B, C, h, w) → (B, C, h, w)."""
        h = self.resnets[0](h)  # (B, C, h, w)
        for attention in self.attentions:
            h = attention(h)  # (B, C, h, w)
        return self.resnets[1](h)


class DownLevel(nn.Module):
    """diffusers' ``DownEncoderBlock2D``: ResBlocks, then (``downsample``) pad right/bottom by one and a stride-2 conv."""

    def __init__(self, cin: int, cout: int, layers: int, cfg: UNetConfig, downsample: bool) -> None:
        super().__init__()
        self.resnets = _resnets([cin] + [cout] * (layers - 1), cout, cfg)
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=0) if downsample else None

    def forward(self, h: Tensor) -> Tensor:
        """(B, Cin, H, W) → (B, Cout, H/2, W/2), or (B, Cout, H, W) without downsampling."""
        for resnet in self.resnets:
            h = resnet(h)  # (B, Cout, H, W)
        if self.downsample is not None:
            h = self.downsample(F.pad(h, (0, 1, 0, 1)))  # (B, Cout, H/2, W/2)
        return h


class UpLevel(nn.Module):
    """diffusers' ``UpDecoderBlock2D``: ResBlocks, then (``upsample``) nearest ×2 and a 3×3 conv."""

    def __init__(self, cin: int, cout: int, layers: int, cfg: UNetConfig, upsample: bool) -> None:
        super().__init__()
        self.resnets = _resnets([cin] + [cout] * (layers - 1), cout, cfg)
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, h: Tensor) -> Tensor:
        """(B, Cin, H, W) → (B, Cout, 2H, 2W), or (B, Cout, H, W) without upsampling."""
        for resnet in self.resnets:
            h = resnet(h)  # (B, Cout, H, W)
        if self.upsample is not None:
            h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, Cout, 2H, 2W)
        return h


class Encoder(nn.Module):
    """Images (B, channels, H, W) in [-1, 1] → posterior moments (B, 2·latent, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(
        self, channels: int, widths: tuple[int, ...], layers: int, latent: int, groups: int, mid_attention: bool
    ) -> None:
        super().__init__()
        cfg = block_config(widths, groups)
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        cins = [widths[0], *widths[:-1]]
        last = len(widths) - 1
        self.down = nn.ModuleList(DownLevel(cins[i], w, layers, cfg, i < last) for i, w in enumerate(widths))
        self.mid = MidBlock(widths[-1], cfg, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, 2·latent, h, w)."""
        h = self.conv_in(x)  # (B, W0, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, W_last, h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2·latent, h, w)


class Decoder(nn.Module):
    """Latents (B, latent, h, w) → images (B, channels, h·2^(L-1), w·2^(L-1)), about [-1, 1] (unbounded)."""

    def __init__(
        self, channels: int, widths: tuple[int, ...], layers: int, latent: int, groups: int, mid_attention: bool
    ) -> None:
        super().__init__()
        cfg = block_config(widths, groups)
        rev = tuple(reversed(widths))  # widest (lowest resolution) first
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid = MidBlock(rev[0], cfg, mid_attention)
        cins = [rev[0], *rev[:-1]]
        last = len(rev) - 1
        self.up = nn.ModuleList(UpLevel(cins[i], w, layers + 1, cfg, i < last) for i, w in enumerate(rev))
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """(B, latent, h, w) → (B, C, H, W)."""
        h = self.mid(self.conv_in(z))  # (B, W_last, h, w)
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C, H, W)


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), diagonal, from its moments (B, 2·L, h, w).

    ``logvar`` is clamped to :data:`LOGVAR_RANGE`. ``sample(generator)`` draws z = mean + std·ε,
    ``mode()`` is the mean and ``kl()`` the closed-form KL(q ‖ N(0, I)) per sample,
    ½ Σ (mean² + var − 1 − logvar) over (L, h, w).
    """

    def __init__(self, moments: Tensor) -> None:
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"expected posterior moments (B, 2·L, h, w); got {tuple(moments.shape)}")
        mean, logvar = moments.chunk(2, dim=1)  # (B, L, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)  # (B, L, h, w)

    @property
    def std(self) -> Tensor:
        """exp(logvar / 2), (B, L, h, w)."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        """exp(logvar), (B, L, h, w)."""
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std·ε, ε ~ N(0, I) drawn from ``generator`` (on its device; default: torch's global one)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # (B, L, h, w)

    def mode(self) -> Tensor:
        """The mean (B, L, h, w): the posterior's most likely latent."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) per sample (B,), summed over the latent's (L, h, w) elements."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))
