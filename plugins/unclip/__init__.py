"""The unCLIP family plugin (DALL·E 2): a diffusion prior over CLIP embeddings, a CLIP-conditioned diffusion
decoder, and for the shapes a super-resolution stage, composed from registered parts.

Variants:
    ``unclip``          digits: the ``clip`` CLIP (frozen), prior and decoder (8×8) trained together.
    ``unclip-shapes``   shapes (``unclip-cascade``): the ``clip-shapes`` CLIP, decoder at 16×16, the diffusion
                        family's ``sr3`` (frozen) to 32×32.
    ``unclip-prior``    the prior part (:mod:`.prior`); ``unclip-decoder`` the decoder part (:mod:`.decoder`):
                        trained inside the composites, each saved in its own sub-folder.

    polymodal train unclip --out runs/unclip                      # --set clip=DIR reuses a trained CLIP
    polymodal sample runs/unclip --prompt "the digit 3" -n 16 --out s
    polymodal sample runs/unclip --variations digit.png -n 8
    polymodal sample runs/unclip --interpolate a.png b.png --steps 8
    polymodal train unclip-shapes --out runs/unclip-shapes
    polymodal sample runs/unclip-shapes --prompt "a red circle" -n 16 --cfg 3 --prior-cfg 4 --sampler ddim
    polymodal eval runs/unclip
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.models.parts import PartConfig
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .cascade import UnCLIPCascade
from .config import UnCLIPConfig
from .decoder import VARIANTS as DECODER_VARIANTS
from .model import UnCLIP
from .prior import VARIANTS as PRIOR_VARIANTS

__all__ = ["VARIANTS", "UnCLIP", "UnCLIPCascade", "UnCLIPConfig"]

DIGITS = ModelSpec(
    UnCLIP,
    UnCLIPConfig(prior_width=64, prior_depth=2, decoder_channels=(16, 32), guidance_scale=1.5),
    data="digits",
    train=TrainConfig(
        steps=1000, batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.0, checkpoint_every=0, ema_decay=0.995
    ),
    doc="unCLIP on the digits: frozen clip → diffusion prior (width 64, depth 2) → decoder (UNet 16/32) at 8×8, "
    "trained together; EMA 0.995; decoder guidance 1.5.",
)

SHAPES = ModelSpec(
    UnCLIPCascade,
    UnCLIPConfig(
        clip=PartConfig(variant="clip-shapes", data="shapes"),
        upsampler=PartConfig(variant="sr3", data="shapes"),
        image_size=32,
        channels=3,
        decoder_size=16,
        prior_width=64,
        prior_depth=2,
        decoder_channels=(32, 64),
        decoder_loss_weighting="min_snr",
        eval_per_class=4,
        eval_variations=0,
        eval_ablation=False,  # the paper's ablation is the digits' bar; here it would double the sampling
    ),
    data="shapes",
    # Optimizer steps, not samples, carry the 16×16 decoder's shapes (1,500 × 64 judged kind 0.63, 3,000 × 32
    # 0.91); Min-SNR-5 weighting gets there in 2,000 (kind 0.84; 1,000 steps: 0.51 with it, 0.32 without).
    train=TrainConfig(
        steps=2000, batch_size=32, lr=3e-3, warmup_steps=100, weight_decay=0.0, checkpoint_every=0, ema_decay=0.995
    ),
    doc="unCLIP on the shapes: frozen clip-shapes → prior → decoder (UNet 32/64, Min-SNR-5) at 16×16 → frozen sr3 "
    "to 32×32.",
)

VARIANTS = {"unclip": DIGITS, "unclip-shapes": SHAPES, **PRIOR_VARIANTS, **DECODER_VARIANTS}


@hookimpl
def register_models(register):
    """The unCLIP composites and their prior and decoder parts."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``diffusers-prior``: a diffusers PriorTransformer folder to an unclip-prior model folder."""
    from .convert_prior import convert_diffusers_prior

    register("diffusers-prior", convert_diffusers_prior, doc="diffusers PriorTransformer folder → unclip-prior")
