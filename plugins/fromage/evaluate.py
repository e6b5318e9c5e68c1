"""FROMAGe evaluation: captions that name the digit, text→image retrieval by [RET], [RET] emission."""

from __future__ import annotations

import re
from typing import Any

import torch

from polymodal.data.augment import resize
from polymodal.data.digits import DIGIT_WORDS
from polymodal.nn import eval_mode

from .config import DIGITS_TRAIN_TEMPLATES, fill_template
from .infer import caption, embed_images, embed_texts, generate


def named_digits(text: str) -> set[int]:
    """Digits a text names, as words (``seven``) or numerals (``7``)."""
    words = re.findall(r"[a-z]+|\d", text.lower())
    return {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w) for w in words if w in DIGIT_WORDS or w.isdigit()}


@torch.no_grad()
def evaluate_fromage(model: Any, dataset: Any, split: str = "test") -> dict[str, Any]:
    """``caption_accuracy``: the greedy caption names the image's digit and no other (word or numeral).

    ``retrieval_r1``: for every (template, digit) query read alone with [RET], the nearest image
    of the split shows that digit; the templates are the digits' word-form caption templates ("a
    photo of the number seven" …, trained on; the images are unseen), ``_numerals`` its numeral
    ones ("a handwritten 7" …), ``_heldout`` the held-out templates (never trained on);
    ``retrieval_precision10``: mean share of the 10 nearest images that show it.
    ``ret_emission_rate``: share of the word-form queries whose greedy continuation emits [RET].
    """
    with eval_mode(model):
        data = dataset.split(split)
        images, labels = resize(data["image"].float(), model.vision.config.vision.image_size), data["label"]
        caps = caption(model, images)
        right = [named_digits(c) == {y} for c, y in zip(caps, labels.tolist())]
        gallery = embed_images(model, images).cpu()  # (N, S)
        metrics: dict[str, Any] = {"caption_accuracy": sum(right) / len(right)}
        words = tuple(t for t in DIGITS_TRAIN_TEMPLATES if "{numeral}" not in t)
        numerals = tuple(t for t in DIGITS_TRAIN_TEMPLATES if "{numeral}" in t)
        for suffix, templates in (("", words), ("_numerals", numerals), ("_heldout", model.config.eval_templates)):
            queries = [(fill_template(t, d), d) for t in templates for d in range(10)]
            sims = embed_texts(model, [q for q, _ in queries]).cpu() @ gallery.t()  # (Q, N)
            want = torch.tensor([d for _, d in queries])  # (Q,)
            metrics[f"retrieval_r1{suffix}"] = (labels[sims.argmax(1)] == want).float().mean().item()
            top10 = labels[sims.topk(10, dim=1).indices]  # (Q, 10)
            metrics[f"retrieval_precision10{suffix}"] = (top10 == want[:, None]).float().mean().item()
        queries = [fill_template(t, d) for t in words for d in range(10)]
        metrics["ret_emission_rate"] = sum(generate(model, q)["emitted_ret"] for q in queries) / len(queries)
        metrics.update(model.parameter_counts())
        metrics["samples"] = len(labels)
        metrics["example_captions"] = "; ".join(f"{y}: {c}" for c, y in list(zip(caps, labels.tolist()))[:5])
    return metrics


__all__ = ["evaluate_fromage", "named_digits"]
