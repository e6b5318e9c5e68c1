"""unCLIP evaluation: test losses, judged text → image samples, the prior ablation, variations, FD.

* ``test_loss_prior`` / ``test_loss_decoder``: the parts' losses on the split (its own captions, seeded).
* Text → image (digits: ``eval_per_class`` samples of ``"the digit 0"`` … ``"the digit 9"``; shapes: one-object
  prompts for every colour × kind, judged after the upsampler at 32×32): ``sample_accuracy`` (every judged
  attribute as prompted), ``sample_<attribute>_accuracy`` and ``fd_judge`` (Fréchet distance of the judge's
  features against the test split, the same n as DALL·E's evaluation for the digits).
* The ablation of the paper's §5.1 (``eval_ablation``): the same decoder fed the CLIP *text* embedding in place
  of the prior's image embedding (``text_embed_sample_accuracy`` …).
* Variations (``eval_variations`` test images, one variation each, judged scenes only): ``variation_accuracy``
  (the judge reads the source's class) and ``variation_mse`` (mean pixel MSE to the source, in [0, 1]).

Sampling uses the parts' default options and seed ``eval_seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import condition as cond
from .sample import generate, variations_of


@torch.no_grad()
def split_losses(model: Any, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
    """Mean prior and decoder losses on ``split`` (eval mode: no condition dropout; seeded noise)."""
    data = dataset.split(split)
    totals = {"loss_prior": 0.0, "loss_decoder": 0.0}
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.config.eval_seed)
            for start in range(0, len(data), batch_size):
                batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
                _, metrics = model.loss(batch)
                for k in totals:
                    totals[k] += float(metrics[k]) * len(batch["image"])
    finally:
        model.train(was)
    return {f"test_{k}": v / len(data) for k, v in totals.items()}


def _batched(fn: Any, items: list[Any], batch_size: int) -> Tensor:
    return torch.cat([fn(items[s : s + batch_size]).cpu() for s in range(0, len(items), batch_size)])


@torch.no_grad()
def prompted_samples(
    model: Any, prompts: list[str], seed: int, embedding: str = "prior", batch_size: int = 256
) -> Tensor:
    """Samples (N, C, S, S) for ``prompts`` (seeded), from the prior's embeddings or the text embeddings."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    return _batched(lambda p: generate(model, p, generator=g, embedding=embedding), prompts, batch_size)


def judged_targets(dataset: Any, split: str, n: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The first ``n`` images of ``split`` the judge reads (shapes: one-object scenes) and their attributes."""
    data = dataset.split(split)
    spec = dataset.meta.get("judge") or {}
    attributes = list(spec.get("attributes") or ["label"])
    keep = torch.ones(len(data), dtype=torch.bool)  # (N,)
    if spec.get("where"):
        name, value = spec["where"]
        keep = data[name] == value
    index = keep.nonzero().flatten()[:n]  # (n,)
    return data["image"][index], {a: data[a][index] for a in attributes}


@torch.no_grad()
def judged_variations(model: Any, dataset: Any, split: str, n: int, batch_size: int = 256) -> dict[str, float]:
    """One variation of each of the first ``n`` judged test images: the judge's accuracy on the source's
    attributes and the mean pixel MSE to the source."""
    from polymodal.eval.judge import judge_samples

    images, targets = judged_targets(dataset, split, n)
    g = torch.Generator(device=model.device).manual_seed(model.config.eval_seed)
    out = _batched(
        lambda x: variations_of(model, torch.stack(x), generator=g), list(images), batch_size
    )  # (n, C, S, S)
    scores = judge_samples(dataset, out, targets)
    metrics = {f"variation_{k.removeprefix('sample_')}": v for k, v in scores.items() if k != "fd_judge"}
    metrics["variation_mse"] = (out - images.float()).pow(2).mean().item()
    metrics["variations"] = len(images)
    return metrics


@torch.no_grad()
def evaluate_unclip(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """Test losses; on digits and shapes the judged samples, the ablation and the variations."""
    from polymodal.eval.judge import get_judge, judge_samples

    metrics = split_losses(model, dataset, split)
    if dataset.name not in ("digits", "shapes"):
        return metrics
    with torch.enable_grad():  # a judge not cached yet is trained now, inside evaluate's no_grad
        get_judge(dataset)
    c = model.config
    prompts, targets = cond.eval_prompts(dataset.name, c.eval_per_class)
    metrics |= judge_samples(dataset, prompted_samples(model, prompts, c.eval_seed), targets)
    metrics["samples"] = len(prompts)
    if c.eval_ablation:
        text = judge_samples(dataset, prompted_samples(model, prompts, c.eval_seed, embedding="text"), targets)
        metrics |= {f"text_embed_{k}": v for k, v in text.items()}
    if c.eval_variations:
        metrics |= judged_variations(model, dataset, split, c.eval_variations)
    return metrics


@torch.no_grad()
def generative_samples(model: Any, dataset: Any, n: int, seed: int = 0, batch_size: int = 256) -> tuple:
    """``n`` samples cycling through the evaluation prompts, and their targets (the generative table's hook)."""
    k = len(cond.eval_prompts(dataset.name, 1)[0])
    per = math.ceil(n / k)
    prompts, targets = cond.eval_prompts(dataset.name, per)  # grouped by prompt: per each
    order = torch.arange(k * per).view(k, per).t().flatten()[:n]  # (n,) prompt 0, 1, …, k-1, 0, 1, …
    images = prompted_samples(model, [prompts[i] for i in order.tolist()], seed, batch_size=batch_size)
    return images, {a: v[order] for a, v in targets.items()}
