"""Kandinsky 2.1 evaluation: Kandinsky 2.0's per-language judged samples (:mod:`.evaluate`) drawn through the
prior, with the same metric names. The prior is sampled once per prompt set (:func:`prior_draws`): the thresholded
and plain samples decode the same image embeddings (only thresholding differs between them), and the cosine reads
them too.

Per language of :data:`polymodal.data.languages.LANGUAGES`: ``colour_accuracy_<lang>`` / ``kind_accuracy_<lang>``
(the evaluation prompts, thresholding on), the same with ``_nothreshold``, ``heldout_colour_accuracy_<lang>`` /
``heldout_kind_accuracy_<lang>`` (the evaluation-only phrasings), their means over languages and ``fd_judge``
(the thresholded samples of every language against the test split's one-object scenes); plus
``prior_cosine_<lang>``: the mean cosine of the prior's embeddings to the teacher CLIP's embeddings of the test
one-object scenes of the prompted colour and kind (how well the prior reaches the image side); and
``variation_colour_accuracy`` / ``variation_kind_accuracy``: one variation (image embedding, text dropped) of each
of the first 24 × ``eval_per_class`` test one-object scenes, judged against the scene's colour and kind.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.data import languages as lang

from .evaluate import chunks, evaluate_kandinsky


@torch.no_grad()
def prior_draws(model: Any, prompts: list[str], seed: int, batch_size: int = 256) -> dict[str, Tensor]:
    """The prior's CLIP image embeddings for ``prompts`` (seeded, its default guidance and candidates), as the
    ``image_embeds`` option of :func:`.sample21.generate`: drawn once per evaluation prompt set, shared by the
    thresholded and plain samples and :func:`prior_cosine`."""
    from .sample21 import prior_embeddings

    g = torch.Generator(device=model.device).manual_seed(seed)
    drawn = [
        prior_embeddings(model, model.encode_text(prompts[p]), generator=g) for p in chunks(len(prompts), batch_size)
    ]
    return {"image_embeds": torch.cat(drawn)}  # (N, E)


@torch.no_grad()
def prior_cosine(model: Any, judged: Any, drawn: Tensor, targets: dict[str, Tensor]) -> float:
    """Mean cosine of the prior's embeddings ``drawn`` (B, E) for the prompts of ``targets`` to the mean CLIP
    embedding of the test one-object scenes of each prompt's colour and kind."""
    test = judged.test
    one = test["count"] == 1  # (N,)
    embeds = model.image_embeddings(test["image"][one])  # (n, E)
    colour, kind = test["colour"][one], test["kind"][one]  # (n,)
    scores = []
    for z, c, k in zip(drawn, targets["colour"].tolist(), targets["kind"].tolist(), strict=True):
        rows = (colour == c) & (kind == k)
        if rows.any():
            scores.append(float(F.cosine_similarity(z, embeds[rows.to(embeds.device)].mean(0), dim=0)))
    return sum(scores) / max(1, len(scores))


@torch.no_grad()
def variation_scores(model: Any, judged: Any, count: int, seed: int) -> dict[str, float]:
    """One variation of each of the first ``count`` one-object test scenes, judged against the scene."""
    from polymodal.eval.judge import judge_samples

    from .sample21 import decode_latents, empty_text

    rows = (judged.test["count"] == 1).nonzero().squeeze(1)[:count]  # (n,)
    embeds = model.image_embeddings(judged.test["image"][rows])  # (n, E)
    g = torch.Generator(device=model.device).manual_seed(seed)
    latents = decode_latents(model, empty_text(model, len(rows)), embeds, generator=g)  # (n, 4, h, w)
    targets = {"colour": judged.test["colour"][rows], "kind": judged.test["kind"][rows]}
    scores = judge_samples(judged, model.from_latents(latents).cpu(), targets)
    return {"variation_colour_accuracy": scores["sample_colour_accuracy"],
            "variation_kind_accuracy": scores["sample_kind_accuracy"]}  # fmt: skip


@torch.no_grad()
def evaluate_kandinsky21(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """Kandinsky 2.0's per-language evaluation (:func:`.evaluate.evaluate_kandinsky`) with the prior's cosines
    per language, and the variations' judged accuracy."""
    from polymodal.data import load_dataset

    def cosines(model: Any, judged: Any, code: str, prompts: list[str], targets: dict, drawn: dict) -> dict:
        return {"prior_cosine": prior_cosine(model, judged, drawn["image_embeds"], targets)}

    metrics = evaluate_kandinsky(model, dataset, split, per_language=cosines, draws=prior_draws)
    judged = load_dataset(lang.base_dataset(dataset.name))
    return metrics | variation_scores(model, judged, 24 * model.config.eval_per_class, model.config.eval_seed)
