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


def shrink_config(cfg: Any) -> Any:
    """``cfg`` with size fields (depth, dim, heads …) lowered wherever the config stays valid."""
    if not attrs.has(type(cfg)):
        return cfg
    for _ in range(2):  # a second pass takes changes that needed another field lowered first
        for a in attrs.fields(type(cfg)):
            value = getattr(cfg, a.name)
            if attrs.has(type(value)):
                new = shrink_config(value)
            elif a.name in SHRINK and isinstance(value, int) and not isinstance(value, bool) and value > SHRINK[a.name]:
                new = SHRINK[a.name]
            else:
                continue
            if a.init and new != value:
                try:
                    cfg = attrs.evolve(cfg, **{a.name: new})
                except (ValueError, TypeError):
                    pass
    return cfg


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


__all__ = ["SHRINK", "shrink_config", "tiny_config"]
