"""Kandinsky 2.1's config: the frozen parts (MoVQ, multilingual CLIP text tower), the diffusion prior trained with
the UNet, the UNet on MoVQ latents with its image-and-text conditioning, condition dropout, the noise schedule and
the sampling defaults (decoder and prior guidance, dynamic thresholding)."""

from __future__ import annotations

from typing import Any

from polymodal.config import config, field, in_range
from polymodal.models.parts import PartConfig, part_field
from polymodal.nn import UNetConfig

from .config import UNET, LatentDiffusionSettings

_count = in_range(1, 65536, integer=True)


@config
class Kandinsky21Config(LatentDiffusionSettings):
    """Kandinsky 2.1: a diffusion prior maps the multilingual CLIP text embedding to a CLIP image embedding; a UNet
    denoises a frozen MoVQ's latents conditioned on that image embedding (10 context tokens beside the text tokens,
    and added to the timestep embedding with the pooled text: diffusers' ``text_image_proj`` / ``text_image``)."""

    vae: PartConfig = part_field(
        PartConfig(variant="movq-shapes", data="shapes"),
        "The frozen MoVQ: its continuous latents (unscaled, decoded without quantising) are what the UNet denoises.",
    )
    text: PartConfig = part_field(
        PartConfig(variant="mclip-shapes", data="shapes-multilingual"),
        "The frozen multilingual CLIP text tower (pooled embedding, token features); its frozen teacher CLIP's "
        "image tower gives the CLIP image embeddings the prior predicts and the UNet is conditioned on.",
    )
    unet: UNetConfig = field(
        UNET, "The latent UNet: in/out channels and sample_size must be the MoVQ's latent channels and side."
    )
    latent_scaling: bool = field(
        True,
        "Divide the MoVQ's latents by their std over the training latents (fitted once when training starts, LDM's "
        "scaling factor), so the UNet denoises unit-variance latents; False diffuses them as they are (Kandinsky "
        "2.1's MoVQ latents are near unit scale).",
    )
    image_tokens: int = field(
        10, "Context tokens the CLIP image embedding is projected to (diffusers' num_image_text_embeds).", check=_count
    )
    prior_width: int = field(128, "Width of the diffusion prior's transformer (a fresh unclip-prior).", check=_count)
    prior_depth: int = field(2, "Blocks of the prior's transformer.", check=in_range(1, 1024, integer=True))
    prior_heads: int = field(4, "Attention heads of the prior; must divide prior_width.", check=_count)
    prior_dropout: float = field(
        0.1, "Training: share of samples whose text the prior sees dropped (its guidance).", check=in_range(0.0, 1.0)
    )
    prior_steps: int = field(64, "Default prior sampling steps (DDPM, x0 clipped as unCLIP's).", check=_count)
    prior_guidance_scale: float = field(
        2.0, "Default prior classifier-free guidance scale (1: none).", check=in_range(0.0, 100.0)
    )
    prior_candidates: int = field(
        2, "Prior samples per prompt; the one closest to the text embedding is kept.", check=_count
    )
    text_dropout: float = field(
        0.5,
        "Training: share of samples whose text is dropped while the image embedding stays (what variations and "
        "mixing decode: an image embedding with no text).",
        check=in_range(0.0, 1.0),
    )
    image_dropout: float = field(
        0.1,
        "Training: share of samples whose image embedding is zeroed and text dropped: the null condition "
        "classifier-free guidance contrasts against.",
        check=in_range(0.0, 1.0),
    )

    def __attrs_post_init__(self) -> None:
        self.check_unet("image and text tokens are")
        checks: tuple[tuple[bool, str, Any], ...] = (
            (self.prior_width % self.prior_heads != 0, f"prior_heads must divide prior_width={self.prior_width}",
             self.prior_heads),
            (self.text_dropout + self.image_dropout > 1, "text_dropout + image_dropout must be ≤ 1",
             self.text_dropout + self.image_dropout),
        )  # fmt: skip
        for bad, what, got in checks:
            if bad:
                raise ValueError(f"Kandinsky21Config.{what}; got {got}")
