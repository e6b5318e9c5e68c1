"""The MAE family plugin: masked autoencoders on square images (He et al., 2021), ViTMAE in and out.

Variants (the core :class:`~polymodal.nn.mae.MAE`: fixed sin-cos positions, 75% of the patches hidden):
    ``vit-mae``         the embedded 8×8 grey digits, patch 2 (a 4×4 grid), encoder width 64, depth 4;
                        a two-block width-64 decoder; raw pixel targets.
    ``vit-mae-shapes``  the embedded 32×32 RGB shapes scenes, patch 4 (an 8×8 grid), the same widths.

``polymodal eval DIR`` reports the masked-patch loss on the test split next to a predict-the-mean
baseline and a linear probe on the encoder's pooled features; ``polymodal sample DIR`` writes image /
mask / reconstruction triples. ``hf-vitmae`` converts a transformers ``ViTMAEForPreTraining`` folder
(``polymodal.load("hf:facebook/vit-mae-base")``) and exports one back (``polymodal export DIR OUT --to hf``).
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.nn.mae import MAEConfig
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import MAEModel, MAEModelConfig

__all__ = ["MAEModel", "MAEModelConfig", "VARIANTS"]


def _mae(image_size: int, patch_size: int, channels: int) -> MAEConfig:
    encoder = ViTEncoderConfig(
        image_size=image_size,
        patch_size=patch_size,
        channels=channels,
        depth=4,
        pos_embed="sincos",
        block=BlockConfig(dim=64, heads=4, mlp_ratio=2.0),
    )
    return MAEConfig(
        encoder=encoder,
        decoder_dim=64,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_ratio=2.0,
        mask_ratio=0.75,
        norm_pix_loss=False,
    )


DIGITS = ModelSpec(
    MAEModel,
    MAEModelConfig(mae=_mae(8, 2, 1), data="digits"),
    data="digits",
    train=TrainConfig(steps=1000, batch_size=128, lr=3e-3, warmup_steps=100, weight_decay=0.05),
    doc="MAE on the embedded 8×8 digits: patch 2 (4×4 grid), 75% hidden, encoder width 64 depth 4, decoder depth 2.",
)

SHAPES = ModelSpec(
    MAEModel,
    MAEModelConfig(mae=_mae(32, 4, 3), data="shapes"),
    data="shapes",
    train=TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup_steps=100, weight_decay=0.05),
    doc="MAE on the embedded 32×32 RGB shapes: patch 4 (8×8 grid), 75% hidden, encoder width 64 depth 4.",
)

VARIANTS = {"vit-mae": DIGITS, "vit-mae-shapes": SHAPES}


@hookimpl
def register_models(register):
    """The MAE variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``hf-vitmae``: a transformers ViTMAEForPreTraining folder to an mae model folder."""
    from .convert import convert_hf_vitmae

    register("hf-vitmae", convert_hf_vitmae, doc="Hugging Face transformers ViTMAE folder → polymodal mae")


@hookimpl
def register_exporters(register):
    """``hf-vitmae``: an mae model folder to a transformers ViTMAEForPreTraining folder."""
    from .export import EXPORTER

    register("hf-vitmae", EXPORTER, doc="polymodal mae → Hugging Face transformers ViTMAEForPreTraining folder")
