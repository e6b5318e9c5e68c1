"""The Kandinsky family plugin: Kandinsky 2.0 (``kandinsky2``), multilingual latent diffusion composed from
registered frozen parts — the ``kl-vae-shapes`` KL-VAE, the ``mclip-shapes`` multilingual CLIP text tower and
the ``t5-multilingual`` span-corruption encoder — and a core UNet with classifier-free guidance and dynamic
thresholding (:mod:`.model`).

    polymodal train kandinsky2 --out runs/k2 --set vae=DIR --set text=DIR --set t5=DIR   # or 'auto' parts
    polymodal sample runs/k2 --prompt "красный круг" -n 16 --cfg 4 --steps 50 --sampler ddim [--no-threshold]
    polymodal eval runs/k2
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .config import Kandinsky2Config
from .model import Kandinsky2

__all__ = ["VARIANTS", "Kandinsky2", "Kandinsky2Config"]

KANDINSKY2 = ModelSpec(
    Kandinsky2,
    Kandinsky2Config(),
    data="shapes-multilingual",
    train=TrainConfig(
        steps=1000, batch_size=64, lr=2e-3, warmup_steps=100, weight_decay=0.0, checkpoint_every=0, ema_decay=0.995
    ),
    doc="Kandinsky 2.0 on the multilingual shapes: UNet 64/128 on 8×8×4 KL-VAE latents, conditioned on frozen "
    "mclip-shapes and t5-multilingual (pooled → timestep embedding, tokens → cross-attention); CFG 4, dynamic "
    "thresholding.",
)

VARIANTS = {"kandinsky2": KANDINSKY2}


@hookimpl
def register_models(register):
    """Kandinsky 2.0."""
    register_variants(register, VARIANTS)
