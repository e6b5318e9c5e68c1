"""The registry: one table of named components per kind, filled by plugins at start-up.

After start-up nothing on a forward path consults pluggy: code asks the registry
(``polymodal.registry.get("encoder", "vit")``) and gets the object a plugin registered.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from polymodal.registry.hookspecs import KINDS  # one kind per registration hook: the hookspecs are the list

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


class RegistryError(KeyError):
    """A lookup or registration the registry refuses; the message says why."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _short(text: str, limit: int = 120) -> str:
    """The first line of ``text``, cut to ``limit`` characters."""
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class Entry:
    """One registered component: its kind, name, the object itself and who registered it."""

    kind: str
    name: str
    obj: Any
    plugin: str
    doc: str = ""


@dataclass
class Registry:
    """Named components by kind. Names are lowercase; a duplicate name is an error."""

    _entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    version: int = 0
    """Bumped on every change, so callers can cache what they looked up."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Plugins that failed to load or were disabled (name → why, short): an unknown name lists them,
    since one of them may have been meant to provide it. The loader keeps this up to date."""

    def _check_kind(self, kind: str) -> None:
        if kind not in self._entries:
            raise RegistryError(f"unknown registry kind {kind!r}; expected one of {', '.join(KINDS)}")

    def add(self, kind: str, name: str, obj: Any, *, plugin: str = "<direct>", doc: str = "") -> Entry:
        """Register ``obj`` under ``kind``/``name``; ``plugin`` names who registered it.

        Raises :class:`RegistryError` when the name is not lowercase or already taken,
        naming both the plugin that holds it and the one that asked.
        """
        self._check_kind(kind)
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(
                f"{kind} name {name!r} from plugin {plugin!r} is invalid: expected lowercase "
                "letters, digits, '-', '_' or '.', starting with a letter or digit"
            )
        held = self._entries[kind].get(name)
        if held is not None:
            raise RegistryError(
                f"duplicate {kind} {name!r}: registered by plugin {held.plugin!r} and again by plugin {plugin!r}"
            )
        if not doc:
            doc = (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
        entry = Entry(kind, name, obj, plugin, doc)
        self._entries[kind][name] = entry
        self.version += 1
        return entry

    def remove(self, kind: str, name: str) -> None:
        """Unregister one entry (tests register and unregister around themselves)."""
        self._check_kind(kind)
        self._entries[kind].pop(name, None)
        self.version += 1

    def remove_plugin(self, plugin: str) -> None:
        """Unregister everything one plugin registered."""
        for table in self._entries.values():
            for name in [n for n, e in table.items() if e.plugin == plugin]:
                del table[name]
        self.version += 1

    def entry(self, kind: str, name: str) -> Entry:
        """The :class:`Entry` for ``kind``/``name``; an unknown name suggests close matches."""
        self._check_kind(kind)
        try:
            return self._entries[kind][name]
        except KeyError:
            known = sorted(self._entries[kind])
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            listing = ", ".join(known) if known else "none registered"
            raise RegistryError(f"unknown {kind} {name!r}{hint} (known: {listing}){self._unavailable_note()}") from None

    def _unavailable_note(self) -> str:
        """What an unknown name's error adds when plugins failed or were disabled: each (with why, cut
        short) and a pointer to ``polymodal plugins``; "" when every plugin loaded."""
        if not self.unavailable:
            return ""
        shown = "; ".join(f"{n!r} ({_short(why)})" for n, why in sorted(self.unavailable.items()))
        return f". Plugins not loaded (one may provide it): {shown}; see `polymodal plugins`"

    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``kind``/``name``."""
        return self.entry(kind, name).obj

    def names(self, kind: str) -> list[str]:
        """Sorted names registered under ``kind``."""
        self._check_kind(kind)
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        """All entries, or those of one kind, in name order."""
        kinds = KINDS if kind is None else (kind,)
        for k in kinds:
            self._check_kind(k)
            for name in sorted(self._entries[k]):
                yield self._entries[k][name]

    def find(self, name: str) -> list[Entry]:
        """Every entry called ``name``, whatever its kind."""
        return [t[name] for t in self._entries.values() if name in t]

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return kind in self._entries and name in self._entries[kind]
