"""DALL·E evaluation: test cross-entropy (bits per image token) and samples judged by the shared judge.

Digits: ``eval_per_class`` samples for each prompt ``"the digit 0"`` … ``"the digit 9"``;
``sample_accuracy`` is the share the judge reads as the prompted digit. Shapes: one-object
prompts for every colour × kind; ``sample_colour_accuracy`` and ``sample_kind_accuracy``
are the shares whose colour / kind the judge reads as prompted (``sample_accuracy``: both).
``fd_judge`` is the Fréchet distance between judge features of the samples and of the test
images. Sampling is seeded (seed 0) and uses the model's default sampling options.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import text as txt
from .sample import generate_codes


@torch.no_grad()
def test_loss(
    model: Any, dataset: Any, split: str = "test", batch_size: int = 128, train_templates: bool = False
) -> dict[str, float]:
    """Mean weighted, text and image cross-entropy (nats) of ``split``, and bits per image token.

    The captions are the split's own (on the embedded data: held-out phrasings), or with
    ``train_templates`` fresh ones from the training templates (seeded), which measures
    the image model apart from unseen phrasing.
    """
    data = dataset.split(split)
    totals = {"loss": 0.0, "loss_text": 0.0, "loss_image": 0.0}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for start in range(0, len(data), batch_size):
            batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
            captions = txt.resample_captions(model.config, batch) if train_templates else list(batch["caption"])
            text = model.encode_text(captions, truncate=True)  # (B, L)
            loss, metrics = model.stream_loss(model.stream(text, model.image_codes(batch["image"])))
            n = len(captions)
            totals["loss"] += loss.item() * n
            totals["loss_text"] += float(metrics["loss_text"]) * n  # the loss's metrics are device scalars
            totals["loss_image"] += float(metrics["loss_image"]) * n
    suffix = "_train_templates" if train_templates else ""
    out = {f"test_{k}{suffix}": v / len(data) for k, v in totals.items()}
    out[f"test_bits_per_image_token{suffix}"] = out[f"test_loss_image{suffix}"] / math.log(2)
    return out


@torch.no_grad()
def judged_samples(model: Any, dataset: Any, per_class: int, seed: int = 0, batch_size: int = 256) -> dict[str, float]:
    """Samples for the evaluation prompts scored by :func:`polymodal.eval.judge.judge_samples`."""
    from polymodal.eval.judge import get_judge, judge_samples

    with torch.enable_grad():  # a judge not cached yet is trained now, inside evaluate's no_grad
        get_judge(dataset)
    prompts, targets = txt.eval_prompts(dataset.name, per_class)
    g = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        codes = generate_codes(model, prompts[start : start + batch_size], generator=g)  # (b, h, w)
        images.append(model.decode_codes(codes).cpu())
    metrics = judge_samples(dataset, torch.cat(images), targets)
    metrics["samples"] = len(prompts)
    return metrics


@torch.no_grad()
def generative_samples(model: Any, dataset: Any, n: int, seed: int = 0, batch_size: int = 256) -> tuple:
    """``n`` samples cycling through the evaluation prompts, and their targets (the generative table's hook)."""
    if dataset.name not in ("digits", "shapes"):
        raise ValueError(f"DALL·E's evaluation prompts are for digits and shapes; got {dataset.name!r}")
    k = len(txt.eval_prompts(dataset.name, 1)[0])
    per = math.ceil(n / k)
    prompts, targets = txt.eval_prompts(dataset.name, per)  # grouped by prompt: per each
    order = torch.arange(k * per).view(k, per).t().flatten()[:n]  # (n,) prompt 0, 1, …, k-1, 0, 1, …
    g = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    chosen = [prompts[i] for i in order.tolist()]
    images = [
        model.decode_codes(generate_codes(model, chosen[s : s + batch_size], generator=g)).cpu()  # (b, C, S, S)
        for s in range(0, n, batch_size)
    ]
    return torch.cat(images), {a: v[order] for a, v in targets.items()}


@torch.no_grad()
def evaluate_dalle(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """Test loss metrics, then judged sample metrics (datasets the judge knows: digits, shapes)."""
    metrics = test_loss(model, dataset, split)
    if model.config.templates:
        metrics.update(test_loss(model, dataset, split, train_templates=True))
    if dataset.name in ("digits", "shapes"):
        metrics.update(judged_samples(model, dataset, model.config.eval_per_class))
    return metrics
