"""polymodal: multimodal transformer families composed from one small core.

import polymodal
model = polymodal.create("vit")           # a registered variant
model = polymodal.load("runs/vit")        # a model folder
polymodal.registry.names("model")         # what the plugins registered (module functions)
"""

from __future__ import annotations

from typing import Any

from polymodal.registry.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["__version__", "create", "hookimpl", "hookspec", "load", "registry", "train_model"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import polymodal`` (and importing a plugin) stays cheap.
    if name == "registry":  # the module: polymodal.registry.get(kind, name), .names(kind) …
        import importlib

        return importlib.import_module(".registry", __name__)
    if name in ("create", "load", "train_model", "evaluate_folder"):
        from polymodal import api

        return getattr(api, name)
    raise AttributeError(f"module 'polymodal' has no attribute {name!r}")
