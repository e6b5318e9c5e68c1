"""``shapes-multilingual`` and ``digits-multilingual``: the English datasets with captions in four languages.

Images, labels and every other field are those of :func:`load_shapes` / :func:`load_digits` with the
same options, in the same order; only ``caption`` is replaced. Each sample gets a language (a balanced,
seeded shuffle: each language has a quarter of a split, give or take one) and a template id drawn
uniformly from that language's training templates (train split) or evaluation-only templates (test
split), so the test split holds exactly the evaluation-only ``(template, language)`` pairs and the train
split none of them. Caption draws use their own seed streams and never touch the English generators.

New fields: ``language`` (list[str], codes of :data:`polymodal.data.languages.LANGUAGES`) and
``template`` (N,) int64, the aligned template id. Meta adds the per-language tables (see :func:`_meta`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from polymodal.data import languages as lang
from polymodal.data.base import Dataset, Split
from polymodal.data.digits import load_digits
from polymodal.data.shapes import load_shapes

_CAPTION_STREAM = 7919
"""Second entry of the caption generators' seed sequence ``[seed, _CAPTION_STREAM, split]``."""


def _draw(n: int, dataset: str, heldout: bool, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """A language and a template id for each of ``n`` samples."""
    codes = rng.permutation(np.arange(n) % len(lang.LANGUAGES))  # (N,) balanced language indices
    pick = rng.random(n)  # (N,) uniform in [0, 1)
    languages, templates = [], []
    for code, u in zip(codes.tolist(), pick.tolist()):
        language = lang.LANGUAGES[code]
        ids = lang.template_ids(dataset, language, heldout)
        languages.append(language)
        templates.append(ids[int(u * len(ids))])
    return languages, templates


def scene_objects(split: Split | Mapping[str, Any], image_size: int) -> list[list[tuple[int, int, int]]]:
    """Per scene of ``split`` (a split or a batch: anything with ``boxes``), its objects ``(colour, kind, cell)``
    first object first, read from its box entries ``(x0, y0, x1, y1, colour, kind, …)``.

    An object lies inside its grid cell, so its box's centre names the cell (row-major over the 3×3 grid).
    """
    out = []
    for boxes in split["boxes"]:
        objects = []
        for x0, y0, x1, y1, c, k, *_ in boxes:
            col, row = int(3 * (x0 + x1) // (2 * image_size)), int(3 * (y0 + y1) // (2 * image_size))
            objects.append((int(c), int(k), min(row, 2) * 3 + min(col, 2)))
        out.append(objects)
    return out


def _recaption(split: Split, captions: list[str], languages: list[str], templates: list[int]) -> Split:
    """``split`` with ``caption`` replaced and ``language``, ``template`` added (tensors shared, not copied)."""
    return Split(
        {
            **split.fields,
            "caption": captions,
            "language": languages,
            "template": torch.tensor(templates, dtype=torch.int64),  # (N,)
        }
    )


def _meta(dataset: str, english: dict[str, Any]) -> dict[str, Any]:
    """The English meta (``templates`` and ``heldout_templates`` stay English, so English readers keep
    working) plus: ``languages``, ``language_names``, ``templates_by_language`` /
    ``heldout_templates_by_language`` (template strings; fill them with :func:`languages.caption_for`, not ``str.format``),
    ``template_ids_by_language`` / ``heldout_template_ids_by_language``, ``heldout_pairs``
    (``[template id, language]``), ``class_names_by_language``, ``prompts_by_language`` (one evaluation
    prompt per class) and, for shapes, ``conjunctions``."""
    codes = lang.LANGUAGES
    meta = dict(english)
    meta |= {
        "languages": list(codes),
        "language_names": dict(lang.LANGUAGE_NAMES),
        "templates_by_language": {c: lang.template_texts(dataset, c) for c in codes},
        "heldout_templates_by_language": {c: lang.template_texts(dataset, c, heldout=True) for c in codes},
        "template_ids_by_language": {c: list(lang.template_ids(dataset, c)) for c in codes},
        "heldout_template_ids_by_language": {c: list(lang.template_ids(dataset, c, heldout=True)) for c in codes},
        "heldout_pairs": [[t, c] for t, c in lang.heldout_pairs(dataset)],
        "class_names_by_language": {c: lang.class_names(dataset, c) for c in codes},
        "prompts_by_language": {c: lang.evaluation_prompts(dataset, c) for c in codes},
    }
    if dataset == "shapes":
        meta["conjunctions"] = {c: lang.SHAPES[c].conjunction for c in codes}
    return meta


def load_shapes_multilingual(
    root: str | None = None, seed: int = 0, image_size: int = 32, train_size: int = 2000, test_size: int = 500
) -> Dataset:
    """``shapes-multilingual``: the shapes scenes captioned in English, Russian, French or Chinese (field ``language``)."""
    english = load_shapes(root, seed=seed, image_size=image_size, train_size=train_size, test_size=test_size)
    parts = []
    for index, split in enumerate((english.train, english.test)):
        rng = np.random.default_rng([seed, _CAPTION_STREAM, index])
        languages, templates = _draw(len(split), "shapes", index == 1, rng)
        captions = [
            lang.shapes_caption(code, t, objects)
            for code, t, objects in zip(languages, templates, scene_objects(split, image_size))
        ]
        parts.append(_recaption(split, captions, languages, templates))
    return Dataset("shapes-multilingual", parts[0], parts[1], _meta("shapes", english.meta))


def load_digits_multilingual(root: str | None = None, seed: int = 0) -> Dataset:
    """``digits-multilingual``: the digits captioned in English, Russian, French or Chinese (field ``language``)."""
    english = load_digits(root, seed=seed)
    parts = []
    for index, split in enumerate((english.train, english.test)):
        rng = np.random.default_rng([seed, _CAPTION_STREAM, index])
        languages, templates = _draw(len(split), "digits", index == 1, rng)
        labels = split["label"].tolist()
        captions = [lang.digit_caption(code, t, y) for code, t, y in zip(languages, templates, labels)]
        parts.append(_recaption(split, captions, languages, templates))
    return Dataset("digits-multilingual", parts[0], parts[1], _meta("digits", english.meta))


__all__ = ["load_digits_multilingual", "load_shapes_multilingual", "scene_objects"]
