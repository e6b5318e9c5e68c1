"""The MoVQ family plugin: Kandinsky 2.1's image autoencoder, laid out like diffusers' ``VQModel(norm_type="spatial")``.

A VQ autoencoder whose decoder normalises with GroupNorm spatially conditioned on the latent it decodes; a
diffusion model works on its continuous latents (``encode``), which are decoded without quantising
(``decode(latents, quantize=False)``). Model in :mod:`.model` (encoder and decoder from the core's
:mod:`polymodal.nn.autoencoder`, the codebook from :mod:`polymodal.nn.quantize`), metrics in :mod:`.evaluate`, the
diffusers ``VQModel`` converter in :mod:`.convert`.

Variants:
    ``movq-shapes``  32×32 RGB shapes scenes → 8×8×4 latents (the KL-VAE's latent size), 1,024 codes.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import MoVQ, MoVQConfig

__all__ = ["MoVQ", "MoVQConfig", "VARIANTS"]

SHAPES = ModelSpec(
    MoVQ,
    MoVQConfig(
        image_size=32,
        channels=3,
        block_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_groups=8,
        decoder_norm_groups=8,
        codebook_size=1024,
        data="shapes",
    ),
    data="shapes",
    train=TrainConfig(
        steps=1500, batch_size=8, lr=2e-3, beta1=0.5, beta2=0.9, warmup_steps=30, weight_decay=0.0, checkpoint_every=0
    ),
    doc="MoVQ for the 32×32 shapes scenes: 8×8×4 latents, 1,024 EMA codes, spatially conditioned decoder norms.",
)

VARIANTS = {"movq-shapes": SHAPES}


@hookimpl
def register_models(register):
    """The MoVQ variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``diffusers-movq``: a diffusers VQModel(norm_type="spatial") folder to a movq model folder."""
    from .convert import convert_diffusers_movq

    register("diffusers-movq", convert_diffusers_movq, doc="diffusers VQModel (norm_type='spatial') folder → movq")
