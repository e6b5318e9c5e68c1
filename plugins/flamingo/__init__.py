"""The Flamingo family plugin: a frozen LM and a frozen CLIP vision tower joined by a Perceiver
Resampler and gated cross-attention, trained on interleaved digit image–caption sequences.

Variants:
    ``flamingo``  frozen ``lm`` (``--set lm=LM_DIR``, else the default LM trained first) and frozen
                  digits ``clip`` (``--set vision=CLIP_DIR``, else the default CLIP trained first).

Command: ``polymodal flamingo caption DIR IMAGE... [--shots K]`` prints an interleaved few-shot transcript.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import Flamingo, FlamingoConfig

__all__ = ["Flamingo", "FlamingoConfig", "VARIANTS"]

DIGITS = ModelSpec(
    Flamingo,
    FlamingoConfig(),
    data="digits",
    train=TrainConfig(steps=500, batch_size=64, lr=3e-3, warmup_steps=30, weight_decay=0.01, checkpoint_every=0),
    doc="Flamingo on the digits: frozen LM + frozen CLIP, trained resampler and gated cross-attention (few-shot).",
)

VARIANTS = {"flamingo": DIGITS}


@hookimpl
def register_models(register):
    """The Flamingo variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_commands(register):
    """``polymodal flamingo caption DIR IMAGE... [--shots K]``: few-shot captions as an interleaved transcript."""
    from .generate import caption_command

    register("caption", caption_command)
