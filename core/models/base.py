"""The model contract every family implements, and the registry entry that names a variant.

A family subclasses :class:`PolymodalModel` and registers :class:`ModelSpec` variants::

    register("vit", ModelSpec(ViTClassifier, ViTConfig(), data="digits", train=TrainConfig(steps=3000)))

The trainer, the CLI, model folders and the testing kit use only this contract.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from polymodal.config import apply_overrides, from_dict, to_dict
from polymodal.models.recipe import TrainConfig


class PolymodalModel(nn.Module):
    """Base class of every family's model.

    Subclasses set ``family`` and ``config_class`` and implement ``loss`` and ``evaluate``;
    ``forward`` is the model's natural call (logits, features …).
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    frozen: ClassVar[tuple[str, ...]] = ()
    """Attribute names of pretrained parts that never train (a VQ-VAE tokenizer, a frozen CLIP or
    LM): :meth:`freeze` turns their gradients off and :meth:`train` keeps them in eval mode."""
    implements: ClassVar[tuple[type, ...]] = ()
    """Contracts of :mod:`polymodal.models.interfaces` the model meets (``(CausalLM,)``), so other
    families can take it as a part; the contract kit checks every registered variant against them."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def freeze(self) -> None:
        """Turn off gradients of every part named in :attr:`frozen` and put it in eval mode."""
        for name in self.frozen:
            part = getattr(self, name, None)
            if part is None:
                raise AttributeError(f"{type(self).__name__}.frozen names {name!r}, which is not set; "
                                     f"set it before calling freeze()")
            part.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "PolymodalModel":
        """Set train/eval mode; the parts named in :attr:`frozen` always stay in eval mode."""
        super().train(mode)
        for name in self.frozen:
            part = getattr(self, name, None)
            if isinstance(part, nn.Module):
                part.eval()
        return self

    @property
    def default_data(self) -> str | None:
        """The registered dataset named by ``config.data`` (what ``polymodal eval`` uses when no
        ``--data`` is given), or None when the config names none or an unregistered one."""
        from polymodal.registry import get_registry

        data = getattr(self.config, "data", None)
        return data if isinstance(data, str) and data and ("dataset", data) in get_registry() else None

    @classmethod
    def config_for_data(cls, config: Any, dataset: Any, fixed: Collection[str] = ()) -> Any:
        """Adapt a variant's config to a dataset (image size, classes …), leaving alone what the dotted
        config keys in ``fixed`` name (the user set them, e.g. ``encoder.image_size``); default: unchanged."""
        return config

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Training loss on one batch from the dataset's train split, plus metrics to log."""
        raise NotImplementedError

    train_step: int = 0
    """The trainer's global step for the loss being computed (counted across ``--resume``)."""
    train_steps: int = 0
    """The recipe's total steps (0 outside the trainer)."""

    def begin_step(self, step: int, total: int) -> None:
        """Called by the trainer before each step's loss with the global step (0-based, counted
        across ``--resume``) and the recipe's total; stores them as :attr:`train_step` and
        :attr:`train_steps` for schedules (an EMA momentum, a curriculum)."""
        self.train_step, self.train_steps = step, total

    def after_step(self) -> None:
        """Called by the trainer after every optimiser step (clamp a parameter, update an EMA
        teacher …); default: nothing."""

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """The family's metrics on ``dataset`` (test split by default)."""
        raise NotImplementedError

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple:
        """Random valid inputs for ``forward`` (used by the testing kit)."""
        raise NotImplementedError

    # -- model folders -------------------------------------------------------------------------
    def save(self, directory: str | Path, *, metrics: dict[str, Any] | None = None,
             card: str | None = None, source: str | None = None) -> Path:
        """Write a model folder atomically (see :func:`polymodal.io.save_model`)."""
        from polymodal.io import save_model

        return save_model(self, directory, metrics=metrics, card=card, source=source)

    def save_extras(self, directory: Path) -> None:
        """Write extra files (tokenizers …) into ``directory``; default: nothing."""

    def load_extras(self, directory: Path) -> None:
        """Read what :meth:`save_extras` wrote; default: nothing."""

    def config_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible values."""
        return to_dict(self.config)

    @classmethod
    def config_from_dict(cls, data: dict[str, Any]) -> Any:
        """Rebuild the config from :meth:`config_dict` output."""
        return from_dict(cls.config_class, data)

    def card_lines(self) -> list[str]:
        """Family-specific lines for the README model card."""
        return []


@dataclass(frozen=True)
class ModelSpec:
    """A named model variant: the family class, its config, default data and training recipe."""

    model_class: type[PolymodalModel]
    config: Any
    data: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    doc: str = ""
    pretrained_parts: tuple[str | tuple[str, str], ...] = ()
    """Config fields that take a trained part's folder: ``"clip"`` (field and variant share the
    name) or ``("tokenizer", "vqvae-shapes")`` (field, registered variant that trains it)."""

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        return self.doc or (self.model_class.__doc__ or "").strip().split("\n")[0]

    def parts(self) -> list[tuple[str, str]]:
        """``(config field, variant)`` of every pretrained part."""
        return [(p, p) if isinstance(p, str) else (p[0], p[1]) for p in self.pretrained_parts]

    def build(self, dataset: Any = None, **overrides: Any) -> PolymodalModel:
        """A freshly initialised model, adapted to ``dataset`` and with config ``overrides``."""
        cfg = self.config
        if dataset is not None:
            cfg = self.model_class.config_for_data(cfg, dataset)
        if overrides:
            cfg = attrs.evolve(cfg, **overrides)
        return self.model_class(cfg)

    def config_for(self, dataset: Any, overrides: tuple[str, ...] = ()) -> Any:
        """The config ``polymodal train`` builds: adapted to ``dataset`` by the family's
        ``config_for_data`` (told the keys the ``key=value`` ``overrides`` set, so that an explicit
        ``encoder.image_size=8`` is not adapted away), then the overrides applied."""
        adapt = self.model_class.config_for_data
        if "fixed" in inspect.signature(adapt).parameters:
            fixed = frozenset(pair.split("=", 1)[0].strip() for pair in overrides)
            return apply_overrides(adapt(self.config, dataset, fixed=fixed), overrides)
        return apply_overrides(adapt(self.config, dataset), overrides)
