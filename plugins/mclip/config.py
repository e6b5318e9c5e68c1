"""The M-CLIP composite's config: the frozen teacher CLIP, the student's trunk and tokenizer, the caption tables."""

from __future__ import annotations

from polymodal.config import config, field, in_range, one_of
from polymodal.models.parts import PartConfig, part_field
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import TextEncoderConfig


def _bidirectional(instance, attribute, value: TextEncoderConfig) -> None:
    """Validator: a non-causal text trunk (the student mean-pools every token, each seeing the whole text)."""
    if not isinstance(value, TextEncoderConfig) or value.causal:
        got = "causal=True" if isinstance(value, TextEncoderConfig) else repr(value)
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be a TextEncoderConfig with causal=False; got {got}"
        )


@config
class MCLIPConfig:
    """M-CLIP (Carlsson et al. 2022): a multilingual student text encoder matched to a frozen CLIP's text tower."""

    teacher: PartConfig = part_field(
        PartConfig(variant="clip-shapes", data="shapes"),
        "The frozen English CLIP whose text embeddings of the English captions the student learns to give for "
        "their translations, and whose image tower the zero-shot evaluation uses; its data is the English "
        "dataset of the multilingual one the model is trained on.",
    )
    text: TextEncoderConfig = field(
        TextEncoderConfig(
            vocab_size=512,
            context_length=64,
            depth=2,
            causal=False,
            positions="none",
            block=BlockConfig(dim=64, heads=4, norm_eps=1e-5, dropout=0.25, position_bias="t5"),
        ),
        "The student's transformer trunk: bidirectional (causal=False) with a padding mask, order from T5's "
        "relative bias only (no absolute positions: a word's features do not move with the words before it); its "
        "final hidden states are the token features and their mean over the real tokens feeds the linear head.",
        check=_bidirectional,
    )
    tables: str = field(
        "shapes",
        "Which caption tables train the tokenizer and make the training captions: 'shapes' or 'digits' (from "
        "the multilingual dataset the model is adapted to).",
        check=one_of("shapes", "digits"),
    )
    image_size: int = field(
        32,
        "Side of the data's images: where a shapes object's box sits names its grid cell in the captions.",
        check=in_range(1, 4096, integer=True),
    )
    data: str = field("", "Name of the multilingual dataset the config was adapted to.")
