"""The t5 family's metrics: span corruption on held-out captions and linear probes of the frozen encoder.

* ``span_loss_{lang}``: mean cross-entropy of the teacher-forced targets (sentinels, dropped tokens, eos), the
  training loss; ``span_accuracy_{lang}``: arg-max accuracy on the dropped tokens alone (sentinels and eos are
  near-certain and left out); ``target_accuracy_{lang}``: on every target token. Each caption of the split is
  corrupted :data:`CORRUPTIONS` times with seeded generators, so the numbers are reproducible.
* ``probe_{field}_{lang}``: a ridge-regression linear probe (one-hot targets, standardised features) fitted on the
  pooled encoder features of the *training* captions, predicting the object's ``colour`` and ``kind`` (shapes) or
  the digit ``label`` (digits), scored on the split: the pooled features must carry the caption's content for
  Kandinsky's conditioning. Shapes probes read the one-object scenes only: a mean-pooled caption of two objects
  does not say which one is "first", so no linear read-out can (a probe on all scenes tops out near 0.76 on the
  training captions themselves), and Kandinsky's prompts name one object. On the test split every caption is an evaluation-only
  (template, language) pair, so both families of metrics measure generalisation to unseen wordings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.nn import eval_mode

from .corruption import sentinel_ids

CORRUPTIONS = 4
"""Seeded corruptions of each caption in the span metrics."""

BATCH = 256
"""Captions per forward pass."""

RIDGE = 1e-2
"""Ridge penalty of the probes, relative to the number of training captions."""

PROBES = {"shapes": (("colour", "colour"), ("kind", "kind")), "digits": (("digit", "label"),)}
"""Dataset kind → (metric name, field) of the probed labels."""


def _languages(split: Any) -> list[str]:
    return list(split["language"]) if "language" in split.fields else ["all"] * len(split["caption"])


def span_metrics(model: Any, captions: list[str], languages: list[str]) -> dict[str, float]:
    """Span-corruption loss and accuracies per language (and over all) of ``captions``."""
    special = torch.tensor([*sentinel_ids(model.tokenizer), model.tokenizer.special_tokens["eos"]])
    sums: dict[str, list[float]] = {}
    for seed in range(CORRUPTIONS):
        g = torch.Generator().manual_seed(seed)
        for start in range(0, len(captions), BATCH):
            batch = model.corrupt(captions[start : start + BATCH], generator=g)
            logits = model(batch["input_ids"], batch["decoder_ids"]).float().cpu()  # (b, T, V)
            targets = batch["targets"]  # (b, T)
            real = targets >= 0  # (b, T)
            ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")  # (b, T)
            right = logits.argmax(-1) == targets  # (b, T)
            dropped = real & ~torch.isin(targets, special)  # (b, T)
            for i, language in enumerate(languages[start : start + BATCH]):
                for key in (language, "all"):
                    s = sums.setdefault(key, [0.0] * 5)
                    s[0] += float(ce[i][real[i]].sum())
                    s[1] += int(real[i].sum())
                    s[2] += int((right[i] & real[i]).sum())
                    s[3] += int((right[i] & dropped[i]).sum())
                    s[4] += int(dropped[i].sum())
    out = {}
    for key, (ce_sum, n, right_all, right_dropped, n_dropped) in sums.items():
        suffix = "" if key == "all" else f"_{key}"
        out[f"span_loss{suffix}"] = ce_sum / max(n, 1)
        out[f"target_accuracy{suffix}"] = right_all / max(n, 1)
        out[f"span_accuracy{suffix}"] = right_dropped / max(n_dropped, 1)
    return out


def pooled_features(model: Any, captions: list[str]) -> Tensor:
    """Pooled encoder features (N, D) of ``captions`` (truncated to max_len where needed)."""
    out = []
    for start in range(0, len(captions), BATCH):
        ids = model.tokenize(captions[start : start + BATCH], truncate=True)  # (b, L)
        out.append(model.encode_text_and_tokens(ids)[0].double().cpu())  # (b, D)
    return torch.cat(out)  # (N, D)


def fit_probe(features: Tensor, labels: Tensor, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ridge regression of one-hot ``labels`` (N,) on standardised ``features`` (N, D): (mean, std, weights (D+1, C))."""
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)  # (D,), (D,)
    x = torch.cat([(features - mean) / std, torch.ones(len(features), 1, dtype=features.dtype)], 1)  # (N, D+1)
    y = F.one_hot(labels.long(), classes).to(features.dtype)  # (N, C)
    gram = x.T @ x + RIDGE * len(x) * torch.eye(x.shape[1], dtype=x.dtype)  # (D+1, D+1)
    return mean, std, torch.linalg.solve(gram, x.T @ y)  # (D+1, C)


def probe_predict(probe: tuple[Tensor, Tensor, Tensor], features: Tensor) -> Tensor:
    """Predicted classes (N,) of ``features`` (N, D) under a :func:`fit_probe` probe."""
    mean, std, w = probe
    x = torch.cat([(features - mean) / std, torch.ones(len(features), 1, dtype=features.dtype)], 1)  # (N, D+1)
    return (x @ w).argmax(-1)  # (N,)


def probe_captions(train: Any, data: str) -> tuple[list[str], Tensor]:
    """The captions the probes are fitted on and the training rows they describe: on a multilingual dataset every
    training scene captioned in every language, each with a training template drawn with a seeded generator
    (training pairs only, as the pre-training reads them); else the split's own captions."""
    if "language" not in train.fields:
        return list(train["caption"]), torch.arange(len(train["caption"]))
    from polymodal.data.languages import LANGUAGES

    from .corruption import recaption

    g = torch.Generator().manual_seed(0)
    captions = [c for language in LANGUAGES for c in recaption(train.fields, data, g, language)]
    return captions, torch.arange(len(train["caption"])).repeat(len(LANGUAGES))


def probe_metrics(model: Any, dataset: Any, split: str) -> dict[str, float]:
    """``probe_{field}`` and ``probe_{field}_{lang}`` accuracies of probes fitted on the training captions."""
    kind = "digits" if "digits" in dataset.name else "shapes" if "shapes" in dataset.name else None
    if kind is None:
        return {}
    train, test = dataset.split("train"), dataset.split(split)
    if "count" in train.fields:  # shapes: one-object scenes (see the module docs)
        train, test = (s.subset(torch.nonzero(s["count"] == 1).flatten()) for s in (train, test))
    captions, rows = probe_captions(train, dataset.name)
    fit, score = pooled_features(model, captions), pooled_features(model, list(test["caption"]))
    languages = _languages(test)
    out = {}
    for name, field in PROBES[kind]:
        if field not in train.fields:
            continue
        labels = train[field][rows]  # (N_fit,)
        classes = int(max(labels.max(), test[field].max())) + 1
        right = probe_predict(fit_probe(fit, labels, classes), score) == test[field]  # (N,)
        out[f"probe_{name}"] = float(right.double().mean())
        for language in sorted(set(languages) - {"all"}):
            pick = torch.tensor([lang == language for lang in languages])
            out[f"probe_{name}_{language}"] = float(right[pick].double().mean())
    return out


@torch.no_grad()
def evaluate_t5(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """Every metric above on ``split`` of ``dataset`` (span metrics need a decoder; all need a tokenizer)."""
    model.require_tokenizer()
    data = dataset.split(split)
    captions = list(data["caption"])
    with eval_mode(model):
        out = span_metrics(model, captions, _languages(data)) if model.decoder is not None else {}
        out.update(probe_metrics(model, dataset, split))
    out["samples"] = len(captions)
    return out


__all__ = ["evaluate_t5", "fit_probe", "pooled_features", "probe_metrics", "probe_predict", "span_metrics"]
