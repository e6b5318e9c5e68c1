"""Contract checks for the registered components other than models: encoders, attention backends,
datasets, registry docs, config docs, model specs and the Protocols a model declares.

``tests/test_contracts.py`` runs them over the whole registry; the model checks are in
:mod:`polymodal.testing.contracts`.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import Tensor

from polymodal.models import ModelSpec, PolymodalModel
from polymodal.testing.contracts import _name, build, example_inputs, resolve

# -- kinds other than models --------------------------------------------------------------------------------


def check_encoder(encoder_class: type, batch_size: int = 2) -> None:
    """The encoder builds from ``config_class()`` defaults and maps ``example_inputs`` to (B, N, out_dim)."""
    name = getattr(encoder_class, "__name__", repr(encoder_class))
    cfg_class = getattr(encoder_class, "config_class", None)
    assert cfg_class is not None, f"encoder {name} has no config_class"
    torch.manual_seed(0)
    encoder = encoder_class(cfg_class()).eval()
    inputs = example_inputs(encoder, batch_size)
    with torch.no_grad():
        out = encoder(*inputs)
    assert isinstance(out, Tensor), f"encoder {name} returned {type(out).__name__}, expected a tensor (B, N, out_dim)"
    assert out.dim() == 3 and out.shape[0] == batch_size, (
        f"encoder {name} returned shape {tuple(out.shape)}, expected (B, N, D)"
    )
    out_dim = getattr(encoder, "out_dim", None)
    assert out_dim is None or out.shape[-1] == out_dim, f"encoder {name}: last dim {out.shape[-1]} != out_dim {out_dim}"
    assert torch.isfinite(out).all(), f"encoder {name} returned non-finite values"


def attention_specs() -> list[Any]:
    """A spread of attention calls (devices, dtypes, masks, grad, dropout) to ask backends about."""
    from polymodal.attention import AttentionSpec

    specs = []
    for device in ("cpu", "cuda"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for causal, padding, packed, dense in (
                (False, False, False, ""),
                (True, False, False, ""),
                (False, True, False, ""),
                (True, False, True, ""),
                (False, False, False, "bool"),
                (True, True, False, "additive"),
            ):
                for grad, dropout in ((False, False), (True, False), (True, True)):
                    specs.append(AttentionSpec(device, dtype, grad, causal, padding, packed, dense, dropout, 8, 8, 16))
    return specs


def check_attention_backend(backend: Any, name: str = "") -> None:
    """``available()`` and ``supports(spec)`` return ``None`` or a non-empty reason string, for many calls."""
    label = name or getattr(backend, "name", repr(backend))
    assert callable(backend), f"attention backend {label} is not callable"
    why = backend.available()
    assert why is None or (isinstance(why, str) and why), f"attention backend {label}.available() returned {why!r}"
    for spec in attention_specs():
        why = backend.supports(spec)
        assert why is None or (isinstance(why, str) and why), (
            f"attention backend {label}.supports({spec}) returned {why!r}; expected None or a reason"
        )


def check_dataset_entry(obj: Any, name: str = "") -> None:
    """A dataset entry is a callable ``(root=None, **options) -> Dataset``."""
    assert callable(obj), f"dataset {name or obj!r} is not callable"


def check_component_doc(entry: Any) -> None:
    """A registry entry has a one-line doc (``polymodal list`` shows it)."""
    assert isinstance(entry.doc, str) and entry.doc.strip(), (
        f"{entry.kind} {entry.name!r} from plugin {entry.plugin!r} has no doc: give it a docstring or register(..., doc=...)"
    )


def _nested_config_types(cls: type) -> Iterator[type]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    for a in attrs.fields(cls):
        tp = hints.get(a.name, a.type)
        for candidate in (tp, *typing.get_args(tp)):
            if isinstance(candidate, type) and attrs.has(candidate):
                yield candidate
        default = (
            a.default.factory() if isinstance(a.default, attrs.Factory) and not a.default.takes_self else a.default
        )
        if attrs.has(type(default)):
            yield type(default)


def check_config_docs(config: Any) -> None:
    """Every field of an attrs config class (and of the configs nested in it) has ``metadata['doc']``."""
    cls = config if isinstance(config, type) else type(config)
    seen: set[type] = set()
    todo = [cls]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        assert attrs.has(current), f"{current.__name__} is not an attrs config class"
        missing = [a.name for a in attrs.fields(current) if not str(a.metadata.get("doc", "")).strip()]
        assert not missing, (
            f"{current.__name__} fields without a docstring: {', '.join(missing)} (use polymodal.config.field)"
        )
        todo.extend(_nested_config_types(current))


def registered_configs(registry: Any = None) -> dict[str, type]:
    """Every config class reachable from the registry (each once), by a label naming where it was found.

    Nested configs are not listed; :func:`check_config_docs` walks into them.
    """
    if registry is None:
        from polymodal.registry import get_registry

        registry = get_registry()
    found: dict[str, type] = {}

    def add(label: str, cls: Any) -> None:
        if isinstance(cls, type) and attrs.has(cls) and cls not in found.values():
            found[label] = cls

    for e in registry.entries():
        if e.kind == "model":
            add(f"model {e.name} config", type(e.obj.config))
            add(f"model {e.name} config_class", e.obj.model_class.config_class)
            add(f"model {e.name} train", type(e.obj.train))
        add(f"{e.kind} {e.name} config_class", getattr(e.obj, "config_class", None))
    return found


def check_spec(spec: str | ModelSpec) -> None:
    """A ModelSpec is coherent: a PolymodalModel subclass with a family, and a config of its config_class."""
    spec = resolve(spec)
    cls = spec.model_class
    assert isinstance(cls, type) and issubclass(cls, PolymodalModel), f"{cls!r} is not a PolymodalModel subclass"
    assert cls.family, f"{cls.__name__}.family is empty"
    assert isinstance(spec.config, cls.config_class), (
        f"{cls.__name__}: the spec's config is a {type(spec.config).__name__}, not its config_class {cls.config_class.__name__}"
    )


def check_implements(spec: str | ModelSpec, *, use_tiny: bool = True) -> None:
    """A built model has every member of each protocol its class declares in ``implements``.

    ``implements = (CausalLM,)`` on a model class (see :mod:`polymodal.models.interfaces`)
    promises that other families can take the model as that part; a variant whose class declares
    nothing passes without being built.
    """
    from polymodal.models.interfaces import missing_members

    spec = resolve(spec)
    declared = tuple(getattr(spec.model_class, "implements", ()))
    if not declared:
        return
    for protocol in declared:
        assert getattr(protocol, "_is_protocol", False), (
            f"{_name(spec)}.implements lists {protocol!r}, which is not a typing.Protocol"
        )
    model = build(spec, use_tiny=use_tiny, perturb=False)
    for protocol in declared:
        missing = missing_members(model, protocol)
        assert not missing, f"{_name(spec)} declares it implements {protocol.__name__} but lacks {', '.join(missing)}"
        assert isinstance(model, protocol), f"{_name(spec)} is not an instance of {protocol.__name__}"
