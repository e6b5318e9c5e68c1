"""The RuDolph family plugin: ``[left text][image][right text]`` in one causal decoder.

Variants:
    ``rudolph``  digits: 4×4 codes from the frozen default VQ-VAE (``--set tokenizer=VQ_DIR``, else
                 the default ``vqvae`` trained first), BPE captions, width 128, depth 4, MLP ratio 2;
                 30% text→image / 70% image→text rows, pixel noise 0.1 on the image→text rows.

Tasks: text→image (``polymodal sample DIR --prompt "the digit seven"``, ``--candidates C`` for
self-reranking), captioning (``model.caption(images)``), zero-shot classification by the lowest
right-text perplexity (``model.zero_shot(images, class_captions)``); ``polymodal eval`` reports
``caption_accuracy``, ``zero_shot_accuracy``, ``sample_accuracy`` and ``fd_judge``.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .config import RudolphConfig
from .model import RuDolph

__all__ = ["RuDolph", "RudolphConfig", "VARIANTS"]

DIGITS = ModelSpec(
    RuDolph,
    RudolphConfig(dim=128, depth=4, heads=4, mlp_ratio=2.0, t2i_fraction=0.3, augment_noise=0.1),
    data="digits",
    train=TrainConfig(steps=800, batch_size=64, lr=2e-3, warmup_steps=50, weight_decay=0.05, checkpoint_every=0),
    doc="RuDolph on the digits: [left text][4×4 VQ codes][right text], width 128, depth 4 (row, column, conv, conv).",
)

VARIANTS = {"rudolph": DIGITS}


@hookimpl
def register_models(register):
    """The RuDolph variants."""
    register_variants(register, VARIANTS)
