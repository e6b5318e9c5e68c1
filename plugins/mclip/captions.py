"""M-CLIP's captions: the student's tokenizer corpus, the training draws and the aligned English captions.

Every caption comes from the core's hand-written tables (:mod:`polymodal.data.languages`), where template
id ``t`` of every language translates English template ``t``. A training sample draws a ``(template,
language)`` pair among the *training* pairs only (:func:`training_pairs`); the student reads the caption in
that language and the frozen teacher reads the English caption of the same template id and the same
objects (or digit) — the translation pair M-CLIP trains on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from polymodal.data import languages as lang
from polymodal.data import shapes as shapes_data
from polymodal.data.multilingual import scene_objects
from polymodal.data.tokenizers import BPETokenizer

Scene = Any
"""A shapes scene's objects ``[(colour, kind, cell), …]`` or a digit's label (int)."""


def training_pairs(tables: str) -> list[tuple[int, str]]:
    """Every ``(template id, language)`` pair the train split may hold (no evaluation-only pair)."""
    return [(t, code) for code in lang.LANGUAGES for t in lang.template_ids(tables, code)]


def caption(tables: str, language: str, template: int, scene: Scene) -> str:
    """The caption of ``scene`` in ``language`` from aligned template id ``template``."""
    if tables == "digits":
        return lang.digit_caption(language, template, int(scene))
    return lang.shapes_caption(language, template, scene)


def scenes(tables: str, batch: Any, image_size: int) -> list[Scene]:
    """Per sample, what its captions describe: the shapes' objects (from ``boxes``) or the digit's label."""
    if tables == "digits":
        return [int(y) for y in batch["label"]]
    return scene_objects(batch, image_size)


def draw_pairs(tables: str, n: int, generator: torch.Generator | None = None) -> list[tuple[int, str]]:
    """``n`` pairs drawn uniformly from :func:`training_pairs` (torch's global generator unless given)."""
    pairs = training_pairs(tables)
    picks = torch.randint(len(pairs), (n,), generator=generator).tolist()  # (n,)
    return [pairs[i] for i in picks]


def training_captions(
    tables: str, batch: Any, image_size: int, generator: torch.Generator | None = None
) -> tuple[list[str], list[str], list[tuple[int, str]]]:
    """A fresh training pair per sample: (the student's captions, the aligned English captions, the pairs)."""
    items = scenes(tables, batch, image_size)
    pairs = draw_pairs(tables, len(items), generator)
    student = [caption(tables, code, t, s) for (t, code), s in zip(pairs, items)]
    english = [caption(tables, "en", t, s) for (t, _), s in zip(pairs, items)]
    return student, english, pairs


def corpus(tables: str) -> list[str]:
    """Every training caption of one object (shapes: every colour × kind × cell; digits: every digit) in
    every language's training templates, and for shapes each also joined to another by the language's
    conjunction (two-object scenes)."""
    texts: list[str] = []
    for t, code in training_pairs(tables):
        if tables == "digits":
            texts += [caption(tables, code, t, y) for y in range(10)]
            continue
        ones = [
            [(c, k, p)]
            for c in range(len(shapes_data.COLOURS))
            for k in range(len(shapes_data.KINDS))
            for p in range(len(shapes_data.POSITIONS))
        ]
        texts += [caption(tables, code, t, o) for o in ones]
        texts += [caption(tables, code, t, a + b) for a, b in zip(ones, ones[7:] + ones[:7])]
    return texts


@functools.lru_cache(maxsize=4)
def caption_tokenizer(tables: str, vocab_size: int) -> BPETokenizer:
    """The byte-level BPE (at most ``vocab_size`` ids; bos 0, eos 1, pad 2) learnt from :func:`corpus`.

    Byte-level: any UTF-8 text encodes (a script it never saw falls back to its bytes)."""
    return BPETokenizer.train(corpus(tables), vocab_size=vocab_size)


def check_texts(texts: Sequence[str] | str) -> list[str]:
    """``texts`` as a non-empty list of strings; else a ValueError naming expected vs given."""
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"expected a text or a non-empty list of texts; got {texts!r}")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"expected texts (str); got {', '.join(sorted(set(bad)))} among them")
    return list(texts)
