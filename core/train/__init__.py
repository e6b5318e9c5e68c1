"""The one trainer every family uses, its recipe and the weight averages it keeps."""

from polymodal.models.recipe import TrainConfig
from polymodal.train.distributed import DistributedContext, init_from_env
from polymodal.train.ema import cosine_momentum, ema_update_
from polymodal.train.trainer import CHECKPOINT, TrainingError, batches, lr_at, param_groups, train

__all__ = [
    "CHECKPOINT",
    "DistributedContext",
    "TrainConfig",
    "TrainingError",
    "batches",
    "cosine_momentum",
    "ema_update_",
    "init_from_env",
    "lr_at",
    "param_groups",
    "train",
]
