"""polymodal: multimodal transformer families composed from one small core.

import polymodal
polymodal.list_models("vit*")                         # registered variants, fnmatch wildcards
model = polymodal.create("vit", encoder={"depth": 2})  # a new model; nested / dotted overrides
model, metrics = polymodal.train("vit", steps=20, out="runs/vit-tiny")
model = polymodal.load("runs/vit")                    # a model folder
model(model.preprocess("digit.png"))                  # an image file, PIL image or array → (1, C, H, W)
polymodal.registry.names("model")                     # what the plugins registered (module functions)

``polymodal.train`` is both the function above (:func:`polymodal.api.train`) and the package
``polymodal.train`` (``from polymodal.train import TrainConfig`` keeps working): the package's
module object is callable.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from polymodal.registry.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "create",
    "evaluate_folder",
    "hookimpl",
    "hookspec",
    "list_models",
    "load",
    "registry",
    "train",
    "train_model",
]

_API = ("create", "list_models", "load", "train", "train_model", "evaluate_folder")


class _CallableTrainPackage(types.ModuleType):
    """The class of the ``polymodal.train`` package once imported: calling it is :func:`polymodal.api.train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``polymodal.train(name, data=…, steps=…, out=…)``: see :func:`polymodal.api.train`."""
        from polymodal import api

        return api.train(*args, **kwargs)


class _Package(types.ModuleType):
    """The class of this module: when the import system binds the ``polymodal.train`` package here, the
    package becomes callable (so ``polymodal.train(...)`` trains whether or not it was imported first)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _CallableTrainPackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import polymodal`` (and importing a plugin) stays cheap.
    if name in ("registry", "train"):  # modules: polymodal.registry.get(kind, name) …; polymodal.train(...)
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        from polymodal import api

        return getattr(api, name)
    raise AttributeError(f"module 'polymodal' has no attribute {name!r}")
