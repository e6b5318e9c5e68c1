"""Interleaved image–text input: parsing ``<image>`` / ``<|endofchunk|>`` text, media masks, training sequences.

An interleaved text reads like OpenFlamingo's::

    "<image>This is a three.<|endofchunk|><image>This is a"

Each ``<image>`` stands for the next image of the sample, in order; ``<|endofchunk|>`` closes
a chunk (image + its text). Both get ids after the language model's vocabulary
(``lm.vocab_size`` and ``lm.vocab_size + 1``), embedded by the Flamingo model's own rows.

Media masking: every token attends only to the visual tokens of the *latest* ``<image>`` at
or before its position; tokens before the first ``<image>`` see no image at all (their
cross-attention output is exactly zero).
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polymodal.data.digits import DIGIT_WORDS

IMAGE = "<image>"
"""Marks where an image sits in the text."""
END_OF_CHUNK = "<|endofchunk|>"
"""Closes an image's chunk of text."""
_SPLIT = re.compile(r"(<image>|<\|endofchunk\|>)")

SHORT_TEMPLATES = (
    "a handwritten {numeral}",
    "the digit {word}",
    "an 8x8 image of a {numeral}",
    "a scanned digit {numeral}",
    "the number {numeral} written by hand",
    "a small picture of {word}",
    "a {word}",
    "a drawing of the digit {word}",
    "a low resolution {word}",
    "the handwritten numeral {word}",
    "The answer is {word}.",
    "The number is {word}.",
)
"""Caption-like formats, all wordings the frozen LM has read (the digits' training captions and the
text corpus's short templates)."""

SENTENCE_TEMPLATES = tuple(f"This is {t}." for t in SHORT_TEMPLATES if t.startswith("a "))
"""The same captions as sentences ("This is a handwritten 7.", "This is a seven." …): six formats
share the words "This is a", so what follows them is decided by the sequence's other captions."""

CAPTION_TEMPLATES = SHORT_TEMPLATES + SENTENCE_TEMPLATES
"""Training caption formats (one per sequence, as a web page keeps its captions' style). The few-shot
format "This is a {word}." is one of the six "This is a …" sentences, so a 0-shot prompt cannot tell
which one is asked for; the in-context examples tell it."""

EVAL_TEMPLATE = "This is a {word}."
"""The few-shot evaluation's example captions; its query is the text before ``{word}``."""


def fill(template: str, digit: int) -> str:
    """``template`` with ``{word}`` (``seven``) and ``{numeral}`` (``7``) for ``digit``."""
    return template.format(word=DIGIT_WORDS[digit], numeral=str(digit))


def chunk_text(captions: Sequence[str], query: str | None = None) -> str:
    """``<image>c1<|endofchunk|><image>c2<|endofchunk|>…`` and, with ``query``, ``<image>query`` at the end."""
    text = "".join(f"{IMAGE}{c}{END_OF_CHUNK}" for c in captions)
    return text + (f"{IMAGE}{query}" if query is not None else "")


def encode(text: str, tokenizer, image_id: int, eoc_id: int, *, bos: bool = True) -> list[int]:
    """Token ids of an interleaved text: text pieces through ``tokenizer``, the two markers as their own ids."""
    ids = [tokenizer.special_tokens["bos"]] if bos else []
    for piece in _SPLIT.split(text):
        if piece == IMAGE:
            ids.append(image_id)
        elif piece == END_OF_CHUNK:
            ids.append(eoc_id)
        elif piece:
            ids += tokenizer.encode(piece, add_bos=False, add_eos=False)
    return ids


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> Tensor:
    """Right-padded LongTensor (B, max length)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def image_counts(ids: Tensor, image_id: int) -> Tensor:
    """(B,) how many ``<image>`` tokens each row holds."""
    return (ids == image_id).sum(dim=1)


def media_index(ids: Tensor, image_id: int, offset: Tensor | None = None) -> Tensor:
    """(B, T) index of the latest image at or before each position (−1: none yet).

    ``offset`` (B,) counts images already seen in earlier (cached) positions.
    """
    index = torch.cumsum((ids == image_id).long(), dim=1) - 1  # (B, T)
    return index if offset is None else index + offset.to(index.device).unsqueeze(1)


def media_mask(index: Tensor, num_images: int, tokens_per_image: int) -> Tensor:
    """(B, T, M·L) bool: position t may see the L visual tokens of image ``index[b, t]`` only."""
    owner = torch.arange(num_images, device=index.device).repeat_interleave(tokens_per_image)  # (M·L,)
    return index.unsqueeze(-1) == owner  # (B, T, M·L)


def sentence_formats() -> list[str]:
    """Caption formats from the text corpus's sentences, a noun filled in: ``"There are {word} cats in the box."``."""
    from polymodal.data import text

    return [t.replace("{noun}", n) for t in text.SENTENCE_TEMPLATES for n in text.NOUNS]


def fill_caption(template: str, digit: int) -> str:
    """``template`` filled for ``digit``, with a plural noun after "one" made singular (text corpus style)."""
    caption = fill(template, digit)
    if digit == 1 and "{word} " in template:
        noun = template.split("{word} ", 1)[1].split(" ", 1)[0].rstrip(".")
        singular = noun[:-2] if noun.endswith("xes") else noun[:-1]
        caption = caption.replace(f"one {noun}", f"one {singular}", 1)
    return caption


def training_sequences(
    labels: Sequence[int],
    templates: Sequence[str],
    min_chunks: int,
    max_chunks: int,
    mixed_template_rate: float,
    rng: random.Random,
    sentence_rate: float = 0.0,
) -> list[tuple[list[int], list[str]]]:
    """Group a batch's images into interleaved sequences: ``(image indices, captions)`` each.

    Every sequence gets ``min_chunks … max_chunks`` image–caption chunks. Its captions share
    one format (like a web page's consistent captions): a caption template, or for a
    ``sentence_rate`` share of sequences a sentence format of the text corpus (the digit word
    mid-sentence), except a ``mixed_template_rate`` share where each chunk draws its own template.
    """
    order = list(range(len(labels)))
    rng.shuffle(order)
    sentences = sentence_formats() if sentence_rate > 0 else []
    out, i = [], 0
    while i < len(order):
        k = rng.randint(min_chunks, max_chunks)
        idx = order[i : i + k]
        i += k
        mixed = rng.random() < mixed_template_rate
        pool = sentences if sentences and rng.random() < sentence_rate else list(templates)
        shared = rng.choice(pool)
        captions = [fill_caption(rng.choice(list(templates)) if mixed else shared, int(labels[j])) for j in idx]
        out.append((idx, captions))
    return out


__all__ = [
    "CAPTION_TEMPLATES",
    "END_OF_CHUNK",
    "EVAL_TEMPLATE",
    "IMAGE",
    "SENTENCE_TEMPLATES",
    "SHORT_TEMPLATES",
    "chunk_text",
    "encode",
    "fill",
    "image_counts",
    "media_index",
    "media_mask",
    "pad_rows",
    "training_sequences",
]


def training_rows(
    labels: list[int], config: Any, tokenizer: Any, image_id: int, eoc_id: int, max_len: int
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Interleaved training sequences of a batch's ``labels``: ids (S, T + 1), targets (S, T) and, per
    sequence, the batch indices of its images (LongTensor).

    One draw from torch's global generator seeds the sequences' ``random.Random``; chunks that do
    not fit ``max_len + 1`` tokens are dropped from the end. Caption tokens and ``<|endofchunk|>``
    are targets; ``<image>`` and padding (-100) are not.
    """
    c = config
    rng = random.Random(int(torch.randint(0, 2**31 - 1, ())))
    seqs = training_sequences(
        labels, c.templates, c.min_chunks, c.max_chunks, c.mixed_template_rate, rng, c.sentence_rate
    )
    rows, index = [], []
    for idx, captions in seqs:
        row = encode(chunk_text(captions), tokenizer, image_id, eoc_id)
        while len(row) > max_len + 1 and len(captions) > 1:  # drop chunks that do not fit
            idx, captions = idx[:-1], captions[:-1]
            row = encode(chunk_text(captions), tokenizer, image_id, eoc_id)
        rows.append(row[: max_len + 1])
        index.append(torch.as_tensor(idx, dtype=torch.long))
    ids = pad_rows(rows, tokenizer.special_tokens["pad"])  # (S, T + 1)
    targets = ids[:, 1:].clone()  # (S, T)
    for i, r in enumerate(rows):
        targets[i, len(r) - 1 :] = -100
    targets[targets == image_id] = -100
    return ids, targets, index


class FlamingoCollate:
    """``collate(batch, step) -> batch`` for Flamingo training: ``ids`` (S, T + 1) and ``targets`` (S, T) of
    the interleaved sequences built from the batch's labels, and ``image_index``, per sequence the
    indices of its images in ``batch['image']`` (see :func:`training_rows`). Holds the config and the
    LM's tokenizer only (it pickles for DataLoader workers)."""

    def __init__(self, config: Any, tokenizer: Any, image_id: int, eoc_id: int, max_len: int) -> None:
        self.config, self.tokenizer, self.image_id, self.eoc_id, self.max_len = (
            config,
            tokenizer,
            image_id,
            eoc_id,
            max_len,
        )

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch of global step ``step`` (unused: no curriculum) with its sequences."""
        ids, targets, index = training_rows(
            batch["label"].tolist(), self.config, self.tokenizer, self.image_id, self.eoc_id, self.max_len
        )
        out = copy.copy(batch)  # a Batch stays a Batch (its missing-field errors name the dataset)
        out.update(ids=ids, targets=targets, image_index=index)
        return out
