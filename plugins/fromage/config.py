"""FROMAGe's config: where the frozen parts come from, the joints' sizes and the templates."""

from __future__ import annotations

from typing import Any

import attrs

from polymodal.config import config, field, in_range, one_of
from polymodal.data.digits import DIGIT_WORDS, HELDOUT_TEMPLATES
from polymodal.data.digits import TRAIN_TEMPLATES as DIGITS_TRAIN_TEMPLATES
from polymodal.models.parts import PartConfig, part_field

TRAIN_TEMPLATES = ("a {word}",)
"""Captioning templates: the digit right after the prefix and "a" (the small frozen LM's digit slot is
steered by a prefix only a token or two away; it never learnt to carry a digit across a sentence)."""

RETRIEVAL_TEMPLATES = DIGITS_TRAIN_TEMPLATES + ("This is a {word}.", "The answer is {word}.", "The number is {word}.")
"""Texts the [RET] query trains on: the digits' training caption templates ("a photo of the number
{word}" …) and three short sentences; :data:`EVAL_TEMPLATES` are never trained on."""

EVAL_TEMPLATES = HELDOUT_TEMPLATES
"""Held-out retrieval queries of `evaluate` (``retrieval_r1_heldout``): the digits' held-out caption templates."""


def fill_template(template: str, digit: int, noun: str = "things") -> str:
    """``template`` with the digit's ``{word}`` / ``{numeral}`` and ``noun`` (singular after "one")."""
    if digit == 1 and noun:
        noun = noun[:-2] if noun.endswith("xes") else noun[:-1]
    return template.format(word=DIGIT_WORDS[digit], numeral=str(digit), noun=noun)


def _not_empty(instance: Any, attribute: attrs.Attribute, value: tuple) -> None:
    if not value or any("{word}" not in t and "{numeral}" not in t for t in value):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be non-empty templates with {{word}} or "
            f"{{numeral}}; got {value!r}"
        )


@config
class FromageConfig:
    """FROMAGe: frozen LM + frozen CLIP image tower, a linear prefix adapter, [RET] and two retrieval heads."""

    lm: PartConfig = part_field(PartConfig(variant="lm"), "The frozen language model.")
    vision: PartConfig = part_field(
        PartConfig(variant="clip", data="digits"), "The CLIP whose image tower is frozen in; its data follows --data."
    )
    visual_feature: str = field(
        "cls",
        "Image feature fed to the adapter and image head: 'cls' the ViT [CLS] token "
        "after its final norm (FROMAGe's CLIP pooler output), 'embed' the CLIP "
        "projected embedding.",
        check=one_of("embed", "cls"),
    )
    prefix_tokens: int = field(
        8, "LM input tokens the adapter makes from one image (FROMAGe: 1).", check=in_range(1, 64, integer=True)
    )
    bos_first: bool = field(
        True,
        "Captioning order bos, image prefix, caption (the small LM always saw bos at "
        "position 0); False: FROMAGe's prefix, bos, caption.",
    )
    ret_layer: int = field(
        -1,
        "LM hidden state the [RET] query is read from: -1 the final output (FROMAGe); "
        "-2 every block's output at [RET], concatenated; i the input of block i.",
        check=in_range(-2, 1024, integer=True),
    )
    ret_init: str = field(
        "mean",
        "Initial [RET] row: 'mean' of the LM's token rows (transformers' mean_resizing "
        "of added tokens), 'random' normal at the rows' scale.",
        check=one_of("mean", "random"),
    )
    caption_ret: bool = field(
        False,
        "End captions with [RET] as their last target; False: with the LM's end-of-text, "
        "and [RET] is taught only by the text read alone (FROMAGe masks [RET] in "
        "captioning).",
    )
    shared_dim: int = field(64, "Width of the retrieval space of the two heads.", check=in_range(1, 4096, integer=True))
    retrieval_weight: float = field(
        1.0, "Weight of the InfoNCE loss beside the captioning loss (weight 1).", check=in_range(0.0, 100.0)
    )
    emission_weight: float = field(
        0.3,
        "Weight of the cross-entropy teaching the text read alone to end in [RET] "
        "(FROMAGe's retrieval-mode LM loss), so generation from a text prompt emits "
        "it; captions end in end-of-text and do not teach it.",
        check=in_range(0.0, 100.0),
    )
    distinct_negatives: bool = field(
        True,
        "Compute InfoNCE within groups of distinct digits (templated captions "
        "repeat: an image of the caption's own digit is never its negative); "
        "False: over the whole batch.",
    )
    init_temperature: float = field(
        0.07, "Initial InfoNCE temperature (learnable logit scale).", check=in_range(1e-3, 10.0)
    )
    retrieval_templates: tuple[str, ...] = field(
        RETRIEVAL_TEMPLATES,
        "Texts (ending in [RET]) the retrieval "
        "loss pairs with images, re-sampled per step ({word}, {numeral}, "
        "{noun}).",
        check=_not_empty,
    )
    templates: tuple[str, ...] = field(
        TRAIN_TEMPLATES,
        "Caption templates re-sampled per image and step "
        "({word}, {numeral}); the dataset's captions are used for data without labels.",
        check=_not_empty,
    )
    eval_templates: tuple[str, ...] = field(
        EVAL_TEMPLATES, "Held-out retrieval query templates of `evaluate`.", check=_not_empty
    )
    max_caption_tokens: int = field(12, "Tokens generated at most per caption.", check=in_range(1, 512, integer=True))
    data: str = field("digits", "Dataset the config was adapted to (`polymodal eval` default).")


__all__ = [
    "DIGITS_TRAIN_TEMPLATES",
    "EVAL_TEMPLATES",
    "FromageConfig",
    "RETRIEVAL_TEMPLATES",
    "TRAIN_TEMPLATES",
    "fill_template",
]
