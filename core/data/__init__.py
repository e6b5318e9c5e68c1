"""Embedded data: nothing is downloaded. Datasets are registry entries (kind ``dataset``)."""

from polymodal.data.base import Batch, Dataset, MissingFieldError, Split
from polymodal.data.digits import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, load_digits
from polymodal.data.folder import load_folder
from polymodal.data.sampling import global_batches, local_indices
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
    "global_batches",
    "local_indices",
]


def load_dataset(name_or_dir: str, **options):
    """A registered dataset by name, a folder of images with ``captions.jsonl``, or tar shards.

    * a registered name (``"shapes"``): that dataset, ``options`` passed to its loader;
    * a folder, or ``"folder:PATH"``: :func:`load_folder` (lazy above ``POLYMODAL_LAZY_ABOVE`` images,
      or with ``lazy=True``);
    * a pattern of ``.tar`` shards (``"shards/{00000..00009}.tar"``, ``"shards/*.tar"``, one ``.tar``), or
      ``"shards:PATTERN"``: :func:`polymodal.data.shards.load_shards` (streamed, WebDataset layout).
    """
    import os

    from polymodal.data.shards import is_shard_pattern, load_shards
    from polymodal.registry import get_registry

    registry = get_registry()
    if ("dataset", name_or_dir) in registry:
        return registry.get("dataset", name_or_dir)(**options)
    if isinstance(name_or_dir, str) and name_or_dir.startswith("folder:"):
        return registry.get("dataset", "folder")(root=name_or_dir.removeprefix("folder:"), **options)
    if isinstance(name_or_dir, str) and (name_or_dir.startswith("shards:") or is_shard_pattern(name_or_dir)):
        return load_shards(name_or_dir.removeprefix("shards:"), **options)
    if os.path.isdir(name_or_dir) and ("dataset", "folder") in registry:
        return registry.get("dataset", "folder")(root=name_or_dir, **options)
    registry.entry("dataset", name_or_dir)  # raises, suggesting close names
