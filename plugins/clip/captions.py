"""Captions for CLIP: the embedded caption corpus its BPE tokenizer learns, and per-step re-sampling.

The tokenizer corpus is every training-template caption of the embedded data (digits: all
training templates for all ten digits; shapes: all training templates for every colour, kind
and position). Held-out templates are never part of it, nor of training.

Shapes captions come in *views*: ``"all"`` names colour, kind and position of every object
(optionally with attribute dropout), a partial view such as ``"kind"`` names only those
attributes (``"a circle and a cross"``, words the tokenizer already knows). A partial caption
is true of several scenes of a batch; :func:`positives` marks them, for the multi-positive
InfoNCE of :mod:`.objective`. A curriculum (``first_views`` for ``first_view_steps``) trains
the hard attribute (kind) before the easy one (colour), which would otherwise starve it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from polymodal.data import digits as digits_data
from polymodal.data import shapes as shapes_data
from polymodal.data.multilingual import scene_objects
from polymodal.data.tokenizers import BPETokenizer

from .objective import positive_keys


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


Claim = tuple[int | None, int | None, int | None]
"""One caption clause as ``(colour, kind, cell)``; ``None`` where the clause leaves the attribute out."""


def shape_clause(template: str, claim: Claim) -> str:
    """One object's clause from a shapes template; left-out attributes are omitted (spaces collapsed).

    ``shape_clause("a {colour} {kind} {where}", (None, 1, 4))`` is ``"a circle in the center"``.
    """
    colour, kind, cell = claim
    text = template.format(
        colour="" if colour is None else tuple(shapes_data.COLOURS)[colour],
        kind="" if kind is None else shapes_data.KINDS[kind],
        where="" if cell is None else shapes_data.WHERE[shapes_data.POSITIONS[cell]],
    )
    return " ".join(text.split())


def drop_attributes(n: int, p: tuple[float, float, float]) -> list[tuple[bool, bool, bool]]:
    """Per caption, which of (colour, kind, position) it keeps: each left out with its probability in ``p``,
    at least one always kept (a random one when all three were drawn out)."""
    probs = torch.tensor(p, dtype=torch.float32)
    if probs.shape != (3,) or not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(f"expected three dropout probabilities in [0, 1] (colour, kind, position); got {p}")
    keep = torch.rand(n, 3) >= probs  # (N, 3)
    none = ~keep.any(dim=1)  # (N,)
    keep[none, torch.randint(3, (int(none.sum()),))] = True
    return [tuple(row) for row in keep.tolist()]


def claim_holds(claims: list[Claim], objects: list[tuple[int, int, int]]) -> bool:
    """True when every clause is true of some object (each stated attribute equal)."""
    return all(any(all(a is None or a == b for a, b in zip(claim, obj)) for obj in objects) for claim in claims)


def shapes_captions(
    cfg: Any, batch: dict[str, Any], keep: tuple[bool, bool, bool] | None = None
) -> tuple[list[str], list[list[Claim]], list[list[tuple[int, int, int]]]]:
    """Captions of a shapes batch from random training templates, their clauses and the scenes' objects.

    ``keep`` (colour, kind, position) states which attributes every caption names; without it,
    ``cfg.caption_dropout`` = (p_colour, p_kind, p_position) leaves out each attribute of each
    caption with its probability, so short captions like ``"a circle"`` are trained too.
    """
    templates, size = cfg.templates, batch["image"].shape[-1]
    n = len(batch["caption"])
    choice = torch.randint(len(templates), (n,)).tolist()
    if keep is not None:
        keeps = [tuple(keep)] * n
    else:
        keeps = drop_attributes(n, cfg.caption_dropout) if any(cfg.caption_dropout) else [(True,) * 3] * n
    texts, claims, scenes = [], [], []
    for objects, j, keep in zip(scene_objects(batch, size), choice, keeps):
        clauses = [tuple(a if k else None for a, k in zip(obj, keep)) for obj in objects]
        texts.append(" and ".join(shape_clause(templates[j], c) for c in clauses))
        claims.append(clauses)
        scenes.append(objects)
    return texts, claims, scenes


def _combos() -> torch.Tensor:
    """(V, 3) every (colour, kind, cell) an object can have."""
    sizes = (len(shapes_data.COLOURS), len(shapes_data.KINDS), len(shapes_data.POSITIONS))
    return torch.cartesian_prod(*(torch.arange(n) for n in sizes))  # (V, 3)


def positives(claims: list[list[Claim]], scenes: list[list[tuple[int, int, int]]]) -> torch.Tensor:
    """(B, B) bool: ``[i, j]`` when caption ``j`` is true of scene ``i`` (:func:`claim_holds`; the diagonal always is).

    Each clause and each scene become sets over every possible object (colour, kind, cell);
    a clause is true of a scene when the two sets meet.
    """
    combos = _combos()  # (V, 3)
    flat = torch.tensor([[-1 if a is None else a for a in c] for cs in claims for c in cs])  # (C, 3)
    clause_sets = ((flat[:, None] == -1) | (flat[:, None] == combos)).all(-1).float()  # (C, V)
    objects = torch.tensor([o for os in scenes for o in os])  # (O, 3)
    owner = torch.tensor([i for i, os in enumerate(scenes) for _ in os])  # (O,)
    present = torch.zeros(len(scenes), len(combos))  # (B, V)
    present[
        owner,
        (
            objects * torch.tensor([len(shapes_data.KINDS) * len(shapes_data.POSITIONS), len(shapes_data.POSITIONS), 1])
        ).sum(-1),
    ] = 1.0
    true = (present @ clause_sets.t()) > 0  # (B, C) clause true of scene
    caption = torch.tensor([j for j, cs in enumerate(claims) for _ in cs])  # (C,)
    false = torch.zeros(len(scenes), len(claims)).index_add_(1, caption, (~true).float())  # (B, B) false clauses
    return (false == 0) | torch.eye(len(scenes), dtype=torch.bool)  # (B, B)


ATTRIBUTES = ("colour", "kind", "position")
"""The attributes a shapes caption view can name (``caption_views``: ``"kind"``, ``"colour+kind"``, ``"all"`` …)."""


def parse_view(view: str) -> tuple[bool, bool, bool] | None:
    """``(colour, kind, position)`` kept by a caption view; ``"all"`` is None (the full, possibly dropped-out caption)."""
    if view == "all":
        return None
    names = view.split("+")
    if not names or any(n not in ATTRIBUTES for n in names) or len(set(names)) != len(names):
        raise ValueError(f"a caption view is 'all' or '+'-joined names from {', '.join(ATTRIBUTES)}; got {view!r}")
    return tuple(a in names for a in ATTRIBUTES)


def check_probabilities(instance: Any, attribute: Any, value: Any) -> None:
    """Check a (colour, kind, position) triple of probabilities."""
    if len(tuple(value)) != 3 or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in value):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be three probabilities in [0, 1] "
            f"(colour, kind, position); got {value!r}"
        )


def check_views(instance: Any, attribute: Any, value: Any) -> None:
    """Check the caption views (each 'all' or '+'-joined attribute names)."""
    if not value:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} needs at least one view; got {value!r}")
    for view in value:
        parse_view(view)


def check_views_or_none(instance: Any, attribute: Any, value: Any) -> None:
    """Check optional caption views (empty, or each 'all' or '+'-joined attribute names)."""
    if value:
        check_views(instance, attribute, value)


def resample(cfg: Any, batch: dict[str, Any], step: int | None = None) -> list[str] | None:
    """Fresh captions for a training batch from a random training template per sample (None: keep the batch's)."""
    views = resample_views(cfg, batch, step)
    return views[0][0] if views else None


def views_at(cfg: Any, step: int | None) -> tuple[str, ...]:
    """The shapes caption views of training step ``step``: ``cfg.first_views`` for the first
    ``cfg.first_view_steps`` steps (when given), then ``cfg.caption_views``; None: the latter."""
    if step is not None and cfg.first_views and step < cfg.first_view_steps:
        return tuple(cfg.first_views)
    return tuple(cfg.caption_views)


def resample_views(
    cfg: Any, batch: dict[str, Any], step: int | None = None, *, keys: bool = False
) -> list[tuple[list[str], Any]]:
    """Fresh training captions, one list per caption view, each with its positives matrix or None.

    ``[]`` keeps the dataset's own captions. The label captioner gives one view (one
    positive per row: plain InfoNCE). The shapes captioner gives one per view of
    :func:`views_at` (``step`` is the training step, for the curriculum);
    a view's (B, B) bool matrix (``[i, j]``: caption ``j`` is true of scene ``i``, see
    :func:`positives`) is given for every partial view, and for ``"all"`` when
    ``cfg.multi_positive`` or any ``cfg.caption_dropout`` (else None: plain InfoNCE). With ``keys``
    a view gives its :class:`~.objective.PositiveKeys` instead of the matrix (per-sample rows, which
    can be gathered across ranks and split into micro-batches; ``keys.matrix()`` is the same matrix).
    """
    templates = cfg.templates
    if cfg.captioner == "none" or not templates:
        return []
    if cfg.captioner == "label":
        choice = torch.randint(len(templates), (len(batch["caption"]),)).tolist()
        labels = batch["label"].tolist()
        return [([fill(templates[j], labels[i], cfg.class_names) for i, j in enumerate(choice)], None)]
    out = []
    for view in views_at(cfg, step):
        keep = parse_view(view)
        texts, claims, scenes = shapes_captions(cfg, batch, keep)
        multi = keep is not None or cfg.multi_positive or any(cfg.caption_dropout)
        pos = (positive_keys(claims, scenes) if keys else positives(claims, scenes)) if multi else None
        out.append((texts, pos))
    return out


def describe(cfg: Any) -> list[str]:
    """Model-card lines on how the shapes captioner trains (views, curriculum, dropout); none otherwise."""
    if cfg.captioner != "shapes":
        return []
    first = (
        f"; the first {cfg.first_view_steps} steps use {', '.join(cfg.first_views)}"
        if cfg.first_views and cfg.first_view_steps
        else ""
    )
    multi = (
        cfg.multi_positive or any(cfg.caption_dropout) or any(v != "all" for v in cfg.caption_views + cfg.first_views)
    )
    return [
        f"Caption views per step: {', '.join(cfg.caption_views)}{first}; attribute dropout (colour, kind, "
        f"position) {tuple(cfg.caption_dropout)}; multi-positive InfoNCE: {multi}; random shift "
        f"{cfg.augment_shift} px.",
        "",
    ]
