"""Trained parts a recipe builds on (a CLIP, a VQ-VAE tokenizer, a language model …).

A recipe that needs a trained part takes its model folder through a config field
(``--set tokenizer=VQ_DIR``). The field's value decides where the part comes from:

* a folder path: load it (strict, safetensors only);
* ``"auto"``: train the part's default variant once and keep it in the cache
  (``$POLYMODAL_CACHE/parts/<variant>-<data>``, default ``~/.cache/polymodal``), so one
  command works on a fresh install;
* ``""``: build the variant fresh and untrained (contract tests; loading a saved folder
  that carries its own copy of the part).
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.io.cache import cache_root, default_part_folder
from polymodal.models import PolymodalModel


def resolve_part(value: str, variant: str, data: str, *, field: str, tiny: bool = False) -> tuple[PolymodalModel, str]:
    """The part named by a config ``field`` whose value is ``value``, and a line saying where it came from.

    ``variant`` is the registered model trained by ``"auto"`` (on ``data``) or built by ``""``
    (its tiny form with ``tiny``). Loading or training leaves the global torch RNG state as it
    was, so building a recipe is reproducible whether or not a part had to be trained.
    """
    from polymodal.io import load_model
    from polymodal.registry import get_registry

    if not isinstance(value, str):
        raise ValueError(f"{field} must be a model folder, 'auto' or ''; got {value!r}")
    if value == "":
        spec = get_registry().get("model", variant)
        cfg = spec.config
        if tiny:
            from polymodal.testing.contracts import tiny_config
            cfg = tiny_config(spec.model_class, cfg)
        return spec.model_class(cfg), f"fresh, untrained `{variant}`"
    folder = Path(value) if value != "auto" else default_part_folder(variant, data)
    rng = torch.get_rng_state()
    try:
        if value == "auto" and not (folder / "config.json").is_file():
            from polymodal.api import train_model
            print(f"{field}: no trained `{variant}` at {folder}; training it on {data} first")
            train_model(variant, data=data, out=folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{field} must be a model folder with config.json (or 'auto' / ''); {folder} has none")
        return load_model(folder), str(folder)
    finally:
        torch.set_rng_state(rng)  # training or building the part drew random numbers

def resolve_config_part(config: object, name: str, *, tiny: bool = False) -> tuple[PolymodalModel, str]:
    """:func:`resolve_part` for a config that names a part by the fields ``name`` (folder, 'auto' or
    ''), ``name_variant`` and ``name_data`` ('' for the variant's default data); errors name
    ``ConfigClass.name``."""
    from polymodal.registry import get_registry

    variant = getattr(config, f"{name}_variant")
    data = getattr(config, f"{name}_data") or get_registry().get("model", variant).data
    return resolve_part(getattr(config, name), variant, data, field=f"{type(config).__name__}.{name}", tiny=tiny)


__all__ = ["cache_root", "default_part_folder", "resolve_config_part", "resolve_part"]
