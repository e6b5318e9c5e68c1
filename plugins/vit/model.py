"""ViT (Dosovitskiy et al., 2020): patches, a [CLS] token, learned positions, a pre-norm encoder, a linear head."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import config, field, in_range, one_of
from polymodal.data.augment import random_translate, resize
from polymodal.models import PolymodalModel
from polymodal.nn import eval_mode
from polymodal.nn.encoders import ViTEncoder, ViTEncoderConfig
from polymodal.nn.grid import fit_encoder


@config
class ViTConfig:
    """A ViT image classifier."""

    encoder: ViTEncoderConfig = field(ViTEncoderConfig(), "The transformer trunk (patch size, width, depth …).")
    num_classes: int = field(
        10, "Output classes (0: no head, forward returns pooled features).", check=in_range(0, 1 << 20, integer=True)
    )
    pool: str = field(
        "cls", "Pooling for the head: the [CLS] token or the mean of patch tokens.", check=one_of("cls", "mean")
    )
    head_dropout: float = field(0.0, "Dropout before the classification head.", check=in_range(0.0, 1.0))
    label_smoothing: float = field(0.0, "Label smoothing of the training cross-entropy.", check=in_range(0.0, 1.0))
    augment_shift: int = field(
        0, "Training augmentation: random translation by up to this many pixels.", check=in_range(0, 64, integer=True)
    )

    def __attrs_post_init__(self) -> None:
        if self.pool == "cls" and not self.encoder.cls_token:
            raise ValueError("ViTConfig.pool='cls' needs encoder.cls_token=True")


class ViTClassifier(PolymodalModel):
    """Images (B, C, H, W) float → logits (B, num_classes)."""

    family = "vit"
    progress_metrics = ("accuracy",)
    image_fields = "config.encoder"  # image_size and channels: what preprocess() prepares
    config_class = ViTConfig

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.encoder = ViTEncoder(config.encoder)
        self.head_drop = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(config.encoder.dim, config.num_classes) if config.num_classes else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @classmethod
    def config_for_data(cls, config: ViTConfig, dataset: Any, fixed: Collection[str] = ()) -> ViTConfig:
        """Match the dataset's channels, classes and image size (the patch grid keeps about the variant's
        patches per side, printed); with ``encoder.image_size`` in ``fixed`` images are resized to it."""
        meta = dataset.meta
        encoder, line = fit_encoder(config.encoder, meta, family="vit", fixed=fixed)
        if line:
            print(line)
        encoder = attrs.evolve(encoder, channels=meta.get("channels", config.encoder.channels))
        return attrs.evolve(config, encoder=encoder, num_classes=meta.get("num_classes", config.num_classes))

    @classmethod
    def tiny_config(cls, config: ViTConfig) -> ViTConfig:
        """The same architecture at toy size, for the contract tests (``polymodal.testing.contracts.tiny``)."""
        e = config.encoder
        encoder = attrs.evolve(e.with_block(dim=16, heads=2), depth=1, image_size=min(e.image_size, 2 * e.patch_size))
        return attrs.evolve(config, encoder=encoder, num_classes=min(config.num_classes, 10))

    def features(self, images: Tensor) -> Tensor:
        """Pooled features (B, dim)."""
        tokens = self.encoder(images)  # (B, 1 + N, D)
        if self.config.pool == "cls":
            return tokens[:, 0]  # (B, D)
        return tokens[:, self.encoder.prefix :].mean(dim=1)  # (B, D)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits, or pooled features without a head."""
        pooled = self.features(images)  # (B, D)
        return self.head(self.head_drop(pooled)) if self.head is not None else pooled

    def _prepare(self, images: Tensor) -> Tensor:
        return resize(images, self.config.encoder.image_size)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Cross-entropy of the logits against ``batch['label']`` (with shift augmentation)."""
        images = self._prepare(batch["image"])  # (B, C, S, S)
        if self.training and self.config.augment_shift:
            images = random_translate(images, self.config.augment_shift)
        logits = self(images)  # (B, K)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.config.label_smoothing)
        return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).float().mean()}  # 0-dim: no host sync

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
        """Top-1 ``accuracy`` and mean cross-entropy ``loss`` on a split."""
        with eval_mode(self):
            data = dataset.split(split)
            device = next(self.parameters()).device
            correct, total, loss_sum = 0, 0, 0.0
            for start in range(0, len(data), batch_size):
                batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
                logits = self(self._prepare(batch["image"].to(device)))  # (b, K)
                labels = batch["label"].to(device)
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
                total += len(labels)
        return {"accuracy": correct / total, "loss": loss_sum / total, "samples": total}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """A random image batch of the configured size."""
        return self.encoder.example_inputs(batch_size, generator)

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        e = self.config.encoder
        return [
            f"ViT: {e.image_size}×{e.image_size} input, patch {e.patch_size}, width {e.dim}, depth {e.depth}, "
            f"{e.block.heads} heads, {self.config.num_classes} classes.",
            "",
        ]
