"""Tiny forms of a model's config: the same architecture at toy size.

The contract kit builds every registered variant this way, and a composite model builds a
fresh pretrained part this way when its :class:`~polymodal.models.parts.PartConfig` says
``tiny``. A model class may define a classmethod::

    @classmethod
    def tiny_config(cls, config):
        '''The same architecture at toy size (a few thousand parameters).'''
        return attrs.evolve(config, encoder=attrs.evolve(config.encoder.with_block(dim=16, heads=2), depth=1))

Without one, :func:`shrink_config` lowers the fields with the usual size names.
"""

from __future__ import annotations

from typing import Any

import attrs

SHRINK = {
    "depth": 1,
    "layers": 1,
    "num_layers": 1,
    "n_layers": 1,
    "decoder_depth": 1,
    "encoder_depth": 1,
    "dim": 16,
    "width": 16,
    "embed_dim": 16,
    "d_model": 16,
    "hidden_dim": 32,
    "mlp_dim": 32,
    "heads": 2,
    "num_heads": 2,
    "n_heads": 2,
}
"""The size fields :func:`shrink_config` lowers, and the value each is lowered to."""


def resize_config(cfg: Any, targets: dict[str, int], *, grow: bool = False) -> Any:
    """``cfg`` with each size field named in ``targets`` moved to its target (in nested configs too),
    lowered (or, with ``grow``, raised) wherever the config stays valid; a value already past the
    target is kept. Two passes take changes that needed another field moved first."""
    if not attrs.has(type(cfg)):
        return cfg
    for _ in range(2):
        for a in attrs.fields(type(cfg)):
            value = getattr(cfg, a.name)
            if attrs.has(type(value)):
                new = resize_config(value, targets, grow=grow)
            elif a.name in targets and isinstance(value, int) and not isinstance(value, bool):
                new = max(value, targets[a.name]) if grow else min(value, targets[a.name])
            else:
                continue
            if a.init and new != value:
                try:
                    cfg = attrs.evolve(cfg, **{a.name: new})
                except (ValueError, TypeError):
                    pass
    return cfg


def shrink_config(cfg: Any) -> Any:
    """``cfg`` with size fields (depth, dim, heads …) lowered to :data:`SHRINK` wherever the config stays valid."""
    return resize_config(cfg, SHRINK)


def tiny_config(model_class: type, config: Any) -> Any:
    """The model class's ``tiny_config(config)`` when it has one, else :func:`shrink_config`."""
    hook = getattr(model_class, "tiny_config", None)
    small = hook(config) if hook is not None else shrink_config(config)
    if not isinstance(small, model_class.config_class):
        raise AssertionError(
            f"{model_class.__name__}.tiny_config returned {type(small).__name__}, "
            f"not a {model_class.config_class.__name__}"
        )
    return small


__all__ = ["SHRINK", "resize_config", "shrink_config", "tiny_config"]
