"""OFA's evaluation: every task of the one model scored on the test splits (the first ``eval_limit`` scenes).

* ``caption_accuracy``: the caption names exactly the scene's objects, each with its colour, kind and position
  (parsed: " and " between objects, a colour word, a kind word, the longest position phrase);
  ``caption_colour_kind`` / ``caption_position``: per object, its colour and kind / its position
  named correctly. ``*_two`` (captions' position, grounding, region questions): the same score on the objects of
  two-object scenes alone, where the model must bind each object to its place (chance: about half).
* ``vqa_accuracy`` (exact match, answers constrained to the training answers by a trie), ``vqa_yes_no``,
  ``vqa_count``; ``ground_accuracy`` (IoU ≥ 0.5 with the tight box; ``ground_malformed``: outputs that were not
  four location tokens); ``region_accuracy`` (colour and kind of the object in a given box);
  ``classify_accuracy`` (the ``text`` test split's digit words); ``sample_*`` (text-to-image, the judge on
  one-object prompts); infilling on the one-object scenes whose object the blacked-out middle half cuts
  (:func:`cut_objects`): ``infill_colour_accuracy`` (the colour drawn over the object's hidden pixels is the
  original's, :func:`painted_colour`) and ``infill_scenes``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polymodal.data import shapes
from polymodal.data.boxes import box_iou
from polymodal.data.multilingual import scene_objects as objects_of_scenes

from .config import TASKS
from .tasks import mask_middle, object_name

_COLOURS = tuple(shapes.COLOURS)
_PHRASES = sorted(shapes.WHERE.items(), key=lambda kv: -len(kv[1]))  # longest first: "in the top left" before "top"


def scene_objects(boxes: list, size: int) -> set[tuple[int, int, int]]:
    """``(colour, kind, cell)`` of every object of one scene from its box entries (the cell from the box centre;
    :func:`polymodal.data.multilingual.scene_objects`)."""
    return set(objects_of_scenes({"boxes": [boxes]}, size)[0])


def parse_caption(caption: str) -> list[tuple[int, int, int]]:
    """The ``(colour, kind, cell)`` each " and "-separated part of a caption names (-1 where it names none)."""
    out = []
    for part in caption.split(" and "):
        words = part.split()
        colour = next((_COLOURS.index(w) for w in words if w in _COLOURS), -1)
        kind = next((shapes.KINDS.index(w) for w in words if w in shapes.KINDS), -1)
        where = next((shapes.POSITIONS.index(p) for p, phrase in _PHRASES if phrase in part), -1)
        out.append((colour, kind, where))
    return out


def caption_metrics(model: Any, test: Any, idx: list[int], size: int) -> dict[str, float]:
    """The captioning scores of the scenes ``idx``."""
    exact = ck = 0
    placed: list[tuple[bool, bool]] = []  # per object: position named right, in a scene of two objects
    for start in range(0, len(idx), 64):
        rows = idx[start : start + 64]
        for i, caption in zip(rows, model.caption(test["image"][rows]), strict=True):
            truth, named = scene_objects(test["boxes"][i], size), parse_caption(caption)
            exact += set(named) == truth and len(named) == len(truth)
            for c, k, p in truth:
                ck += any(n[0] == c and n[1] == k for n in named)
                placed.append(((c, k, p) in named, len(truth) == 2))
    return {
        "caption_accuracy": exact / len(idx),
        "caption_colour_kind": ck / len(placed),
        "caption_position": sum(hit for hit, _ in placed) / len(placed),
        **two_object_share("caption_position", placed),
    }


def two_object_share(name: str, hits: list[tuple[bool, bool] | tuple[float, bool]]) -> dict[str, float]:
    """``{name}_two``: the mean of the hits that belong to two-object scenes (``(hit, in a two-object scene)``
    pairs), where the task must tell the scene's objects apart — say which is where — rather than read the one
    object there; empty when there are none."""
    two = [float(hit) for hit, pair in hits if pair]
    return {f"{name}_two": sum(two) / len(two)} if two else {}


def vqa_metrics(model: Any, test: Any, idx: list[int], answers: list[str]) -> dict[str, float]:
    """Exact-match VQA over every question of the scenes ``idx`` (a trie over ``answers``)."""
    items = [(i, q, a) for i in idx for q, a in test["qa"][i]]
    hits = []
    for start in range(0, len(items), 128):
        chunk = items[start : start + 128]
        images = test["image"][[i for i, _, _ in chunk]]
        got = model.ask(images, [q for _, q, _ in chunk], candidates=answers)
        hits += [g == a for g, (_, _, a) in zip(got, chunk, strict=True)]
    hit = torch.tensor(hits, dtype=torch.float)
    yes_no = torch.tensor([a in ("yes", "no") for _, _, a in items])
    count = torch.tensor([q.startswith("how many") for _, q, _ in items])
    return {
        "vqa_accuracy": hit.mean().item(),
        "vqa_yes_no": hit[yes_no].mean().item(),
        "vqa_count": hit[count].mean().item(),
    }


def ground_and_region_metrics(model: Any, test: Any, idx: list[int]) -> dict[str, float]:
    """Grounding (IoU ≥ 0.5) and region questions (colour and kind) on every object of the scenes ``idx``."""
    objects = [(i, tuple(b)) for i in idx for b in test["boxes"][i]]
    pair = [len(test["boxes"][i]) == 2 for i, _ in objects]
    hits, malformed, region = [], 0, []
    for start in range(0, len(objects), 128):
        chunk = objects[start : start + 128]
        images = test["image"][[i for i, _ in chunk]]
        truth = torch.tensor([b[:4] for _, b in chunk], dtype=torch.float)  # (n, 4)
        boxes, ok = model.ground(images, [object_name(b) for _, b in chunk])
        hits += (box_iou(boxes, truth) >= 0.5).tolist()
        malformed += ok.count(False)
        colours = model.region_question(images, truth, "colour", list(_COLOURS))
        kinds = model.region_question(images, truth, "kind", list(shapes.KINDS))
        region += [
            ((c == _COLOURS[b[4]]) + (k == shapes.KINDS[b[5]])) / 2
            for c, k, (_, b) in zip(colours, kinds, chunk, strict=True)
        ]
    return {
        "ground_accuracy": sum(hits) / len(hits),
        "ground_malformed": malformed / len(hits),
        "region_accuracy": sum(region) / len(region),
        **two_object_share("ground_accuracy", list(zip(hits, pair, strict=True))),
        **two_object_share("region_accuracy", list(zip(region, pair, strict=True))),
    }


def classify_metrics(model: Any, limit: int) -> dict[str, float]:
    """Digit-word accuracy on the ``text`` test split (its first ``limit`` sentences; 0: all)."""
    from polymodal.data import load_dataset
    from polymodal.data.digits import DIGIT_WORDS

    test = load_dataset(model.config.text_data).split("test")
    n = len(test["text"]) if not limit else min(limit, len(test["text"]))
    got = []
    for start in range(0, n, 128):
        got += model.classify_text(test["text"][start : min(n, start + 128)], list(DIGIT_WORDS))
    truth = [DIGIT_WORDS[int(y)] for y in test["label"][:n]]
    return {"classify_accuracy": sum(g == t for g, t in zip(got, truth, strict=True)) / n}


def one_object_prompts(test: Any, limit: int) -> tuple[list[int], list[str]]:
    """The one-object test scenes (at most ``limit``) and a training-template caption of each."""
    idx = [i for i in range(len(test["caption"])) if len(test["boxes"][i]) == 1][:limit]
    size = test["image"].shape[-1]
    prompts = []
    for i in idx:
        ((c, k, p),) = scene_objects(test["boxes"][i], size)
        prompts.append(
            shapes.TRAIN_TEMPLATES[0].format(
                colour=_COLOURS[c], kind=shapes.KINDS[k], where=shapes.WHERE[shapes.POSITIONS[p]]
            )
        )
    return idx, prompts


def hidden_pixels(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per image (N, 3, S, S) of objects on black: the objects' pixels (N, S, S) (any channel above 0.5) and those of
    them that infilling's blacked-out middle half (:func:`~.tasks.mask_middle`) hides (N, S, S)."""
    drawn = images.amax(1) > 0.5  # (N, S, S)
    return drawn, drawn & (mask_middle(torch.ones_like(images[:, :1])) == 0)[:, 0]


def cut_objects(test: Any, limit: int, low: float = 0.1, high: float = 0.9) -> list[int]:
    """One-object test scenes (at most ``limit``) whose object the blacked-out middle half cuts: between ``low`` and
    ``high`` of its pixels hidden, so what stays visible names its colour and the hidden rest must be drawn again
    to match. (In the shapes scenes an object whose centre lies in the middle half lies wholly inside it: its
    input is black, and no model can name its colour.)"""
    one = [i for i in range(len(test["caption"])) if len(test["boxes"][i]) == 1]
    drawn, hidden = hidden_pixels(test["image"][one].float())  # (n, S, S) each
    share = hidden.flatten(1).sum(1) / drawn.flatten(1).sum(1).clamp(min=1)  # (n,)
    return [i for i, s in zip(one, share.tolist(), strict=True) if low <= s <= high][:limit]


def painted_colour(images: Tensor, where: Tensor) -> Tensor:
    """The palette colour (N,) nearest the mean RGB of each image's pixels ``where`` (N, S, S); -1 where black is
    nearer than every colour of the palette (nothing painted there)."""
    palette = torch.tensor([(0.0, 0.0, 0.0), *shapes.COLOURS.values()])  # (1 + colours, 3): black first
    mean = (images * where[:, None]).sum((2, 3)) / where.sum((1, 2)).clamp(min=1)[:, None]  # (N, 3)
    return torch.cdist(mean, palette).argmin(1) - 1  # (N,)


def infill_metrics(model: Any, test: Any, limit: int) -> dict[str, float]:
    """Infilling on :func:`cut_objects`: ``infill_colour_accuracy``, the share whose colour drawn over the object's
    hidden pixels (:func:`painted_colour`) is the original's, and ``infill_scenes``. Not the judge: it reads the
    whole scene, and the visible part answers it (1.00 on these scenes with the middle left black)."""
    idx = cut_objects(test, limit)
    if not idx:
        return {}
    original = test["image"][idx].float()  # (n, 3, S, S)
    filled = torch.cat([model.infill(original[s : s + 64], seed=s) for s in range(0, len(idx), 64)]).cpu()
    _, hidden = hidden_pixels(original)  # (n, S, S)
    painted = painted_colour(filled.float(), hidden)  # (n,)
    return {
        "infill_colour_accuracy": (painted == test["colour"][idx]).float().mean().item(),
        "infill_scenes": float(len(idx)),
    }


def generative_samples(model: Any, dataset: Any, n: int, seed: int = 0) -> tuple:
    """``n`` text-to-image samples for one-object test captions and their colour / kind (the generative table)."""
    test = dataset.split("test")
    idx, prompts = one_object_prompts(test, len(test["caption"]))
    reps = -(-n // len(idx))
    idx, prompts = (idx * reps)[:n], (prompts * reps)[:n]
    images = torch.cat([model.text_to_image(prompts[s : s + 64], seed=seed + s) for s in range(0, n, 64)])
    return images, {"colour": test["colour"][idx], "kind": test["kind"][idx]}


def image_metrics(model: Any, dataset: Any, limit: int) -> dict[str, float]:
    """Text-to-image, read by the dataset's judge, and infilling (:func:`infill_metrics`)."""
    from polymodal.eval.judge import get_judge, judge_samples

    with torch.enable_grad():  # a judge not cached yet is trained now, inside evaluate's no_grad
        get_judge(dataset)
    images, targets = generative_samples(model, dataset, limit)
    metrics = judge_samples(dataset, images, targets)
    return {**metrics, **infill_metrics(model, dataset.split("test"), limit)}


def evaluate_ofa(
    model: Any, dataset: Any, split: str = "test", tasks: tuple[str, ...] | None = None
) -> dict[str, float]:
    """Every task's score (see the module docstring); ``tasks`` scores only those (names of
    :data:`~polymodal.plugins.ofa.config.TASKS`; ground and region, text-to-image and infill go together)."""
    wanted = set(TASKS if tasks is None else tasks)
    if wanted - set(TASKS):
        raise ValueError(f"evaluate_ofa: unknown tasks {sorted(wanted - set(TASKS))}; expected some of {TASKS}")
    test, limit = dataset.split(split), model.config.eval_limit
    idx = list(range(len(test["caption"]) if not limit else min(limit, len(test["caption"]))))
    size = test["image"].shape[-1]
    metrics: dict[str, float] = {}
    if "caption" in wanted:
        metrics.update(caption_metrics(model, test, idx, size))
    if "vqa" in wanted:
        answers = sorted({a for qa in dataset.split("train")["qa"] for _, a in qa})
        metrics.update(vqa_metrics(model, test, idx, answers))
    if wanted & {"ground", "region"}:
        metrics.update(ground_and_region_metrics(model, test, idx))
    if "classify" in wanted:
        metrics.update(classify_metrics(model, limit))
    if wanted & {"text_to_image", "infill"} and dataset.name == "shapes":
        metrics.update(image_metrics(model, dataset, limit or len(idx)))
    return metrics


__all__ = [
    "cut_objects",
    "evaluate_ofa",
    "generative_samples",
    "hidden_pixels",
    "infill_metrics",
    "painted_colour",
    "parse_caption",
    "scene_objects",
    "two_object_share",
]
