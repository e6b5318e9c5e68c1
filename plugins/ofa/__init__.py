"""The OFA family plugin: one encoder–decoder for captioning, VQA, grounding, region questions, text-to-image,
infilling and a text task, each switched by its instruction, over a unified vocabulary (text BPE, the frozen
``vqvae-shapes`` codes, location bins).

Variants:
    ``ofa``  shapes (+ the ``text`` sentences): 32×32 scenes as 4×4 stem patches, 8×8 VQ codes, 33 location bins.

    polymodal train ofa --out runs/ofa
    polymodal ofa ask runs/ofa scene.png "what colour is the square?"
    polymodal ofa ask runs/ofa scene.png --ground "blue cross"
"""

from __future__ import annotations

from polymodal import hookimpl
from polymodal.models import ModelSpec
from polymodal.registry import register_variants
from polymodal.train import TrainConfig

from .model import OFA, OFAConfig

__all__ = ["OFA", "OFAConfig", "VARIANTS"]

SHAPES = ModelSpec(
    OFA,
    # The stem pre-trained for 2,000 steps on mirrored and shifted scenes (unmoved, it learns the 2,000 training
    # scenes), then 1,000 steps of captioning alone (the decoder learns to read the image) and 500 of text-to-image
    # alone (it learns to read the caption for codes; in the mixture from the start it learns neither), then 1,500
    # steps of the task mixture; width 192 and the text task's weight 1.0 keep the text task learnt beside the image
    # tasks (at 128 / 0.5 it fails on 2 of 3 seeds). The schedule starts again after the pre-stage (``restarts``),
    # which would otherwise begin at 0.65 of the peak rate. Numbers and ablations: README.
    OFAConfig(
        stem_pretrain_steps=2000,
        stem_augment_flip=True,
        stem_augment_shift=4,
        dim=192,
        heads=6,
        classify_weight=1.0,
        caption_first_steps=1000,
        first_stages=("text_to_image:500",),
    ),
    data="shapes",
    train=TrainConfig(
        steps=5000, batch_size=32, lr=5e-4, warmup_steps=100, restarts=(2000,), weight_decay=0.01, checkpoint_every=0
    ),
    doc="OFA on the shapes and the text sentences: width 192, 3+3 blocks, a pre-trained ResNet stem, captioning "
    "then text-to-image alone, then every task by instruction.",
)

VARIANTS = {"ofa": SHAPES}


@hookimpl
def register_models(register):
    """The OFA variant."""
    register_variants(register, VARIANTS)


@hookimpl
def register_commands(register):
    """``polymodal ofa ask DIR IMAGE INSTRUCTION | --ground TEXT``: any task by instruction."""
    from .cli import ask_command

    register("ask", ask_command)
