"""The FROMAGe family plugin: a frozen LM and a frozen CLIP joined by a linear prefix and [RET] retrieval.

Variants:
    ``fromage``  on the digits: frozen ``lm`` (``--set lm=LM_DIR``, else the default LM trained
                 first) and frozen ``clip`` image tower (``--set vision=CLIP_DIR``, else the
                 default CLIP trained first); trains the adapter, the [RET] row and two heads.

Commands: ``polymodal fromage caption DIR IMAGE...`` and ``polymodal fromage retrieve DIR PROMPT``;
``polymodal sample DIR --prompt TEXT`` writes the retrieved images with a transcript.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import Fromage, FromageConfig

__all__ = ["Fromage", "FromageConfig", "VARIANTS"]

DIGITS = ModelSpec(
    Fromage,
    FromageConfig(),
    data="digits",
    # No global clipping: the InfoNCE gradient would throttle the adapter's (captions 0.66–0.95 over seeds with
    # grad_clip=1, 0.95 without).
    train=TrainConfig(
        steps=1200, batch_size=64, lr=1e-2, warmup_steps=30, weight_decay=0.0, grad_clip=0.0, checkpoint_every=0
    ),
    doc="FROMAGe on the digits: frozen LM + frozen CLIP image tower; linear prefix adapter, [RET] and retrieval heads.",
)

VARIANTS = {"fromage": DIGITS}


@hookimpl
def register_models(register):
    """The FROMAGe variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_commands(register):
    """``polymodal fromage caption DIR IMAGE...`` and ``polymodal fromage retrieve DIR PROMPT``."""
    from .commands import caption_command, retrieve_command

    register("fromage-caption", caption_command)
    register("fromage-retrieve", retrieve_command)
