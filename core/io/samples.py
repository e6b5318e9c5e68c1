"""A samples folder (``polymodal sample --out DIR``): each run replaces the files the previous run
wrote there, and nothing else.

Every run records what it wrote in ``DIR/.polymodal-samples.json`` (written atomically). The next
run into ``DIR`` samples into a staging folder beside it first; only when that succeeded does it
remove the files the manifest lists, move its own in and record them. A folder holding files but
no manifest (files ``polymodal sample`` did not write) is refused before any work, and so is a new
file that would replace a file no run wrote: a user's own files are never deleted or overwritten.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from polymodal.io.folders import atomic_write
from polymodal.io.output import OutputError, check_writable, output_lock

MANIFEST = ".polymodal-samples.json"
"""The file in a samples folder that lists what the last ``polymodal sample`` run wrote there."""

_STAGING = re.compile(r"^\..+\.[0-9a-f]{12}\.samples\.tmp$")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", … ({len(names)} entries)" if len(names) > 5 else "")


def previous_samples(out: str | Path, *, flag: str = "--out") -> list[str]:
    """Check, before any work, that a sampling run may write into the folder ``out``; returns the
    files (relative POSIX paths) the previous run recorded there, which the next run replaces.

    ``out`` may be missing, empty, or a folder with the manifest of an earlier run. Refused, with an
    :class:`~polymodal.io.output.OutputError` naming ``flag`` and the folder: a path that is a file or
    lies under one, a place this user cannot write, a folder holding files but no manifest, and a
    manifest that is not one (bad JSON, or a listed path outside the folder).
    """
    absolute = Path(os.path.abspath(Path(out).expanduser()))
    existing = check_writable(out, flag=flag, what="samples folder")
    if existing != absolute:
        return []
    manifest = absolute / MANIFEST
    if not manifest.is_file():
        names = sorted(p.name for p in absolute.iterdir())
        if names:
            raise OutputError(
                f"{flag} {out} holds files that `polymodal sample` did not write ({_shown(names)}) and no "
                f"{MANIFEST}; samples would mix with them, so choose a new or empty folder"
            )
        return []
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("'files' is not a list of paths")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(
            f"{flag} {out}: {manifest} is not a samples manifest ({exc}); remove it, or choose another folder"
        ) from None
    for name in files:
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or name == MANIFEST:
            raise OutputError(
                f"{flag} {out}: {manifest} lists {name!r}, which is not a file inside the folder; "
                "remove the manifest, or choose another folder"
            )
    return files


def write_samples_folder(out: str | Path, fill: Callable[[Path], list[Path]], *, flag: str = "--out") -> list[Path]:
    """Run ``fill(folder)`` (a family's ``sample_to_folder``) and make ``out`` hold exactly what it wrote.

    ``fill`` writes into a fresh staging folder beside ``out``; the folder is checked
    (:func:`previous_samples`) and locked for the whole run. Then the previous run's files are removed,
    the new ones moved in and listed in the manifest; files that no run wrote stay. A new file whose
    name is taken by such a file is refused before anything in ``out`` changes. Returns ``fill``'s
    paths, as they lie in ``out``.
    """
    previous_samples(out, flag=flag)  # before making a lock file
    folder = Path(os.path.abspath(Path(out).expanduser()))
    made = [p for p in (folder.parent, *folder.parent.parents) if not os.path.lexists(p)]
    try:
        return _write(out, folder, fill, flag)
    finally:
        for parent in made:  # the folders above OUT this run made, if a failed run left them empty
            try:
                parent.rmdir()
            except OSError:
                break


def _write(out: str | Path, folder: Path, fill: Callable[[Path], list[Path]], flag: str) -> list[Path]:
    """:func:`write_samples_folder` once ``out`` is checked: lock, stage, swap the files, record them."""
    with output_lock(out, flag=flag):
        previous = previous_samples(out, flag=flag)
        for entry in folder.parent.iterdir():  # staging folders of killed runs
            if entry.name.startswith(f".{folder.name}.") and _STAGING.match(entry.name) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        staging = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.samples.tmp"
        staging.mkdir()
        try:
            paths = fill(staging)
            written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir())
            taken = [name for name in written if os.path.lexists(folder / name) and name not in previous]
            if taken:
                raise OutputError(
                    f"{flag} {out}: this run writes {_shown(taken)}, which a previous `polymodal sample` did not "
                    "write there; it is never replaced, so move it or choose another folder"
                )
            folder.mkdir(parents=True, exist_ok=True)
            _record(folder, sorted(set(previous) | set(written)))  # a run killed from here on leaves all listed
            for name in previous:
                old = folder / name
                if old.is_file() or old.is_symlink():
                    old.unlink()
            made = {str(parent) for n in previous for parent in PurePosixPath(n).parents} - {"."}
            for name in sorted(made, key=len, reverse=True):
                try:
                    (folder / name).rmdir()  # a sub-folder the previous run made, now empty
                except OSError:
                    pass
            for name in written:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, folder / name)
            _record(folder, written)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [Path(out) / Path(p).relative_to(staging) if Path(p).is_relative_to(staging) else Path(p) for p in paths]


def _record(folder: Path, files: list[str]) -> None:
    """Write the manifest: the files of ``folder`` that ``polymodal sample`` wrote."""
    text = json.dumps({"written_by": "polymodal sample", "files": files}, indent=1) + "\n"
    atomic_write(folder / MANIFEST, text)


__all__ = ["MANIFEST", "previous_samples", "write_samples_folder"]
