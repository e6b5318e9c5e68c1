"""Plugin loading: entry points in the ``polymodal`` group, one at a time, failures recorded.

Built-in families and third-party distributions load the same way. A plugin that
fails to import or register is recorded with its error (``polymodal plugins`` shows
it) and whatever it had registered is removed; every other plugin still works.

Environment:
    ``POLYMODAL_STRICT_PLUGINS=1``   re-raise the first plugin failure (tests and CI).
    ``POLYMODAL_DISABLE_PLUGINS=a,b`` skip the named plugins.
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from polymodal.registry import hookspecs
from polymodal.registry.table import Registry

GROUP = "polymodal"


@dataclass
class PluginRecord:
    """What happened to one plugin at start-up."""

    name: str
    source: str
    status: str  # "loaded", "failed" or "disabled"
    error: str = ""
    registered: int = 0


class PluginError(RuntimeError):
    """A plugin failed while ``POLYMODAL_STRICT_PLUGINS`` is set."""


_lock = threading.RLock()
_state: dict[str, Any] = {"registry": None, "manager": None, "records": []}


def _strict() -> bool:
    return os.environ.get("POLYMODAL_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


def _disabled() -> set[str]:
    raw = os.environ.get("POLYMODAL_DISABLE_PLUGINS", "")
    return {n.strip() for n in raw.split(",") if n.strip()}


def _new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _run_hooks(manager: pluggy.PluginManager, registry: Registry, name: str) -> int:
    """Call every registration hook the plugin ``name`` implements; returns how many it added."""
    count = 0
    hooks = {
        **hookspecs.HOOK_KINDS,
        **{old: hookspecs.HOOK_KINDS[new] for old, new in hookspecs.DEPRECATED_HOOKS.items()},
    }
    for hook_name, kind in hooks.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            if impl.plugin_name != name:
                continue

            def register(entry_name: str, obj: Any, doc: str = "", _kind: str = kind) -> Any:
                registry.add(_kind, entry_name, obj, plugin=name, doc=doc)
                return obj

            impl.function(register=register)
            count += 1
    return count


def _check_hooks(manager: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Refuse a hook implementation no hookspec declares (a misspelt ``register_modles`` would never run)."""
    known = [*hookspecs.HOOK_KINDS, *hookspecs.DEPRECATED_HOOKS]
    for caller in manager.get_hookcallers(plugin) or []:
        if caller.spec is None:
            close = difflib.get_close_matches(caller.name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(hookspecs.HOOK_KINDS)}"
            raise pluggy.PluginValidationError(
                plugin, f"plugin {name!r} implements an unknown hook {caller.name!r}{hint}"
            )
    manager.check_pending()  # the same check across every plugin, pluggy's own


def register_plugin(plugin: Any, name: str, *, source: str = "<direct>") -> PluginRecord:
    """Register a plugin object (a module or any object with hook implementations).

    Failures are recorded, or re-raised under ``POLYMODAL_STRICT_PLUGINS=1``.
    """
    with _lock:
        registry, manager = _ensure_loaded()
        return _add(manager, registry, plugin, name, source)


def _add(manager: pluggy.PluginManager, registry: Registry, plugin: Any, name: str, source: str) -> PluginRecord:
    try:
        manager.register(plugin, name=name)
        _check_hooks(manager, plugin, name)
        _run_hooks(manager, registry, name)
        record = PluginRecord(name, source, "loaded", registered=sum(1 for e in registry.entries() if e.plugin == name))
    except Exception as exc:  # a broken plugin must not take the others down
        registry.remove_plugin(name)
        if manager.is_registered(plugin) or manager.get_plugin(name) is not None:
            manager.unregister(name=name)
        record = PluginRecord(name, source, "failed", error=_describe(exc))
        if _strict():
            _state["records"].append(record)
            raise PluginError(f"plugin {name!r} ({source}) failed: {record.error}") from exc
    _state["records"].append(record)
    return record


def unregister_plugin(name: str) -> None:
    """Remove a plugin and everything it registered."""
    with _lock:
        registry, manager = _ensure_loaded()
        registry.remove_plugin(name)
        if manager.get_plugin(name) is not None:
            manager.unregister(name=name)
        _state["records"] = [r for r in _state["records"] if r.name != name]


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _load_entry_points(manager: pluggy.PluginManager, registry: Registry) -> None:
    disabled = _disabled()
    seen: set[str] = set()
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name != "core", e.name)):
        if ep.name in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add(ep.name)
        source = f"{ep.value}" + (f" [{ep.dist.name}]" if getattr(ep, "dist", None) else "")
        if ep.name in disabled:
            _state["records"].append(PluginRecord(ep.name, source, "disabled"))
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            record = PluginRecord(ep.name, source, "failed", error=_describe(exc))
            _state["records"].append(record)
            if _strict():
                raise PluginError(f"plugin {ep.name!r} ({source}) failed: {record.error}") from exc
            continue
        _add(manager, registry, plugin, ep.name, source)
    if "core" not in seen and "core" not in disabled:
        # Running from a source tree without installed metadata: the core still registers.
        _add(manager, registry, importlib.import_module("polymodal.builtin"), "core", "polymodal.builtin")


def _ensure_loaded() -> tuple[Registry, pluggy.PluginManager]:
    if _state["registry"] is None:
        registry, manager = Registry(), _new_manager()
        _state.update(registry=registry, manager=manager, records=[])
        try:
            _load_entry_points(manager, registry)
        except Exception:
            _state.update(registry=None, manager=None)
            raise
    return _state["registry"], _state["manager"]


def get_registry() -> Registry:
    """The process-wide registry, loading plugins on first use."""
    with _lock:
        return _ensure_loaded()[0]


def peek_registry() -> Registry | None:
    """The process-wide registry if the plugins are already loaded, else None (never loads them).

    For code on a hot path that must not trigger plugin loading, such as the attention dispatcher.
    """
    return _state["registry"]


def plugin_records() -> list[PluginRecord]:
    """One record per plugin seen at start-up (loaded, failed or disabled)."""
    with _lock:
        _ensure_loaded()
        return list(_state["records"])


def reset() -> None:
    """Forget all plugins; the next registry access loads entry points again."""
    with _lock:
        _state.update(registry=None, manager=None, records=[])
