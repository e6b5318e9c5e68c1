"""The core plugin: registers the parts that ship with polymodal itself.

It loads through the ``polymodal`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    """math (reference), sdpa, xformers (CUDA only) and flex."""
    from .attention import BUILTIN_BACKENDS

    for backend in BUILTIN_BACKENDS:
        register(backend.name, backend)


@hookimpl
def register_encoders(register):
    """The ViT trunk, reused by ViT, CLIP, DINO, PIXEL."""
    from .encoders import ViTEncoder

    register("vit", ViTEncoder)


@hookimpl
def register_datasets(register):
    """Embedded data: digits."""
    from .data import load_digits

    register("digits", load_digits)


@hookimpl
def register_metrics(register):
    """Generic metrics."""
    from .metrics import accuracy

    register("accuracy", accuracy)
