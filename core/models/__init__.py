"""The model contract: :class:`PolymodalModel`, the :class:`ModelSpec` registry entry with its
:class:`TrainConfig` recipe, and the typed interfaces parts meet through."""

from polymodal.models.base import ModelSpec, PolymodalModel
from polymodal.models.recipe import TrainConfig

__all__ = ["ModelSpec", "PolymodalModel", "TrainConfig"]
