"""Model folders: ``config.json``, ``model.safetensors``, extras, ``metrics.json``, ``README.md``,
and one sub-folder per pretrained part of a composite (``lm/``, ``vision/`` …: complete model
folders of their own, whose weights the parent's ``model.safetensors`` leaves out).

Writes are atomic: a folder is built next to its destination and renamed into place, and
single files go through a temporary file and ``os.replace``. Loading is strict and never
unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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

FORMAT = "polymodal/1"


class LoadError(ValueError):
    """A model folder or file that cannot be loaded; the message names the file and why."""


def atomic_write(path: str | Path, write: Callable[[Path], None] | str | bytes) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if callable(write):
            write(Path(tmp))
        else:
            Path(tmp).write_bytes(write.encode() if isinstance(write, str) else write)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_folder(directory: str | Path, fill: Callable[[Path], None], keep: tuple[str, ...] = ()) -> Path:
    """Build a folder with ``fill(tmp_dir)`` beside ``directory``, then swap it in.

    An interruption leaves either the old folder or the new one, never half of each.
    Entries named in ``keep`` (e.g. a training ``checkpoint``) move over from the old folder.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old = directory.parent / f".{directory.name}.old"
    moved: list[str] = []
    try:
        fill(tmp)
        for name in keep:
            if (directory / name).exists() and not (tmp / name).exists():
                os.replace(directory / name, tmp / name)
                moved.append(name)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not directory.exists():
            os.replace(old, directory)
        for name in moved:  # a kept entry already moved into tmp goes back, never into rmtree
            if (tmp / name).exists() and directory.exists() and not (directory / name).exists():
                os.replace(tmp / name, directory / name)
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
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
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
    """Write ``model`` as a model folder (see :func:`write_model`), replacing any folder there atomically."""
    return replace_folder(
        directory, lambda tmp: write_model(model, tmp, metrics=metrics, card=card, source=source), keep=("checkpoint",)
    )


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
    """Load a model folder written by :func:`save_model` (strictly; nothing is unpickled)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LoadError(f"{directory} is not a model folder (no such directory)")
    header = read_json(directory / "config.json")
    if not isinstance(header, dict) or "family" not in header or "config" not in header:
        raise LoadError(f"{directory / 'config.json'} lacks 'family' and 'config'; is this a polymodal model folder?")
    cls = model_class_for(header["family"])
    try:
        cfg = cls.config_from_dict(header["config"])
    except (ValueError, TypeError) as exc:
        raise LoadError(f"{directory / 'config.json'}: {exc}") from exc
    parts = {}
    for name in getattr(cls, "part_attributes", {}):  # each part is a model folder of its own in DIR/<field>/
        if not (directory / name / "config.json").is_file():
            raise LoadError(
                f"{directory / name} is not a model folder: a {header['family']} folder keeps its part `{name}` there"
            )
        parts[name] = load_model(directory / name)
    model = cls(cfg, parts=parts) if parts else cls(cfg)
    for name in parts:
        model.part_sources[name] = str(directory / name)
    model.load_extras(directory)
    expected = model.own_state_dict() if parts else None
    load_state_strict(
        model, read_state(directory / "model.safetensors"), str(directory / "model.safetensors"), expected
    )
    return model.to(device).eval()
