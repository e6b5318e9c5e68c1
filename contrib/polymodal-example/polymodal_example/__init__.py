"""The tutorial plugin: a mean-pool image classifier built from the core's registered ViT trunk.

Nothing here is new machinery. The trunk comes from the registry
(``polymodal.registry.get("encoder", "vit")``), the config is a frozen attrs class made
with the core's ``config``/``field`` helpers, the model follows the
:class:`polymodal.models.PolymodalModel` contract, and one ``@hookimpl`` registers its
:class:`polymodal.models.ModelSpec` variants (``register_variants``) so that
``polymodal train example-meanpool`` works.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal import hookimpl
from polymodal.config import config, field, in_range
from polymodal.data.augment import resize
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.nn import BlockConfig, eval_mode
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.registry import register_variants
from polymodal.train import TrainConfig


@config
class MeanPoolConfig:
    """A ViT trunk without a [CLS] token, mean-pooled, normalised, then a linear head."""

    trunk: str = field("vit", "Registered encoder to use as the trunk (kind 'encoder').")
    encoder: ViTEncoderConfig = field(
        ViTEncoderConfig(depth=2, cls_token=False, block=BlockConfig(dim=64, heads=4, mlp_ratio=2.0)),
        "The trunk's config (patch size, width, depth …).",
    )
    num_classes: int = field(10, "Output classes.", check=in_range(1, 1 << 20, integer=True))


class MeanPoolClassifier(PolymodalModel):
    """Images (B, C, H, W) → logits (B, num_classes) from the mean of the trunk's tokens."""

    family = "example-meanpool"
    config_class = MeanPoolConfig

    def __init__(self, config: MeanPoolConfig) -> None:
        super().__init__(config)
        import polymodal  # the registry loads plugins lazily; ask it at build time, not import time

        self.encoder = polymodal.registry.get("encoder", config.trunk)(config.encoder)
        self.norm = nn.LayerNorm(config.encoder.dim)
        self.head = nn.Linear(config.encoder.dim, config.num_classes)

    @classmethod
    def config_for_data(cls, config: MeanPoolConfig, dataset: Any) -> MeanPoolConfig:
        """Match the dataset's channels and number of classes."""
        encoder = attrs.evolve(config.encoder, channels=dataset.meta.get("channels", config.encoder.channels))
        return attrs.evolve(config, encoder=encoder, num_classes=dataset.meta.get("num_classes", config.num_classes))

    @classmethod
    def tiny_config(cls, config: MeanPoolConfig) -> MeanPoolConfig:
        """A very small variant for the contract tests (``polymodal.testing.tiny``)."""
        return attrs.evolve(config, encoder=attrs.evolve(config.encoder.with_block(dim=16, heads=2), depth=1))

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes)."""
        tokens = self.encoder(resize(images, self.config.encoder.image_size))  # (B, N, D)
        return self.head(self.norm(tokens.mean(dim=1)))  # (B, K)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy against ``batch['label']``."""
        logits = self(batch["image"])  # (B, K)
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean().item()
        return F.cross_entropy(logits, batch["label"]), {"accuracy": accuracy}

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Top-1 ``accuracy`` on a split."""
        data = dataset.split(split)
        with eval_mode(self):
            logits = self(data["image"].to(next(self.parameters()).device))  # (N, K)
        return {"accuracy": (logits.argmax(-1).cpu() == data["label"]).float().mean().item(), "samples": len(data)}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """A random image batch of the trunk's size."""
        return self.encoder.example_inputs(batch_size, generator)


RECIPE = TrainConfig(steps=300, batch_size=64, lr=2e-3, warmup_steps=20)
VARIANTS = {"example-meanpool": ModelSpec(MeanPoolClassifier, MeanPoolConfig(), data="digits", train=RECIPE)}


@hookimpl
def register_models(register):
    """``example-meanpool``: the tutorial model, on the embedded digits."""
    register_variants(register, VARIANTS)
