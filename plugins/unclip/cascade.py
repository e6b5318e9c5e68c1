"""unCLIP's shapes cascade: :class:`~.model.UnCLIP` with a frozen SR3 upsampler (the diffusion family's ``sr3``)
after its decoder, decoder_size → image_size."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polymodal.models import PolymodalModel
from polymodal.models.parts import load_part

from . import condition as cond
from .config import UnCLIPConfig
from .model import UnCLIP


class UnCLIPCascade(UnCLIP):
    """:class:`UnCLIP` with a frozen super-resolution part (SR3) after the decoder: decoder_size → image_size."""

    family = "unclip-cascade"
    frozen: ClassVar[tuple[str, ...]] = ("clip", "upsampler")
    part_attributes: ClassVar[dict[str, str]] = {**UnCLIP.part_attributes, "upsampler": "upsampler"}

    def __init__(self, config: UnCLIPConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        if config.upsampler is None:
            raise ValueError("UnCLIPCascade needs UnCLIPConfig.upsampler (an sr3 part); got None (use `unclip`)")
        parts = dict(parts or {})
        if "upsampler" not in parts:
            parts["upsampler"] = load_part(config.upsampler, name="UnCLIPConfig.upsampler")
        up = parts["upsampler"]
        missing = [a for a in ("upscale",) if not callable(getattr(up, a, None))]
        missing += [a for a in ("low_size", "image_size", "channels") if not hasattr(up.config, a)]
        if missing:
            raise ValueError(f"UnCLIPConfig.upsampler must be a super-resolution model (sr3); it lacks {missing}")
        super().__init__(config, parts)

    def upscale(self, images: Tensor, *, generator: torch.Generator | None = None, **options: Any) -> Tensor:
        """The decoder's images (B, C, h, w) → SR3 (resized to its input first if it differs) → (B, C, S, S)."""
        up = self.upsampler.config
        low = cond.resize_to(cond.to_channels(images, up.channels), up.low_size)  # (B, C', low, low)
        high = self.upsampler.upscale(low, generator=generator, **options)  # (B, C', S', S')
        return cond.resize_to(cond.to_channels(high, self.config.channels), self.config.image_size)


__all__ = ["UnCLIPCascade"]
