"""Generation: token choosers, the autoregressive decoding loop and the causal decoder trunk (diffusion samplers
join here)."""

from polymodal.generation.beam import beam_search
from polymodal.generation.constraints import TokenTrie
from polymodal.generation.decoder import CausalDecoder
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
    "CausalDecoder",
    "TokenTrie",
    "apply_cfg",
    "beam_search",
    "generate",
    "sample_greedy",
    "sample_next",
    "sample_temperature",
    "sample_top_k",
    "sample_top_p",
]
