"""One attention function over several kernels: ``attention(q, k, v, causal=..., ...)``."""

from polymodal.attention.backends import (
    BUILTIN_BACKENDS,
    Backend,
    FlexBackend,
    MathBackend,
    SDPABackend,
    XFormersBackend,
)
from polymodal.attention.dispatch import AttentionError, attention, backends, select_backend, use_backend
from polymodal.attention.masks import (
    IMAGE_PATTERNS,
    AttentionSpec,
    block_diagonal_mask,
    causal_mask,
    combine,
    image_pattern_mask,
    pattern_schedule,
)

__all__ = [
    "AttentionError",
    "AttentionSpec",
    "BUILTIN_BACKENDS",
    "Backend",
    "FlexBackend",
    "MathBackend",
    "SDPABackend",
    "XFormersBackend",
    "attention",
    "backends",
    "block_diagonal_mask",
    "causal_mask",
    "combine",
    "IMAGE_PATTERNS",
    "image_pattern_mask",
    "pattern_schedule",
    "select_backend",
    "use_backend",
]
