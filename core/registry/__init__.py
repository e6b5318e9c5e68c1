"""Plugin machinery, the bottom layer: the registry of named components, the hook specs and
the plugin loader.

After start-up nothing on a forward path consults pluggy: code asks the registry
(``polymodal.registry.get("encoder", "vit")``) and gets the object a plugin registered.
The module functions below read the process-wide registry, loading the plugins on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from polymodal.registry.hookspecs import ACCEPTS, Accepts, hookimpl, hookspec
from polymodal.registry.loader import (
    PluginError,
    PluginRecord,
    PluginWarning,
    get_registry,
    peek_registry,
    plugin_records,
)
from polymodal.registry.table import KINDS, Entry, Registry, RegistryError


def get(kind: str, name: str) -> Any:
    """The object registered as ``kind``/``name`` in the process-wide registry."""
    return get_registry().get(kind, name)


def entry(kind: str, name: str) -> Entry:
    """The :class:`Entry` for ``kind``/``name`` in the process-wide registry."""
    return get_registry().entry(kind, name)


def names(kind: str) -> list[str]:
    """Sorted names of one kind in the process-wide registry."""
    return get_registry().names(kind)


def entries(kind: str | None = None) -> Iterator[Entry]:
    """Entries of the process-wide registry (all kinds, or one)."""
    return get_registry().entries(kind)


def find(name: str) -> list[Entry]:
    """Every entry called ``name`` in the process-wide registry."""
    return get_registry().find(name)


def register_variants(register: Callable[..., object], variants: Mapping[str, Any]) -> None:
    """Register every ``name -> ModelSpec`` of ``variants``: the whole body of a family's ``register_models``::

        @hookimpl
        def register_models(register):
            register_variants(register, VARIANTS)

    Each variant's registry doc is its spec's ``doc``.
    """
    if not isinstance(variants, Mapping):
        raise ValueError(
            f"register_variants expects a mapping of variant name to ModelSpec; got {type(variants).__name__}"
        )
    for name, spec in variants.items():
        register(name, spec)


def has(kind: str, name: str) -> bool:
    """Whether ``kind``/``name`` is registered in the process-wide registry."""
    return (kind, name) in get_registry()


__all__ = [
    "ACCEPTS",
    "KINDS",
    "Accepts",
    "Entry",
    "PluginError",
    "PluginRecord",
    "PluginWarning",
    "Registry",
    "RegistryError",
    "entries",
    "entry",
    "find",
    "get",
    "get_registry",
    "has",
    "hookimpl",
    "hookspec",
    "names",
    "peek_registry",
    "plugin_records",
    "register_variants",
]
