"""The KL-VAE family plugin: a KL-regularised autoencoder laid out like diffusers' ``AutoencoderKL``.

The first stage of a latent diffusion model (LDM, Kandinsky 2): images ⇄ a diagonal-Gaussian latent with 4
channels, and the latent ``scaling_factor`` the diffusion model multiplies it by. Model in :mod:`.model` (encoder and
decoder from the core's :mod:`polymodal.nn.autoencoder`, the posterior in :mod:`.nets`, metrics in :mod:`.evaluate`); the diffusers ``AutoencoderKL`` converter in :mod:`.convert`.

Variants:
    ``kl-vae``         8×8 digits → 4×4×4 latents.
    ``kl-vae-shapes``  32×32 RGB shapes scenes → 8×8×4 latents.

Both recipes train on the MSE (the quality bar's measure; an L1 loss on the mostly black shapes scenes settles on
the black median first and learns far slower) plus 1e-6 × KL, with Adam betas (0.5, 0.9) as LDM trains its
autoencoders, and small batches: on one CPU thread more, smaller steps reach a lower error in the same time.
"""

from __future__ import annotations

import attrs

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import KLVAE, KLVAEConfig

__all__ = ["KLVAE", "KLVAEConfig", "VARIANTS"]

TRAIN = TrainConfig(lr=2e-3, beta1=0.5, beta2=0.9, warmup_steps=30, weight_decay=0.0, checkpoint_every=0)
"""Both recipes' optimiser: Adam betas (0.5, 0.9) as LDM's autoencoders, no weight decay."""

DIGITS = ModelSpec(
    KLVAE,
    KLVAEConfig(image_size=8, channels=1, block_channels=(32, 64), layers_per_block=1, norm_groups=8, data="digits"),
    data="digits",
    train=attrs.evolve(TRAIN, steps=500, batch_size=16),
    doc="KL-VAE for the 8×8 digits: 4×4×4 latents (MSE + 1e-6 × KL).",
)

SHAPES = ModelSpec(
    KLVAE,
    KLVAEConfig(
        image_size=32, channels=3, block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8, data="shapes"
    ),
    data="shapes",
    train=attrs.evolve(TRAIN, steps=1500, batch_size=8),
    doc="KL-VAE for the 32×32 shapes scenes: 8×8×4 latents (MSE + 1e-6 × KL).",
)

VARIANTS = {"kl-vae": DIGITS, "kl-vae-shapes": SHAPES}


@hookimpl
def register_models(register):
    """The KL-VAE variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``diffusers-vae``: a diffusers AutoencoderKL folder to a klvae model folder."""
    from .convert import convert_diffusers_vae

    register("diffusers-vae", convert_diffusers_vae, doc="diffusers AutoencoderKL folder → polymodal klvae")
