"""Where trained default parts, judges and hub conversions are kept between runs, and what is there.

Everything polymodal caches lives under :func:`cache_root` (``$POLYMODAL_CACHE`` or
``~/.cache/polymodal``), one folder per entry:

```
parts/<variant>-<data>/        a model folder: an "auto" part trained once (api.prepare_parts)
judge/<attributes>-<hash>/     judge.json + judge.safetensors: the judge of generated images
hub/…/                         a model folder converted from a Hugging Face Hub repository
igpt-probe/<name>-<hash>/      probe_by_layer.png: an iGPT evaluation's plot
```

:func:`cache_entries` lists what is there (``polymodal cache list``) and :func:`clear_cache`
removes entries (``polymodal cache clear``). Only a folder polymodal writes is an entry (a model
folder, a judge, a probe plot); anything else under the root, and every symbolic link, is never
listed and never removed. :func:`announce` is the one-line note on stderr each cache user prints
when it trains into, converts into or reuses an entry.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from polymodal.io.output import folder_kind


def cache_root() -> Path:
    """``$POLYMODAL_CACHE`` or ``~/.cache/polymodal``: where trained default parts and judges live."""
    return Path(os.environ.get("POLYMODAL_CACHE") or Path.home() / ".cache" / "polymodal")


def default_part_folder(variant: str, data: str) -> Path:
    """Where ``"auto"`` keeps the default ``variant`` trained on ``data``."""
    return cache_root() / "parts" / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{variant}-{data}")


def announce(message: str) -> None:
    """Print ``polymodal: MESSAGE`` as one line on stderr (stdout stays the command's own output):
    what the cache is used for, e.g. a default part trained into it or a judge reused from it."""
    print(f"polymodal: {message}", file=sys.stderr, flush=True)


@contextmanager
def entry_lock(folder: str | Path) -> Iterator[None]:
    """Hold the cache entry ``folder``'s lock (``PARENT/.NAME.cache-lock``, hidden from listings), waiting for
    another process that holds it. Whoever makes an entry checks for it again inside the lock, so two runs
    needing the same missing part or judge train it once: the second waits, then reuses it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / f".{folder.name}.cache-lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        announce(f"waiting for another process that is making {folder}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


KINDS = {"parts": "part", "judge": "judge", "hub": "hub", "igpt-probe": "probe"}
"""The cache's top-level folders and the kind ``polymodal cache list`` shows for their entries."""

_FILES = {"judge": {"judge.json", "judge.safetensors"}, "probe": {"probe_by_layer.png"}}
"""The kinds of entry that are plain files, and the only files such an entry may hold."""

_DEPTH = 4
"""How deep below the root an entry is looked for (``hub/ORG/NAME/REVISION`` is the deepest layout)."""


@dataclass(frozen=True)
class CacheEntry:
    """One thing polymodal keeps in the cache."""

    name: str
    """Its path below the cache root (``parts/vqvae-digits``): what ``polymodal cache clear NAME`` takes."""
    kind: str
    """``part``, ``judge``, ``hub``, ``probe`` (or the top-level folder's name)."""
    path: Path
    """The folder itself."""
    size: int
    """Bytes of its files (a hard-linked file counted once)."""


def _size(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (symbolic links not followed, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(parent, d))]
        for name in files:
            st = os.lstat(os.path.join(parent, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _entry_kind(folder: Path) -> str | None:
    """``model`` for a model folder (or a training run that has only its checkpoint), ``judge`` or
    ``probe`` for a folder holding only those files, else None (not something polymodal wrote)."""
    try:
        kind, _ = folder_kind(folder)
        names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    except OSError:
        return None
    if kind in ("model", "run"):
        return "model"
    for what, allowed in _FILES.items():
        files = [folder / n for n in names]
        if names and names <= allowed and all(f.is_file() and not f.is_symlink() for f in files):
            return what
    return None


def cache_entries(root: str | Path | None = None) -> list[CacheEntry]:
    """Every entry polymodal wrote under ``root`` (default :func:`cache_root`), sorted by name.

    A folder is an entry when it is a model folder (a trained part, a hub conversion), a judge or a
    probe plot's folder; a folder of anything else is looked into (up to a few levels), never listed.
    Hidden names (temporary folders, locks) and symbolic links are skipped.
    """
    root = Path(root) if root is not None else cache_root()
    found: list[CacheEntry] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return
        for child in children:
            if child.name.startswith(".") or child.is_symlink() or not child.is_dir():
                continue
            what = _entry_kind(child)
            if what is None:
                if depth < _DEPTH:
                    visit(child, depth + 1)
                continue
            name = child.relative_to(root).as_posix()
            top = name.split("/", 1)[0]
            kind = KINDS.get(top, top) if what == "model" or top in KINDS else what
            found.append(CacheEntry(name, kind, child, _size(child)))

    if root.is_dir():
        visit(root, 1)
    return sorted(found, key=lambda e: e.name)


def select_entries(names: tuple[str, ...] | list[str], root: str | Path | None = None) -> list[CacheEntry]:
    """The entries ``names`` name (all of them when empty): an entry's name (``parts/vqvae-digits``),
    its last component when no other entry shares it (``vqvae-digits``), or a top-level folder
    (``parts``, ``judge``, ``hub``) for all its entries. A name that matches nothing is a ValueError
    listing the entries there are."""
    entries = cache_entries(root)
    if not names:
        return entries
    chosen: dict[str, CacheEntry] = {}
    for raw in names:
        name = raw.strip().strip("/")
        match = [e for e in entries if e.name == name or e.name.startswith(name + "/")]
        if not match:
            match = [e for e in entries if e.name.rsplit("/", 1)[-1] == name]
            if len(match) > 1:
                raise ValueError(
                    f"cache entry {raw!r} is ambiguous: {', '.join(e.name for e in match)}; give the whole name"
                )
        if not match:
            listing = ", ".join(e.name for e in entries) or "the cache is empty"
            raise ValueError(f"no cache entry {raw!r} under {Path(root or cache_root())}; expected one of: {listing}")
        chosen |= {e.name: e for e in match}
    return sorted(chosen.values(), key=lambda e: e.name)


def remove_entry(entry: CacheEntry) -> None:
    """Remove one entry's folder: checked again to be polymodal's (never a link or a foreign folder),
    renamed aside to ``.NAME.<hex>.tmp`` first so no reader finds half of it, then deleted."""
    if entry.path.is_symlink() or _entry_kind(entry.path) is None:
        raise ValueError(f"{entry.path} is not a cache entry polymodal wrote (any more); left alone")
    aside = entry.path.parent / f".{entry.path.name}.{secrets.token_hex(6)}.tmp"
    os.replace(entry.path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def clear_cache(names: tuple[str, ...] | list[str] = (), root: str | Path | None = None) -> list[CacheEntry]:
    """Remove the entries ``names`` name (every entry when empty; see :func:`select_entries`) and return
    them. Only entries polymodal wrote are removed: nothing else under the root is touched."""
    entries = select_entries(names, root)
    for entry in entries:
        remove_entry(entry)
    return entries


def human_size(size: int) -> str:
    """``size`` bytes as ``812 B``, ``3.2 kB``, ``12.8 MB`` or ``1.1 GB``."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


__all__ = [
    "CacheEntry",
    "KINDS",
    "announce",
    "cache_entries",
    "cache_root",
    "clear_cache",
    "default_part_folder",
    "entry_lock",
    "human_size",
    "remove_entry",
    "select_entries",
]
