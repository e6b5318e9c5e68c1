"""Embedded data: nothing is downloaded. Datasets are registry entries (kind ``dataset``)."""

from polymodal.data.base import Batch, Dataset, MissingFieldError, Split
from polymodal.data.digits import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, load_digits
from polymodal.data.folder import load_folder
from polymodal.data.shapes import load_shapes
from polymodal.data.text import load_text

__all__ = [
    "DIGIT_WORDS",
    "Batch",
    "Dataset",
    "HELDOUT_TEMPLATES",
    "MissingFieldError",
    "Split",
    "TRAIN_TEMPLATES",
    "load_digits",
    "load_dataset",
    "load_folder",
    "load_shapes",
    "load_text",
]


def load_dataset(name_or_dir: str, **options):
    """A registered dataset by name, or a folder of images with ``captions.jsonl``."""
    import os

    from polymodal.registry import get_registry

    registry = get_registry()
    if ("dataset", name_or_dir) in registry:
        return registry.get("dataset", name_or_dir)(**options)
    if os.path.isdir(name_or_dir) and ("dataset", "folder") in registry:
        return registry.get("dataset", "folder")(root=name_or_dir, **options)
    registry.entry("dataset", name_or_dir)  # raises, suggesting close names
