"""Embedded text: short English sentences that each name one digit word, generated from templates.

Every sentence names exactly one of ``zero … nine`` as a word (never as a numeral), so the
label is recoverable only by reading the word: a language model pre-trains on it, a
classifier learns "which digit does this phrase name", and a pixel model reads it rendered.
Besides the sentence templates the corpus holds the digits' caption templates (word forms)
and Flamingo-style "This is a seven." lines.

The corpus is deterministic: every (template, digit, noun) combination is generated,
shuffled with a fixed seed and split 80 / 20 by template-noun pair, so a test sentence's
wording differs from every training sentence of the same digit.
"""

from __future__ import annotations

import random

import torch

from polymodal.data.base import Dataset, Split
from polymodal.data.digits import DIGIT_WORDS

SENTENCE_TEMPLATES = (
    "I counted {word} {noun} on the table.",
    "She bought {word} {noun} at the market.",
    "There are {word} {noun} in the box.",
    "We saw {word} {noun} near the river.",
    "He gave me {word} {noun} this morning.",
    "The child drew {word} {noun} on the wall.",
    "My sister found {word} {noun} in the garden.",
    "They painted {word} {noun} red and blue.",
    "Please bring {word} {noun} to the kitchen.",
    "Only {word} {noun} were left after lunch.",
    "The teacher asked for {word} {noun}.",
    "Our neighbour keeps {word} {noun} in the yard.",
)
"""Sentence templates; ``{word}`` is a digit word, ``{noun}`` a plural noun."""

SHORT_TEMPLATES = (
    "This is a {word}.",
    "the digit {word}",
    "a photo of the number {word}",
    "a small picture of {word}",
    "a {word}",
    "a drawing of the digit {word}",
    "a low resolution {word}",
    "the handwritten numeral {word}",
    "The answer is {word}.",
    "The number is {word}.",
)
"""Caption-like templates (the digits' word-form captions and Flamingo's "This is a {word}.")."""

NOUNS = (
    "apples",
    "birds",
    "books",
    "boxes",
    "cats",
    "chairs",
    "coins",
    "cups",
    "dogs",
    "eggs",
    "flowers",
    "keys",
    "lamps",
    "pens",
    "shoes",
    "stones",
    "trees",
    "windows",
)
"""Plural nouns filled into :data:`SENTENCE_TEMPLATES`."""


def fill(template: str, noun: str, digit: int) -> str:
    """``template`` with the digit's word and ``noun`` (singular after "one")."""
    if digit == 1 and noun:
        noun = noun[:-2] if noun.endswith("xes") else noun[:-1]
    return template.format(word=DIGIT_WORDS[digit], noun=noun)


def corpus() -> list[tuple[str, int]]:
    """Every generated ``(sentence, digit)`` pair, in a fixed order."""
    wordings = [(t, n) for t in SENTENCE_TEMPLATES for n in NOUNS] + [(t, "") for t in SHORT_TEMPLATES]
    return [(fill(t, n, d), d) for t, n in wordings for d in range(10)]


def load_text(root: str | None = None, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The embedded sentences with the digit each names: fields ``text`` (str) and ``label`` (long).

    The split is by wording: a (template, noun) pair is wholly in train or wholly in test;
    ``seed`` only shuffles the order inside each split.
    """
    if root is not None:
        raise ValueError(f"the text dataset is generated and takes no folder; got {root!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    wordings = [(t, n) for t in SENTENCE_TEMPLATES for n in NOUNS] + [(t, "") for t in SHORT_TEMPLATES]
    random.Random(0).shuffle(wordings)  # the split itself never depends on ``seed``
    n_test = round(len(wordings) * test_fraction)
    test_wordings = set(wordings[:n_test])

    rng = random.Random(seed)

    def split(keys: list[tuple[str, str]]) -> Split:
        rows = [(fill(t, n, d), d) for t, n in keys for d in range(10)]
        rng.shuffle(rows)
        return Split({"text": [r[0] for r in rows], "label": torch.tensor([r[1] for r in rows], dtype=torch.long)})

    train = split([w for w in wordings if w not in test_wordings])
    test = split([w for w in wordings if w in test_wordings])
    meta = {
        "num_classes": 10,
        "class_names": list(DIGIT_WORDS),
        "modality": "text",
        "templates": list(SENTENCE_TEMPLATES + SHORT_TEMPLATES),
    }
    return Dataset("text", train, test, meta)


__all__ = ["NOUNS", "SENTENCE_TEMPLATES", "SHORT_TEMPLATES", "corpus", "fill", "load_text"]
