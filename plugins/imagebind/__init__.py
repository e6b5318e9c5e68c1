"""The ImageBind family plugin: variants, the modality encoders and the DTMF digits dataset.

Variants:
    ``imagebind``  frozen CLIP (``--set clip=CLIP_DIR``, else the default ``clip`` trained first)
                   plus audio (DTMF tones) and thermal encoders bound to images on the digits.

Registered parts: encoders ``imagebind-audio`` and ``imagebind-thermal`` (a plugin adds a
modality by registering ``imagebind-<name>``: an encoder with ``modality``, ``logit_scale``
and ``derive(batch, generator)``, built with ``dim``/``depth``/``heads`` overrides; see
:mod:`polymodal.plugins.imagebind.modalities`), and the dataset ``digits-audio`` (the
digits with a fixed DTMF clip per sample).
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .arithmetic import compose, retrieve
from .model import ImageBind, ImageBindConfig

__all__ = ["ImageBind", "ImageBindConfig", "VARIANTS", "compose", "retrieve"]

DIGITS = ModelSpec(
    ImageBind,
    ImageBindConfig(),
    data="digits",
    train=TrainConfig(steps=600, batch_size=128, lr=1e-3, warmup_steps=50, weight_decay=0.05, checkpoint_every=0),
    doc="ImageBind on the digits: frozen CLIP image/text, trained audio (DTMF) and thermal encoders.",
)

VARIANTS = {"imagebind": DIGITS}


@hookimpl
def register_models(register):
    """The ImageBind variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_encoders(register):
    """ImageBind's modality encoders (preprocessor + stem + ViT trunk): ``imagebind-audio``, ``imagebind-thermal``."""
    from .modalities import MODALITY_ENCODERS

    for name, cls in MODALITY_ENCODERS.items():
        register(f"imagebind-{name}", cls)


@hookimpl
def register_datasets(register):
    """``digits-audio``: the digits with a seeded DTMF clip of each sample's digit (field ``audio``)."""
    from polymodal.plugins.imagebind.audio import load_digits_audio

    register("digits-audio", load_digits_audio)
