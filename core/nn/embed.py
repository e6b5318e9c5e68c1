"""Patch embedding and position embeddings (learned, sin-cos 1-D and 2-D, with interpolation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping ``patch × patch`` squares and project each to ``dim``."""

    def __init__(self, channels: int, dim: int, patch: int, bias: bool = True) -> None:
        super().__init__()
        self.channels, self.patch = channels, patch
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch, bias=bias)

    def check(self, images: Tensor) -> None:
        """Raise a ValueError naming expected vs given for a wrongly shaped or typed batch."""
        if not isinstance(images, Tensor):
            raise ValueError(f"expected a tensor (B, {self.channels}, H, W); got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"expected a 4-D image batch (B, {self.channels}, H, W); got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected a floating-point image tensor; got dtype {images.dtype}")
        if images.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels; got {images.shape[1]} (shape {tuple(images.shape)})")
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"image height and width must be divisible by the patch size {self.patch}; got {h}×{w}")

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) → (B, H/p · W/p, dim), patches in raster order."""
        self.check(images)
        x = self.proj(images.to(self.proj.weight.dtype))  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def sincos_1d(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """(length, dim) fixed sinusoidal embedding (Transformer paper); sin in the first half."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim; got {dim}")
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    freq = base ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (D/2,)
    angles = pos * freq  # (L, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (L, D)


def sincos_2d(height: int, width: int, dim: int, base: float = 10000.0) -> Tensor:
    """(height·width, dim): half the channels encode the row, half the column (MAE style)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4; got {dim}")
    rows = sincos_1d(height, dim // 2, base)  # (H, D/2)
    cols = sincos_1d(width, dim // 2, base)  # (W, D/2)
    grid_rows = rows.unsqueeze(1).expand(height, width, -1)  # (H, W, D/2)
    grid_cols = cols.unsqueeze(0).expand(height, width, -1)  # (H, W, D/2)
    return torch.cat([grid_rows, grid_cols], dim=-1).reshape(height * width, dim)


def interpolate_grid(pos: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Resize a (old_h·old_w, D) grid of position embeddings to (new_h·new_w, D), bicubic."""
    if old == new:
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False)  # (1, D, H, W)
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], d).to(pos.dtype)


class PositionEmbedding(nn.Module):
    """Position embeddings for ``prefix`` extra tokens plus a ``grid`` of patches (or a 1-D sequence).

    ``kind="learned"`` trains a table (initialised with std 0.02); ``"sincos"`` is fixed.
    A different grid size at run time is handled by bicubic interpolation of the grid part.
    """

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0, kind: str = "learned") -> None:
        super().__init__()
        if kind not in ("learned", "sincos"):
            raise ValueError(f"position embedding kind must be 'learned' or 'sincos'; got {kind!r}")
        self.grid, self.prefix, self.kind = tuple(grid), prefix, kind
        n = grid[0] * grid[1]
        if kind == "learned":
            self.weight = nn.Parameter(torch.randn(1, prefix + n, dim) * 0.02)
        else:
            table = sincos_2d(grid[0], grid[1], dim) if grid[0] > 1 else sincos_1d(n, dim)
            table = torch.cat([torch.zeros(prefix, dim), table])  # (prefix + N, D)
            self.register_buffer("weight", table.unsqueeze(0), persistent=False)

    def forward(self, grid: tuple[int, int] | None = None) -> Tensor:
        """(1, prefix + h·w, D) for a grid of ``grid`` patches (the built size when None)."""
        if grid is None or tuple(grid) == self.grid:
            return self.weight
        head, body = self.weight[:, : self.prefix], self.weight[0, self.prefix :]
        body = interpolate_grid(body, self.grid, tuple(grid)).unsqueeze(0)  # (1, h·w, D)
        return torch.cat([head, body], dim=1)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit norms (the timm/ViT initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
