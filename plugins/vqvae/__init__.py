"""The VQ-VAE family plugin: the library's image tokenizer (images ⇄ discrete code grids).

Variants:
    ``vqvae``         8×8 digits → 4×4 codes from a 64-code book (the default recipe).
    ``vqvae-shapes``  32×32 RGB shapes scenes → 8×8 codes from a 128-code book.

The class is also registered as the tokenizer ``vqvae``: a trained folder loaded with
``polymodal.load(DIR)`` gives ``encode(images) -> codes (B, h, w)``, ``decode(codes) -> images``,
``codebook_size`` and ``grid``.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import VQVAE, VQVAEConfig

__all__ = ["VQVAE", "VQVAEConfig", "VARIANTS"]

DIGITS = ModelSpec(
    VQVAE,
    VQVAEConfig(
        image_size=8,
        channels=1,
        stages=1,
        hidden=64,
        res_blocks=2,
        res_hidden=32,
        dim=32,
        codebook_size=64,
        data="digits",
    ),
    data="digits",
    train=TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup_steps=50, weight_decay=0.0, checkpoint_every=0),
    doc="VQ-VAE for the 8×8 digits: 4×4 codes from a 64-code EMA book.",
)

SHAPES = ModelSpec(
    VQVAE,
    VQVAEConfig(
        image_size=32,
        channels=3,
        stages=2,
        hidden=64,
        res_blocks=2,
        res_hidden=32,
        dim=32,
        codebook_size=128,
        data="shapes",
    ),
    data="shapes",
    train=TrainConfig(steps=1500, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.0, checkpoint_every=0),
    doc="VQ-VAE for the 32×32 shapes scenes: 8×8 codes from a 128-code EMA book.",
)

VARIANTS = {"vqvae": DIGITS, "vqvae-shapes": SHAPES}


@hookimpl
def register_models(register):
    """The VQ-VAE variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_tokenizers(register):
    """``vqvae``: images ⇄ code grids (load a trained folder with ``polymodal.load``)."""
    register(
        "vqvae",
        VQVAE,
        doc="VQ-VAE image tokenizer: images (B, C, H, W) ⇄ codes (B, h, w); "
        "train with `polymodal train vqvae` / `vqvae-shapes`.",
    )
