"""The model contract every family implements, and the registry entry that names a variant.

A family subclasses :class:`PolymodalModel` and registers :class:`ModelSpec` variants::

    register("vit", ModelSpec(ViTClassifier, ViTConfig(), data="digits", train=TrainConfig(steps=3000)))

The trainer, the CLI, model folders and the testing kit use only this contract.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from polymodal.config import _coerce, _nested_class, apply_overrides, evolve, from_dict, to_dict
from polymodal.data.base import Batch
from polymodal.models.images import GREY_WEIGHTS, ImageSpec  # noqa: F401 (re-exported: families import it here)
from polymodal.models.recipe import TrainConfig


class PolymodalModel(nn.Module):
    """Base class of every family's model.

    Subclasses set ``family`` and ``config_class`` and implement ``loss`` and ``evaluate``;
    ``forward`` is the model's natural call (logits, features …). A composite made of pretrained
    parts (a frozen LM, CLIP or tokenizer) takes them built: ``Model(config, parts={"lm": lm})``
    (see :attr:`part_attributes`); its constructor never trains anything.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    frozen: ClassVar[tuple[str, ...]] = ()
    """Attribute names of pretrained parts that never train (a VQ-VAE tokenizer, a frozen CLIP or
    LM): :meth:`freeze` turns their gradients off and :meth:`train` keeps them in eval mode."""
    trained_by: ClassVar[str] = ""
    """The variant that trains this part when it cannot train alone (unCLIP's prior: ``"unclip"``); "" if it can."""
    implements: ClassVar[tuple[type, ...]] = ()
    """Contracts of :mod:`polymodal.models.interfaces` the model meets (``(CausalLM,)``), so other
    families can take it as a part; the contract kit checks every registered variant against them."""
    part_attributes: ClassVar[dict[str, str]] = {}
    """A composite's pretrained parts: each :class:`~polymodal.models.parts.PartConfig` field of the
    config, mapped to the attribute that holds the built part (DALL·E: ``{"tokenizer": "vq"}``).

    The builder makes the parts before the constructor runs and passes them as
    ``Model(config, parts={"tokenizer": vq})``; the constructor hands them to :meth:`attach_parts`,
    which loads or builds (never trains) any that were not passed. A saved model keeps each part
    once, as a model folder of its own in ``DIR/<field>/``, outside its own ``model.safetensors``
    (:meth:`own_state_dict`); loading reads the sub-folders and passes them in the same way."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.part_sources: dict[str, str] = {}
        self._part_keys: dict[str, frozenset[str]] = {}

    def attach_parts(self, parts: Mapping[str, PolymodalModel] | None) -> dict[str, PolymodalModel]:
        """The built part of every :attr:`part_attributes` field: from ``parts``, else made by
        :func:`~polymodal.models.parts.load_part` (a folder or the cached 'auto' one loaded, '' built
        fresh; nothing is trained). Call it in ``__init__`` before changing a part: it records each
        part's state keys as attached, its own parts' included (what ``DIR/<field>/`` and its sub-folders hold) and where it came from (model cards)."""
        from polymodal.models.parts import describe_part, load_parts, part_fields

        fields = part_fields(self.config)
        if set(fields) != set(self.part_attributes):
            raise TypeError(
                f"{type(self).__name__}.part_attributes names {sorted(self.part_attributes)}; its config's "
                f"PartConfig fields are {sorted(fields)}"
            )
        built = load_parts(self.config, parts)
        for name, part in built.items():
            if not isinstance(part, PolymodalModel):
                raise ValueError(
                    f"{type(self.config).__name__}.{name} must be a polymodal model; got {type(part).__name__}"
                )
            self._part_keys[name] = frozenset(part.state_dict())  # with its own parts' (saved in its folder)
            self.part_sources[name] = describe_part(fields[name])
        return built

    def part_modules(self) -> dict[str, PolymodalModel]:
        """The attached parts by config field (see :attr:`part_attributes`)."""
        return {name: getattr(self, attr) for name, attr in self.part_attributes.items()}

    def part_state_dict(self, name: str) -> dict[str, Tensor]:
        """The weights part ``name`` keeps in ``DIR/<name>/model.safetensors``: its own state as it was
        attached (modules the composite injected into it later stay the composite's)."""
        part = self.part_modules()[name]
        return {k: v for k, v in part.own_state_dict().items() if k in self._part_keys[name]}

    def own_state_dict(self) -> dict[str, Tensor]:
        """The weights in this model's own ``model.safetensors``: :meth:`state_dict` without the parts'."""
        owned = {f"{self.part_attributes[name]}.{k}" for name, keys in self._part_keys.items() for k in keys}
        return {k: v for k, v in self.state_dict().items() if k not in owned}

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """What a training checkpoint keeps: :meth:`state_dict` without the weights of the parts named
        in :attr:`frozen` (they never change in training and come back from their folders on ``--resume``)."""
        frozen_parts = {attr for attr in self.part_attributes.values() if attr in self.frozen}
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] not in frozen_parts}

    def freeze(self) -> None:
        """Turn off gradients of every part named in :attr:`frozen` and put it in eval mode."""
        for name in self.frozen:
            part = getattr(self, name, None)
            if part is None:
                raise AttributeError(
                    f"{type(self).__name__}.frozen names {name!r}, which is not set; set it before calling freeze()"
                )
            part.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PolymodalModel:
        """Set train/eval mode; the parts named in :attr:`frozen` always stay in eval mode."""
        super().train(mode)
        for name in self.frozen:
            part = getattr(self, name, None)
            if isinstance(part, nn.Module):
                part.eval()
        return self

    progress_metrics: ClassVar[tuple[str, ...]] = ()
    """Names of :meth:`loss` metrics the training progress bar shows beside the loss (DINO's
    ``("teacher_entropy",)``); every metric goes to ``train_log.jsonl`` whatever this says."""

    image_fields: ClassVar[str] = ""
    """Where an image family's input size and channels live, as a dotted attribute path from the
    model (``"config.encoder"``, ``"vq.config"``): an object with ``image_size`` and ``channels``,
    both saved in the folder's ``config.json``. Empty for a family that reads no images; drives
    :meth:`image_spec` and :meth:`preprocess`."""

    def image_spec(self) -> ImageSpec | None:
        """How the model's images are prepared (size, channels, value range), read from the config at
        :attr:`image_fields`; None for a family that reads no images. A family whose data pipeline
        normalises (a mean and std) overrides this and returns them."""
        if not self.image_fields:
            return None
        source: Any = self
        for name in self.image_fields.split("."):
            source = getattr(source, name)
        return ImageSpec(size=int(source.image_size), channels=int(source.channels))

    def preprocess(self, image: Any) -> Tensor:
        """One image as the model's input batch ``(1, C, S, S)`` float, prepared as in training.

        ``image`` is a Pillow image, a file path (``str`` or ``Path``, opened with the core's
        pixel-limited reader), a numpy array ``(H, W)`` / ``(H, W, C)`` (uint8 0–255 or float in
        [0, 1]) or a tensor ``(H, W)`` / ``(C, H, W)`` / ``(1, C, H, W)``. It is converted to the
        model's channels (grey ↔ RGB as Pillow's ``L``/``RGB`` do; alpha dropped), resized to its
        size (bilinear, as the folder datasets and the families' commands do) and scaled as the family's
        data (see :meth:`image_spec`), so ``model(model.preprocess(Image.open(p)))`` works
        (open_clip's ``preprocess``, transformers' image processors). On the model's device.
        """
        spec = self.image_spec()
        if spec is None:
            raise TypeError(f"{type(self).__name__} ({self.family}) reads no images; preprocess is for image families")
        x = spec.prepare(image)[None]  # (1, C, S, S)
        param = next(self.parameters(), None)
        return x.to(param.device) if param is not None else x

    def preprocess_images(self, images: Any) -> Tensor:
        """One image or several (a list or tuple, or an (N, C, H, W) tensor), each as :meth:`preprocess`
        takes it, as one batch (N, C, S, S)."""
        if isinstance(images, (list, tuple)) or (isinstance(images, Tensor) and images.dim() == 4 and len(images) > 1):
            if not len(images):
                raise ValueError("preprocess_images: expected at least one image; got none")
            return torch.cat([self.preprocess(image) for image in images])
        return self.preprocess(images)

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

    def collator(self) -> Callable[[Batch, int], Batch] | None:
        """The family's data-pipeline step, or None (the default: the batch goes to :meth:`loss` as read).

        A picklable callable ``collate(batch, step) -> batch`` that does the CPU work a batch needs before
        :meth:`loss` (tokenising captions, re-sampling caption views for global step ``step``), so it runs
        in DataLoader workers for streamed data and out of the training step's critical path. It must not
        hold the model's weights (it is sent to the workers) and must draw randomness only from torch's
        global generator (seeded per worker by the DataLoader)."""
        return None

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
    def save(
        self,
        directory: str | Path,
        *,
        metrics: dict[str, Any] | None = None,
        card: str | None = None,
        source: str | None = None,
    ) -> Path:
        """Write a model folder atomically (see :func:`polymodal.io.save_model`)."""
        from polymodal.io import save_model

        return save_model(self, directory, metrics=metrics, card=card, source=source)

    def save_extras(self, directory: Path) -> None:
        """Write extra files (tokenizers …) into ``directory``; default: nothing."""

    def load_extras(self, directory: Path) -> None:
        """Read what :meth:`save_extras` wrote; default: nothing."""

    def config_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible values; every part's ``path`` is ``''``: a saved folder carries
        its parts in ``DIR/<field>/`` and reads no other path."""
        data = to_dict(self.config)
        for name in self.part_attributes:
            data[name]["path"] = ""
        return data

    @classmethod
    def config_from_dict(cls, data: dict[str, Any]) -> Any:
        """Rebuild the config from :meth:`config_dict` output (a saved ``config.json``).

        Every field must be there (:func:`~polymodal.config.from_dict`; a missing one is an error naming
        it, never a default taken silently). A family whose saved format really changed (a field added
        since folders of an earlier release were written) overrides this to migrate such a dict, and
        documents the rule it applies; no family needs one yet."""
        return from_dict(cls.config_class, data)

    def card_lines(self) -> list[str]:
        """Family-specific lines for the README model card."""
        return []


def _dotted_keys(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted leaf key ``overrides`` sets (``{"encoder": {"depth": 2}}`` → ``encoder.depth``)."""
    keys: list[str] = []
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        keys += _dotted_keys(value, name + ".") if isinstance(value, Mapping) else [name]
    return keys


def _nest(overrides: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``overrides`` with dotted keys unfolded into nested dicts (``{"encoder.depth": 2}`` →
    ``{"encoder": {"depth": 2}}``), merged with dicts given for the same field; a leaf set twice
    (``encoder={"depth": 2}`` and ``encoder.depth=3``) raises naming it."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ValueError(f"override keys are field names (dotted for nested fields); got {prefix}{key!r}")
        head, _, rest = key.partition(".")
        value = {rest: value} if rest else value
        if isinstance(value, Mapping):
            value = _nest(value, f"{prefix}{head}.")
        if head in out:
            if not (isinstance(out[head], dict) and isinstance(value, dict)):
                raise ValueError(f"'{prefix}{head}' is set twice (a whole value and its fields); give it once")
            twice = sorted(set(_dotted_keys(out[head])) & set(_dotted_keys(value)))
            if twice:
                raise ValueError(f"'{prefix}{head}.{twice[0]}' is set twice (a dict and a dotted key); give it once")
            out[head] = _deep_merge(out[head], value)
        else:
            out[head] = value
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` updated by ``b``, nested dicts merged key by key."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def merge_overrides(cfg: Any, overrides: Mapping[str, Any], prefix: str = "") -> Any:
    """``cfg`` with Python keyword ``overrides`` merged in, the way timm's ``create_model(**kwargs)`` does.

    A dict given for a nested config changes only the fields it names (``encoder={"depth": 2}``
    keeps the variant's other encoder fields; a nested config that is None is built from its
    class's defaults); a dotted key reaches one nested field (``**{"encoder.depth": 2}``); a string
    for a nested config whose class names a ``string_field`` sets that field (``lm="runs/lm"``); a
    list for a tuple field becomes a tuple; any other value replaces the field. Errors are
    ValueErrors that name fields by their dotted keys (``prefix`` is ``cfg``'s own, ``"encoder."``):
    ``unknown field 'encoder.dpth' (known fields of encoder: …)``, ``encoder.block.heads must divide dim …``.
    """
    changes = _nest(overrides, prefix)
    fields = attrs.fields_dict(type(cfg))
    hints = typing.get_type_hints(type(cfg))
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in fields:
            where = f"fields of {prefix[:-1]}" if prefix else f"{type(cfg).__name__} fields"
            raise ValueError(f"unknown field '{prefix}{key}' (known {where}: {', '.join(fields)})")
        current, nested = getattr(cfg, key), _nested_class(hints.get(key, Any))
        if isinstance(value, dict) and current is None and nested is not None:
            try:
                out[key] = from_dict(nested, value, partial=True, label=f"{prefix}{key}")
            except (ValueError, TypeError) as exc:
                raise ValueError(str(exc).replace(f"{nested.__name__}.", f"{prefix}{key}.")) from None
        elif isinstance(value, dict) and attrs.has(type(current)):
            out[key] = merge_overrides(current, value, f"{prefix}{key}.")
        else:
            out[key] = _coerce(hints.get(key, Any), value, f"{prefix}{key}") if isinstance(value, list) else value
    try:
        return evolve(cfg, **out)
    except (ValueError, TypeError) as exc:  # a validator's message names the class: say the dotted key
        raise ValueError(str(exc).replace(f"{type(cfg).__name__}.", prefix)) from None


@dataclass(frozen=True)
class ModelSpec:
    """A named model variant: the family class, its config, default data and training recipe."""

    model_class: type[PolymodalModel]
    config: Any
    data: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    doc: str = ""

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        return self.doc or (self.model_class.__doc__ or "").strip().split("\n")[0]

    def parts(self) -> list[tuple[str, str]]:
        """``(config field, registered variant)`` of every pretrained part the config names."""
        from polymodal.models.parts import part_fields

        return [(name, part.variant) for name, part in part_fields(self.config).items()]

    def make_config(self, dataset: Any = None, **overrides: Any) -> Any:
        """The config adapted to ``dataset``, with ``overrides`` merged in by :func:`merge_overrides`
        (a dict for a nested config changes only the fields it names, ``"encoder.depth"`` reaches one
        field, a string for a part field sets its path). ``config_for_data`` is told the dotted keys
        set, so an explicit ``encoder={"image_size": 16}`` is not adapted away."""
        cfg = self.config
        if dataset is not None:
            adapt = self.model_class.config_for_data
            if "fixed" in inspect.signature(adapt).parameters:
                cfg = adapt(cfg, dataset, fixed=frozenset(_dotted_keys(overrides)))
            else:
                cfg = adapt(cfg, dataset)
        return merge_overrides(cfg, overrides) if overrides else cfg

    def config_for(self, dataset: Any, overrides: tuple[str, ...] = ()) -> Any:
        """The config ``polymodal train`` builds: adapted to ``dataset`` by the family's
        ``config_for_data`` (told the keys the ``key=value`` ``overrides`` set, so that an explicit
        ``encoder.image_size=8`` is not adapted away), then the overrides applied."""
        adapt = self.model_class.config_for_data
        if "fixed" in inspect.signature(adapt).parameters:
            fixed = frozenset(pair.split("=", 1)[0].strip() for pair in overrides)
            return apply_overrides(adapt(self.config, dataset, fixed=fixed), overrides)
        return apply_overrides(adapt(self.config, dataset), overrides)

    def build(
        self, dataset: Any = None, parts: Mapping[str, PolymodalModel] | None = None, **overrides: Any
    ) -> PolymodalModel:
        """A freshly initialised model, adapted to ``dataset`` and with config ``overrides``.

        Its pretrained parts are made first: those in ``parts`` as given, the others loaded or
        built fresh by :func:`~polymodal.models.parts.load_parts` (nothing is trained: an 'auto'
        part not in the cache yet raises; :func:`polymodal.create` trains it).
        """
        return self.instantiate(self.make_config(dataset, **overrides), parts)

    def instantiate(self, config: Any, parts: Mapping[str, PolymodalModel] | None = None) -> PolymodalModel:
        """``model_class(config)``, with ``parts=`` (every part made beforehand) for a composite."""
        from polymodal.models.parts import load_parts

        if not self.model_class.part_attributes:
            if parts:
                raise ValueError(f"{self.model_class.__name__} takes no parts; got {', '.join(parts)}")
            return self.model_class(config)
        return self.model_class(config, parts=load_parts(config, parts))
