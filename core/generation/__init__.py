"""Generation: token choosers and the autoregressive decoding loop (diffusion samplers join here)."""

from polymodal.generation.sampling import (
    apply_cfg,
    generate,
    sample_greedy,
    sample_next,
    sample_temperature,
    sample_top_k,
    sample_top_p,
)

__all__ = [
    "apply_cfg",
    "generate",
    "sample_greedy",
    "sample_next",
    "sample_temperature",
    "sample_top_k",
    "sample_top_p",
]
