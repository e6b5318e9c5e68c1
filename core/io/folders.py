"""Model folders: ``config.json``, ``model.safetensors``, extras, ``metrics.json``, ``README.md``,
and one sub-folder per pretrained part of a composite (``lm/``, ``vision/`` …: complete model
folders of their own, whose weights the parent's ``model.safetensors`` leaves out).

Writes are atomic: a folder is built next to its destination and swapped into place (on Linux by
one ``renameat2(RENAME_EXCHANGE)``, so the path never lacks a complete folder; elsewhere by two
renames, whose interruption :func:`recover_folder` undoes on the next open), and single files go
through a temporary file and ``os.replace``. Everything is created with the user's umask, like any
other file. Loading is strict and never unpickles anything.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    from safetensors import SafetensorError as _SafetensorsError
except ImportError:  # older safetensors raise plain exceptions
    _SafetensorsError = RuntimeError
from safetensors.torch import load_file, save_file

RUN_FILES = ("train_log.jsonl", "loss.png", "tensorboard")
"""What a training run writes into its model folder besides the model and ``checkpoint/`` (the trainer's
log, its loss plot and TensorBoard events): a folder swap keeps them, and a folder holding only these and a
checkpoint is a run's."""

FORMAT = "polymodal/1"


class LoadError(ValueError):
    """A model folder or file that cannot be loaded; the message names the file and why."""


def _fresh_path(parent: Path, name: str) -> Path:
    """A new, unused temporary name ``.NAME.<random>.tmp`` in ``parent``."""
    return parent / f".{name}.{secrets.token_hex(6)}.tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None] | str | bytes) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    The file gets the user's umask (mode ``0o666 & ~umask``), as ``open()`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _fresh_path(path.parent, path.name)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        if callable(write):
            write(tmp)
        else:
            tmp.write_bytes(write.encode() if isinstance(write, str) else write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _old(directory: Path) -> Path:
    """Where the two-rename swap parks the previous folder: ``PARENT/.NAME.old``."""
    return directory.parent / f".{directory.name}.old"


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc ≥ 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (``renameat2(..., RENAME_EXCHANGE)``).

    Returns False where the system or file system cannot (no renameat2, ENOSYS, EINVAL, ENOTSUP):
    the caller then falls back to two renames.
    """
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def recover_folder(directory: str | Path) -> Path:
    """Undo a folder swap that a killed process left half done, before ``directory`` is read.

    The two-rename swap moves the previous folder to ``PARENT/.NAME.old`` and then the new one to
    ``NAME``: if ``NAME`` is missing and ``.NAME.old`` is there, the previous (complete) folder goes
    back; a ``.NAME.old`` beside a present ``NAME`` is a finished swap's leftover and is removed.
    """
    directory = Path(directory)
    old = _old(directory)
    if old.is_dir():
        if not os.path.lexists(directory):
            try:
                os.replace(old, directory)
            except FileNotFoundError:  # another process recovered it first
                pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (kept files are only ever replaced, never changed in place); copy if
    the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_folder(directory: str | Path, fill: Callable[[Path], None], keep: tuple[str, ...] = ()) -> Path:
    """Build a folder with ``fill(tmp_dir)`` beside ``directory``, then swap it in.

    At every instant ``directory`` holds the old complete folder or the new one (Linux: one atomic
    exchange); where only two renames are possible, a process killed between them leaves the old
    folder in ``.NAME.old``, which :func:`recover_folder` (called by every reader) puts back.
    Entries named in ``keep`` (e.g. a training ``checkpoint``) are carried over from the old folder
    (hard links) before the swap, so the new folder is complete when it appears.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(directory)
    while True:
        tmp = _fresh_path(directory.parent, directory.name)
        try:
            tmp.mkdir()  # the user's umask, unlike mkdtemp's 0700
            break
        except FileExistsError:
            continue
    old = _old(directory)
    try:
        fill(tmp)
        for name in keep:
            if (directory / name).exists() and not (tmp / name).exists():
                if (directory / name).is_dir():
                    shutil.copytree(directory / name, tmp / name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(directory / name), str(tmp / name))
        if not directory.exists():
            os.replace(tmp, directory)
        elif not _exchange(tmp, directory):  # after an exchange, tmp holds the old folder
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)  # a kill from here to the next line: recover_folder restores `old`
            os.replace(tmp, directory)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if old.exists() and not directory.exists():
            os.replace(old, directory)
        if tmp != old:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_state(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save tensors to safetensors (contiguous, shared storage broken) with string metadata.

    Tensors that share storage with an earlier entry (tied weights) are saved as copies:
    safetensors refuses aliased tensors, and loading copies them back into the tied parameter.
    """
    flat, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if v.is_shared() or not v.is_contiguous() or ptr in seen:
            v = v.contiguous().clone()
        elif ptr is not None:
            seen.add(ptr)
        flat[k] = v
    save_file(flat, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; a model file is as readable as any other


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a corrupt or truncated file raises a :class:`LoadError` naming it."""
    if not path.is_file():
        raise LoadError(f"missing file {path}")
    try:
        return load_file(str(path))
    except (_SafetensorsError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupted") from exc


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed one raises a :class:`LoadError` naming it."""
    if not path.is_file():
        raise LoadError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path} is not valid JSON ({exc})") from exc


def _group(keys: list[str]) -> str:
    groups: dict[str, list[str]] = defaultdict(list)
    for k in sorted(keys):
        groups[".".join(k.split(".")[:2])].append(k)
    return "; ".join(f"{p}: {len(v)} ({', '.join(v[:3])}{', …' if len(v) > 3 else ''})" for p, v in groups.items())


def check_state_keys(saved: dict[str, tuple[int, ...]], own: dict[str, torch.Tensor], source: str) -> None:
    """Raise one :class:`LoadError` naming ``source`` and every key of ``own`` (a state dict) that ``saved``
    (key → shape) misses, every key it has beyond them and every shape that differs; nothing when they match."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k} {tuple(saved[k])} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved and tuple(saved[k]) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys — {_group(missing)}")
        if unexpected:
            parts.append(f"unexpected keys — {_group(unexpected)}")
        if shapes:
            parts.append("shape mismatches — " + "; ".join(shapes))
        raise LoadError(f"{source} does not match the model:\n  " + "\n  ".join(parts))


def load_state_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    expected: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy ``state`` into ``module``; missing, unexpected and mis-shaped keys fail together.

    ``expected`` is the part of ``module.state_dict()`` that ``state`` must match exactly (default:
    all of it; a composite's :meth:`own_state_dict`, whose parts were loaded from their sub-folders).
    """
    own = module.state_dict() if expected is None else expected
    check_state_keys({k: tuple(v.shape) for k, v in state.items()}, own, source)
    module.load_state_dict(state, strict=expected is None)


def _card(model: Any, family: str, metrics: dict[str, Any] | None, source: str | None, card: str | None) -> str:
    lines = [f"# {family} model", "", f"A polymodal `{family}` model ({type(model).__name__}).", ""]
    if source:
        lines += [f"Source: {source}", ""]
    lines += model.card_lines()
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in metrics.items()
            if not isinstance(v, (dict, list))
        ]
        lines.append("")
    if card:
        lines += [card, ""]
    lines += ["Load it with `polymodal.load(DIR)`; evaluate with `polymodal eval DIR`.", ""]
    return "\n".join(lines)


def plain_metrics(value: Any) -> Any:
    """``value`` (a metrics dict, or anything in one) with every one-element tensor turned into its Python
    number, in nested dicts, lists and tuples too: losses hand back device scalars (no host sync per step),
    and metrics go to JSON and to people. A larger tensor is a ValueError (a metric is a number)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"a metric must be a number or a one-element tensor; got a tensor of shape {tuple(value.shape)}"
            )
        return value.item()
    if isinstance(value, dict):
        return {k: plain_metrics(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_metrics(v) for v in value)
    return value


def write_model(
    model: Any,
    directory: Path,
    *,
    state: dict[str, torch.Tensor] | None = None,
    metrics: dict[str, Any] | None = None,
    card: str | None = None,
    source: str | None = None,
) -> None:
    """Write ``model``'s files into the new, empty folder ``directory`` (not atomic by itself:
    :func:`save_model` builds the folder aside and swaps it in).

    ``model.safetensors`` holds ``state`` (default: the model's own weights, without its parts'); each
    pretrained part is written once, as a complete model folder of its own, in ``directory/<field>/``.
    """
    family = model.family
    header = {"format": FORMAT, "family": family, "config": model.config_dict()}
    if source:
        header["source"] = source
    spec = model.image_spec() if hasattr(model, "image_spec") else None
    if spec is not None:  # how `model.preprocess` prepares an image, for readers outside polymodal too
        header["preprocess"] = spec.to_dict()
    if state is None:
        state = model.own_state_dict() if hasattr(model, "own_state_dict") else model.state_dict()
    (directory / "config.json").write_text(json.dumps(header, indent=2, sort_keys=True))
    save_state(directory / "model.safetensors", state, {"family": family, "format": FORMAT})
    parts = model.part_modules() if hasattr(model, "part_modules") else {}
    for name, part in parts.items():
        (directory / name).mkdir()
        write_model(
            part,
            directory / name,
            state=model.part_state_dict(name),
            source=f"the frozen `{name}` of a {family} model ({model.part_sources.get(name, 'given')})",
        )
    model.save_extras(directory)
    if metrics is not None:
        metrics = plain_metrics(metrics)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (directory / "README.md").write_text(_card(model, family, metrics, source, card))


def save_model(
    model: Any,
    directory: str | Path,
    *,
    metrics: dict[str, Any] | None = None,
    card: str | None = None,
    source: str | None = None,
) -> Path:
    """Write ``model`` as a model folder (see :func:`write_model`), replacing any folder there atomically;
    the run's own files already there (``checkpoint/`` and :data:`RUN_FILES`) are kept."""
    return replace_folder(
        directory,
        lambda tmp: write_model(model, tmp, metrics=metrics, card=card, source=source),
        keep=("checkpoint", *RUN_FILES),
    )


def write_metrics(
    model: Any,
    directory: str | Path,
    metrics: dict[str, Any],
    *,
    card: str | None = None,
    source: str | None = None,
) -> Path:
    """Rewrite ``metrics.json`` and the model card of the saved model folder ``directory`` (each file
    atomically), e.g. once a model saved right after training has been evaluated."""
    directory = Path(directory)
    metrics = plain_metrics(metrics)
    atomic_write(directory / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    atomic_write(directory / "README.md", _card(model, model.family, metrics, source, card))
    return directory


def model_class_for(family: str) -> type:
    """The registered model class of ``family`` (any variant of it will do)."""
    from polymodal.registry import get_registry

    registry = get_registry()
    for entry in registry.entries("model"):
        if entry.obj.model_class.family == family:
            return entry.obj.model_class
    families = sorted({e.obj.model_class.family for e in registry.entries("model")})
    raise LoadError(f"no installed plugin provides the model family {family!r} (installed: {', '.join(families)})")


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> Any:
    """Load a model folder written by :func:`save_model` (strictly; nothing is unpickled).

    Loading reads ``directory`` and its own part sub-folders only, and never trains: ``config.json``
    must say ``format`` :data:`FORMAT` and give every config field, each part's ``path`` must be ``''``
    (a part named ``'auto'`` or by a path is refused: those are resolved when a model is created), and
    every tensor must have the model's dtype (nothing is cast). Each is a :class:`LoadError` naming it.
    """
    directory = recover_folder(directory)  # a swap a killed writer left half done
    if not directory.is_dir():
        raise LoadError(f"{directory} is not a model folder (no such directory)")
    header = read_json(directory / "config.json")
    if not isinstance(header, dict) or "family" not in header or "config" not in header:
        raise LoadError(f"{directory / 'config.json'} lacks 'family' and 'config'; is this a polymodal model folder?")
    if header.get("format") != FORMAT:
        found = f"format {header['format']!r}" if "format" in header else "no 'format'"
        raise LoadError(
            f"{directory / 'config.json'} has {found}; this polymodal reads {FORMAT!r} folders "
            "(a newer or another program wrote it?)"
        )
    cls = model_class_for(header["family"])
    try:
        cfg = cls.config_from_dict(header["config"])
    except (ValueError, TypeError) as exc:
        raise LoadError(f"{directory / 'config.json'}: {exc}") from exc
    parts = {}
    for name in getattr(cls, "part_attributes", {}):  # each part is a model folder of its own in DIR/<field>/
        path = getattr(getattr(cfg, name, None), "path", "")
        if path != "":
            raise LoadError(
                f"{directory / 'config.json'}: the part `{name}` has path {path!r}; a saved folder keeps each part "
                f"in its own sub-folder ({directory / name}/, path '') and loading reads nothing else ('auto' and "
                "folder paths are resolved when a model is created, never when one is loaded)"
            )
        if not (directory / name / "config.json").is_file():
            raise LoadError(
                f"{directory / name} is not a model folder: a {header['family']} folder keeps its part `{name}` there"
            )
        parts[name] = load_model(directory / name)
    model = cls(cfg, parts=parts) if parts else cls(cfg)
    for name in parts:
        model.part_sources[name] = str(directory / name)
    model.load_extras(directory)
    expected = model.own_state_dict() if parts else model.state_dict()
    source = directory / "model.safetensors"
    state = read_state(source)
    cast = [
        f"{k} is {state[k].dtype} in the file, {v.dtype} in the model"
        for k, v in expected.items()
        if k in state and state[k].dtype != v.dtype
    ]
    if cast:
        more = "; …" if len(cast) > 5 else ""
        raise LoadError(
            f"{source}: tensor dtypes differ from the model's (nothing is cast): {'; '.join(cast[:5])}{more}"
        )
    load_state_strict(model, state, str(source), expected if parts else None)
    return model.to(device).eval()
