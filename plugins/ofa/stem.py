"""OFA's image input: the first stages of a small ResNet turn the image into the encoder's patch features; the
optional pre-stage that trains them first."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
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


def object_loss(stem: nn.Module, head: nn.Module, images: Tensor, objects: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """The stem pre-stage (OFA's ImageNet-pretrained ResNet in miniature): binary cross-entropy of ``head`` on the
    max-pooled stem features of ``images`` (B, 3, S, S) against the multi-hot classes each scene holds ``objects``
    (B, classes); logs ``loss_objects`` and ``accuracy`` (scenes whose whole set of classes is read right)."""
    features = F.gelu(stem(images)).amax(dim=1)  # (B, D): max over the patches — the objects are small
    logits = head(features)  # (B, classes)
    target = objects.to(logits)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    exact = ((logits > 0) == target.bool()).all(dim=1).float().mean()
    return loss, {"loss_objects": loss.detach(), "accuracy": exact}


__all__ = ["ResNetStem", "object_loss"]
