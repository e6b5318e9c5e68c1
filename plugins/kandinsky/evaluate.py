"""Kandinsky 2.0 evaluation: per language, judged samples for the evaluation prompts, with and without thresholding.

For each language of :data:`polymodal.data.languages.LANGUAGES`, ``eval_per_class`` samples of every colour ×
kind evaluation prompt ("a red circle", "красный круг", "un cercle rouge", "红色的圆形": a phrasing none of
the training templates has) are decoded to 32×32 and read by the judge of the English shapes (the same images):
``colour_accuracy_<lang>``, ``kind_accuracy_<lang>``, the same with thresholding off
(``colour_accuracy_nothreshold_<lang>`` …), their means over languages, and ``fd_judge`` (all languages'
thresholded samples against the test split). ``heldout_colour_accuracy_<lang>`` / ``heldout_kind_accuracy_<lang>``:
the same prompts phrased with that language's evaluation-only templates (with a position, cycled over the
grid; thresholding on). Sampling uses the model's defaults and seed ``eval_seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from polymodal.data import languages as lang


def prompts_and_targets(dataset: str, language: str, per_class: int) -> tuple[list[str], dict[str, Tensor]]:
    """The evaluation prompts of ``language`` (each ``per_class`` times, grouped) and their colour and kind."""
    prompts = lang.evaluation_prompts(dataset, language)
    kinds = len(lang.SHAPES[language].kinds)
    labels = torch.arange(len(prompts)).repeat_interleave(per_class)  # (N,)
    return [prompts[i] for i in labels.tolist()], {"colour": labels // kinds, "kind": labels % kinds}


def heldout_prompts(dataset: str, language: str, per_class: int) -> tuple[list[str], dict[str, Tensor]]:
    """Every colour × kind (``per_class`` each) captioned with ``language``'s evaluation-only templates in turn,
    the position cycling over the grid cells, and their colour and kind."""
    templates = lang.template_ids(dataset, language, heldout=True)
    _, targets = prompts_and_targets(dataset, language, per_class)
    prompts = [
        lang.caption_for(dataset, language, templates[i % len(templates)], colour=c, kind=k, position=(i * 4 + c) % 9)
        for i, (c, k) in enumerate(zip(targets["colour"].tolist(), targets["kind"].tolist(), strict=True))
    ]
    return prompts, targets


def chunks(n: int, size: int) -> list[slice]:
    """Slices of ``range(n)`` at most ``size`` long, in order: the batches evaluation draws in."""
    return [slice(s, s + size) for s in range(0, n, size)]


@torch.no_grad()
def prompted_samples(
    model: Any, prompts: list[str], seed: int, batch_size: int = 256, rows: dict[str, Tensor] | None = None,
    **options: Any,
) -> Tensor:  # fmt: skip
    """Samples (N, C, S, S) for ``prompts`` through ``model.generate`` (either variant), seeded; ``rows`` are
    per-prompt options (N, …), handed to ``generate`` with their chunk of the prompts."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for part in chunks(len(prompts), batch_size):
        chunk = {k: v[part] for k, v in (rows or {}).items()}
        out.append(model.generate(prompts[part], generator=g, **chunk, **options).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_kandinsky(
    model: Any,
    dataset: Any,
    split: str = "test",
    per_language: Callable[..., dict[str, float]] | None = None,
    draws: Callable[[Any, list[str], int], dict[str, Tensor]] | None = None,
) -> dict[str, float]:
    """The per-language judged accuracies (thresholding on and off), their means and ``fd_judge``;
    ``per_language(model, judged, code, prompts, targets, drawn)`` adds a variant's own metrics for each language
    (``<name>_<code>``, averaged into ``<name>``). ``draws(model, prompts, seed)`` → per-prompt ``generate``
    options drawn once per prompt set and shared by its thresholded and plain samples (2.1: the prior's
    image embeddings); ``drawn`` is what it returned for the language's evaluation prompts."""
    from polymodal.data import load_dataset
    from polymodal.eval.judge import get_judge, judge_samples

    judged = load_dataset(lang.base_dataset(dataset.name))  # the English shapes: the same images, one judge
    with torch.enable_grad():  # a judge not cached yet is trained now, inside evaluate's no_grad
        get_judge(judged)
    c, metrics, every = model.config, {}, []

    def drawn_for(prompts: list[str]) -> dict[str, Tensor]:
        return draws(model, prompts, c.eval_seed) if draws else {}

    for code in lang.LANGUAGES:
        prompts, targets = prompts_and_targets(dataset.name, code, c.eval_per_class)
        drawn = drawn_for(prompts)
        for suffix, on in (("", True), ("_nothreshold", False)):
            images = prompted_samples(model, prompts, c.eval_seed, rows=drawn, threshold=on)
            scores = judge_samples(judged, images, targets)
            metrics[f"colour_accuracy{suffix}_{code}"] = scores["sample_colour_accuracy"]
            metrics[f"kind_accuracy{suffix}_{code}"] = scores["sample_kind_accuracy"]
            if on:
                every.append(images)
        extra = per_language(model, judged, code, prompts, targets, drawn) if per_language else {}
        metrics |= {f"{name}_{code}": value for name, value in extra.items()}
        prompts, targets = heldout_prompts(dataset.name, code, c.eval_per_class)
        scores = judge_samples(judged, prompted_samples(model, prompts, c.eval_seed, rows=drawn_for(prompts)), targets)
        metrics[f"heldout_colour_accuracy_{code}"] = scores["sample_colour_accuracy"]
        metrics[f"heldout_kind_accuracy_{code}"] = scores["sample_kind_accuracy"]
    names = ("colour_accuracy", "kind_accuracy", "colour_accuracy_nothreshold", "kind_accuracy_nothreshold")
    for name in (*names, "heldout_colour_accuracy", "heldout_kind_accuracy", *extra):
        metrics[name] = sum(metrics[f"{name}_{code}"] for code in lang.LANGUAGES) / len(lang.LANGUAGES)
    from polymodal.eval.judge import frechet_distance

    judge = get_judge(judged)
    test_images = judged.test["image"][judged.test["count"] == 1]  # (n, C, S, S) one-object scenes
    metrics["fd_judge"] = frechet_distance(judge.embed(torch.cat(every)), judge.embed(test_images))
    metrics["samples"] = float(sum(len(x) for x in every))
    return metrics


@torch.no_grad()
def generative_samples(model: Any, dataset: Any, n: int, seed: int = 0, batch_size: int = 256) -> tuple:
    """``n`` samples cycling through the evaluation prompts (languages in turn), and their colour and kind."""
    per_language = [prompts_and_targets(dataset.name, code, 1) for code in lang.LANGUAGES]
    prompts = [p for ps, _ in per_language for p in ps]
    colour = torch.cat([t["colour"] for _, t in per_language])  # (K,)
    kind = torch.cat([t["kind"] for _, t in per_language])  # (K,)
    order = torch.arange(n) % len(prompts)  # (n,)
    images = prompted_samples(model, [prompts[i] for i in order.tolist()], seed, batch_size)
    return images, {"colour": colour[order], "kind": kind[order]}
