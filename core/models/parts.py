"""Pretrained parts a composite model is made of (a CLIP, a VQ-VAE tokenizer, a language model …).

A composite's config names each part with a nested :class:`PartConfig` field::

    @config
    class FlamingoConfig:
        lm: PartConfig = part_field(PartConfig(variant="lm"), "The frozen language model.")

``--set lm=DIR`` sets the part's ``path`` (a plain string for a part field means its path),
``--set lm.variant=lm-big`` any other field. The builder makes the parts *before* the model's
constructor runs and hands them over (``Model(config, parts={"lm": lm})``); this module's
:func:`load_part` only loads a folder or builds a fresh variant and never trains. Training an
``"auto"`` part that is not cached yet is the API's job (:func:`polymodal.api.prepare_parts`,
used by ``polymodal.create``, ``train_model`` and the CLI).

A saved composite keeps each part once, as a complete model folder of its own in ``DIR/<field>/``,
and leaves it out of its own ``model.safetensors`` (see :func:`polymodal.io.save_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch

from polymodal.config import config, field
from polymodal.data.folder import is_folder
from polymodal.io.cache import default_part_folder
from polymodal.io.folders import load_model
from polymodal.models.tiny import tiny_config
from polymodal.registry import get_registry


@config
class PartConfig:
    """Where a pretrained part comes from: a model folder, the cache's trained default, or a fresh build."""

    string_field: ClassVar[str] = "path"
    """A plain string given for a part field (``--set lm=DIR``) sets this field."""

    path: str = field(
        "auto",
        "The part's model folder; 'auto' trains (or reuses) `variant` on `data` in the cache "
        "($POLYMODAL_CACHE/parts/<variant>-<data>); '' builds `variant` fresh and untrained "
        "(tests; a saved composite keeps '' and carries the part in its <field>/ sub-folder).",
    )
    variant: str = field("", "Registered model variant that 'auto' trains and '' builds.")
    data: str = field("", "Dataset 'auto' trains the variant on; '' for the variant's default data.")
    tiny: bool = field(False, "With path '', build the variant's tiny form (contract tests).")

    def __attrs_post_init__(self) -> None:
        if not self.variant:
            raise ValueError(f"PartConfig.variant must name a registered model variant; got {self.variant!r}")


def _check_part(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: a :class:`PartConfig`."""
    if not isinstance(value, PartConfig):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be a PartConfig (or a folder path string "
            f"through --set / create); got {value!r}"
        )


def part_field(default: PartConfig, doc: str) -> Any:
    """A config field naming a pretrained part: a :class:`PartConfig` with ``default`` and ``doc``."""
    return field(default, doc, check=_check_part)


def part_fields(config: Any) -> dict[str, PartConfig]:
    """Every :class:`PartConfig` field of ``config``, by field name (in field order)."""
    if not attrs.has(type(config)):
        return {}
    return {
        a.name: getattr(config, a.name)
        for a in attrs.fields(type(config))
        if isinstance(getattr(config, a.name), PartConfig)
    }


def part_data(part: PartConfig) -> str:
    """The dataset ``"auto"`` trains ``part.variant`` on (``part.data`` or the variant's default)."""
    from polymodal.registry import get_registry

    return part.data or get_registry().get("model", part.variant).data


def auto_folder(part: PartConfig) -> Path:
    """Where ``"auto"`` keeps ``part.variant`` trained on :func:`part_data`."""
    return default_part_folder(part.variant, part_data(part))


def describe_part(part: PartConfig) -> str:
    """Where ``part`` comes from, in words (for model cards)."""
    if part.path == "":
        return f"fresh, untrained `{part.variant}`" + (" (tiny)" if part.tiny else "")
    return str(auto_folder(part)) if part.path == "auto" else part.path


def load_part(part: PartConfig, *, name: str = "part") -> Any:
    """The model ``part`` names, loaded or built but never trained; ``name`` labels errors.

    A folder is loaded (strict, safetensors only); ``"auto"`` loads the cache's trained default
    and raises a ValueError when it is not there yet (``polymodal.create``, ``polymodal train`` and
    :func:`polymodal.api.prepare_parts` train it first); ``""`` builds ``part.variant`` fresh (its
    tiny form with ``part.tiny``), drawing from the global torch RNG like any new module. Loading
    leaves the RNG state as it was, so a composite draws the same random numbers whether its parts
    came from a folder or the cache.
    """
    from polymodal.registry import get_registry

    if not isinstance(part, PartConfig):
        raise ValueError(f"{name} must be a PartConfig; got {part!r}")
    if part.path == "":
        spec = get_registry().get("model", part.variant)
        return spec.instantiate(tiny_config(spec.model_class, spec.config) if part.tiny else spec.config)
    rng = torch.get_rng_state()
    try:
        folder = auto_folder(part) if part.path == "auto" else Path(part.path)
        if not (folder / "config.json").is_file():
            if part.path == "auto":
                raise ValueError(
                    f"{name}: no trained `{part.variant}` at {folder} yet; polymodal.create, polymodal "
                    f"train and polymodal.api.prepare_parts train it (or give a folder: --set {name}=DIR)"
                )
            raise ValueError(f"{name} must be a model folder with config.json (or 'auto' / ''); {folder} has none")
        return load_model(folder)
    finally:
        torch.set_rng_state(rng)  # a plugin's load may draw random numbers (a fresh module before its weights load)


def load_parts(config: Any, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every part ``config`` names: those in ``given`` as they are, the others by :func:`load_part`."""
    given = dict(given or {})
    fields = part_fields(config)
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(
            f"{type(config).__name__} has no part field(s) {', '.join(unknown)}; "
            f"its parts: {', '.join(fields) or 'none'}"
        )
    return {k: given[k] if k in given else load_part(p, name=f"{type(config).__name__}.{k}") for k, p in fields.items()}


def _frozen_part_line(family: str, dataset: Any, part: str, key: str, variant: str) -> str:
    """The line a family bound to a frozen part's input size prints for a folder of images: they are
    resized to the part's own size, and how to give it a part trained on them instead."""
    size, channels = dataset.meta.get("image_size"), dataset.meta.get("channels")
    return (
        f"{family}: images are {size}×{size}×{channels}; the frozen {part} reads them resized to its own image "
        f"size (--set {key}=DIR takes one trained on these images: polymodal train {variant} --data "
        f"{dataset.meta.get('root')} --out DIR)"
    )


def follow_data(config: Any, dataset: Any, name: str, *, family: str, what: str) -> tuple[Any, str]:
    """A composite's 'auto' part trains on the data the composite is adapted to (``config_for_data``).

    Returns ``config`` with part ``name``'s ``data`` set to ``dataset``'s name when it names a
    registered dataset, and the dataset name the composite records. A folder of the user's images
    cannot train an 'auto' part by name: the part keeps its default data, a line says the frozen
    ``what`` reads the images resized to its own size, and the name returned is ''.
    """
    data = getattr(dataset, "name", "")
    part = getattr(config, name)
    if is_folder(dataset):
        print(_frozen_part_line(family, dataset, what, name, part.variant))
        return config, ""
    if ("dataset", data) in get_registry():
        config = attrs.evolve(config, **{name: attrs.evolve(part, data=data)})
    return config, data


__all__ = [
    "PartConfig",
    "auto_folder",
    "describe_part",
    "follow_data",
    "load_part",
    "load_parts",
    "part_data",
    "part_field",
    "part_fields",
]
