"""Captions for CLIP: the embedded caption corpus its BPE tokenizer learns, and per-step re-sampling.

The tokenizer corpus is every training-template caption of the embedded data (digits: all
training templates for all ten digits; shapes: all training templates for every colour, kind
and position). Held-out templates are never part of it, nor of training.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from polymodal.data import digits as digits_data
from polymodal.data import shapes as shapes_data
from polymodal.tokenizers import BPETokenizer


def corpus() -> list[str]:
    """Every training caption of the embedded datasets (no held-out template)."""
    texts = [digits_data.caption(t, d) for t in digits_data.TRAIN_TEMPLATES for d in range(10)]
    for t in shapes_data.TRAIN_TEMPLATES:
        for c in shapes_data.COLOURS:
            for k in shapes_data.KINDS:
                for p in shapes_data.POSITIONS:
                    texts.append(t.format(colour=c, kind=k, where=shapes_data.WHERE[p]))
    return texts


@functools.lru_cache(maxsize=4)
def caption_tokenizer(vocab_size: int) -> BPETokenizer:
    """The byte-level BPE (at most ``vocab_size`` ids) learnt from :func:`corpus`; eos is id 1."""
    return BPETokenizer.train(corpus(), vocab_size=vocab_size)


def fill(template: str, label: int, class_names: tuple[str, ...]) -> str:
    """A label template: ``{numeral}`` is the class index, ``{word}``/``{label}`` its name."""
    name = class_names[label] if label < len(class_names) else str(label)
    return template.format_map({"numeral": str(label), "word": name, "label": name})


def _shape_objects(batch: dict[str, Any], i: int, size: int) -> list[tuple[int, int, int]]:
    """``(colour, kind, cell)`` of every object of scene ``i``, the cell from its box centre."""
    out = []
    for x0, y0, x1, y1, c, k, *_ in batch["boxes"][i]:
        col = min(int((x0 + x1) / 2 * 3 // size), 2)
        row = min(int((y0 + y1) / 2 * 3 // size), 2)
        out.append((int(c), int(k), row * 3 + col))
    return out


def resample(cfg: Any, batch: dict[str, Any]) -> list[str] | None:
    """Fresh captions for a training batch from a random training template per sample (None: keep the batch's)."""
    templates = cfg.templates
    if cfg.captioner == "none" or not templates:
        return None
    n = len(batch["caption"])
    choice = torch.randint(len(templates), (n,)).tolist()
    if cfg.captioner == "label":
        labels = batch["label"].tolist()
        return [fill(templates[j], labels[i], cfg.class_names) for i, j in enumerate(choice)]
    colours, size = tuple(shapes_data.COLOURS), batch["image"].shape[-1]
    texts = []
    for i, j in enumerate(choice):
        objects = _shape_objects(batch, i, size)
        texts.append(" and ".join(templates[j].format(colour=colours[c], kind=shapes_data.KINDS[k],
                                                      where=shapes_data.WHERE[shapes_data.POSITIONS[p]])
                                  for c, k, p in objects))
    return texts
