"""Plugin loading: entry points in the ``polymodal`` group, one at a time, failures recorded.

Built-in families and third-party distributions load the same way, built-ins first (the
entry points of the ``polymodal`` distribution itself, ``core`` leading). A plugin that
fails to import or register (any exception, ``sys.exit()`` included; only ``KeyboardInterrupt``
passes) is recorded with its error (``polymodal plugins`` shows it) and whatever it had
registered is removed; every other plugin still works. Each registered object is checked
against its kind (:data:`polymodal.registry.hookspecs.ACCEPTS`). Nothing shadows a built-in:
another distribution's entry point with a built-in's name is refused, and a component name
already taken fails the plugin that came later, naming both plugins and distributions.

Environment:
    ``POLYMODAL_STRICT_PLUGINS=1``   re-raise the first plugin failure (tests and CI).
    ``POLYMODAL_DISABLE_PLUGINS=a,b`` skip the named plugins (a name no plugin has is warned about).
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import threading
import traceback
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from polymodal.registry import hookspecs
from polymodal.registry.table import Registry, RegistryError

GROUP = "polymodal"
BUILTIN_DISTRIBUTION = "polymodal"
"""The distribution whose entry points are the built-in plugins: they load first and cannot be replaced."""


@dataclass
class PluginRecord:
    """What happened to one plugin at start-up."""

    name: str
    source: str
    status: str  # "loaded", "failed" or "disabled"
    error: str = ""
    registered: int = 0
    distribution: str = ""


class PluginError(RuntimeError):
    """A plugin failed while ``POLYMODAL_STRICT_PLUGINS`` is set."""


class PluginWarning(UserWarning):
    """A plugin setting that does nothing (``POLYMODAL_DISABLE_PLUGINS`` naming no installed plugin)."""


_lock = threading.RLock()
_state: dict[str, Any] = {"registry": None, "manager": None, "records": [], "distributions": {}}
_HERE = str(Path(__file__).resolve().parent) + os.sep


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
                _check_object(registry, _kind, entry_name, obj, name)
                registry.add(_kind, entry_name, obj, plugin=name, doc=doc)
                return obj

            impl.function(register=register)
            count += 1
    return count


def _who(plugin: str) -> str:
    """``plugin 'x'``, with its distribution when it came from one."""
    dist = _state["distributions"].get(plugin, "")
    return f"plugin {plugin!r}" + (f" of distribution {dist!r}" if dist else "")


def _check_object(registry: Registry, kind: str, name: str, obj: Any, plugin: str) -> None:
    """Refuse an object of the wrong type for ``kind``, or a name another plugin already holds."""
    accepts = hookspecs.ACCEPTS.get(kind)
    if accepts is not None and not accepts.accepts(obj):
        raise TypeError(f"{kind} {name!r} from {_who(plugin)} is {hookspecs.describe(obj)}; expected {accepts}")
    if (kind, name) in registry:
        held = registry.entry(kind, name).plugin
        raise RegistryError(f"duplicate {kind} {name!r}: registered by {_who(held)} and again by {_who(plugin)}")


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


def _fail(record: PluginRecord, exc: BaseException | None = None) -> PluginRecord:
    """Record a failed plugin; under ``POLYMODAL_STRICT_PLUGINS`` raise :class:`PluginError` instead."""
    _state["records"].append(record)
    registry, manager = _state["registry"], _state["manager"]
    if registry is not None and not (manager is not None and manager.get_plugin(record.name) is not None):
        registry.unavailable[record.name] = record.error  # an unknown name then names this plugin
    if _strict():
        raise PluginError(f"plugin {record.name!r} ({record.source}) failed: {record.error}") from exc
    return record


def _add(
    manager: pluggy.PluginManager, registry: Registry, plugin: Any, name: str, source: str, dist: str = ""
) -> PluginRecord:
    if manager.get_plugin(name) is not None:  # leave the plugin that holds the name alone
        return _fail(PluginRecord(name, source, "failed", error=f"a plugin named {name!r} is already registered"))
    _state["distributions"][name] = dist
    try:
        manager.register(plugin, name=name)
        _check_hooks(manager, plugin, name)
        _run_hooks(manager, registry, name)
    except BaseException as exc:  # a broken plugin must not take the others (or the CLI) down
        registry.remove_plugin(name)
        if manager.is_registered(plugin) or manager.get_plugin(name) is not None:
            manager.unregister(name=name)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return _fail(PluginRecord(name, source, "failed", error=_describe(exc), distribution=dist), exc)
    registered = sum(1 for e in registry.entries() if e.plugin == name)
    record = PluginRecord(name, source, "loaded", registered=registered, distribution=dist)
    registry.unavailable.pop(name, None)
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
        registry.unavailable.pop(name, None)
        _state["distributions"].pop(name, None)


def _describe(exc: BaseException) -> str:
    """``Type: message (at file:line)``, the line being the last one outside the loader (the plugin's)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    outside = [f for f in frames if not str(Path(f.filename).resolve()).startswith(_HERE)]
    last = (outside or frames)[-1:]
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r}){where}"
    return f"{type(exc).__name__}: {exc}{where}"


def _distribution(ep: Any) -> str:
    """The name of the distribution that publishes ``ep`` ("" when unknown)."""
    try:
        return str(ep.dist.name or "") if getattr(ep, "dist", None) is not None else ""
    except Exception:  # broken metadata
        return ""


def _is_builtin(dist: str) -> bool:
    return re.sub(r"[-_.]+", "-", dist).lower() == BUILTIN_DISTRIBUTION


def _load_entry_points(manager: pluggy.PluginManager, registry: Registry) -> None:
    disabled = _disabled()
    claimed: dict[str, str] = {}  # entry-point name -> the distribution that has it
    found = [(ep, _distribution(ep)) for ep in entry_points(group=GROUP)]
    found.sort(key=lambda pair: (not _is_builtin(pair[1]), pair[0].name != "core", pair[0].name, pair[1]))
    for ep, dist in found:
        source = f"{ep.value}" + (f" [{dist}]" if dist else "")
        if ep.name in claimed:
            if claimed[ep.name] == dist:  # the same distribution seen twice on sys.path
                continue
            held = claimed[ep.name]
            kind = "the built-in plugin" if _is_builtin(held) else "plugin"
            error = (
                f"entry point {ep.name!r} of distribution {dist or '?'!r} clashes with {kind} {ep.name!r} of "
                f"distribution {held or '?'!r}, which loaded first; "
                + ("built-in plugins cannot be replaced; " if _is_builtin(held) else "")
                + "rename the entry point"
            )
            _fail(PluginRecord(ep.name, source, "failed", error=error, distribution=dist))
            continue
        claimed[ep.name] = dist
        if ep.name in disabled:
            _state["records"].append(PluginRecord(ep.name, source, "disabled", distribution=dist))
            registry.unavailable[ep.name] = "disabled by POLYMODAL_DISABLE_PLUGINS"
            continue
        try:
            plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin never ends the process
            _fail(PluginRecord(ep.name, source, "failed", error=_describe(exc), distribution=dist), exc)
            continue
        _add(manager, registry, plugin, ep.name, source, dist)
    if "core" not in claimed and "core" not in disabled:
        # Running from a source tree without installed metadata: the core still registers.
        _add(manager, registry, importlib.import_module("polymodal.builtin"), "core", "polymodal.builtin")
    _warn_unknown_disabled(disabled, {*claimed, "core"})


def _warn_unknown_disabled(disabled: set[str], known: set[str]) -> None:
    """Warn about names in ``POLYMODAL_DISABLE_PLUGINS`` that no plugin has (a typo disables nothing)."""
    unknown = sorted(disabled - known)
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    warnings.warn(
        f"POLYMODAL_DISABLE_PLUGINS names no installed plugin: {', '.join(parts)}; "
        f"known plugins: {', '.join(sorted(known))}",
        PluginWarning,
        stacklevel=2,
    )


def _ensure_loaded() -> tuple[Registry, pluggy.PluginManager]:
    if _state["registry"] is None:
        registry, manager = Registry(), _new_manager()
        _state.update(registry=registry, manager=manager, records=[], distributions={})
        try:
            _load_entry_points(manager, registry)
        except BaseException:  # strict mode or Ctrl-C: nothing stays half-loaded
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
        _state.update(registry=None, manager=None, records=[], distributions={})
