"""DINO's config: the ViT student/teacher, the projection head, the self-distillation loss and the multi-crop recipe."""

from __future__ import annotations

from typing import Any

import attrs

from polymodal.config import config, field, in_range, one_of
from polymodal.nn.encoders import ViTEncoderConfig

from .distill import DINOHeadConfig, DINOLossConfig


def _check_scale(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: a crop-scale range (lo, hi) with 0 < lo <= hi <= 1."""
    if not (isinstance(value, tuple) and len(value) == 2 and 0 < value[0] <= value[1] <= 1):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be (lo, hi) with 0 < lo <= hi <= 1; got {value!r}"
        )


@config
class DINOConfig:
    """A DINO student/teacher pair and its multi-crop recipe."""

    encoder: ViTEncoderConfig = field(ViTEncoderConfig(), "The ViT backbone shared by student and teacher.")
    head: DINOHeadConfig = field(
        DINOHeadConfig(hidden_dim=256, bottleneck_dim=64, out_dim=1024), "The projection head."
    )
    loss: DINOLossConfig = field(DINOLossConfig(), "Temperatures and centring of the DINO loss.")
    local_size: int = field(
        4, "Side of the local crops in pixels (a multiple of the patch size).", check=in_range(1, 8192, integer=True)
    )
    local_crops: int = field(
        4, "Local views per image (seen by the student only).", check=in_range(0, 64, integer=True)
    )
    global_scale: tuple[float, float] = field(
        (0.4, 1.0), "Area fraction of the global crops (lo, hi).", check=_check_scale
    )
    local_scale: tuple[float, float] = field(
        (0.1, 0.4), "Area fraction of the local crops (lo, hi).", check=_check_scale
    )
    flip: float = field(
        0.0,
        "Probability of a left-right flip per view (0 for digits: mirrored digits are other shapes).",
        check=in_range(0.0, 1.0),
    )
    shared_head_batch: bool = field(
        True,
        "Run the head once over the features of every view (DINO; BatchNorm "
        "statistics over global and local views together) or once per crop size.",
    )
    jitter: float = field(0.2, "Brightness jitter strength per view.", check=in_range(0.0, 1.0))
    momentum: float = field(0.99, "Teacher EMA momentum at step 0 (rises to 1 on a cosine).", check=in_range(0.0, 1.0))
    momentum_steps: int = field(
        0,
        "Length of the cosine momentum schedule in steps; 0: the training run's total "
        "steps (as the trainer reports them, so `--steps N` stretches the schedule).",
        check=in_range(0, 10**9, integer=True),
    )
    collapse_min_kl: float = field(
        0.01,
        "Training stops when the teacher's KL to the centre stays below this (0: never).",
        check=in_range(0.0, 100.0),
    )
    collapse_patience: int = field(
        50, "Consecutive steps below collapse_min_kl that count as collapse.", check=in_range(1, 10**9, integer=True)
    )
    collapse_start: int = field(100, "Steps before the collapse check starts.", check=in_range(0, 10**9, integer=True))
    features: str = field(
        "cls",
        "Frozen features for k-NN and the probe: the [CLS] token or [CLS] ⊕ mean patch token.",
        check=one_of("cls", "cls+mean"),
    )
    knn_k: int = field(20, "Neighbours of the weighted k-NN classifier.", check=in_range(1, 10**6, integer=True))
    knn_temperature: float = field(
        0.07, "Temperature of the k-NN vote weights exp(cos / T).", check=in_range(1e-4, 10.0)
    )
    iou_mass: float = field(
        0.6,
        "Attention masks keep the pixels holding this fraction of the [CLS] attention mass.",
        check=in_range(0.01, 1.0),
    )
    data: str = field("", "Name of the dataset the config was adapted to.")

    def __attrs_post_init__(self) -> None:
        e = self.encoder
        if not e.cls_token:
            raise ValueError("DINOConfig.encoder.cls_token must be True (DINO pools the [CLS] token)")
        if self.local_size % e.patch_size or self.local_size > e.image_size:
            raise ValueError(
                f"DINOConfig.local_size must be a multiple of the patch size {e.patch_size} and at most "
                f"image_size {e.image_size}; got {self.local_size}"
            )


__all__ = ["DINOConfig"]
