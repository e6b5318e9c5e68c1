"""Where a run writes and on what it runs: the device check, the output-folder guard and the
writer lock, all checked before any work starts (``polymodal train --out``, ``polymodal convert DST``).

A model folder is written by replacing the whole folder, so the guard refuses any folder that is not
a polymodal model folder (or an empty one): nothing a user keeps there is ever deleted. An existing
model folder is replaced only with ``overwrite`` (or continued with ``resume``), and one writer at a
time holds ``PARENT/.NAME.lock`` (an ``flock``; it names the holder's PID).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from polymodal.io.folders import RUN_FILES, recover_folder

try:
    import fcntl
except ImportError:  # Windows: no advisory flock; a second writer is not detected there
    fcntl = None

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device ``name`` names (``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked before any work starts.

    An unknown name, or a CUDA/MPS device this torch build or machine does not have, raises a ValueError
    saying what is available instead of torch's AssertionError deep inside the first ``.to()``.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or not _DEVICE.match(name.strip()):
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or mps; got {name!r}")
    device = torch.device(name.strip())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this torch build has no CUDA device available "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


class OutputError(ValueError):
    """An output folder that a run must not or cannot write; the message names the folder and why."""


CHECKPOINT = "checkpoint"


def folder_kind(path: str | Path) -> tuple[str, str | None]:
    """What ``path`` holds: ``("missing" | "empty" | "model" | "run" | "other", family or listing)``.

    ``model``: a model folder (``config.json`` with ``family`` and ``config``); ``run``: only a training
    checkpoint and the run's log files (:data:`~polymodal.io.folders.RUN_FILES`: a run stopped before its first save); ``other``: anything else (the second item lists it).
    A swap a killed writer left half done is recovered first.
    """
    path = recover_folder(Path(path))
    if not os.path.lexists(path):
        return "missing", None
    if not path.is_dir():
        return "other", "a file"
    recover_folder(path / CHECKPOINT)
    leftovers = tuple(f".{name}." for name in (CHECKPOINT, *RUN_FILES))  # swap and atomic-write leftovers
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith(leftovers))
    if not names:
        return "empty", None
    header = _json(path / "config.json")
    if isinstance(header, dict) and "family" in header and "config" in header:
        return "model", str(header["family"])
    meta = _json(path / CHECKPOINT / "trainer.json")
    if CHECKPOINT in names and set(names) <= {CHECKPOINT, *RUN_FILES} and isinstance(meta, dict) and "step" in meta:
        return "run", meta.get("family")
    shown = ", ".join(names[:5]) + (f", … ({len(names)} entries)" if len(names) > 5 else "")
    return "other", shown


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_writable(out: str | Path, *, flag: str = "--out", what: str = "folder") -> Path:
    """The absolute path of ``out`` once it is known a ``what`` can be made or written there: its nearest
    existing ancestor is a folder (not a file) this user can write. Returns that existing ancestor."""
    absolute = Path(os.path.abspath(Path(out).expanduser()))
    existing = absolute
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {out}: {existing} is a file, so no {what} can be made there")
    writable = [existing] if existing != absolute else [absolute.parent, absolute]
    for folder in writable:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {out}: {folder} is not writable by this user; choose a folder you can write")
    return existing


def check_new_file(out: str | Path, *, flag: str = "--out") -> Path:
    """Check, before any work, that the single file ``out`` (a transcript, a picture) may be written: it must not
    exist (an :class:`OutputError` naming ``flag`` and the path), since polymodal never overwrites a file it did not
    write. Returns it as a Path."""
    if os.path.lexists(out):
        raise OutputError(f"{flag} {out} already exists; polymodal never overwrites a file it did not write")
    return Path(out)


def check_output(
    out: str | Path,
    *,
    family: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    flag: str = "--out",
) -> Path:
    """Check, before any work, that a run may write the model folder ``out``; returns it as a Path.

    Refused, with an :class:`OutputError` naming ``flag`` and the folder: the current folder or one
    above it; a path under a file; a place this user cannot write; a folder holding anything but a
    polymodal model folder (even with ``overwrite``: it would be deleted); an existing model folder
    without ``overwrite`` or ``resume``; ``resume`` into a model folder of another family than
    ``family``. A missing or empty folder is fine.
    """
    if overwrite and resume:
        raise OutputError(f"{flag} {out}: give --overwrite (start over) or --resume (continue), not both")
    path = Path(out).expanduser()
    absolute = Path(os.path.abspath(path))
    real, here = absolute.resolve(), Path.cwd().resolve()
    if real == here or real in here.parents:
        raise OutputError(
            f"{flag} {out} is the current folder or a folder above it; a model folder is replaced as a whole, "
            "so name a folder of its own (e.g. runs/NAME)"
        )
    check_writable(out, flag=flag)
    kind, detail = folder_kind(absolute)
    if kind == "other":
        raise OutputError(
            f"{flag} {out} is not a polymodal model folder (it holds {detail}); writing a model there would delete "
            "what it holds, so choose a new or empty folder (--overwrite only replaces a model folder)"
        )
    what = "model folder" if kind == "model" else "training checkpoint"
    if kind in ("model", "run") and resume and family and detail and detail != family:
        raise OutputError(f"{flag} {out} holds a {detail} {what}; --resume cannot continue it as a {family} run")
    if kind in ("model", "run") and not (overwrite or resume):
        held = f"a polymodal {detail} {what}" if detail else f"a polymodal {what}"
        raise OutputError(
            f"{flag} {out} already holds {held}; pass --overwrite to replace it, or --resume to continue its run"
        )
    return path


@contextlib.contextmanager
def output_lock(out: str | Path, *, flag: str = "--out") -> Iterator[Path]:
    """Hold the exclusive writer lock of the folder ``out`` (``PARENT/.NAME.lock``, holding the PID).

    A second writer, in this process or another, gets an :class:`OutputError` naming the holder's PID
    at once. The lock file goes when the lock is released. Without ``fcntl`` (Windows) nothing is locked.
    """
    absolute = Path(os.path.abspath(Path(out).expanduser()))
    lock = absolute.parent / f".{absolute.name}.lock"
    if fcntl is None:
        yield lock
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, f"{flag} {out}")
    except OSError as exc:
        raise OutputError(f"{flag} {out}: cannot write there ({exc.strerror or exc})") from exc
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # still holding the lock: a waiter re-checks that its file is this path's
        os.close(fd)


def _acquire(lock: Path, what: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{what} is being written by another polymodal process (PID {holder}, lock {lock}); "
                "wait for it to finish or choose another folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its previous holder removed the file between our open and flock: take the new one


@contextlib.contextmanager
def output_folder(
    out: str | Path,
    *,
    family: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    flag: str = "--out",
) -> Iterator[Path]:
    """Lock the output folder ``out`` (:func:`output_lock`) and check it (:func:`check_output`) for the
    duration of a run: ``with output_folder(out, family=..., overwrite=...): train, save``.

    Holding the lock, it removes the temporary folders a killed writer of ``out`` left behind.
    """
    check_output(out, family=family, overwrite=overwrite, resume=resume, flag=flag)  # before making a lock file
    with output_lock(out, flag=flag):
        path = check_output(out, family=family, overwrite=overwrite, resume=resume, flag=flag)
        _remove_leftovers(Path(os.path.abspath(path)))
        yield path


def _remove_leftovers(folder: Path) -> None:
    """The half-built ``.NAME.<hex>.tmp`` folders of killed swaps of ``folder`` and of its checkpoint."""
    for parent, name in ((folder.parent, folder.name), (folder, CHECKPOINT)):
        pattern = re.compile(rf"^\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp$")
        if parent.is_dir():
            for entry in parent.iterdir():
                if pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)


__all__ = [
    "OutputError",
    "check_new_file",
    "check_output",
    "check_writable",
    "folder_kind",
    "output_folder",
    "output_lock",
    "resolve_device",
]
