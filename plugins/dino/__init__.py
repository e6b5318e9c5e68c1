"""The DINO family plugin: self-distillation with no labels (Caron et al., 2021).

Variants:
    ``dino``         a small ViT on the embedded 8×8 digits (patch 2; 4×4 local crops); scored by weighted
                     k-NN and a linear probe on frozen teacher features.
    ``dino-shapes``  a small ViT on the embedded 32×32 shapes scenes (patch 4; 16×16 local crops); also scores
                     the [CLS] attention of the last layer against the true object masks.

``polymodal dino attention-maps DIR IMAGE... --out OUT`` writes the last layer's [CLS] attention per head.
The objective, head, EMA and collapse monitor live in :mod:`polymodal.plugins.dino.distill`.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.plugins.dino.distill import DINOHeadConfig, DINOLossConfig
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .config import DINOConfig
from .model import DINOModel

__all__ = ["DINOConfig", "DINOModel", "VARIANTS"]

DIGITS_STEPS = 1200
SHAPES_STEPS = 500

# BatchNorm in the head: without it these small ViTs give every image nearly the same [CLS] feature at
# initialisation (cosine ≈ 0.98), the centred teacher is then almost uniform and training collapses to it.
_BLOCK = BlockConfig(dim=64, heads=4, mlp_ratio=2.0)
_HEAD = DINOHeadConfig(hidden_dim=256, bottleneck_dim=64, out_dim=256, batchnorm=True)
_LOSS = DINOLossConfig(student_temp=0.1, teacher_temp=0.05, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=100)

DIGITS = ModelSpec(
    DINOModel,
    DINOConfig(
        encoder=ViTEncoderConfig(image_size=8, patch_size=2, channels=1, depth=4, block=_BLOCK),
        head=_HEAD,
        loss=_LOSS,
        local_size=4,
        local_crops=4,
        global_scale=(0.6, 1.0),
        local_scale=(0.25, 0.5),
        flip=0.0,
        jitter=0.2,
        momentum=0.96,
    ),
    data="digits",
    train=TrainConfig(
        steps=DIGITS_STEPS, batch_size=64, lr=2e-3, warmup_steps=50, weight_decay=0.04, checkpoint_every=0
    ),
    doc="DINO on the embedded 8×8 digits (ViT patch 2, width 64, depth 4; 2 global + 4 local crops; no labels).",
)

SHAPES = ModelSpec(
    DINOModel,
    DINOConfig(
        encoder=ViTEncoderConfig(image_size=32, patch_size=4, channels=3, depth=3, block=_BLOCK),
        head=_HEAD,
        loss=_LOSS,
        local_size=16,
        local_crops=4,
        global_scale=(0.4, 1.0),
        local_scale=(0.1, 0.4),
        flip=0.5,
        jitter=0.2,
        momentum=0.96,
        # Per-size head statistics: many local crops of a scene are empty background, and mixing them into
        # the global views' BatchNorm statistics halved the attention-mask IoU (0.52 → 0.19 at seed 0).
        shared_head_batch=False,
    ),
    data="shapes",
    train=TrainConfig(
        steps=SHAPES_STEPS, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.04, checkpoint_every=0
    ),
    doc="DINO on the embedded 32×32 shapes scenes (ViT patch 4, width 64, depth 3); [CLS] attention vs object masks.",
)

VARIANTS = {"dino": DIGITS, "dino-shapes": SHAPES}


@hookimpl
def register_models(register):
    """The DINO variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_objectives(register):
    """DINO's self-distillation loss: centred, sharpened teacher against the student's views."""
    from .distill import DINOLoss

    register("self-distillation", DINOLoss)


@hookimpl
def register_commands(register):
    """``polymodal dino attention-maps DIR IMAGE... --out OUT``: the last layer's [CLS] attention per head."""
    from .attention_maps import attention_maps_command

    register("attention-maps", attention_maps_command)
