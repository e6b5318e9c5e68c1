"""The Flamingo recipe's configuration: where the frozen parts come from, the trained joints'
shapes, the interleaved training mix and the few-shot evaluation."""

from __future__ import annotations

from typing import Any

import attrs

from polymodal.config import config, field, in_range
from polymodal.models.parts import PartConfig, part_field

from . import interleave as il

_dim = attrs.validators.optional(in_range(1, 65536, integer=True))


def _check_templates(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not value or any(("{word}" not in t and "{numeral}" not in t) for t in value):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be non-empty templates that each hold "
            f"{{word}} or {{numeral}}; got {value!r}"
        )


@config
class FlamingoConfig:
    """Flamingo: frozen LM + frozen CLIP vision, trained resampler and gated cross-attention."""

    lm: PartConfig = part_field(PartConfig(variant="lm"), "The frozen language model.")
    vision: PartConfig = part_field(
        PartConfig(variant="clip", data="digits"), "The CLIP whose image tower is frozen in; its data follows --data."
    )
    lm_dim: int | None = field(
        None, "Width the frozen LM must have; None: take the part's (filled in on build).", check=_dim
    )
    vision_dim: int | None = field(
        None, "Width of the frozen vision tokens; None: take the part's (filled in on build).", check=_dim
    )
    num_latents: int = field(
        8, "Visual tokens per image out of the Perceiver Resampler.", check=in_range(1, 4096, integer=True)
    )
    resampler_depth: int = field(2, "Perceiver Resampler layers.", check=in_range(1, 64, integer=True))
    resampler_heads: int = field(4, "Perceiver Resampler attention heads.", check=in_range(1, 64, integer=True))
    resampler_final_norm: bool = field(
        False,
        "LayerNorm on the resampler's output (Flamingo's); off in the digits recipe (see the README's Flamingo notes).",
    )
    cross_every: int = field(
        1,
        "A gated cross-attention block before every n-th LM block (0, n, 2n …).",
        check=in_range(1, 1024, integer=True),
    )
    xattn_heads: int = field(4, "Heads of each gated cross-attention block.", check=in_range(1, 64, integer=True))
    xattn_mlp_ratio: float = field(
        2.0, "Hidden width of each block's gated MLP as a multiple of the LM width.", check=in_range(0.25, 16.0)
    )
    templates: tuple[str, ...] = field(
        il.CAPTION_TEMPLATES, "Training caption templates ({word}, {numeral}).", check=_check_templates
    )
    min_chunks: int = field(
        1, "Fewest image–caption chunks in a training sequence.", check=in_range(1, 64, integer=True)
    )
    max_chunks: int = field(5, "Most image–caption chunks in a training sequence.", check=in_range(1, 64, integer=True))
    mixed_template_rate: float = field(
        0.1,
        "Share of training sequences whose chunks each draw their own template "
        "(the rest share one template per sequence).",
        check=in_range(0.0, 1.0),
    )
    sentence_rate: float = field(
        0.0,
        "Share of training sequences captioned in one of the text corpus's sentence formats "
        '("There are {word} cats in the box."): many formats, each learnt from context.',
        check=in_range(0.0, 1.0),
    )
    eval_template: str = field(il.EVAL_TEMPLATE, "Few-shot caption format; the query is its text before {word}.")
    eval_shots: tuple[int, ...] = field((0, 2, 4), "Numbers of in-context examples evaluated (accuracy_by_shots).")
    eval_limit: int = field(
        0, "Test images scored per shot count (0: the whole split).", check=in_range(0, 10**6, integer=True)
    )
    eval_seed: int = field(0, "Seed that draws the in-context examples.", check=in_range(0, 2**31, integer=True))
    sample_shots: int = field(
        2, "In-context examples before each image when sampling captions.", check=in_range(0, 32, integer=True)
    )
    data: str = field("digits", "Dataset the model was adapted to (`polymodal eval` uses it by default).")

    def __attrs_post_init__(self) -> None:
        if self.min_chunks > self.max_chunks:
            raise ValueError(
                f"FlamingoConfig.min_chunks must be <= max_chunks; got {self.min_chunks} > {self.max_chunks}"
            )
        if "{word}" not in self.eval_template:
            raise ValueError(f"FlamingoConfig.eval_template must hold {{word}}; got {self.eval_template!r}")


__all__ = ["FlamingoConfig"]
