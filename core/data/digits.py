"""scikit-learn's 1,797 real 8×8 handwritten digits, with template captions.

The split is fixed: ``train_test_split(range(1797), test_size=0.2, stratify=labels,
random_state=0)`` (1,437 train, 360 test). Pixels are scaled from 0..16 to 0..1 and
stored as (N, 1, 8, 8) float32.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from polymodal.data.base import Dataset, Split

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Class names of the digits, index = digit."""

TRAIN_TEMPLATES = (
    "a handwritten {numeral}",
    "the digit {word}",
    "a photo of the number {word}",
    "an 8x8 image of a {numeral}",
    "a scanned digit {numeral}",
    "the number {numeral} written by hand",
    "a small picture of {word}",
    "a {word}",
)
"""Caption templates used for training; ``{numeral}`` is ``7``, ``{word}`` is ``seven``."""

HELDOUT_TEMPLATES = (
    "a drawing of the digit {word}",
    "someone wrote the number {numeral}",
    "a low resolution {word}",
    "the handwritten numeral {word}",
)
"""Templates never used in training, for evaluating generalisation to new phrasings."""


def caption(template: str, label: int) -> str:
    """Fill ``template`` for digit ``label``."""
    return template.format(numeral=str(label), word=DIGIT_WORDS[label])


def load_digits(root: str | None = None, seed: int = 0) -> Dataset:
    """The digits dataset; each sample gets one training-template caption chosen with ``seed``."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if root is not None:
        raise ValueError(f"the digits dataset ships with scikit-learn and takes no folder; got {root!r}")
    raw = sk_digits()
    labels = raw.target.astype(np.int64)
    train_idx, test_idx = train_test_split(range(1797), test_size=0.2, stratify=labels, random_state=0)
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    targets = torch.from_numpy(labels)  # (1797,)
    rng = random.Random(seed)

    def split(index: list[int], templates: tuple[str, ...]) -> Split:
        idx = torch.tensor(index)
        return Split(
            {
                "image": images[idx],
                "label": targets[idx],
                "caption": [caption(rng.choice(templates), int(labels[i])) for i in index],
            }
        )

    meta = {
        "num_classes": 10,
        "class_names": list(DIGIT_WORDS),
        "image_size": 8,
        "channels": 1,
        "templates": list(TRAIN_TEMPLATES),
        "heldout_templates": list(HELDOUT_TEMPLATES),
        "indices": {"train": list(train_idx), "test": list(test_idx)},
    }
    return Dataset("digits", split(train_idx, TRAIN_TEMPLATES), split(test_idx, HELDOUT_TEMPLATES), meta)
