"""The DALL·E config: tokenizer part, stream sizes, transformer, attention schedule, loss, sampling defaults."""

from __future__ import annotations

from typing import Any

import attrs

from polymodal.attention.masks import IMAGE_PATTERNS, pattern_schedule
from polymodal.config import config, field, in_range, one_of
from polymodal.models.parts import PartConfig, part_field


def _patterns(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: a non-empty tuple of image attention patterns."""
    if not isinstance(value, tuple) or not value or any(p not in IMAGE_PATTERNS for p in value):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be a non-empty tuple of "
            f"{', '.join(IMAGE_PATTERNS)}; got {value!r}"
        )


@config
class DALLEConfig:
    """A DALL·E text-to-image transformer over a frozen image tokenizer."""

    tokenizer: PartConfig = part_field(
        PartConfig(variant="vqvae", data="digits"), "The frozen image tokenizer (a VQ-VAE); its data follows --data."
    )
    text_vocab: int = field(
        384,
        "Text ids (BPE vocabulary, specials included); the BPE learns at most this many.",
        check=in_range(259, 1 << 20, integer=True),
    )
    text_length: int = field(
        10,
        "Text positions L (bos, caption, eos, then one unique pad per position).",
        check=in_range(3, 4096, integer=True),
    )
    dim: int = field(64, "Width of the token stream.", check=in_range(8, 8192, integer=True))
    depth: int = field(4, "Transformer blocks.", check=in_range(1, 256, integer=True))
    heads: int = field(4, "Attention heads; must divide dim.", check=in_range(1, 256, integer=True))
    mlp_ratio: float = field(4.0, "MLP width as a multiple of dim.", check=in_range(0.25, 16.0))
    dropout: float = field(0.0, "Dropout after attention and MLP projections.", check=in_range(0.0, 1.0))
    attention: tuple[str, ...] = field(
        ("full",),
        "Image-to-image attention pattern per layer, the cycle repeated over "
        "the depth: 'full', 'row', 'column' or 'conv' (DALL·E: row, column, row, row).",
        check=_patterns,
    )
    attention_last: str = field(
        "", "Pattern of the last layer ('' keeps the cycle; DALL·E: 'conv').", check=one_of("", *IMAGE_PATTERNS)
    )
    conv_kernel: int = field(
        3, "Odd window size of the 'conv' pattern, in image tokens.", check=in_range(1, 63, integer=True)
    )
    text_loss_weight: float = field(
        0.125, "Weight of the text loss; the image loss gets 1 − it (DALL·E: 1/8, 7/8).", check=in_range(0.0, 1.0)
    )
    caption_dropout: float = field(
        0.15,
        "Training: share of captions replaced by the empty (all-pad) text, so "
        "classifier-free guidance has an unconditional model.",
        check=in_range(0.0, 1.0),
    )
    augment_flip: bool = field(
        False,
        "Training: mirror half the scenes left↔right with their boxes (data with boxes "
        "only: the shapes; captions are re-sampled from the moved boxes).",
    )
    augment_shift: int = field(
        0,
        "Training: shift scenes with boxes by up to this many pixels (zero fill).",
        check=in_range(0, 64, integer=True),
    )
    temperature: float = field(1.0, "Default sampling temperature.", check=in_range(1e-4, 100.0))
    top_k: int | None = field(None, "Default top-k cut for sampling (None: off).")
    top_p: float | None = field(None, "Default nucleus mass for sampling (None: off).")
    cfg_scale: float | None = field(None, "Default classifier-free guidance scale (None: off; 1 equals off).")
    eval_per_class: int = field(
        10,
        "Samples per prompt class in `evaluate` (digits: per digit; shapes: per colour×kind).",
        check=in_range(1, 10000, integer=True),
    )
    data: str = field("", "Name of the dataset the config was adapted to.")
    templates: tuple[str, ...] = field((), "Training caption templates (from the dataset); the BPE learns from them.")
    class_names: tuple[str, ...] = field((), "Class names that fill the templates.")
    image_size: int = field(
        0,
        "Native image size of the data (samples are written at it); 0: the tokenizer's.",
        check=in_range(0, 4096, integer=True),
    )

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"DALLEConfig.heads must divide dim; got dim={self.dim}, heads={self.heads}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"DALLEConfig.conv_kernel must be odd; got {self.conv_kernel}")

    @property
    def schedule(self) -> list[str]:
        """One image attention pattern per layer."""
        return pattern_schedule(self.depth, self.attention, self.attention_last or None)
