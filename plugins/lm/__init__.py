"""The language-model family plugin: a GPT-2 style decoder, its default recipe and the GPT-2 converter.

Variants:
    ``lm``   GPT-2 style decoder on the embedded ``text`` sentences (plus a share of the digits'
             training captions): byte-level BPE of 512 ids learnt from the embedded text, width 128,
             depth 4, 96 positions (the default recipe; the frozen LM of Flamingo and FROMAGe).

Real checkpoints (OpenAI's gpt2 …) come in through ``polymodal convert --from hf-gpt2 SRC DST``.
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .config import LMConfig
from .model import LMModel

__all__ = ["LMConfig", "LMModel", "VARIANTS"]

TEXT = ModelSpec(
    LMModel,
    LMConfig(),
    data="text",
    train=TrainConfig(steps=500, batch_size=64, lr=2e-3, warmup_steps=50, weight_decay=0.05, checkpoint_every=0),
    doc="GPT-2 style LM on the embedded sentences and digits captions (BPE 512, width 128, depth 4).",
)

VARIANTS = {"lm": TEXT}


@hookimpl
def register_models(register):
    """The language-model variants."""
    register_variants(register, VARIANTS)


@hookimpl
def register_converters(register):
    """``hf-gpt2``: a transformers GPT-2 folder (safetensors) to a polymodal ``lm`` folder."""
    from .convert import convert_hf_gpt2

    register("hf-gpt2", convert_hf_gpt2, doc="Hugging Face transformers GPT-2 folder → polymodal lm")


@hookimpl
def register_exporters(register):
    """``hf-gpt2``: an lm model folder to a transformers GPT2LMHeadModel folder."""
    from .export import EXPORTER

    register("hf-gpt2", EXPORTER, doc="polymodal lm → Hugging Face transformers GPT2LMHeadModel folder")
