"""One attention function over several kernels: ``attention(q, k, v, causal=..., ...)``."""

from .backends import BUILTIN_BACKENDS, Backend, FlexBackend, MathBackend, SDPABackend, XFormersBackend
from .dispatch import AttentionError, attention, backends, select_backend, use_backend
from .masks import AttentionSpec, block_diagonal_mask, causal_mask, combine

__all__ = [
    "AttentionError", "AttentionSpec", "BUILTIN_BACKENDS", "Backend", "FlexBackend", "MathBackend",
    "SDPABackend", "XFormersBackend", "attention", "backends", "block_diagonal_mask", "causal_mask",
    "combine", "select_backend", "use_backend",
]
