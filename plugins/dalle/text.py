"""DALL·E's text side: the BPE corpus, per-step caption re-sampling, and prompts for evaluation.

The BPE is learnt from every training-template caption of the dataset the model was adapted
to (digits: each template filled with each digit; shapes: each template filled with each
colour, kind and position, plus two-object joins). Held-out templates are never part of it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from polymodal.data import digits as digits_data
from polymodal.data import shapes as shapes_data
from polymodal.data.augment import augment_scenes
from polymodal.data.multilingual import scene_objects
from polymodal.data.tokenizers import BPETokenizer


def fill_label(template: str, label: int, class_names: tuple[str, ...]) -> str:
    """A label template: ``{numeral}`` is the class index, ``{word}``/``{label}`` its name."""
    name = class_names[label] if label < len(class_names) else str(label)
    return template.format_map({"numeral": str(label), "word": name, "label": name})


def fill_object(template: str, colour: int, kind: int, cell: int) -> str:
    """A shapes template filled for one object (colour, kind and cell indices)."""
    return template.format(
        colour=tuple(shapes_data.COLOURS)[colour],
        kind=shapes_data.KINDS[kind],
        where=shapes_data.WHERE[shapes_data.POSITIONS[cell]],
    )


def corpus(data: str, templates: tuple[str, ...], class_names: tuple[str, ...]) -> list[str]:
    """Every training caption the templates make for ``data`` (the BPE's training text)."""
    if data == "shapes":
        nc, nk, ncell = len(shapes_data.COLOURS), len(shapes_data.KINDS), len(shapes_data.POSITIONS)
        single = [
            fill_object(t, c, k, p) for t in templates for c in range(nc) for k in range(nk) for p in range(ncell)
        ]
        pairs = [f"{single[i]} and {single[(7 * i + 3) % len(single)]}" for i in range(0, len(single), 4)]
        return single + pairs
    names = class_names or digits_data.DIGIT_WORDS
    texts = [fill_label(t, i, tuple(names)) for t in templates for i in range(len(names))]
    return texts or list(names)


def train_tokenizer(
    data: str, templates: tuple[str, ...], class_names: tuple[str, ...], vocab_size: int
) -> BPETokenizer:
    """The byte-level BPE (at most ``vocab_size`` ids) learnt from :func:`corpus`."""
    return BPETokenizer.train(corpus(data, templates, class_names), vocab_size=vocab_size)


def resample_captions(cfg: Any, batch: dict[str, Any]) -> list[str]:
    """Fresh captions for a training batch, each from a random training template (torch's RNG).

    Digits (a ``label`` field and class names): the label fills the template. Shapes (a
    ``boxes`` field): every object fills the template, joined with " and ". Otherwise the
    batch's own captions.
    """
    templates, n = cfg.templates, len(batch["caption"])
    if not templates:
        return list(batch["caption"])
    choice = torch.randint(len(templates), (n,)).tolist()
    if cfg.data == "shapes" and "boxes" in batch:
        size = batch["image"].shape[-1]
        return [
            " and ".join(fill_object(templates[j], *obj) for obj in objects)
            for objects, j in zip(scene_objects(batch, size), choice)
        ]
    if "label" in batch and cfg.class_names:
        labels = batch["label"].tolist()
        return [fill_label(templates[j], labels[i], cfg.class_names) for i, j in enumerate(choice)]
    return list(batch["caption"])


def eval_prompts(data: str, per_class: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Prompts and the attributes the judge should read from their samples.

    Digits: ``"the digit 0"`` … ``"the digit 9"`` (the issue's prompts), ``per_class`` each,
    target ``label``. Shapes: one object per prompt, ``"a {colour} {kind} {where}"`` for
    every colour × kind, ``per_class`` each with the position cycling through the cells,
    targets ``colour`` and ``kind``.
    """
    if data == "shapes":
        prompts, colours, kinds = [], [], []
        nc, nk, ncell = len(shapes_data.COLOURS), len(shapes_data.KINDS), len(shapes_data.POSITIONS)
        template = shapes_data.TRAIN_TEMPLATES[0]
        for c in range(nc):
            for k in range(nk):
                for r in range(per_class):
                    cell = (c * nk + k + 3 * r) % ncell
                    prompts.append(fill_object(template, c, k, cell))
                    colours.append(c)
                    kinds.append(k)
        return prompts, {"colour": torch.tensor(colours), "kind": torch.tensor(kinds)}
    labels = [d for d in range(10) for _ in range(per_class)]
    return [f"the digit {d}" for d in labels], {"label": torch.tensor(labels)}


def pad_ids(text_vocab: int, text_length: int) -> torch.Tensor:
    """(L,) the unique pad id of each text position: ``text_vocab + i``."""
    return text_vocab + torch.arange(text_length)


def encode_texts(tokenizer: Any, cfg: Any, texts: list[str] | str, truncate: bool = False) -> torch.Tensor:
    """(B, L) text streams: ``bos``, caption, ``eos``, then the positions' unique pads (``cfg`` a DALLEConfig).

    A text longer than L tokens raises a ValueError naming its length and the limit,
    unless ``truncate`` (which keeps ``eos``).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("expected at least one text; got an empty list")
    out = pad_ids(cfg.text_vocab, cfg.text_length).repeat(len(texts), 1)  # (B, L)
    for i, t in enumerate(texts):
        try:
            row = tokenizer.encode(t, cfg.text_length, truncate)
        except ValueError as exc:
            raise ValueError(f"prompt {t!r}: {exc} (DALL·E's text context is {cfg.text_length} tokens)") from None
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out  # (B, L)


def empty_texts(tokenizer: Any, cfg: Any, batch: int) -> torch.Tensor:
    """(B, L) the unconditional text: ``bos`` then pads only."""
    row = pad_ids(cfg.text_vocab, cfg.text_length)  # (L,)
    row[0] = tokenizer.special_tokens["bos"]
    return row.repeat(batch, 1)  # (B, L)


def check_captions(images: Any, captions: list[str]) -> None:
    """ValueError unless there is one caption per image."""
    if isinstance(images, torch.Tensor) and len(captions) != len(images):
        raise ValueError(
            f"the batch must hold one caption per image; got {len(images)} image(s) and {len(captions)} caption(s)"
        )


class DALLECollate:
    """``collate(batch, step) -> batch`` for DALL·E training: scenes augmented (flip, shift, boxes moved),
    captions re-sampled, tokenised and some dropped to the unconditional text, as ``text_ids`` (B, L).

    Draws from torch's global generator in :meth:`DALLE.loss`'s order (augmentation, templates,
    caption dropout), so ``loss(collate(batch, step))`` equals ``loss(batch)`` under one seed.
    Holds the config and the text tokenizer only (it pickles for DataLoader workers).
    """

    def __init__(self, config: Any, tokenizer: Any) -> None:
        self.config, self.tokenizer = config, tokenizer

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The training batch of global step ``step`` (unused: DALL·E has no curriculum) with ``text_ids``."""
        c = self.config
        batch = augment_scenes(batch, c.augment_flip, c.augment_shift)
        captions = resample_captions(c, batch)
        check_captions(batch["image"], captions)
        text = encode_texts(self.tokenizer, c, captions, truncate=True)  # (B, L)
        if c.caption_dropout > 0:
            drop = torch.rand(len(captions)) < c.caption_dropout  # (B,)
            text[drop] = empty_texts(self.tokenizer, c, int(drop.sum()))
        out = copy.copy(batch)  # a Batch stays a Batch (its missing-field errors name the dataset)
        out.update(text_ids=text)
        return out
