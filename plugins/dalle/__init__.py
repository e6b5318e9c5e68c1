"""The DALL·E family plugin: text-to-image generation over a frozen VQ-VAE image tokenizer.

Variants:
    ``dalle``         digits: 8×8 images as 4×4 codes of the ``vqvae`` tokenizer (``--set tokenizer=VQ_DIR``,
                      else the default ``vqvae`` trained first).
    ``dalle-shapes``  shapes: 32×32 scenes as 8×8 codes of the ``vqvae-shapes`` tokenizer.

    polymodal train dalle --set tokenizer=runs/vqvae --out runs/dalle
    polymodal sample runs/dalle --prompt "the digit 3" -n 16 --seed 0 --cfg 3 --out samples/
    polymodal sample runs/dalle --prompt "the digit 3" -n 4 --rerank runs/clip --candidates 8
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.models.parts import PartConfig
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import DALLE, DALLEConfig

__all__ = ["DALLE", "DALLEConfig", "VARIANTS"]

DIGITS = ModelSpec(
    DALLE,
    DALLEConfig(text_vocab=384, text_length=10, dim=64, depth=4, heads=4, dropout=0.1, cfg_scale=3.0),
    data="digits",
    train=TrainConfig(steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.05, checkpoint_every=0),
    doc="DALL·E on the digits: 10 text tokens then 4×4 VQ-VAE codes, width 64, depth 4, dropout 0.1; guidance 3.",
)

SHAPES = ModelSpec(
    DALLE,
    DALLEConfig(
        tokenizer=PartConfig(variant="vqvae-shapes", data="shapes"),
        text_vocab=384,
        text_length=20,
        dim=64,
        depth=4,
        heads=4,
        mlp_ratio=2.0,
        augment_flip=True,
        cfg_scale=2.0,
        temperature=0.5,
        eval_per_class=6,
    ),
    data="shapes",
    train=TrainConfig(steps=2000, batch_size=32, lr=3e-3, warmup_steps=100, weight_decay=0.05, checkpoint_every=0),
    doc="DALL·E on the shapes: 20 text tokens then 8×8 VQ-VAE codes, width 64, depth 4; mirrored scenes; guidance 2.",
)

VARIANTS = {"dalle": DIGITS, "dalle-shapes": SHAPES}


@hookimpl
def register_models(register):
    """The DALL·E variants."""
    register_variants(register, VARIANTS)
