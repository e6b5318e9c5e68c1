"""Procedural RGB scenes: one or two coloured shapes on black, with captions, boxes and Q&A.

Every scene is a 3×3 grid of cells; each object sits inside its own cell, so objects
never overlap and each has one position name ("top left", "center", "bottom" …). The
first object decides the class: ``label = colour * len(KINDS) + kind``, named
``"red circle"`` and so on (``meta["class_names"]``). Two objects in one scene never
share both colour and kind, so every question has one answer.

Generation is vectorised with numpy and deterministic: the train split comes from the
seed sequence ``[seed, 0]`` and the test split from ``[seed, 1]``, disjoint streams.
"""

from __future__ import annotations

import numpy as np
import torch

from polymodal.data.base import Dataset, Split

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
"""Colour name → RGB in [0, 1]; index = position in this dict."""

KINDS: tuple[str, ...] = ("square", "circle", "triangle", "cross")
"""Shape kinds; index = position in this tuple."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""Cell names of the 3×3 grid, row-major: index = row * 3 + column."""

WHERE: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
"""Position name → the phrase a caption or question uses."""

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {kind} {where}",
    "{where} a {colour} {kind}",
    "one {colour} {kind} {where}",
    "a {colour} {kind} placed {where}",
)
"""Per-object caption templates for training; two objects are joined with " and "."""

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "there is a {kind} that is {colour} {where}",
    "{where} you can see a {colour} {kind}",
)
"""Templates never used in training (the test split's captions)."""

_COLOUR_NAMES = tuple(COLOURS)
_RGB = np.array(list(COLOURS.values()), dtype=np.float32)  # (num_colours, 3)


def _object_masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int) -> np.ndarray:
    """Boolean masks (N, S, S) of N shapes of ``kind`` centred at (cx, cy) with half-size r."""
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    x = grid[None, None, :]  # (1, 1, S)
    y = grid[None, :, None]  # (1, S, 1)
    cx, cy, r = cx[:, None, None], cy[:, None, None], r[:, None, None]  # (N, 1, 1)
    dx, dy = np.abs(x - cx), np.abs(y - cy)  # (N, 1, S), (N, S, 1)
    square = (dx <= r) & (dy <= r)  # (N, S, S)
    circle = dx**2 + dy**2 <= r**2
    triangle = (y <= cy + r) & (dx <= (y - cy + r) / 2)  # apex up, base at the bottom
    arm = r / 3
    cross = ((dx <= r) & (dy <= arm)) | ((dx <= arm) & (dy <= r))
    shapes = np.stack([square, circle, triangle, cross])  # (K, N, S, S)
    return shapes[kind, np.arange(len(kind))]  # (N, S, S)


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) integer boxes (x0, y0, x1, y1), x1/y1 exclusive, of the pixels of each mask."""
    size = masks.shape[-1]
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (N, S) each
    y0, y1 = rows.argmax(1), size - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), size - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], axis=1)


def describe(objects: list[tuple[int, int, int]], template: str) -> str:
    """A scene's caption: ``template`` filled for each of its objects ``(colour, kind, position)`` (indices),
    joined with " and "."""
    return " and ".join(
        template.format(colour=_COLOUR_NAMES[c], kind=KINDS[k], where=WHERE[POSITIONS[p]]) for c, k, p in objects
    )


def questions(objects: list[tuple[int, int, int]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Questions and answers about one scene's objects ``(colour, kind, position)``: the count; per object its
    colour, the kind at its place, its place, "is there …" (yes); one absent colour × kind drawn with ``rng`` (no)."""
    qa = [("how many objects are there?", str(len(objects)))]
    for c, k, p in objects:
        colour, kind, where = _COLOUR_NAMES[c], KINDS[k], WHERE[POSITIONS[p]]
        qa += [
            (f"what colour is the {kind} {where}?", colour),
            (f"what shape is {where}?", kind),
            (f"where is the {colour} {kind}?", POSITIONS[p]),
            (f"is there a {colour} {kind}?", "yes"),
        ]
    present = {(c, k) for c, k, _ in objects}
    absent = [(c, k) for c in range(len(_COLOUR_NAMES)) for k in range(len(KINDS)) if (c, k) not in present]
    c, k = absent[rng.integers(len(absent))]
    qa.append((f"is there a {_COLOUR_NAMES[c]} {KINDS[k]}?", "no"))
    return qa


def _scenes(n: int, size: int, rng: np.random.Generator, templates: tuple[str, ...]) -> Split:
    """``n`` scenes drawn with ``rng``; captions from ``templates``."""
    nc, nk = len(_COLOUR_NAMES), len(KINDS)
    count = rng.integers(1, 3, n)  # (N,) 1 or 2
    cells = np.argsort(rng.random((n, 9)), axis=1)[:, :2]  # (N, 2) two distinct cells
    combo0 = rng.integers(0, nc * nk, n)
    combo1 = (combo0 + rng.integers(1, nc * nk, n)) % (nc * nk)  # differs from combo0
    combos = np.stack([combo0, combo1], axis=1)  # (N, 2)
    colour, kind = combos // nk, combos % nk  # (N, 2) each
    cell = size / 3
    r = cell * rng.uniform(0.3, 0.45, (n, 2))  # (N, 2) half-size
    slack = cell - 2 * r
    cx = (cells % 3) * cell + r + slack * rng.random((n, 2))  # (N, 2)
    cy = (cells // 3) * cell + r + slack * rng.random((n, 2))

    images = np.zeros((n, 3, size, size), dtype=np.float32)
    union = np.zeros((n, size, size), dtype=bool)
    boxes = []
    for j in range(2):
        m = _object_masks(kind[:, j], cx[:, j], cy[:, j], r[:, j], size)  # (N, S, S)
        m &= (count > j)[:, None, None]
        images += m[:, None] * _RGB[colour[:, j]][:, :, None, None]
        union |= m
        boxes.append(_tight_boxes(m))  # (N, 4)

    captions, box_lists, qas = [], [], []
    choice = rng.integers(0, len(templates), n)
    for i in range(n):
        objects = [(int(colour[i, j]), int(kind[i, j]), int(cells[i, j])) for j in range(count[i])]
        captions.append(describe(objects, templates[choice[i]]))
        box_lists.append([(*map(int, boxes[j][i]), c, k) for j, (c, k, _) in enumerate(objects)])
        qas.append(questions(objects, rng))

    return Split(
        {
            "image": torch.from_numpy(images),
            "label": torch.from_numpy(combos[:, 0].astype(np.int64)),
            "colour": torch.from_numpy(colour[:, 0].astype(np.int64)),
            "kind": torch.from_numpy(kind[:, 0].astype(np.int64)),
            "position": torch.from_numpy(cells[:, 0].astype(np.int64)),
            "count": torch.from_numpy(count.astype(np.int64)),
            "caption": captions,
            "boxes": box_lists,
            "masks": torch.from_numpy(union),
            "qa": qas,
        }
    )


def load_shapes(
    root: str | None = None, seed: int = 0, image_size: int = 32, train_size: int = 2000, test_size: int = 500
) -> Dataset:
    """The shapes dataset.

    Fields of each split: ``image`` (N, 3, S, S) float32 in [0, 1]; ``label`` (N,) the
    first object's class ``colour * len(KINDS) + kind``; ``colour``, ``kind``,
    ``position`` (N,) the first object's indices into :data:`COLOURS`, :data:`KINDS`,
    :data:`POSITIONS`; ``count`` (N,) 1 or 2; ``caption`` list[str]; ``boxes`` a list per
    image of ``(x0, y0, x1, y1, colour, kind)`` in pixels, x1/y1 exclusive, first object
    first; ``masks`` (N, S, S) bool, the union of the objects' pixels; ``qa`` a list per
    image of ``(question, answer)`` about count, colour, kind and position.
    """
    if root is not None:
        raise ValueError(f"the shapes dataset is generated and takes no folder; got {root!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int of at least 16; got {image_size!r}")
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    train = _scenes(train_size, image_size, np.random.default_rng([seed, 0]), TRAIN_TEMPLATES)
    test = _scenes(test_size, image_size, np.random.default_rng([seed, 1]), HELDOUT_TEMPLATES)
    meta = {
        "num_classes": len(COLOURS) * len(KINDS),
        "class_names": [f"{c} {k}" for c in COLOURS for k in KINDS],
        "colours": list(COLOURS),
        "colour_values": [list(v) for v in COLOURS.values()],
        "kinds": list(KINDS),
        "positions": list(POSITIONS),
        "max_objects": 2,
        "image_size": image_size,
        "channels": 3,
        "templates": list(TRAIN_TEMPLATES),
        "heldout_templates": list(HELDOUT_TEMPLATES),
        # the image judge reads colour and kind on one-object scenes, where they are the scene's
        "judge": {"attributes": {"colour": len(COLOURS), "kind": len(KINDS)}, "where": ["count", 1]},
    }
    return Dataset("shapes", train, test, meta)
