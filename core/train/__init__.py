"""The one trainer every family uses, its recipe and the weight averages it keeps."""

from polymodal.models.recipe import TrainConfig
from polymodal.train.ema import cosine_momentum, ema_update_
from polymodal.train.trainer import CHECKPOINT, TrainingError, batches, lr_at, param_groups, train

__all__ = [
    "CHECKPOINT",
    "TrainConfig",
    "TrainingError",
    "batches",
    "cosine_momentum",
    "ema_update_",
    "lr_at",
    "param_groups",
    "train",
]
