"""M-CLIP's evaluation, per language, on the evaluation-only template × language pairs of the test split.

For every language and every test scene (shapes) or digit, each of that language's evaluation-only
templates gives a caption; the student's embedding of it is compared with the teacher's embedding of the
English caption of the same template id: ``mse_<lang>`` (mean over the embedding's entries, as trained) and
``cosine_<lang>``. ``cosine_train_templates_<lang>``: the same on the language's training templates (the
test scenes are new; the phrasings are not), so the gap shows what the unseen phrasings cost.

Zero-shot through the teacher's image tower (CLIP's prompt ensembling: per class, the normalised mean of the
normalised prompt embeddings; the class of an image is the arg-max cosine), with prompts from the language's
evaluation-only templates read by the student, next to the teacher reading the English of the same template
ids (``teacher_…_<lang>``). Shapes: ``colour_accuracy_<lang>`` and ``kind_accuracy_<lang>`` on the test
split's one-object scenes (prompts: every template × other attribute × cell); digits: ``accuracy_<lang>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.data import languages as lang
from polymodal.data import shapes as shapes_data
from polymodal.nn import eval_mode

from . import captions as cap


def _batched(fn: Callable[[list[str]], Tensor], texts: Sequence[str], size: int = 512) -> Tensor:
    """``fn`` over ``texts`` in chunks, concatenated (N, E)."""
    return torch.cat([fn(list(texts[i : i + size])) for i in range(0, len(texts), size)])


def _classifier(embed: Callable[[list[str]], Tensor], prompts: list[list[str]]) -> Tensor:
    """(K, E): per class the renormalised mean of its normalised prompt embeddings."""
    flat = [p for group in prompts for p in group]
    emb = F.normalize(_batched(embed, flat), dim=-1)  # (K·P, E)
    return F.normalize(emb.view(len(prompts), -1, emb.shape[-1]).mean(1), dim=-1)  # (K, E)


def _shapes_prompts(language: str, templates: Sequence[int], attribute: str) -> list[list[str]]:
    """Per colour (or kind), its one-object captions: every template × value of the other attribute × cell."""
    colours, kinds = range(len(shapes_data.COLOURS)), range(len(shapes_data.KINDS))
    cells = range(len(shapes_data.POSITIONS))
    if attribute == "colour":
        return [
            [cap.caption("shapes", language, t, [(c, k, p)]) for t in templates for k in kinds for p in cells]
            for c in colours
        ]
    return [
        [cap.caption("shapes", language, t, [(c, k, p)]) for t in templates for c in colours for p in cells]
        for k in kinds
    ]


@torch.no_grad()
def evaluate_mclip(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """The metrics of the module doc (``polymodal eval`` and ``metrics.json``)."""
    c = model.config
    with eval_mode(model):
        data = dataset.split(split)
        scenes = cap.scenes(c.tables, data, c.image_size)

        def student(texts: list[str]) -> Tensor:
            return model.encode_text(model.tokenize(texts, truncate=True)).float()  # (n, E)

        def teacher(texts: list[str]) -> Tensor:
            return model.teacher_embeddings(texts).float()  # (n, E)

        metrics: dict[str, float] = {"samples": float(len(data))}
        images = data["image"]
        labels: dict[str, Tensor] = {}
        if c.tables == "shapes":
            single = data["count"] == 1  # one object: its colour and kind are the scene's
            images = images[single]
            labels = {"colour": data["colour"][single], "kind": data["kind"][single]}
        else:
            labels = {"": data["label"]}
        pixels = [model.teacher.prepare(x.to(model.device)) for x in images.split(256)]
        image_emb = F.normalize(torch.cat([model.teacher.encode_image(x) for x in pixels]).float(), dim=-1)
        metrics["zero_shot_images"] = float(len(image_emb))
        means: dict[str, list[float]] = {"mse": [], "cosine": []}
        for code in lang.LANGUAGES:
            for key, heldout in (("", True), ("_train_templates", False)):
                ids = lang.template_ids(c.tables, code, heldout=heldout)
                texts = [cap.caption(c.tables, code, t, s) for s in scenes for t in ids]
                english = [cap.caption(c.tables, "en", t, s) for s in scenes for t in ids]
                pred, target = _batched(student, texts), teacher(english)  # (N, E), (N, E)
                cosine = F.cosine_similarity(pred, target, dim=-1).mean().item()
                metrics[f"cosine{key}_{code}"] = cosine
                if heldout:
                    mse = F.mse_loss(pred, target).item()
                    metrics[f"mse_{code}"] = mse
                    means["mse"].append(mse)
                    means["cosine"].append(cosine)
            ids = lang.template_ids(c.tables, code, heldout=True)
            for attribute, truth in labels.items():
                if c.tables == "shapes":
                    prompts, english = _shapes_prompts(code, ids, attribute), _shapes_prompts("en", ids, attribute)
                else:
                    prompts = [[cap.caption(c.tables, code, t, y) for t in ids] for y in range(10)]
                    english = [[cap.caption(c.tables, "en", t, y) for t in ids] for y in range(10)]
                name = f"{attribute}_accuracy" if attribute else "accuracy"
                for prefix, embed, groups in (("", student, prompts), ("teacher_", teacher, english)):
                    predicted = (image_emb @ _classifier(embed, groups).t()).argmax(-1).cpu()  # (N,)
                    metrics[f"{prefix}{name}_{code}"] = predicted.eq(truth).float().mean().item()
        metrics |= {k: sum(v) / len(v) for k, v in means.items()}
    return metrics
