"""RuDolph's text side: the caption tokenizer, task tokens, the two text contexts, caption parsing.

Task tokens (RuDolph's ``<LT_T2I>`` / ``<LT_I2T>`` / ``<RT_I2T>``) open the text contexts:

* text→image: left ``[lt_t2i] caption [eos] pad…``; the right context is padding (no loss);
* image→text: left ``[lt_i2t] pad…``; right ``[rt_i2t] caption [eos] pad…``.

Training alternates the two tasks per sample, as the lecture describes: the left context
serves image generation, the right one captioning. Task and pad tokens are conditions, never
targets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from polymodal.data.tokenizers import DEFAULT_BPE_SPECIALS, BPETokenizer, ByteTokenizer

TASK_TOKENS = {"lt_t2i": "<|lt_t2i|>", "lt_i2t": "<|lt_i2t|>", "rt_i2t": "<|rt_i2t|>"}
"""Role → token string of RuDolph's task tokens (left text→image, left image→text, right image→text)."""

SPECIALS = {**DEFAULT_BPE_SPECIALS, **TASK_TOKENS}
"""Every special token of the caption tokenizer (bos is unused: the task tokens open each context)."""

IGNORE = -100
"""Target id that the cross-entropy skips (conditions: padding and task tokens)."""

_NUMERALS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def fill(template: str, label: int, class_names: Sequence[str]) -> str:
    """A caption from ``template``: ``{numeral}`` is the class index, ``{word}``/``{label}`` its name."""
    name = class_names[label] if label < len(class_names) else str(label)
    return template.format_map({"numeral": str(label), "word": name, "label": name})


def label_templates(templates: Sequence[str], class_names: Sequence[str]) -> bool:
    """Whether every template fills from a class alone (``{numeral}``, ``{word}``, ``{label}``; the digits' kind)."""
    try:
        for t in templates:
            fill(t, 0, class_names)
    except (KeyError, IndexError, ValueError):
        return False
    return bool(templates) and bool(class_names)


def corpus(templates: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Every training caption: each template filled for each class."""
    return [fill(t, c, class_names) for t in templates for c in range(len(class_names))]


def make_tokenizer(kind: str, vocab_size: int, templates: Sequence[str], class_names: Sequence[str]):
    """``"bpe"``: byte-level BPE learnt from :func:`corpus`; ``"bytes"``: UTF-8 bytes. Both carry the task tokens."""
    if kind == "bytes":
        return ByteTokenizer(("bos", "eos", "pad", *TASK_TOKENS), add_bos=False)
    if not templates or not class_names:
        raise ValueError(
            "the 'bpe' text tokenizer learns from caption templates and class names; got "
            f"{len(templates)} templates and {len(class_names)} class names (use text_tokenizer='bytes')"
        )
    return BPETokenizer.train(corpus(templates, class_names), vocab_size, SPECIALS, min_frequency=1, add_bos=False)


def text_context(
    tokenizer, texts: Sequence[str], length: int, task: str, *, what: str, truncate: bool = False
) -> Tensor:
    """(B, length) ids ``[task] text [eos] pad…`` (``task`` a role of :data:`TASK_TOKENS`, or "pad").

    A text that does not fit raises ValueError naming its length and the room there is,
    unless ``truncate`` (training captions: cut, keeping the end-of-text); an empty string
    gives ``[task] pad…`` (no end-of-text).
    """
    sp = tokenizer.special_tokens
    out = torch.full((len(texts), length), sp["pad"], dtype=torch.long)  # (B, L)
    out[:, 0] = sp[task]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what} must be a string; got {type(text).__name__}")
        if text == "":
            continue
        body = tokenizer.encode(text, add_bos=False, add_eos=True)
        if len(body) > length - 1 and truncate:
            body = body[: length - 2] + body[-1:]
        if len(body) > length - 1:
            raise ValueError(
                f"{what} {text!r} encodes to {len(body)} tokens (with end-of-text), longer than the "
                f"{length - 1} the {length}-token context has after its task token; shorten it"
            )
        out[i, 1 : 1 + len(body)] = torch.tensor(body, dtype=torch.long)
    return out


def conditions(tokenizer) -> list[int]:
    """Ids that are never targets nor sampled as text: pad, bos and the task tokens."""
    sp = tokenizer.special_tokens
    return sorted({sp["pad"], sp["bos"], *(sp[r] for r in TASK_TOKENS)})


def named_classes(text: str, class_names: Sequence[str] = _NUMERALS) -> set[int]:
    """Every class a caption names, by word (``seven``) or numeral (``7``); ``8x8`` is no numeral."""
    words = {w.lower(): i for i, w in enumerate(class_names)}
    found = set()
    for m in re.finditer(r"\b(\w+)\b", text):
        tok = m.group(1).lower()
        if tok in words:
            found.add(words[tok])
        elif tok.isdigit() and int(tok) < len(class_names):
            found.add(int(tok))
    return found


def caption_label(text: str, class_names: Sequence[str] = _NUMERALS) -> int:
    """The one class a caption names, or -1 when it names none or several."""
    found = named_classes(text, class_names)
    return found.pop() if len(found) == 1 else -1


__all__ = [
    "IGNORE",
    "SPECIALS",
    "TASK_TOKENS",
    "caption_label",
    "conditions",
    "corpus",
    "fill",
    "label_templates",
    "make_tokenizer",
    "named_classes",
    "text_context",
]
