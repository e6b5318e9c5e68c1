"""Transformers ViTMAE → the core :class:`~polymodal.nn.mae.MAE`, for PIXEL's use.

The ViTMAE conversion belongs to the ``mae`` family (the ``hf-vitmae`` converter: a square-image
``mae`` model folder, :mod:`polymodal.plugins.mae.convert`). A family never imports another, so
these functions reach it through the registry: :func:`convert_hf_vitmae` returns the converted
model's core MAE (a part, e.g. to start PIXEL's encoder from), and the key maps are the converter's
``hf_config`` / ``hf_state``. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polymodal.nn.mae import MAE, MAEConfig
from polymodal.registry import get_registry


def _vitmae() -> Any:
    """The registered ``hf-vitmae`` converter (the ``mae`` family's)."""
    return get_registry().get("converter", "hf-vitmae")


def mae_config_from_hf(hf: dict, source: str = "hf-vitmae") -> MAEConfig:
    """Translate a transformers ``ViTMAEConfig`` dict (as in ``config.json``) into the core :class:`MAEConfig`."""
    return _vitmae().hf_config(hf, source)


def mae_state_from_hf(src: dict[str, torch.Tensor], depth: int, decoder_depth: int) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a ``ViTMAEForPreTraining`` state dict into the core :class:`MAE`'s names."""
    return _vitmae().hf_state(src, depth, decoder_depth)


def convert_hf_vitmae(src: str | Path) -> MAE:
    """Load a transformers ``ViTMAEForPreTraining`` folder (``config.json`` + ``model.safetensors``) as a core MAE."""
    return _vitmae()(src).mae
