"""The PIXEL family: masked autoencoding on rendered text, fine-tuned, compared with a byte-level classifier.

Variants (default data: the embedded ``text``):
    ``pixel-mae``  pre-training: sentences rendered into 1×24 strips of 12×12 grey patches, span
                   masking, the core MAE (encoder width 64, depth 4; a one-block decoder).
    ``pixel``      fine-tuning from a ``pixel-mae`` (``--set mae=FOLDER``; 'auto' trains one), next to a
                   same-size byte-level baseline; ``polymodal eval DIR --json`` reports both
                   classifiers' clean and perturbed ("s3ven", "eiqht") accuracy and the MAE's
                   masked-patch loss against a predict-the-mean baseline.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import PixelConfig, PixelModel
from .pretrain import PixelMAEConfig, PixelMAEModel

__all__ = ["PixelConfig", "PixelMAEConfig", "PixelMAEModel", "PixelModel", "VARIANTS"]

PIXEL_MAE = ModelSpec(
    PixelMAEModel,
    PixelMAEConfig(),
    data="text",
    train=TrainConfig(steps=2000, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.05),
    doc="PIXEL pre-training: span-masked MAE on sentences rendered into 1×24 strips of 12×12 patches.",
)

PIXEL = ModelSpec(
    PixelModel,
    PixelConfig(),
    data="text",
    train=TrainConfig(steps=800, batch_size=64, lr=2e-3, warmup_steps=50, weight_decay=0.05),
    doc="PIXEL fine-tuned to name the digit word, with a same-size byte-level baseline trained alongside.",
)

VARIANTS = {"pixel-mae": PIXEL_MAE, "pixel": PIXEL}


@hookimpl
def register_models(register):
    """The PIXEL variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_exporters(register):
    """``hf-vitmae-pixel``: refuses a pixel-mae folder by name (transformers' ViTMAE has square patch grids
    only; ``hf-vitmae`` is the ``mae`` family's, for square images)."""
    from .export import EXPORTER

    register(
        "hf-vitmae-pixel", EXPORTER, doc="polymodal pixel-mae → transformers ViTMAE: refused, naming the strip grid"
    )
