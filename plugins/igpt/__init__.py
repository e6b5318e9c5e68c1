"""The iGPT family plugin: variants and the Hugging Face ImageGPT converter.

Variants:
    ``igpt``         iGPT on the embedded 8×8 digits: 64 grey tokens over a 16-level k-means
                     palette, width 128, depth 4; half the training images shifted by up to a
                     pixel (the default recipe, about 2–3 minutes on one CPU thread).
    ``igpt-shapes``  iGPT on the shapes scenes downsampled to 16×16 RGB (256 tokens, 16 colours;
                     a recipe whose quality has not been measured).

Real checkpoints (OpenAI's imagegpt-small …) come in through ``polymodal convert --from hf-imagegpt``.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .config import IGPTConfig
from .model import IGPT

__all__ = ["IGPT", "IGPTConfig", "VARIANTS"]

DIGITS = ModelSpec(
    IGPT,
    IGPTConfig(
        image_size=8,
        channels=1,
        palette_size=16,
        dim=128,
        depth=4,
        heads=4,
        augment_shift=1,
        augment_prob=0.5,
        data="digits",
        eval_samples=256,
    ),
    data="digits",
    train=TrainConfig(steps=800, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.05, checkpoint_every=0),
    doc="iGPT on the embedded 8×8 digits (16-grey palette, 64 tokens, width 128, depth 4).",
)

SHAPES = ModelSpec(
    IGPT,
    IGPTConfig(image_size=16, channels=3, palette_size=16, dim=128, depth=4, heads=4, data="shapes"),
    data="shapes",
    train=TrainConfig(steps=1500, batch_size=32, lr=1e-3, warmup_steps=100, weight_decay=0.05, checkpoint_every=0),
    doc="iGPT on the shapes scenes at 16×16 RGB (16-colour palette, 256 tokens, width 128, depth 4).",
)

VARIANTS = {"igpt": DIGITS, "igpt-shapes": SHAPES}


@hookimpl
def register_models(register):
    """The iGPT variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``hf-imagegpt``: a transformers ImageGPT folder (safetensors) to a polymodal model folder."""
    from .convert import convert_hf_imagegpt

    register("hf-imagegpt", convert_hf_imagegpt, doc="Hugging Face transformers ImageGPT folder → polymodal igpt")


@hookimpl
def register_exporters(register):
    """``hf-imagegpt``: an igpt model folder to a transformers ImageGPTForCausalImageModeling folder."""
    from .export import EXPORTER

    register("hf-imagegpt", EXPORTER, doc="polymodal igpt → Hugging Face transformers ImageGPT folder")
