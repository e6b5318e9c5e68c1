"""Convolutional encoder and decoder with residual blocks (van den Oord et al. 2017, section 4.1).

The encoder halves the resolution ``stages`` times with 4×4 stride-2 convolutions, then a
3×3 convolution, residual blocks (ReLU, 3×3, ReLU, 1×1) and a 1×1 projection to the
code width. The decoder mirrors it with 4×4 stride-2 transposed convolutions. No
normalisation layers, so a sample's output never depends on the rest of its batch.
"""

from __future__ import annotations

from torch import Tensor, nn


class ResBlock(nn.Module):
    """x + 1×1(ReLU(3×3(ReLU(x)))), width ``dim`` with a ``hidden``-wide bottleneck."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, dim, H, W) → (B, dim, H, W)."""
        return x + self.net(x)


def _widths(hidden: int, stages: int) -> list[int]:
    """Channel width after each down-sampling stage: halved per stage back from the last (≥ 16)."""
    return [max(hidden >> (stages - 1 - i), min(hidden, 16)) for i in range(stages)]


class Encoder(nn.Module):
    """Images (B, C, H, W) → latents (B, D, H / 2^stages, W / 2^stages)."""

    def __init__(self, channels: int, hidden: int, stages: int, res_blocks: int, res_hidden: int, dim: int) -> None:
        super().__init__()
        widths = _widths(hidden, stages)
        layers: list[nn.Module] = []
        prev = channels
        for w in widths:
            layers += [nn.Conv2d(prev, w, 4, stride=2, padding=1), nn.ReLU()]
            prev = w
        layers.append(nn.Conv2d(prev, hidden, 3, padding=1))
        layers += [ResBlock(hidden, res_hidden) for _ in range(res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden, dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) → (B, D, h, w)."""
        return self.net(images)


class Decoder(nn.Module):
    """Latents (B, D, h, w) → images (B, C, h·2^stages, w·2^stages), unbounded (clamp for [0, 1])."""

    def __init__(self, channels: int, hidden: int, stages: int, res_blocks: int, res_hidden: int, dim: int) -> None:
        super().__init__()
        widths = _widths(hidden, stages)[::-1]  # widest first
        layers: list[nn.Module] = [nn.Conv2d(dim, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, res_hidden) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        prev = hidden
        for i, _w in enumerate(widths):
            last = i == len(widths) - 1
            out = channels if last else widths[i + 1]
            layers.append(nn.ConvTranspose2d(prev, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            prev = out
        self.net = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        """(B, D, h, w) → (B, C, H, W)."""
        return self.net(latents)
