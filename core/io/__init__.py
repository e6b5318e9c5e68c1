"""Reading and writing: atomic files and model folders, the cache, and helpers for the
transformers-folder converters (:mod:`polymodal.io.hf`)."""

from polymodal.io.cache import cache_root, default_part_folder
from polymodal.io.folders import (
    FORMAT,
    LoadError,
    atomic_write,
    load_model,
    load_state_strict,
    model_class_for,
    read_json,
    read_state,
    recover_folder,
    replace_folder,
    save_model,
    save_state,
    write_metrics,
)
from polymodal.io.output import OutputError, check_output, folder_kind, output_folder, output_lock, resolve_device

__all__ = [
    "FORMAT",
    "LoadError",
    "OutputError",
    "atomic_write",
    "cache_root",
    "check_output",
    "default_part_folder",
    "folder_kind",
    "load_model",
    "load_state_strict",
    "model_class_for",
    "output_folder",
    "output_lock",
    "read_json",
    "read_state",
    "recover_folder",
    "replace_folder",
    "resolve_device",
    "save_model",
    "save_state",
    "write_metrics",
]
