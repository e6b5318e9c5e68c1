"""The diffusion family plugin: DDPM / DDIM on the embedded data, guidance, SR3, inpainting.

Variants are declared in :mod:`.variants` (``ddpm``, ``ddpm-cfg`` for classifier-free guidance,
``ddpm-classifier``, the noisy classifier of classifier guidance; models in :mod:`.model`,
:mod:`.classifier`) and
:mod:`.sr3` (super-resolution); the diffusers ``UNet2DModel`` converter is in :mod:`.convert`.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.registry import register_variants

from .sr3 import VARIANTS as SR3_VARIANTS
from .variants import VARIANTS as DDPM_VARIANTS

VARIANTS = {**DDPM_VARIANTS, **SR3_VARIANTS}

__all__ = ["VARIANTS"]


@hookimpl
def register_models(register):
    """The diffusion variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``diffusers-unet``: a diffusers UNet2DModel folder to a diffusion model folder."""
    from .convert import convert_diffusers_unet

    register("diffusers-unet", convert_diffusers_unet, doc="diffusers UNet2DModel folder → polymodal diffusion")
