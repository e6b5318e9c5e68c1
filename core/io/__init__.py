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
    replace_folder,
    save_model,
    save_state,
)

__all__ = [
    "FORMAT",
    "LoadError",
    "atomic_write",
    "cache_root",
    "default_part_folder",
    "load_model",
    "load_state_strict",
    "model_class_for",
    "read_json",
    "read_state",
    "replace_folder",
    "save_model",
    "save_state",
]
