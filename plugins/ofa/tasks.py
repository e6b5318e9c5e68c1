"""OFA's task mixture: every training batch holds every task, the rows shared out by the config's sampling weights
(OFA mixes its tasks within each batch), or — ``mixed_batches=False`` — is one task drawn by the step. A task is an
instruction (with or without the image) and a target sequence in the unified vocabulary.

Targets made of image codes (text-to-image, infilling) are filled in by the model from its frozen VQ tokenizer:
the collator holds no weights, so it only names the region (``code_target``: 'full' or 'middle').
"""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polymodal.data import shapes
from polymodal.data.augment import augment_scenes
from polymodal.data.boxes import box_to_bins
from polymodal.data.digits import DIGIT_WORDS
from polymodal.data.multilingual import scene_objects

from . import vocab as V
from .config import TASKS

_COLOURS = tuple(shapes.COLOURS)
OBJECT_CLASSES = len(_COLOURS) * len(shapes.KINDS)
"""Classes of the stem pre-stage: one per colour × kind (``colour · kinds + kind``)."""


def pick_task(weights: tuple[float, ...], seed: int, step: int) -> str:
    """The task of global step ``step``: a draw with ``weights`` from a generator seeded by (seed, step), so
    every rank and micro-batch of a step trains the same task."""
    return random.Random(f"{seed}:{step}").choices(TASKS, weights=weights)[0]


def split_rows(weights: tuple[float, ...], n: int, seed: int, step: int) -> list[tuple[str, int]]:
    """How many of a batch's ``n`` rows each task gets at global step ``step``: ``n·w/Σw`` rounded down, the rows
    left over drawn (by (seed, step), with the fractions as weights) so each task's expected share is its weight.
    Tasks with no row are left out; the order is :data:`TASKS`'."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(e) for e in exact]
    rest = [e - c for e, c in zip(exact, counts, strict=True)]
    rng = random.Random(f"{seed}:{step}")
    for _ in range(n - sum(counts)):
        i = rng.choices(range(len(TASKS)), weights=rest)[0]
        counts[i], rest[i] = counts[i] + 1, 0.0
    return [(t, k) for t, k in zip(TASKS, counts, strict=True) if k]


def batch_rows(batch: dict[str, Any]) -> int:
    """Rows of a shapes batch (its captions, else its images)."""
    return len(batch["caption"]) if "caption" in batch else len(batch["image"])


def pad_rows(rows: list[list[int]], pad: int) -> Tensor:
    """Id rows of different lengths → (B, longest) long, right-padded with ``pad``."""
    out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)  # (B, L)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def objects_present(batch: dict[str, Any]) -> Tensor:
    """(B, colours × kinds) multi-hot of the objects each scene holds (the stem pre-stage's targets)."""
    out = torch.zeros(batch_rows(batch), OBJECT_CLASSES)  # (B, C·K)
    for i, boxes in enumerate(batch["boxes"]):
        for box in boxes:
            if box[2] > box[0] and box[3] > box[1]:  # (a box moved wholly out of the image is left out)
                out[i, box[4] * len(shapes.KINDS) + box[5]] = 1.0
    return out


def mask_middle(images: Tensor) -> Tensor:
    """Images (B, C, S, S) with their middle half (S/4 … 3S/4 on both axes) blacked out (infilling's input)."""
    s = images.shape[-1]
    out = images.clone()
    out[..., s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 0.0
    return out


def object_name(box: tuple) -> str:
    """'colour kind' of a shapes box entry ``(x0, y0, x1, y1, colour, kind)``."""
    return f"{_COLOURS[box[4]]} {shapes.KINDS[box[5]]}"


def box_bins(box: tuple, vocab: V.Vocabulary, size: int) -> list[int]:
    """The four location token ids of a shapes box entry."""
    bins = box_to_bins(torch.tensor([box[:4]]), size, vocab.bins)[0]  # (4,)
    return vocab.bin_ids(bins).tolist()


def region_instruction(box: tuple, attribute: str, vocab: V.Vocabulary, size: int) -> list[int]:
    """' what color is the object in the region? region: <bin>×4' as ids (``attribute``: 'colour' or 'kind')."""
    return vocab.text(V.REGION.format(attribute=V.REGION_ATTRIBUTES[attribute])) + box_bins(box, vocab, size)


def scene_rows(task: str, batch: dict[str, Any], vocab: V.Vocabulary, size: int, rng: random.Random) -> tuple:
    """(instruction rows, target rows or None, whether the encoder sees the image) of a shapes batch."""
    n = len(batch["caption"])
    text, eos = vocab.text, [vocab.eos]
    if task == "caption":
        return [text(V.CAPTION)] * n, [text(c) + eos for c in batch["caption"]], True
    if task == "vqa":
        pairs = [rng.choice(qa) for qa in batch["qa"]]
        return [text(" " + q) for q, _ in pairs], [text(a) + eos for _, a in pairs], True
    if task in ("ground", "region"):
        chosen = [rng.choice(boxes) for boxes in batch["boxes"]]
        if task == "ground":
            instr = [text(V.GROUND.format(text=object_name(b))) for b in chosen]
            return instr, [box_bins(b, vocab, size) + eos for b in chosen], True
        attrs = [rng.choice(tuple(V.REGION_ATTRIBUTES)) for _ in chosen]
        instr = [region_instruction(b, a, vocab, size) for b, a in zip(chosen, attrs, strict=True)]
        answers = [_COLOURS[b[4]] if a == "colour" else shapes.KINDS[b[5]] for b, a in zip(chosen, attrs, strict=True)]
        return instr, [text(a) + eos for a in answers], True
    if task == "text_to_image":
        return [text(V.TEXT_TO_IMAGE.format(caption=c)) for c in batch["caption"]], None, False
    if task == "infill":
        return [text(V.INFILL)] * n, None, True
    raise ValueError(f"unknown scene task {task!r}; expected one of {TASKS}")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch generator that moves the scenes of global step ``step`` (pre-stage and mixture alike), so every
    rank and micro-batch of a step draws the same moves."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def move_scenes(batch: dict[str, Any], flip: bool, shift: int, seed: int, step: int) -> dict[str, Any]:
    """``batch`` with its scenes mirrored and shifted with their boxes (:func:`augment_scenes`, drawn by (seed,
    step)) and its ``caption`` and ``qa`` made again from the moved boxes: each object's place is its box centre's
    cell, each caption from a training template drawn per scene."""
    moved = dict(augment_scenes(batch, flip, shift, step_generator(seed, step)))
    rng, templates = np.random.default_rng([seed, step]), shapes.TRAIN_TEMPLATES
    objects = scene_objects(moved, int(moved["image"].shape[-1]))  # type: ignore[arg-type]
    moved["caption"] = [shapes.describe(o, templates[int(rng.integers(len(templates)))]) for o in objects]
    moved["qa"] = [shapes.questions(o, rng) for o in objects]
    return moved


def stage_weights(config: Any, step: int) -> tuple[float, ...]:
    """The task weights of global step ``step`` (after the stem pre-stage): during a stage of ``config.stages()``
    its tasks' weights and 0 for the others (a task weighted 0 by the config keeps weight 1 in a stage that names
    it), after the stages the mixture's."""
    at = config.stem_pretrain_steps
    for tasks, steps in config.stages():
        if step < at + steps:
            return tuple((w or 1.0) if t in tasks else 0.0 for t, w in zip(TASKS, config.weights(), strict=True))
        at += steps
    return config.weights()


class TaskCollate:
    """``collate(batch, step) -> batch``: ``parts``, one task batch per task of the step (:func:`split_rows`; one
    part, the task drawn by :func:`pick_task`, when ``config.mixed_batches`` is off; during the first
    ``config.stem_pretrain_steps`` one ``objects`` part: the scenes, mirrored and shifted with their boxes
    (``config.stem_augment_*``, drawn by (seed, step)), and :func:`objects_present`; then the parts of each of
    ``config.stages()`` (captioning first, ``first_stages``; :func:`stage_weights`); after them the scenes are
    moved the same way with ``config.augment_*``, :func:`move_scenes`), each with ``instruction``
    (b, L), ``target`` (b, T) (absent for code targets, with ``code_target`` naming them), ``encoder_images``
    (absent when the task does not show the image) and ``task``.

    The text-only task reads ``texts`` sentences from the ``text`` dataset's train split, as many as the batch
    has rows, drawn by the step."""

    def __init__(self, config: Any, vocab: V.Vocabulary, texts: dict[str, Any] | None, seed: int = 0) -> None:
        self.config, self.vocab, self.texts, self.seed = config, vocab, texts, seed

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The task batch of global step ``step``."""
        c = self.config
        if step < c.stem_pretrain_steps:
            moved = augment_scenes(batch, c.stem_augment_flip, c.stem_augment_shift, step_generator(self.seed, step))
            return {"parts": [{"task": "objects", "encoder_images": moved["image"], "objects": objects_present(moved)}]}
        if c.augment_flip or c.augment_shift:
            batch = move_scenes(batch, c.augment_flip, c.augment_shift, self.seed, step)
        weights, rng, n = stage_weights(c, step), random.Random(f"{self.seed}/{step}"), batch_rows(batch)
        if c.mixed_batches:
            counts = split_rows(weights, n, self.seed, step)
        else:
            counts = [(pick_task(weights, self.seed, step), n)]
        parts, at = [], 0
        for task, k in counts:
            rows = {key: value[at : at + k] for key, value in batch.items()}
            parts.append(make_task_batch(task, rows, self.vocab, c, self.texts, rng))
            at += k
        return {"parts": parts}


def make_task_batch(
    task: str, batch: dict[str, Any], vocab: V.Vocabulary, config: Any, texts: dict[str, Any] | None, rng: random.Random
) -> dict[str, Any]:
    """One task's batch from a shapes batch (see :class:`TaskCollate`)."""
    out = copy.copy(batch)
    out["task"] = task
    if task == "classify":
        if texts is None:
            raise ValueError("the classify task needs the text dataset's sentences; none were given")
        pick = [rng.randrange(len(texts["text"])) for _ in range(batch_rows(batch))]
        words = [DIGIT_WORDS[int(texts["label"][i])] for i in pick]
        instr = [vocab.text(V.CLASSIFY.format(text=texts["text"][i])) for i in pick]
        target, sees = [vocab.text(w) + [vocab.eos] for w in words], False
    else:
        instr, target, sees = scene_rows(task, batch, vocab, config.image_size, rng)
    out["instruction"] = pad_rows(instr, vocab.pad)  # (B, L)
    if target is not None:
        out["target"] = pad_rows(target, vocab.pad)  # (B, T)
    else:
        out["code_target"] = "full" if task == "text_to_image" else "middle"
    if sees:
        out["encoder_images"] = mask_middle(batch["image"]) if task == "infill" else batch["image"]
    return out


__all__ = [
    "OBJECT_CLASSES",
    "TaskCollate",
    "box_bins",
    "make_task_batch",
    "mask_middle",
    "move_scenes",
    "objects_present",
    "object_name",
    "pad_rows",
    "pick_task",
    "region_instruction",
    "split_rows",
    "stage_weights",
    "step_generator",
]
