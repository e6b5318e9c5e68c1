"""A folder of the user's own images, described by ``captions.jsonl``.

Each line of ``captions.jsonl`` is one JSON object::

    {"path": "cats/01.png", "caption": "a cat on a mat", "label": "cat",
     "boxes": [[4, 4, 20, 20]], "split": "train"}

``path`` (relative to the folder, never outside it) and ``caption`` are required.
``label`` is optional but, when used, every line has one: all ints (class indices below the
number of lines) or all strings (mapped to indices in sorted order). A ``classes.txt`` beside
it (one class name per line) is the explicit class list: int labels then index it and string
labels must be in it, in its order. ``boxes`` are ``[x0, y0, x1, y1, …]``
in the original image's pixels and are scaled with the image; extra entries after
the first four are kept. ``split`` (``"train"`` or ``"test"``) pins a line to a split;
the other lines are split by ``seed`` with ``test_fraction``. An empty train split is
refused, and so is an empty test split unless ``test_fraction`` is 0.

Images are read with Pillow (:func:`polymodal.data.images.open_image`: nothing is ever
unpickled, and an image over the pixel limit is refused before it is decoded), converted to
RGB, or to L when every image is greyscale (``channels`` chooses instead), and kept at their
own size, float32 in [0, 1]. All images of a folder share one size: when they do not, every image is resized to the most common size and a
note says how many were resized (a non-square size is stretched to the square of its
larger side, also with a note). ``image_size`` resizes every image to that square size
instead. ``meta["image_size"]`` is the size the images have, which the families read to
size their models (``config_for_data``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymodal.data.base import Dataset, Split
from polymodal.data.images import open_image, pixel_limit
from polymodal.data.lazy import FolderReader, LazyFolderSplit, prepare_image

CAPTIONS = "captions.jsonl"
CLASSES = "classes.txt"


def _read_lines(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``file``."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{lineno}: malformed JSON: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{file}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key in ("path", "caption"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{file}:{lineno}: missing or empty {key!r} (a non-empty string is required)")
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{file}: no entries")
    return rows


def _image_path(root: Path, rel: str, where: str) -> Path:
    """``root / rel``, refusing paths that leave ``root`` or do not exist."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{where}: path {rel!r} escapes the folder {root}")
    if not path.is_file():
        raise ValueError(f"{where}: image {rel!r} does not exist ({path})")
    return path


GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "F"})
"""Pillow modes of greyscale images (a folder of only these loads with one channel)."""


def _load_image(path: Path, where: str):
    """The image at ``path`` in its own Pillow mode, fully read (refused over the pixel limit)."""
    return open_image(path, where=where)


def _class_list(root: Path) -> list[str] | None:
    """The class names of ``root/classes.txt`` (one per line, blank lines skipped), or None without one."""
    file = root / CLASSES
    if not file.is_file():
        return None
    try:
        names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e})") from None
    if not names:
        raise ValueError(f"{file}: no class names (one name per line)")
    twice = [name for name, k in Counter(names).items() if k > 1]
    if twice:
        raise ValueError(f"{file}: each class is listed once; {twice[0]!r} twice")
    return names


def _labels(
    rows: list[tuple[int, dict[str, Any]]], file: Path, classes: list[str] | None = None
) -> tuple[list[int], list[str]] | None:
    """Class indices and class names, or None when no line has a label.

    Int labels are class indices below the number of lines, or below the length of ``classes``
    (``classes.txt``) when given; string labels are looked up in ``classes``, or sorted when none.
    """
    has = [("label" in row) for _, row in rows]
    if not any(has):
        return None
    for (lineno, _row), h in zip(rows, has):
        if not h:
            raise ValueError(f"{file}:{lineno}: no 'label', but other lines have one (label every line or none)")
    raw = [row["label"] for _, row in rows]
    if all(isinstance(v, str) for v in raw):
        names = classes if classes is not None else sorted(set(raw))
        index = {name: i for i, name in enumerate(names)}
        for (lineno, _), v in zip(rows, raw):
            if v not in index:
                raise ValueError(
                    f"{file}:{lineno}: label {v!r} is not in {file.parent / CLASSES} ({len(names)} classes)"
                )
        return [index[v] for v in raw], list(names)
    bound = len(classes) if classes is not None else len(rows)
    for (lineno, _), v in zip(rows, raw):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{file}:{lineno}: label {v!r} must be a non-negative int, or every label a string")
        if v >= bound:
            by = (
                f"the {bound} classes of {file.parent / CLASSES}"
                if classes is not None
                else f"the number of lines, {bound}; list the classes in {CLASSES} (one name per line) for more"
            )
            raise ValueError(
                f"{file}:{lineno}: label {v} is out of range: int labels are class indices 0 … {bound - 1} ({by})"
            )
    return raw, list(classes) if classes is not None else [str(i) for i in range(max(raw) + 1)]


def _boxes(value: Any, scale: tuple[float, float], where: str) -> list[tuple]:
    """Boxes of one line scaled by ``(sx, sy)``."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: 'boxes' must be a list of [x0, y0, x1, y1, …] lists")
    out = []
    for box in value:
        if (
            not isinstance(box, list)
            or len(box) < 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box[:4])
        ):
            raise ValueError(f"{where}: box {box!r} must be a list starting with four numbers x0, y0, x1, y1")
        sx, sy = scale
        out.append((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy, *box[4:]))
    return out


def _common_size(root: Path, sizes: list[tuple[str, tuple[int, int]]]) -> int:
    """The square side every image of the folder is brought to: the images' own size when they
    share one square size; otherwise the most common size (its larger side when not square), with a
    printed note naming how many images are resized and one of them."""
    counts = Counter(size for _, size in sizes)
    (w, h), _ = counts.most_common(1)[0]
    side = max(w, h)
    odd = [path for path, size in sizes if size != (w, h)]
    if odd:
        shown = ", ".join(f"{wi}×{hi} ×{k}" for (wi, hi), k in counts.most_common(4))
        more = ", …" if len(counts) > 4 else ""
        print(
            f"folder {root.name}: images have {len(counts)} sizes ({shown}{more}); the {len(odd)} not "
            f"{w}×{h} (e.g. {odd[0]!r}) are resized to {side}×{side} (pass image_size= to choose the size)"
        )
    if w != h:
        print(
            f"folder {root.name}: images are {w}×{h} (width×height); stretched to {side}×{side} "
            f"(the models take square images)"
        )
    return side


def _check_sizes(file: Path, n_train: int, n_test: int, n_free: int, test_fraction: float) -> None:
    """Refuse an empty train split, and an empty test split unless ``test_fraction`` is 0."""
    sizes = f"train {n_train}, test {n_test}"
    if n_train == 0:
        raise ValueError(
            f"{file}: the train split is empty ({sizes}): every line is pinned to 'split': 'test'; "
            f"leave some lines without a split or pin them to 'train'"
        )
    if n_test == 0 and test_fraction > 0:
        raise ValueError(
            f"{file}: the test split is empty ({sizes}): test_fraction={test_fraction} draws test images from "
            f"the lines without a 'split' when there are at least 2 of them (here {n_free}); add images, pin a "
            f"line to 'split': 'test', or pass test_fraction=0 for no test split"
        )


def load_folder(
    root: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    channels: int | None = None,
    lazy: bool | None = None,
) -> Dataset:
    """The images in ``root`` described by ``root/captions.jsonl``.

    Fields of each split: ``image`` (N, C, S, S) float32 in [0, 1]; ``caption``
    list[str]; ``path`` list[str] (as written in the file); ``label`` (N,) when the
    lines have labels; ``boxes`` (a list of tuples per image) when any line has boxes.
    ``S`` is ``image_size`` when given, else the images' own (most common) size; ``C`` is
    ``channels`` when given, else 1 when every image is greyscale and 3 otherwise.
    Raises ValueError naming the file and line for any bad input.

    ``lazy=True`` decodes no pixels here (:func:`load_lazy_folder`, :mod:`polymodal.data.lazy`: a header-only
    pass reads sizes and modes; the train split decodes its images on demand, in DataLoader workers
    when training, and gives the same batches bit for bit); ``lazy=None`` (the default) is lazy when
    the folder has more than ``POLYMODAL_LAZY_ABOVE`` (default 2,000) images.
    """
    if root is None:
        raise ValueError("the folder dataset needs root: a folder of images with a captions.jsonl")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int; got {image_size!r}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    file = root / CAPTIONS
    if not file.is_file():
        raise ValueError(f"{root} has no {CAPTIONS} (one JSON object per line with 'path' and 'caption')")
    rows = _read_lines(file)
    labels = _labels(rows, file, _class_list(root))
    if lazy or (lazy is None and len(rows) > lazy_above()):
        return load_lazy_folder(root, rows, labels, seed, test_fraction, image_size, channels)

    loaded = []
    for lineno, row in rows:
        where = f"{file}:{lineno}"
        loaded.append(_load_image(_image_path(root, row["path"], where), where))
        check_split_value(row, where)
    if channels is None:
        channels = 1 if all(img.mode in GREY_MODES for img in loaded) else 3
    mode = "L" if channels == 1 else "RGB"
    if image_size is None:
        image_size = _common_size(root, [(row["path"], img.size) for (_, row), img in zip(rows, loaded)])

    images, boxes = [], []
    for (lineno, row), img in zip(rows, loaded):
        boxes.append(row_boxes(row, img.size, image_size, f"{file}:{lineno}"))
        images.append(prepare_image(img, mode, image_size))  # (C, S, S)
    index = split_index(file, [row.get("split") for _, row in rows], seed, test_fraction)

    stacked = torch.from_numpy(np.stack(images))  # (N, C, S, S)
    with_boxes = any("boxes" in row for _, row in rows)

    def split_of(idx: list[int]) -> Split:
        fields: dict[str, Any] = {
            "image": stacked[torch.tensor(idx, dtype=torch.long)],
            "caption": [rows[i][1]["caption"] for i in idx],
            "path": [rows[i][1]["path"] for i in idx],
        }
        if labels is not None:
            fields["label"] = torch.tensor([labels[0][i] for i in idx], dtype=torch.long)
        if with_boxes:
            fields["boxes"] = [boxes[i] for i in idx]
        return Split(fields)

    meta = folder_meta(root, labels, image_size, channels, index)
    return Dataset("folder", split_of(index["train"]), split_of(index["test"]), meta)


LAZY_ABOVE = 2000
"""Folders with more images than this load lazily (``POLYMODAL_LAZY_ABOVE`` overrides it)."""


def lazy_above() -> int:
    """The image count above which :func:`load_folder` is lazy: ``$POLYMODAL_LAZY_ABOVE``, else :data:`LAZY_ABOVE`."""
    import os

    value = os.environ.get("POLYMODAL_LAZY_ABOVE", "").strip()
    if not value:
        return LAZY_ABOVE
    try:
        above = int(value)
    except ValueError:
        above = -1
    if above < 0:
        raise ValueError(f"POLYMODAL_LAZY_ABOVE must be a whole number ≥ 0 (images); got {value!r}")
    return above


def check_split_value(row: dict[str, Any], where: str) -> None:
    """Refuse a ``split`` other than ``"train"``, ``"test"`` or none."""
    split = row.get("split")
    if split not in (None, "train", "test"):
        raise ValueError(f"{where}: split must be 'train' or 'test'; got {split!r}")


def row_boxes(row: dict[str, Any], size: tuple[int, int], image_size: int, where: str) -> list[tuple]:
    """The line's boxes scaled from the image's own ``size`` (width, height) to ``image_size``; [] without."""
    if "boxes" not in row:
        return []
    return _boxes(row["boxes"], (image_size / size[0], image_size / size[1]), where)


def split_index(file: Path, pinned: list[str | None], seed: int, test_fraction: float) -> dict[str, list[int]]:
    """Line indices of the train and test splits: lines pinned by ``split``, the others drawn by ``seed``
    with ``test_fraction`` (refused when a split would be empty: :func:`_check_sizes`)."""
    free = [i for i, s in enumerate(pinned) if s is None]
    order = np.random.default_rng(seed).permutation(len(free))
    n_test = round(len(free) * test_fraction)
    if test_fraction > 0 and len(free) >= 2:
        n_test = min(max(n_test, 1), len(free) - 1)
    test_set = {free[j] for j in order[:n_test]} | {i for i, s in enumerate(pinned) if s == "test"}
    index = {"train": [i for i in range(len(pinned)) if i not in test_set], "test": sorted(test_set)}
    _check_sizes(file, len(index["train"]), len(index["test"]), len(free), test_fraction)
    return index


def folder_meta(
    root: Path, labels: tuple[list[int], list[str]] | None, image_size: int, channels: int, index: dict
) -> dict[str, Any]:
    """``Dataset.meta`` of a folder: classes, image size and channels, its root and split indices."""
    class_names = labels[1] if labels is not None else []
    return {
        "num_classes": len(class_names),
        "class_names": class_names,
        "image_size": image_size,
        "channels": channels,
        "templates": [],
        "heldout_templates": [],
        "root": str(root),
        "indices": index,
    }


def is_folder(dataset: Any) -> bool:
    """Whether ``dataset`` is a folder of the user's own images: it is loaded from its path, so
    neither ``load_dataset(dataset.name)`` nor an 'auto' part (trained by dataset name) can load it.
    Tar shards (:mod:`polymodal.data.shards`, name ``"shards"``) count as one: they too load from their path."""
    return getattr(dataset, "name", "") in ("folder", "shards") and "root" in getattr(dataset, "meta", {})


def _header(path: Path, where: str) -> tuple[str, tuple[int, int]]:
    """The image's Pillow mode and (width, height) from its header: no pixel is decoded. The pixel limit
    and unreadable files are refused as :func:`~polymodal.data.images.open_image` refuses them."""
    import warnings

    from PIL import Image

    limit = pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                mode, size = img.mode, img.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{where}: image {path.name!r} is over the pixel limit ({exc}); use a smaller image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{where}: cannot read image {path.name!r} ({path}): {exc}") from None
    if limit is not None and size[0] * size[1] > limit:
        open_image(path, where=where)  # raises the same ValueError as the eager folder, from the header
    return mode, size


def load_lazy_folder(
    root: Path,
    rows: list[tuple[int, dict[str, Any]]],
    labels: tuple[list[int], list[str]] | None,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    channels: int | None = None,
) -> Dataset:
    """The folder ``root`` (its parsed ``captions.jsonl`` ``rows`` and ``labels``) as a lazy :class:`Dataset`.

    The same splits, ``meta``, notes and errors as :func:`~polymodal.data.folder.load_folder` (every
    image's header is read, so a missing or oversized image is refused here, naming its line); the
    train split decodes on demand, the test split keeps its images once evaluation reads them whole.
    """
    file = root / CAPTIONS
    headers = []
    for lineno, row in rows:
        where = f"{file}:{lineno}"
        headers.append(_header(_image_path(root, row["path"], where), where))
        check_split_value(row, where)
    if channels is None:
        channels = 1 if all(mode in GREY_MODES for mode, _ in headers) else 3
    if image_size is None:
        image_size = _common_size(root, [(row["path"], size) for (_, row), (_, size) in zip(rows, headers)])
    boxes = [row_boxes(row, size, image_size, f"{file}:{lineno}") for (lineno, row), (_, size) in zip(rows, headers)]
    with_boxes = any("boxes" in row for _, row in rows)
    index = split_index(file, [row.get("split") for _, row in rows], seed, test_fraction)
    mode = "L" if channels == 1 else "RGB"

    def split_of(idx: list[int], keep_images: bool) -> LazyFolderSplit:
        reader = FolderReader(
            root,
            [rows[i][1]["path"] for i in idx],
            [rows[i][1]["caption"] for i in idx],
            [labels[0][i] for i in idx] if labels is not None else None,
            [boxes[i] for i in idx] if with_boxes else None,
            mode,
            image_size,
        )
        return LazyFolderSplit(reader, keep_images=keep_images)

    meta = folder_meta(root, labels, image_size, channels, index)
    return Dataset("folder", split_of(index["train"], False), split_of(index["test"], True), meta)
