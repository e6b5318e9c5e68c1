"""How a family feeds images: :class:`ImageSpec` (size, channels, normalisation) turns a user's picture, path,
array or tensor into the tensor the model takes (``PolymodalModel.preprocess``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

GREY_WEIGHTS = (0.299, 0.587, 0.114)
"""Pillow's ITU-R 601-2 luma weights for RGB → L, used for arrays and tensors too."""


@dataclass(frozen=True)
class ImageSpec:
    """How a family feeds images: square ``size`` × ``size``, ``channels`` (1 grey, 3 RGB), values in
    [0, 1] (every built-in family's datasets), then ``(x - mean) / std`` per channel when ``mean`` is
    given. :meth:`prepare` turns a user's image into that tensor."""

    size: int
    channels: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (for model cards and folder headers)."""
        return {
            "size": self.size,
            "channels": self.channels,
            "range": [0.0, 1.0],
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def prepare(self, image: Any) -> Tensor:
        """``image`` (see :meth:`PolymodalModel.preprocess`) as a (C, S, S) float32 tensor."""
        import numpy as np
        from PIL import Image

        from polymodal.data.augment import resize
        from polymodal.data.images import open_image

        if isinstance(image, (str, Path)):
            image = open_image(image)
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
            if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"preprocess: expected an array (H, W) or (H, W, C) with C = 1, 3 or 4; got {image.shape}"
                )
            image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
        if isinstance(image, Image.Image):
            img = image.convert("L" if self.channels == 1 else "RGB")
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy() / 255.0)
            x = x[None] if self.channels == 1 else x.permute(2, 0, 1)  # (C, S, S)
        else:
            x = self._from_array(image)  # (C, H, W) in [0, 1]
            x = resize(x[None], self.size)[0]  # (C, S, S)
        if self.mean:
            x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return x.contiguous()

    def _from_array(self, image: Any) -> Tensor:
        """A float numpy array or a tensor as (channels, H, W) float in [0, 1] (uint8 tensors scaled by 1/255)."""
        import numpy as np

        if isinstance(image, np.ndarray):
            if image.ndim == 3:  # (H, W, C), as Pillow and numpy lay images out
                image = np.moveaxis(image, -1, 0)
            image = torch.from_numpy(np.ascontiguousarray(image))
        if not isinstance(image, Tensor):
            raise ValueError(
                "preprocess: expected a PIL image, a path, a numpy array or a tensor; got " + type(image).__name__
            )
        x = image.detach().cpu()
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.numel() and not (0 <= x.min() and x.max() <= 1):  # NaN fails too
            raise ValueError(
                f"preprocess: a float image must hold values in [0, 1]; got {x.min().item():g} to {x.max().item():g} "
                "(divide 0–255 values by 255, or pass uint8)"
            )
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"preprocess: expected an image (H, W), (C, H, W) or (1, C, H, W) with C = 1, 3 or 4; got {tuple(image.shape)}"
            )
        x = x[:3]  # alpha dropped
        if x.shape[0] == self.channels:
            return x
        if self.channels == 3:
            return x.expand(3, -1, -1)
        return (torch.tensor(GREY_WEIGHTS)[:, None, None] * x).sum(0, keepdim=True)


__all__ = ["GREY_WEIGHTS", "ImageSpec"]
