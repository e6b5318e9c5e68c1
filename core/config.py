"""Configs: frozen attrs classes, validated fields with docs, and a JSON round trip.

Write a config like this::

    @config
    class MLPConfig:
        dim: int = field(64, "Width of the hidden layer.", check=in_range(1, 65536))
        act: str = field("gelu", "Activation.", check=one_of("gelu", "relu"))

``field`` keeps the docstring in the attribute's metadata (``polymodal info`` prints it);
an invalid value raises a ``ValueError`` naming the field, the allowed values and the value given.
Variants are made with ``attrs.evolve(cfg, dim=128)``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import attrs

config = attrs.frozen(kw_only=True)
"""Decorator for config classes: frozen, keyword-only attrs classes."""


def field(
    default: Any,
    doc: str,
    *,
    check: Callable | None = None,
    converter: Callable | None = None,
    runtime: bool = False,
    backfill: bool = False,
) -> Any:
    """A config field with a default, its documentation and an optional validator.

    ``runtime=True`` marks a field that does not change the function the model computes (how it runs:
    gradient checkpointing, …): a saved config written before the field existed loads with its default
    (:func:`from_dict` does not ask for it), and :func:`runtime_fields` lists such fields so comparisons
    of saved configs (``--resume``, exports) can leave them out.

    ``backfill=True`` marks an option added after configs were saved whose default computes what those
    configs computed (an option that is off by default): a saved config without it loads with the default.
    Unlike a runtime field it changes the function when set, so comparisons keep it.
    """
    if not doc:
        raise ValueError("every config field needs a docstring")
    metadata: dict[str, Any] = {"doc": doc, "runtime": True} if runtime else {"doc": doc}
    if backfill:
        metadata["backfill"] = True
    kwargs: dict[str, Any] = {"metadata": metadata, "validator": check, "converter": converter}
    if isinstance(default, (list, dict)):
        kwargs["factory"] = lambda d=default: type(d)(d)
    else:
        kwargs["default"] = default
    return attrs.field(**kwargs)


def as_tuple(value: Any) -> Any:
    """Field converter: a list (as JSON and ``--set`` give it) becomes the tuple the field holds; anything else is
    left to the field's validator."""
    return tuple(value) if isinstance(value, list) else value


def in_range(
    lo: float | None = None, hi: float | None = None, *, integer: bool = False, allow_inf: bool = False
) -> Callable:
    """Validator: a finite number within ``[lo, hi]`` (either bound may be open-ended).

    NaN is always refused (every comparison with it is false, so it would slip through any range),
    and so are ``inf`` and ``-inf`` unless ``allow_inf`` (then the bounds still apply to them).
    """

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        label = f"{type(instance).__name__}.{attribute.name}"
        if isinstance(value, bool) or not ok_type:
            raise ValueError(f"{label} must be {kind}, got {value!r}")
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not allow_inf)):
            raise ValueError(f"{label} must be a finite number, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ValueError(f"{label} must be in {bounds}, got {value!r}")

    return check


def one_of(*allowed: Any) -> Callable:
    """Validator: one of the listed values."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in allowed:
            raise ValueError(
                f"{type(instance).__name__}.{attribute.name} must be one of "
                f"{', '.join(map(repr, allowed))}; got {value!r}"
            )

    return check


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-compatible values (tuples become lists)."""
    return attrs.asdict(cfg, recurse=True)


def _nested_class(tp: Any) -> type | None:
    """The config class a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    if attrs.has(tp):
        return tp
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return next((a for a in typing.get_args(tp) if attrs.has(a)), None)
    return None


def _coerce(tp: Any, value: Any, label: str = "value", *, partial: bool = False) -> Any:
    """Turn a JSON value back into the annotated type (tuples, nested configs); ``label`` names the
    field in errors, ``partial`` lets nested configs take defaults for fields they do not give."""
    origin = typing.get_origin(tp)
    nested = _nested_class(tp)
    if nested is not None and not (value is None and nested is not tp):
        if not isinstance(value, dict):
            raise ValueError(
                f"{label} is a nested {nested.__name__}: expected a JSON object of its fields "
                f"(or dotted keys, {label.rsplit('.', 1)[-1]}.FIELD=VALUE), got {value!r}"
            )
        return from_dict(nested, value, partial=partial, label=label)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, label, partial=partial) for v in value)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is not type(None) and value is not None:
                return _coerce(arg, value, label, partial=partial)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _missing(cls: type, data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``cls`` (nested configs included) that ``data`` does not give."""
    hints = typing.get_type_hints(cls)
    out = []
    for a in attrs.fields(cls):
        if not a.init:
            continue
        if a.name not in data:
            if not (a.metadata.get("runtime") or a.metadata.get("backfill")):  # takes its default (see `field`)
                out.append(prefix + a.name)
            continue
        nested = _nested_class(hints.get(a.name, Any))
        if nested is not None and isinstance(data[a.name], dict):
            out += _missing(nested, data[a.name], f"{prefix}{a.name}.")
    return out


def backfilled(cls: type, saved: Any) -> dict[str, Any]:
    """``saved`` (a config dict written earlier) with the defaults of the ``backfill`` options added since, as
    :func:`to_dict` writes it; {} when it does not load as ``cls``."""
    try:
        return to_dict(from_dict(cls, saved))
    except (ValueError, TypeError):
        return {}


def runtime_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``cls`` (nested configs included) marked ``runtime=True`` in
    :func:`field`: settings that do not change the function (``["encoder.checkpointing"]`` for ViT)."""
    hints = typing.get_type_hints(cls)
    out = []
    for a in attrs.fields(cls):
        if a.metadata.get("runtime"):
            out.append(prefix + a.name)
        nested = _nested_class(hints.get(a.name, Any))
        if nested is not None:
            out += runtime_fields(nested, f"{prefix}{a.name}.")
    return out


def from_dict(cls: type, data: dict[str, Any], *, partial: bool = False, label: str | None = None) -> Any:
    """Build ``cls`` from a dict (a saved config, as :func:`to_dict` wrote it).

    Every field must be given, in nested configs too: a missing one raises a ValueError naming each
    missing field (dotted), because a default silently taken could load a different model; only a field
    marked ``runtime=True`` (see :func:`field`), which does not change the function, or ``backfill=True``, an
    option added later whose default computes what configs saved before it computed, takes its default.
    Unknown keys raise naming the known ones, and a nested config given anything but a JSON object raises
    naming it.
    ``partial=True`` is for *creating* a config from overrides (``--set encoder={"depth": 2}``): the
    fields not given take the class's defaults. ``label`` names ``cls`` in errors (default: its name).
    """
    label = label or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{label} expects a JSON object, got {type(data).__name__}")
    fields = attrs.fields_dict(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {label} field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    if not partial:
        missing = _missing(cls, data)
        if missing:
            raise ValueError(
                f"{label} is missing field(s) {', '.join(missing)}; a saved config names every field "
                "(only a config created from overrides takes defaults)"
            )
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints.get(k, Any), v, f"{label}.{k}", partial=partial) for k, v in data.items()})


def to_json(cfg: Any) -> str:
    """The config as an indented JSON string."""
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_json(cls: type, text: str) -> Any:
    """Parse a JSON string into ``cls``."""
    return from_dict(cls, json.loads(text))


def parse_overrides(cls: type, pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse ``key=value`` strings (as given to ``--set``) into typed field values.

    Values are read as JSON where that parses (``3``, ``0.1``, ``true``, ``[1,2]``),
    else as plain strings. An unknown key raises naming the known fields. A nested config takes a
    JSON object (``encoder={"depth": 2}``: a new nested config, the fields not given at the class's
    defaults) or, where its class names a ``string_field``, a plain string (``lm=DIR``, see
    :func:`evolve`); anything else (``null``, ``5``, ``[1]``) raises naming the field.
    """
    fields = attrs.fields_dict(cls)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ValueError(f"unknown {cls.__name__} field {key!r}; known: {', '.join(fields)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        tp, label = hints.get(key, Any), f"{cls.__name__}.{key}"
        nested = _nested_class(tp)
        if nested is not None and isinstance(value, str) and isinstance(getattr(nested, "string_field", None), str):
            out[key] = value  # lm=DIR: evolve sets the nested config's string field
            continue
        out[key] = _coerce(tp, value, label, partial=True)
    return out


def evolve(cfg: Any, **changes: Any) -> Any:
    """``attrs.evolve(cfg, **changes)``, where a string given for a nested config whose class names a
    ``string_field`` (a pretrained part's ``path``) sets that field of the nested config: with
    ``lm: PartConfig``, ``evolve(cfg, lm="runs/lm")`` is ``evolve(cfg, lm=evolve(cfg.lm, path="runs/lm"))``."""
    for key, value in changes.items():
        current = getattr(cfg, key, None)
        name = getattr(type(current), "string_field", None)
        if isinstance(value, str) and attrs.has(type(current)) and isinstance(name, str):
            changes[key] = attrs.evolve(current, **{name: value})
    return attrs.evolve(cfg, **changes)


class OverrideError(ValueError):
    """An override (``--set KEY=VALUE``) refused: the message starts with the override as the user typed
    it (``--set encoder.block.heads=5: …``) and names fields by their dotted keys, not their classes."""


def _nested_configs(cfg: Any, prefix: str) -> list[tuple[str, Any]]:
    """``(dotted prefix, config)`` for ``cfg`` and every config nested in it, breadth first
    (``("", vit_config), ("encoder.", encoder_config), ("encoder.block.", block_config)``)."""
    out, todo = [], [(prefix, cfg)]
    while todo:
        path, item = todo.pop(0)
        out.append((path, item))
        values = ((f"{path}{a.name}.", getattr(item, a.name)) for a in attrs.fields(type(item)))
        todo += [(p, v) for p, v in values if attrs.has(type(v))]
    return out


def _reword(exc: Exception, cfg: Any, prefix: str, shown: list[str], flag: str) -> OverrideError:
    """``exc`` (a validator's or a parser's error) as an :class:`OverrideError`: led by the overrides
    ``shown`` (with ``prefix``), with ``SomeConfig.field`` said as the dotted key (``encoder.block.field``,
    the first field of ``cfg`` holding a ``SomeConfig``)."""
    paths: dict[str, str] = {}
    for path, item in _nested_configs(cfg, prefix):
        paths.setdefault(type(item).__name__, path)
    message = re.sub(r"\b([A-Z][A-Za-z0-9_]*)\.(?=[A-Za-z_])", lambda m: paths.get(m.group(1), m.group(0)), str(exc))
    typed = " ".join(prefix + pair for pair in shown)
    return OverrideError(f"{flag} {typed}: {message}" if flag else f"{typed}: {message}")


def _unknown_field(cfg: Any, key: str, prefix: str) -> str:
    """Why ``prefix + key`` names no field of ``cfg``: where a field ``key`` does live, close names, the known ones."""
    fields = attrs.fields_dict(type(cfg))
    deeper = [path + key for path, item in _nested_configs(cfg, prefix) if key in attrs.fields_dict(type(item))]
    close = [prefix + c for c in difflib.get_close_matches(key, list(fields), n=2, cutoff=0.7)]
    hint = list(dict.fromkeys(deeper + close))
    where = f"fields of {prefix[:-1]}" if prefix else "fields"
    meant = f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""
    return f"unknown field {prefix + key!r}{meant} (known {where}: {', '.join(fields)})"


def apply_overrides(cfg: Any, pairs: list[str] | tuple[str, ...], *, flag: str = "--set") -> Any:
    """``cfg`` with ``key=value`` overrides applied; dotted keys reach nested configs (``encoder.dim=128``),
    and a plain string for a nested config with a ``string_field`` sets that field (``lm=DIR``, see :func:`evolve`).

    A nested config is changed either whole (``encoder={"depth": 2}``, see :func:`parse_overrides`) or by
    dotted keys, not both: a JSON object for ``encoder`` beside ``encoder.depth=2`` raises a ValueError
    naming both (the order of the pairs would otherwise decide silently). A plain string for a
    ``string_field`` (``lm=DIR``) goes with dotted keys (``lm.variant=…``): both apply.

    Every refusal is an :class:`OverrideError` (a ValueError) that starts with the override as typed,
    after ``flag`` (the option it came from: ``--set``, ``--train-set``; "" for none), and names fields by
    their dotted keys: ``--set encoder.block.heads=5: encoder.block.heads must divide dim; got dim=64, heads=5``.
    """
    return _apply(cfg, tuple(pairs), "", flag)


def _apply(cfg: Any, pairs: tuple[str, ...], prefix: str, flag: str) -> Any:
    """:func:`apply_overrides` on the nested config ``cfg`` at dotted ``prefix`` (``encoder.``)."""
    nested: dict[str, list[str]] = {}
    flat: list[str] = []
    fields = attrs.fields_dict(type(cfg))
    for pair in pairs:
        if "=" not in pair:
            raise OverrideError(f"{flag or 'an override'} expects key=value, got {prefix + pair!r}")
        key = pair.split("=", 1)[0].strip()
        if "." in key:
            head, rest = pair.split(".", 1)
            nested.setdefault(head.strip(), []).append(rest)
        elif key not in fields:
            raise _reword(ValueError(_unknown_field(cfg, key, prefix)), cfg, prefix, [pair], flag)
        else:
            flat.append(pair)
    parsed: dict[str, Any] = {}
    for pair in flat:
        try:
            parsed |= parse_overrides(type(cfg), [pair])
        except ValueError as exc:
            raise _reword(exc, cfg, prefix, [pair], flag) from None
    for head, rest in nested.items():
        if head in parsed and not isinstance(parsed[head], str):
            dotted = ", ".join(f"{prefix}{head}.{r.split('=', 1)[0].strip()}=…" for r in rest)
            raise OverrideError(
                f"{flag + ' ' if flag else ''}{prefix}{head}=… and {dotted} both set {prefix}{head}: "
                "give the whole object or dotted keys, not both"
            )
    try:
        cfg = evolve(cfg, **parsed)  # first, so `lm=DIR lm.variant=…` keeps both
    except (ValueError, TypeError) as exc:
        raise _reword(exc, cfg, prefix, flat, flag) from None
    changes: dict[str, Any] = {}
    for head, rest in nested.items():
        inner = getattr(cfg, head, None) if head in fields else None
        if inner is None or not attrs.has(type(inner)):
            nests = ", ".join(prefix + n for n in fields if attrs.has(type(getattr(cfg, n)))) or "none"
            why = f"{prefix + head!r} is not a nested config (nested configs: {nests})"
            raise _reword(
                ValueError(why if head in fields else _unknown_field(cfg, head, prefix)),
                cfg,
                prefix,
                [f"{head}.{r}" for r in rest],
                flag,
            )
        changes[head] = _apply(inner, tuple(rest), f"{prefix}{head}.", flag)
    try:
        return attrs.evolve(cfg, **changes)
    except (ValueError, TypeError) as exc:
        raise _reword(exc, cfg, prefix, [f"{h}.{r}" for h, rest in nested.items() for r in rest], flag) from None


def describe(cls_or_cfg: Any) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, doc)`` for every field, for ``polymodal info``."""
    cls = cls_or_cfg if isinstance(cls_or_cfg, type) else type(cls_or_cfg)
    rows = []
    for a in attrs.fields(cls):
        if isinstance(cls_or_cfg, type):
            default = a.default.factory() if isinstance(a.default, attrs.Factory) else a.default
        else:
            default = getattr(cls_or_cfg, a.name)
        tp = a.type if isinstance(a.type, str) else getattr(a.type, "__name__", str(a.type))
        rows.append((a.name, str(tp), default, a.metadata.get("doc", "")))
    return rows
