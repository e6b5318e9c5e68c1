"""Zero-shot classification with prompt ensembling, retrieval R@1/R@5, and the ``classify`` command.

Prompt ensembling (CLIP §3.1.4): per class, embed every prompt, L2-normalise, average,
renormalise; an image's class is the arg-max cosine. Retrieval treats identical caption
strings as one text (templated captions repeat): image→text ranks the distinct captions for
each image and hits when its own caption is in the top k; text→image ranks the images for
each distinct caption and hits when any image with that caption is in the top k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.models.inference import inference_options
from polymodal.nn import eval_mode

from .captions import fill


@torch.no_grad()
def embed_texts(model: Any, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """(N, E) normalised text embeddings (texts truncated to the context, keeping end-of-text)."""
    out = [
        F.normalize(model.encode_text(model.tokenize(list(texts[i : i + batch_size]), truncate=True)), dim=-1)
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def embed_images(model: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """(N, E) normalised image embeddings; images are resized to the tower's size."""
    device = model.logit_scale.device
    out = [
        F.normalize(model.encode_image(model.prepare(images[i : i + batch_size].to(device))), dim=-1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(model: Any, prompts: Sequence[Sequence[str]]) -> Tensor:
    """(K, E): per class the renormalised mean of its normalised prompt embeddings."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("expected at least one prompt for every class")
    rows = [F.normalize(embed_texts(model, list(p)).mean(dim=0), dim=-1) for p in prompts]
    return torch.stack(rows)  # (K, E)


def label_prompts(templates: Sequence[str], class_names: Sequence[str]) -> list[list[str]]:
    """Every template filled for every class (``{numeral}``, ``{word}``, ``{label}``)."""
    return [[fill(t, k, tuple(class_names)) for t in templates] for k in range(len(class_names))]


def accuracy(image_emb: Tensor, classifier: Tensor, labels: Tensor) -> float:
    """Top-1 zero-shot accuracy of normalised image embeddings (N, E) against a classifier (K, E)."""
    if len(labels) == 0:
        return float("nan")
    return (image_emb @ classifier.t()).argmax(-1).cpu().eq(labels.cpu()).float().mean().item()


def retrieval(
    image_emb: Tensor, text_emb: Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``image_to_text_r{k}`` and ``text_to_image_r{k}`` (see the module doc for duplicates)."""
    unique = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(unique)}
    own = torch.tensor([index[c] for c in captions])  # (N,) each image's caption
    first = [captions.index(c) for c in unique]
    texts = text_emb[first]  # (U, E)
    sims = (image_emb @ texts.t()).cpu()  # (N, U)
    out = {}
    for k in ks:
        top = sims.topk(min(k, sims.shape[1]), dim=1).indices  # (N, k)
        out[f"image_to_text_r{k}"] = (top == own[:, None]).any(1).float().mean().item()
        top_img = sims.t().topk(min(k, sims.shape[0]), dim=1).indices  # (U, k)
        out[f"text_to_image_r{k}"] = (own[top_img] == torch.arange(len(unique))[:, None]).any(1).float().mean().item()
    return out


def shapes_prompts(templates: Sequence[str], attribute: str) -> list[list[str]]:
    """Colour or kind class prompts: the templates filled with the class and every value of the other fields."""
    from polymodal.data import shapes as s

    colours = list(s.COLOURS)
    where = [s.WHERE[p] for p in s.POSITIONS]
    if attribute == "colour":
        return [
            [t.format(colour=c, kind=k, where=w) for t in templates for k in s.KINDS for w in where] for c in colours
        ]
    return [[t.format(colour=c, kind=k, where=w) for t in templates for c in colours for w in where] for k in s.KINDS]


@torch.no_grad()
def evaluate_clip(model: Any, dataset: Any, split: str = "test") -> dict[str, Any]:
    """The metrics ``polymodal eval`` prints for CLIP (train templates for zero-shot come from the dataset meta)."""
    with eval_mode(model):
        data, meta = dataset.split(split), dataset.meta
        images = embed_images(model, data["image"])  # (N, E)
        metrics: dict[str, Any] = {"samples": len(data)}
        templates, heldout = meta.get("templates") or [], meta.get("heldout_templates") or []
        if dataset.name == "shapes" and templates:
            single = data["count"] == 1  # one object: the class is unambiguous
            for attribute in ("colour", "kind"):
                labels = data[attribute]
                for suffix, temps in (("", templates), ("_heldout", heldout)):
                    if not temps:
                        continue
                    clf = zero_shot_classifier(model, shapes_prompts(temps, attribute))
                    metrics[f"zero_shot_{attribute}_accuracy{suffix}"] = accuracy(images[single], clf, labels[single])
                    if not suffix:  # every scene: a hit when the prediction matches any object in it
                        pred = (images @ clf.t()).argmax(-1).cpu().tolist()
                        key = 4 if attribute == "colour" else 5
                        hits = [any(int(b[key]) == p for b in boxes) for p, boxes in zip(pred, data["boxes"])]
                        metrics[f"zero_shot_{attribute}_accuracy_any_object"] = sum(hits) / max(len(hits), 1)
            metrics["single_object_samples"] = int(single.sum())
        elif meta.get("class_names") and "label" in data:
            names = meta["class_names"]
            for suffix, temps in (("", templates or ["a photo of a {label}."]), ("_heldout", heldout)):
                if temps:
                    clf = zero_shot_classifier(model, label_prompts(temps, names))
                    metrics[f"zero_shot_accuracy{suffix}"] = accuracy(images, clf, data["label"])
        if "caption" in data:
            metrics.update(retrieval(images, embed_texts(model, data["caption"]), list(data["caption"])))
        metrics["logit_scale"] = model.scale().item()
    return metrics


def label_filled(templates: Sequence[str], name: str) -> list[str]:
    """The templates that need only a label (``{label}``/``{word}``/``{numeral}``), filled; else ``[name]``."""
    out = []
    for t in templates:
        try:
            out.append(t.format_map({"label": name, "word": name, "numeral": name}))
        except (KeyError, IndexError, ValueError):
            continue
    return list(dict.fromkeys(out)) or [name]


LABEL_FIELDS = ("label", "word", "numeral")
"""The fields a classify template may hold; each is filled with the label (``{label}`` is the documented one)."""


def check_templates(templates: Sequence[str], what: str = "template") -> None:
    """ValueError naming the template unless each holds ``{label}`` (or ``{word}``/``{numeral}``) and no other field."""
    import string

    for t in templates:
        example = "e.g. 'a photo of a {label}.'"
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(t) if name is not None}
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{what} {t!r} is not a valid template ({exc}); put {{label}} where the label goes, {example}"
            ) from None
        other = sorted(fields - set(LABEL_FIELDS))
        if other or not fields:
            extra = f" and no other field (it holds {', '.join('{' + f + '}' for f in other)})" if other else ""
            raise ValueError(f"{what} must hold {{label}} where the label goes{extra}, {example}; got {t!r}")


@torch.no_grad()
def classify(model: Any, images: Tensor, labels: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
    """(N, K) label probabilities: softmax of ``scale · cos`` against prompt-ensembled labels.

    Given ``templates`` must each hold ``{label}`` (:func:`check_templates`); without them the
    model's training templates are used (those that need only the label).
    """
    if templates:
        check_templates(templates)
    prompts = [label_filled(list(templates or model.config.templates), name) for name in labels]
    clf = zero_shot_classifier(model, prompts)  # (K, E)
    emb = F.normalize(model.encode_image(images), dim=-1)  # (N, E)
    return (model.scale() * emb @ clf.t()).softmax(-1)


@click.command("classify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", required=True, help='Comma-separated labels, e.g. "a,b,c".')
@click.option(
    "--template",
    "templates",
    multiple=True,
    help="Prompt template with {label} (repeatable; default: the model's training templates).",
)
@inference_options
def classify_command(directory, images, labels, templates, dtype, compile_) -> None:
    """Zero-shot classify IMAGES with the CLIP model folder DIRECTORY; prints each label's probability."""
    import polymodal
    from polymodal.eval.images import read_image  # the core's one safe reader (resized to size × size)

    names = [x.strip() for x in labels.split(",") if x.strip()]
    if not names:
        raise click.UsageError("--labels needs at least one label")
    try:
        check_templates(templates, what="--template")
        model = polymodal.load(directory, dtype=dtype, compile=compile_)
        if model.family != "clip":
            raise ValueError(f"{directory} holds a {model.family!r} model, not a CLIP model")
        v = model.config.vision
        batch = torch.stack([read_image(p, v.channels, v.image_size) for p in images])  # (N, C, S, S)
        probs = classify(model, batch, names, templates or None)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for path, row in zip(images, probs.tolist()):
        click.echo(path)
        for name, p in sorted(zip(names, row), key=lambda x: -x[1]):
            click.echo(f"  {name}: {p:.4f}")
