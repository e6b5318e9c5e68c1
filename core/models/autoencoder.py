"""What the latent image autoencoders (KL-VAE, MoVQ) share: the trunk's config fields and the model's shapes, checks
and data adaptation.

Both are laid out as diffusers' autoencoders (the core's :mod:`polymodal.nn.autoencoder`): images (B, C, S, S) in
[0, 1] are mapped to [-1, 1] and encoded to latents (B, L, S/f, S/f) with f = 2^(levels − 1). A latent diffusion
model (Kandinsky) reads either through the same two calls, ``encode_latents`` and ``decode_latents``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
import torch
from torch import Tensor

from polymodal.config import as_tuple, config, field, in_range
from polymodal.models.base import PolymodalModel
from polymodal.models.interfaces import LatentAutoencoder
from polymodal.nn.autoencoder import cpu_channels_last

_pos = in_range(1, 65536, integer=True)


@config
class AutoencoderTrunkConfig:
    """The image shape and the diffusers-style trunk of a latent autoencoder (the families' configs add the rest)."""

    image_size: int = field(8, "Side of the square input images, in pixels.", check=in_range(1, 4096, integer=True))
    channels: int = field(
        1, "Image channels (1 grey, 3 RGB): the encoder's input and the decoder's output.", check=_pos
    )
    block_channels: tuple[int, ...] = field(
        (32, 64),
        "Width of each resolution level (diffusers' block_out_channels); every level but the last halves the "
        "resolution, so the latent grid is image_size / 2^(levels − 1) per side.",
        converter=as_tuple,
    )
    layers_per_block: int = field(
        1, "Residual blocks per encoder level (each decoder level has one more).", check=in_range(1, 64, integer=True)
    )
    latent_channels: int = field(4, "Channels L of the latent (B, L, h, w).", check=_pos)
    norm_groups: int = field(8, "GroupNorm groups of the encoder's norms; must divide every level width.", check=_pos)
    mid_attention: bool = field(
        True, "Self-attention between the two middle residual blocks (diffusers' mid_block_add_attention)."
    )

    def __attrs_post_init__(self) -> None:
        name, widths = type(self).__name__, self.block_channels
        if not widths or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
            raise ValueError(f"{name}.block_channels must be positive integers, one per level; got {widths!r}")
        self.check_groups("norm_groups")
        factor = 1 << (len(widths) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"{name}.image_size must be divisible by 2^(levels − 1) = {factor} ({len(widths)} levels in "
                f"block_channels={widths}); got image_size={self.image_size}"
            )

    def check_groups(self, name: str) -> None:
        """ValueError unless the group count in field ``name`` divides every level width."""
        groups, widths = getattr(self, name), self.block_channels
        bad = [w for w in widths if w % groups]
        if bad:
            raise ValueError(
                f"{type(self).__name__}.block_channels must be multiples of {name}={groups}; got {bad} in {widths}"
            )

    @property
    def downsampling(self) -> int:
        """f: the image side over the latent side (2^(levels − 1))."""
        return 1 << (len(self.block_channels) - 1)


class ImageAutoencoder(PolymodalModel):
    """A latent image autoencoder over an :class:`AutoencoderTrunkConfig`: shapes, input checks naming expected vs
    given, the [0, 1] ⇄ [-1, 1] mapping, adaptation to a dataset and example inputs (the reconstruction folder of
    ``polymodal sample`` is :func:`polymodal.eval.reconstructions.write_reconstructions`). Subclasses build ``quant_conv`` (whose weight gives the device and dtype) and the networks."""

    image_fields = "config"  # image_size and channels: what preprocess() prepares
    implements = (LatentAutoencoder,)  # what a latent diffusion model (Kandinsky) takes as its autoencoder part

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(L, h, w) of the latent of one configured image."""
        side = self.config.image_size // self.config.downsampling
        return self.config.latent_channels, side, side

    def check_images(self, images: Any) -> None:
        """ValueError naming expected vs given unless ``images`` is a float (B, C, S, S) batch of the configured shape."""
        c, s = self.config.channels, self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images (B, {c}, {s}, {s}) in [0, 1]; got {got}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images in [0, 1]; got dtype {images.dtype}")

    def check_latents(self, latents: Any) -> None:
        """ValueError naming expected vs given unless ``latents`` is a float (B, L, h, w) batch of the configured shape."""
        shape = self.latent_shape
        if not isinstance(latents, Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != shape:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"expected latents (B, {', '.join(map(str, shape))}) = (B, L, h, w); got {got}")
        if not latents.is_floating_point():
            raise ValueError(f"expected floating-point latents; got dtype {latents.dtype}")

    def _param(self) -> Tensor:
        return self.quant_conv.weight

    def network_input(self, images: Tensor) -> Tensor:
        """Checked images (B, C, S, S) in [0, 1] → the encoder's input in [-1, 1] on the weights' device and dtype."""
        self.check_images(images)
        p = self._param()
        return cpu_channels_last(images.to(p.device, p.dtype) * 2.0 - 1.0)  # (B, C, S, S)

    @staticmethod
    def network_output(out: Tensor, clamp: bool) -> Tensor:
        """The decoder's output in [-1, 1] → images in [0, 1] (``clamp=False``: not clamped)."""
        out = (out.contiguous() + 1.0) * 0.5  # (B, C, S, S), about [0, 1]
        return out.clamp(0.0, 1.0) if clamp else out

    @classmethod
    def config_for_data(cls, config: Any, dataset: Any, fixed: Collection[str] = ()) -> Any:
        """Image size and channels from the dataset's meta (unless set explicitly); remembers the dataset's name."""
        meta = dataset.meta
        changes: dict[str, Any] = {"data": dataset.name}
        for key in ("image_size", "channels"):
            if key not in fixed and key in meta:
                changes[key] = meta[key]
        return attrs.evolve(config, **changes)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """A random image batch (B, C, S, S) in [0, 1]."""
        c, s = self.config.channels, self.config.image_size
        return (torch.rand(batch_size, c, s, s, generator=generator),)


__all__ = ["AutoencoderTrunkConfig", "ImageAutoencoder"]
