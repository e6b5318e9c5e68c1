"""Models by name from the Hugging Face Hub, and transformers folders loaded as they are.

``polymodal.load("hf:ORG/NAME")`` (or ``hf:ORG/NAME@REVISION``: a branch, tag or commit) resolves the
repository through ``huggingface_hub.snapshot_download``, so the library's own cache (``HF_HUB_CACHE``,
``HF_HOME``), offline mode (``HF_HUB_OFFLINE=1``) and token (``HF_TOKEN``, ``hf auth login``) apply; only
the files a converter reads are fetched (configs, safetensors, tokenizer and processor files: never a
pickle). The converter is the registered one whose declared ``hf_model_type``
(:func:`polymodal.io.hf.hf_converter`) is what the folder says it holds
(:func:`~polymodal.io.hf.folder_model_type`), so a new converter only declares its model type. The
converted model folder is cached under ``cache_root()/hub/ORG/NAME/COMMIT`` (written atomically) and
reused by the next call for the same commit; one line on stderr says which happened and where.

``polymodal.load(DIR)`` of a transformers folder (``config.json`` with a ``model_type`` and no polymodal
``family``) converts it in memory, saying so; ``polymodal convert SRC DST`` takes either form of SRC.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polymodal.io.cache import announce, cache_root
from polymodal.io.folders import LoadError, load_model
from polymodal.io.hf import HUB_FILES, folder_model_type
from polymodal.io.output import output_folder
from polymodal.registry import get_registry

PREFIX = "hf:"
"""What starts a Hub repository's name where a folder is expected: ``hf:ORG/NAME[@REVISION]``."""

CONFIG_FILES = ("config.json", "model_index.json")
"""Fetched first, to learn what the repository holds (transformers' config, a diffusers pipeline's index)."""

_REPO = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_REVISION = re.compile(r"^[\w./-]+$")


def is_hub_name(name: Any) -> bool:
    """Whether ``name`` is a Hub name (a string starting with ``hf:``) rather than a folder."""
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``"hf:ORG/NAME@REVISION"`` → ``("ORG/NAME", "REVISION")`` (``None`` without ``@``); else a LoadError."""
    body = name[len(PREFIX) :] if is_hub_name(name) else ""
    repo, _, revision = body.partition("@")
    if not _REPO.match(repo) or ".." in repo or (revision and (".." in revision or not _REVISION.match(revision))):
        raise LoadError(f"expected a Hub model as hf:ORG/NAME or hf:ORG/NAME@REVISION; got {name!r}")
    if "@" in body and not revision:
        raise LoadError(f"expected a revision (branch, tag or commit) after '@' in {name!r}")
    return repo, revision or None


def snapshot(repo: str, revision: str | None = None, files: tuple[str, ...] = HUB_FILES) -> Path:
    """The local snapshot folder of ``repo`` (``ORG/NAME``, or ``hf:ORG/NAME[@REVISION]``) at ``revision``
    (the default branch when None) holding ``files`` (``allow_patterns``), fetched by
    ``huggingface_hub.snapshot_download`` into its cache when missing there; its name is the resolved
    commit hash. Any failure is a one-line LoadError."""
    from huggingface_hub import constants, snapshot_download

    if is_hub_name(repo):
        repo, named = parse_hub_name(repo)
        revision = revision or named

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(files)))
    except Exception as exc:  # huggingface_hub's many errors (offline, not found, gated, …) become one line
        where = f"{PREFIX}{repo}" + (f"@{revision}" if revision else "")
        offline = (
            f" (offline: HF_HUB_OFFLINE is set, so only the cache {constants.HF_HUB_CACHE} is read)"
            if getattr(constants, "HF_HUB_OFFLINE", False)
            else ""
        )
        first = (str(exc).strip().splitlines() or [""])[0]
        raise LoadError(
            f"{where}: huggingface_hub could not provide it{offline}: {type(exc).__name__}: {first}"
        ) from exc


def converters() -> dict[str, tuple[str, Callable[..., Any]]]:
    """Registered converters that declare a model type: ``{model_type: (converter name, converter)}``;
    a model type two converters declare maps to the first registered (built-ins load first)."""
    found: dict[str, tuple[str, Callable[..., Any]]] = {}
    for entry in get_registry().entries("converter"):
        model_type = getattr(entry.obj, "hf_model_type", None)
        if isinstance(model_type, str):
            found.setdefault(model_type, (entry.name, entry.obj))
    return found


def pick_converter(folder: Path, name: str | None = None, *, what: str | None = None) -> tuple[str, Callable[..., Any]]:
    """The converter for ``folder``: the registered ``name`` (checked against the folder's model type when
    it declares one), or the one that declares the folder's model type. ``what`` names the source in errors
    (default: the folder's ``config.json``)."""
    what = what or str(folder / "config.json")
    model_type = folder_model_type(folder)
    known = converters()
    listing = ", ".join(f"{conv} ({mt})" for mt, (conv, _) in sorted(known.items())) or "none"
    if name is not None:
        converter = get_registry().get("converter", name)
        declared = getattr(converter, "hf_model_type", None)
        if declared and model_type and declared != model_type:
            hint = f"`{known[model_type][0]}` does" if model_type in known else f"none of {listing} does"
            raise LoadError(
                f"the converter {name} reads model_type {declared!r}, but {what} says {model_type!r} "
                f"({hint}; leave the converter out to pick it from the folder)"
            )
        return name, converter
    if model_type is None:
        raise LoadError(
            f"{what} names no model_type (nor a diffusers _class_name), so no converter can be "
            f"picked; name one (`polymodal convert --from NAME`; `polymodal list converter`)"
        )
    if model_type not in known:
        raise LoadError(
            f"{what} says model_type {model_type!r}, which no registered converter reads; they read: {listing}"
        )
    return known[model_type]


def converted_folder(repo: str, commit: str) -> Path:
    """Where the conversion of ``repo`` at ``commit`` is cached: ``cache_root()/hub/ORG/NAME/COMMIT``."""
    return cache_root() / "hub" / repo / commit


def load_hub(name: str, device: str = "cpu") -> Any:
    """The model of the Hub repository ``name`` (``hf:ORG/NAME[@REVISION]``): its cached conversion for the
    resolved commit when there is one, else converted now and cached (see the module docstring)."""
    repo, revision = parse_hub_name(name)
    meta = snapshot(repo, revision, CONFIG_FILES)  # resolves the revision: the folder's name is the commit
    commit = meta.name
    folder = converted_folder(repo, commit)
    if (folder / "config.json").is_file():
        try:
            model = load_model(folder, device=device)
        except LoadError as exc:
            announce(f"{name}: the cached conversion in {folder} cannot be loaded ({exc}); converting it again")
        else:
            announce(f"{name}: reused the conversion of commit {commit[:12]} cached in {folder}")
            return model
    converter_name, converter = pick_converter(meta, what=f"{name} (config.json)")
    source = snapshot(repo, commit, getattr(converter, "hf_files", HUB_FILES))
    with output_folder(folder, overwrite=True, flag="the hub cache folder"):
        model = converter(source, folder)
    announce(f"{name}: converted commit {commit[:12]} with {converter_name}; cached in {folder} (reused next time)")
    return model.to(device).eval()


def is_transformers_folder(directory: Any) -> bool:
    """Whether ``directory`` is a folder whose ``config.json`` names a model type and no polymodal family."""
    return isinstance(directory, (str, os.PathLike)) and folder_model_type(directory) is not None


def load_transformers_folder(directory: str | Path, device: str = "cpu") -> Any:
    """Convert the transformers folder ``directory`` in memory with the converter of its model type, saying so."""
    directory = Path(directory)
    converter_name, converter = pick_converter(directory)
    model = converter(directory)
    announce(
        f"{directory} is a transformers folder (model_type {folder_model_type(directory)!r}): converted it in "
        f"memory with {converter_name}; `polymodal convert {directory} DST` saves a model folder"
    )
    return model.to(device).eval()


def conversion_source(src: str | Path, converter: str | None = None) -> tuple[Path, str, Callable[..., Any]]:
    """What ``polymodal convert SRC DST`` converts: ``(folder, converter name, converter)`` for SRC, a folder or
    ``hf:ORG/NAME[@REVISION]`` (fetched into the Hub cache), with the converter named or picked from SRC."""
    if is_hub_name(src):
        repo, revision = parse_hub_name(str(src))
        meta = snapshot(repo, revision, CONFIG_FILES)
        name, conv = pick_converter(meta, converter, what=f"{src} (config.json)")
        return snapshot(repo, meta.name, getattr(conv, "hf_files", HUB_FILES)), name, conv
    folder = Path(src)
    if not folder.is_dir():
        raise LoadError(f"SRC: expected a folder or hf:ORG/NAME[@REVISION]; got {str(src)!r}, which is no folder")
    name, conv = pick_converter(folder, converter)
    return folder, name, conv


__all__ = [
    "CONFIG_FILES",
    "PREFIX",
    "conversion_source",
    "converted_folder",
    "converters",
    "is_hub_name",
    "is_transformers_folder",
    "load_hub",
    "load_transformers_folder",
    "parse_hub_name",
    "pick_converter",
    "snapshot",
]
