"""The t5 family plugin: a T5 v1.1 / mT5-style encoder–decoder pre-trained on span corruption.

The mT5-small role of Kandinsky 2.0 in miniature: an encoder with T5's relative position bias (a core attention
option, :mod:`polymodal.nn.relative`) learnt by span corruption over the multilingual captions, whose frozen
pooled and token features condition a diffusion model (:meth:`T5Model.encode_text_and_tokens`). Model in
:mod:`.model`, the corruption and its collator in :mod:`.corruption`, the tokenizer in :mod:`.tokenizer`, metrics
in :mod:`.evaluate`, the transformers converter in :mod:`.convert`.

Variants:
    ``t5-multilingual``         shapes captions in en/ru/fr/zh (``shapes-multilingual``).
    ``t5-multilingual-digits``  digits captions in en/ru/fr/zh (``digits-multilingual``).

Real checkpoints (T5, T5 v1.1, mT5 whose ``num_heads * d_kv == d_model``) come in through
``polymodal convert --from transformers-t5 SRC DST``.
"""

from __future__ import annotations

import attrs

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .config import T5Config
from .model import T5Model

__all__ = ["VARIANTS", "T5Config", "T5Model"]

TRAIN = TrainConfig(steps=300, batch_size=64, lr=3e-3, warmup_steps=50, weight_decay=0.01, checkpoint_every=0)
"""Both recipes' optimiser (AdamW in place of T5's Adafactor; a short warm-up and cosine decay)."""

SHAPES = ModelSpec(
    T5Model,
    T5Config(data="shapes-multilingual"),
    data="shapes-multilingual",
    train=TRAIN,
    doc="T5 v1.1-style encoder–decoder pre-trained on span corruption of the en/ru/fr/zh shapes captions.",
)

DIGITS = ModelSpec(
    T5Model,
    T5Config(data="digits-multilingual", depth=2, decoder_depth=1, dim=96, heads=4),
    data="digits-multilingual",
    train=attrs.evolve(TRAIN, steps=200),
    doc="T5 v1.1-style encoder–decoder pre-trained on span corruption of the en/ru/fr/zh digits captions.",
)

VARIANTS = {"t5-multilingual": SHAPES, "t5-multilingual-digits": DIGITS}


@hookimpl
def register_models(register):
    """The t5 variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``transformers-t5`` / ``transformers-mt5``: a transformers T5 / mT5 folder (safetensors) to a ``t5`` folder."""
    from .convert import convert_transformers_mt5, convert_transformers_t5

    register("transformers-t5", convert_transformers_t5, doc="transformers T5 / T5 v1.1 / mT5 folder → polymodal t5")
    register("transformers-mt5", convert_transformers_mt5, doc="transformers mT5 folder → polymodal t5")
