"""The M-CLIP family plugin: a multilingual CLIP text tower (Carlsson et al. 2022), Kandinsky 2.x's text encoder.

Variants:
    ``mclip-shapes``  shapes-multilingual: a student text encoder (bidirectional, width 64, depth 2, relative positions, dropout 0.25, byte-level
                      BPE over the en/ru/fr/zh captions) matched to the frozen ``clip-shapes`` CLIP's text
                      embeddings of the English captions (default recipe).
    ``mclip``         digits-multilingual: the same student matched to the frozen ``clip`` CLIP.

    polymodal train mclip-shapes --out runs/mclip-shapes      # --set teacher=DIR reuses a trained clip-shapes
    polymodal eval runs/mclip-shapes                          # per language: cosine, MSE, zero-shot vs the teacher
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.models.parts import PartConfig
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .config import MCLIPConfig
from .model import MCLIP

__all__ = ["MCLIP", "VARIANTS", "MCLIPConfig"]

SHAPES = ModelSpec(
    MCLIP,
    MCLIPConfig(),
    data="shapes-multilingual",
    # Width 64, depth 2, dropout 0.25, T5's relative bias in place of absolute positions, a 512-id BPE, 300 steps
    # at 3e-3 (~70 s of one thread): zero-shot colour on the unseen phrasings 0.79-0.84 per language (600 steps at
    # 2e-3: 0.78-0.94 in twice the time). Absolute positions at depth 1 with 1,024 ids: 0.55-0.70 (0.71-0.83 once
    # the BPE isolates CJK ideographs); every size fits the training phrasings at cosine >= 0.99 -- what carries to
    # unseen ones is dropout, relative positions and sub-word pieces shared across word forms (ru 'красный' /
    # 'красного').
    train=TrainConfig(steps=300, batch_size=256, lr=3e-3, warmup_steps=50, weight_decay=0.01, checkpoint_every=0),
    doc="M-CLIP on the shapes: a multilingual student (width 64, depth 2, relative positions, mean-pooled, linear head) matched by "
    "MSE to the frozen clip-shapes' text embeddings of the English captions.",
)

DIGITS = ModelSpec(
    MCLIP,
    MCLIPConfig(teacher=PartConfig(variant="clip", data="digits"), tables="digits", image_size=8),
    data="digits-multilingual",
    train=TrainConfig(steps=600, batch_size=256, lr=2e-3, warmup_steps=50, weight_decay=0.01, checkpoint_every=0),
    doc="M-CLIP on the digits: the multilingual student matched to the frozen clip's text embeddings.",
)

VARIANTS = {"mclip-shapes": SHAPES, "mclip": DIGITS}


@hookimpl
def register_models(register):
    """The M-CLIP variants."""
    register_variants(register, VARIANTS)
