"""DDPM variants on the embedded digits: unconditional, label-conditioned with condition dropout
(classifier-free guidance), and the noisy classifier of classifier guidance.

    polymodal train ddpm && polymodal sample runs/ddpm -n 64 --out s
    polymodal train ddpm-cfg && polymodal sample runs/ddpm-cfg --label 3 --guidance-scale 3
    polymodal train ddpm-classifier && polymodal sample runs/ddpm --classifier runs/ddpm-classifier --label 7 --guidance-scale 2
"""

from __future__ import annotations

import attrs

from polymodal.models import ModelSpec
from polymodal.nn import UNetConfig
from polymodal.train import TrainConfig

from .classifier import NoisyClassifier
from .config import ClassifierConfig, DiffusionConfig
from .model import DiffusionModel

UNET = UNetConfig(channels=(16, 32), attention_levels=(False, True), layers_per_block=1, attention_head_dim=16)
"""The digits UNet: widths 16/32, 8×8 → 4×4 (attention at 4×4 and in the middle), one block per level."""

TRAIN = TrainConfig(
    steps=2000, batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.0, checkpoint_every=0, ema_decay=0.995
)

DDPM = ModelSpec(
    DiffusionModel,
    DiffusionConfig(unet=UNET),
    data="digits",
    train=TRAIN,
    doc="DDPM on the digits: UNet 16/32 (attention at 4×4), linear T = 1000, ε-prediction, EMA 0.995.",
)

DDPM_CFG = ModelSpec(
    DiffusionModel,
    DiffusionConfig(unet=attrs.evolve(UNET, num_classes=11), condition="label", cond_dropout=0.1, guidance_scale=2.0),
    data="digits",
    train=TRAIN,
    doc="DDPM on the digits conditioned on the label, 10 % condition dropout (null label); guidance w = 2.",
)

CLASSIFIER = ModelSpec(
    NoisyClassifier,
    ClassifierConfig(),
    data="digits",
    train=TrainConfig(steps=600, batch_size=128, lr=2e-3, warmup_steps=50, weight_decay=0.0, checkpoint_every=0),
    doc="Noisy time-conditioned digit classifier on x_t (linear T = 1000), for ADM classifier guidance of ddpm.",
)

VARIANTS = {"ddpm": DDPM, "ddpm-cfg": DDPM_CFG, "ddpm-classifier": CLASSIFIER}
