"""The OFA recipe's configuration: the image tokenizer part, the unified vocabulary, the encoder–decoder's shape
and the task mixture."""

from __future__ import annotations

from typing import Any

from polymodal.config import as_tuple, config, field, in_range
from polymodal.models.parts import PartConfig, part_field

_pos = in_range(1, 65536, integer=True)
_weight = in_range(0.0, 1000.0)

TASKS = ("caption", "vqa", "ground", "region", "text_to_image", "infill", "classify")
"""The tasks of the mixture, in the order of their ``*_weight`` fields."""


def parse_stage(stage: str) -> tuple[tuple[str, ...], int]:
    """``'caption+vqa:500'`` → ``(("caption", "vqa"), 500)``: a stage of those tasks alone for that many steps, or a
    ValueError naming what was expected."""
    tasks, _, steps = stage.partition(":") if isinstance(stage, str) else ("", "", "")
    names = tuple(tasks.split("+"))
    if not steps.isdigit() or int(steps) < 1 or not tasks or set(names) - set(TASKS):
        raise ValueError(f"a stage is 'TASK+TASK:STEPS' (steps ≥ 1) with tasks from {', '.join(TASKS)}; got {stage!r}")
    return names, int(steps)


def _check_stages(_instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: every entry of ``value`` is a stage (:func:`parse_stage`)."""
    if not isinstance(value, tuple):
        raise ValueError(f"OFAConfig.{attribute.name} must be a list of 'TASK+TASK:STEPS'; got {value!r}")
    for stage in value:
        parse_stage(stage)


@config
class OFAConfig:
    """OFA: one encoder–decoder over [image patches][instruction] → text, image codes or location tokens."""

    tokenizer: PartConfig = part_field(
        PartConfig(variant="vqvae-shapes", data="shapes"),
        "The frozen VQ image tokenizer whose codes are the image tokens of the vocabulary (text-to-image, infilling).",
    )
    text_vocab: int = field(
        512, "Text ids of the unified vocabulary (the BPE learns at most this many).", check=in_range(259, 1 << 20)
    )
    bins: int = field(
        33,
        "Location tokens <bin_0> … <bin_{bins-1}>: box corners quantised to bins evenly spaced values over [0, size].",
        check=in_range(2, 4096, integer=True),
    )
    image_size: int = field(32, "Side of the square RGB input images.", check=in_range(8, 4096, integer=True))
    stem_channels: int = field(48, "Channels of the convolutional stem's ResNet blocks.", check=_pos)
    patch_stride: int = field(
        8,
        "Down-sampling of the stem (a power of two): the image enters the encoder as (size / stride)² patches.",
        check=in_range(1, 64, integer=True),
    )
    dim: int = field(128, "Width of the encoder and decoder token streams (and the shared embedding).", check=_pos)
    heads: int = field(4, "Attention heads; must divide dim.", check=in_range(1, 256, integer=True))
    encoder_depth: int = field(3, "Encoder blocks.", check=in_range(1, 256, integer=True))
    decoder_depth: int = field(3, "Decoder blocks (self-attention, cross-attention, MLP).", check=in_range(1, 256))
    mlp_ratio: float = field(4.0, "MLP hidden width as a multiple of dim.", check=in_range(0.25, 16.0))
    dropout: float = field(0.0, "Dropout on the residual branches.", check=in_range(0.0, 1.0))
    normformer: bool = field(
        True,
        "NormFormer's extra norms in every block (OFA's): per-head scales, post-attention "
        "and MLP mid norms (core BlockConfig.normformer).",
    )
    max_instruction: int = field(
        64, "Longest instruction in tokens (location tokens included) the encoder takes.", check=_pos
    )
    max_target: int = field(80, "Longest target in tokens (eos included) the decoder writes.", check=_pos)
    relative_buckets: int = field(32, "Buckets of the text tokens' 1-D relative position bias.", check=_pos)
    relative_max_distance: int = field(64, "Text offsets beyond this share the last bucket.", check=_pos)
    caption_weight: float = field(1.0, "Sampling weight of captioning batches.", check=_weight)
    vqa_weight: float = field(1.0, "Sampling weight of visual question answering batches.", check=_weight)
    ground_weight: float = field(1.0, "Sampling weight of visual grounding batches.", check=_weight)
    region_weight: float = field(0.5, "Sampling weight of region question batches.", check=_weight)
    text_to_image_weight: float = field(1.0, "Sampling weight of text-to-image batches.", check=_weight)
    infill_weight: float = field(0.5, "Sampling weight of image infilling batches.", check=_weight)
    classify_weight: float = field(0.5, "Sampling weight of the text-only digit-word batches.", check=_weight)
    stem_pretrain_steps: int = field(
        0,
        "Steps that first train the ResNet stem alone as a multi-label classifier of the objects a scene holds "
        "(colour × kind, max-pooled over the patches, a linear head): OFA's ImageNet-pretrained ResNet in "
        "miniature; the task mixture trains the rest of the recipe's steps. 0: no pre-stage.",
        check=in_range(0, 10**7, integer=True),
    )
    stem_augment_flip: bool = field(
        False,
        "Pre-stage: mirror half its scenes left↔right with their boxes (every kind is symmetric about a vertical "
        "axis; without moves the stem learns the 2,000 training scenes rather than the objects).",
        backfill=True,
    )
    stem_augment_shift: int = field(
        0,
        "Pre-stage: shift each scene and its boxes by up to this many pixels in x and y (zero fill; 0: off).",
        check=in_range(0, 64, integer=True),
        backfill=True,
    )
    caption_first_steps: int = field(
        0,
        "Steps after the stem pre-stage that train captioning alone before every task joins: the one task whose "
        "loss falls only by reading the whole image teaches the decoder to look, and the mixture keeps it (from the "
        "start the mixture's decoder learns its tasks' language and ignores the image). 0: the mixture at once.",
        check=in_range(0, 10**7, integer=True),
        backfill=True,
    )
    first_stages: tuple[str, ...] = field(
        (),
        "Stages after the captioning-first steps and before the mixture, in order, each 'TASK+TASK:STEPS': those "
        "tasks alone (rows shared by their weights) for that many steps. As with captioning, a task that must learn "
        "to read its source — text-to-image the caption — learns it alone and the mixture keeps it; in the mixture "
        "from the start its decoder writes codes without reading the caption.",
        check=_check_stages,
        converter=as_tuple,
        backfill=True,
    )
    augment_flip: bool = field(
        False,
        "Task mixture: mirror half its scenes left↔right with their boxes; captions and questions are made again "
        "from the moved boxes (a training template drawn per scene), as DALL·E re-samples its captions.",
        backfill=True,
    )
    augment_shift: int = field(
        0,
        "Task mixture: shift each scene and its boxes by up to this many pixels in x and y (zero fill; 0: off); "
        "captions and questions are made again from the moved boxes.",
        check=in_range(0, 64, integer=True),
        backfill=True,
    )
    mixed_batches: bool = field(
        True,
        "Every batch holds every task, its rows shared out by the weights (OFA's); False: one task per batch, drawn "
        "by the step with the weights.",
    )
    beams: int = field(3, "Beam size of captioning, VQA and grounding.", check=in_range(1, 64, integer=True))
    eval_limit: int = field(
        200, "Test scenes (and sentences) scored per task (0: the whole split).", check=in_range(0, 10**6)
    )
    image_temperature: float = field(1.0, "Sampling temperature of image codes.", check=in_range(0.01, 10.0))
    image_top_k: int = field(16, "Top-k of image code sampling (0: off).", check=in_range(0, 1 << 20, integer=True))
    data: str = field("shapes", "The image dataset of the vision tasks.")
    text_data: str = field("text", "The dataset of the text-only task (sentences naming a digit word).")

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"OFAConfig.heads must divide dim; got dim={self.dim}, heads={self.heads}")
        if self.patch_stride & (self.patch_stride - 1) or self.image_size % self.patch_stride:
            raise ValueError(
                f"OFAConfig.patch_stride must be a power of two dividing image_size={self.image_size}; "
                f"got {self.patch_stride}"
            )
        if sum(self.weights()) <= 0:
            raise ValueError("OFAConfig: at least one task weight must be > 0; got all 0")

    def stages(self) -> list[tuple[tuple[str, ...], int]]:
        """The task stages between the stem pre-stage and the mixture, in order: ``caption_first_steps`` of captioning
        (when > 0), then :attr:`first_stages`."""
        first = [(("caption",), self.caption_first_steps)] if self.caption_first_steps else []
        return first + [parse_stage(s) for s in self.first_stages]

    @property
    def mixture_start(self) -> int:
        """The first step of the task mixture: after the pre-stage and every :meth:`stages` step."""
        return self.stem_pretrain_steps + sum(steps for _, steps in self.stages())

    def weights(self) -> tuple[float, ...]:
        """The task sampling weights in :data:`TASKS` order."""
        return tuple(getattr(self, f"{t}_weight") for t in TASKS)

    @property
    def grid(self) -> int:
        """Patches per side of the encoder's image grid."""
        return self.image_size // self.patch_stride


__all__ = ["OFAConfig", "TASKS", "parse_stage"]
