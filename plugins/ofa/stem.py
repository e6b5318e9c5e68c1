"""OFA's image input: the first stages of a small ResNet turn the image into the encoder's patch features."""

from __future__ import annotations

import math

from torch import Tensor, nn

from polymodal.nn.unet import ResBlock, UNetConfig

from .config import OFAConfig


class ResNetStem(nn.Module):
    """Pixels (B, 3, S, S) in [0, 1] → patch features (B, (S/stride)², D): a stride-2 conv (ResNet's stem), then per
    further halving a ResNet block and a stride-2 conv, a last ResNet block and a 1×1 projection (OFA's first
    ResNet stages)."""

    def __init__(self, c: OFAConfig) -> None:
        super().__init__()
        ch = c.stem_channels
        blocks = UNetConfig(channels=(ch,), attention_levels=(False,), norm_groups=8)
        halvings = int(math.log2(c.patch_stride))
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, stride=2 if halvings else 1, padding=1)]
        for _ in range(halvings - 1):
            layers += [ResBlock(ch, ch, blocks, time_conditioned=False), nn.Conv2d(ch, ch, 3, stride=2, padding=1)]
        layers += [ResBlock(ch, ch, blocks, time_conditioned=False), nn.GroupNorm(8, ch), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(ch, c.dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) → (B, P, D), patches in row-major order."""
        return self.proj(self.body(images * 2 - 1)).flatten(2).transpose(1, 2)  # (B, P, D)


__all__ = ["ResNetStem"]
