"""PIXEL's evaluation (robustness to look-alike characters, masked-patch loss) and reconstruction pictures."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.data import DIGIT_WORDS
from polymodal.nn import eval_mode
from polymodal.nn.mae import MAE

from .masking import DIGIT_LOOKALIKES, LETTER_LOOKALIKES, masked_forward, perturb


def perturbed_texts(
    texts: Sequence[str], substitutions: int, seed: int, table: dict[str, str] | None = None
) -> list[str]:
    """Each text with its digit word perturbed by look-alike substitutions ("s3ven", "eiqht" …) from
    ``table`` (every look-alike by default)."""
    rng = random.Random(seed)
    return [perturb(t, DIGIT_WORDS, substitutions=substitutions, rng=rng, table=table) for t in texts]


def split_texts(dataset: Any, split: str) -> tuple[list[str], Tensor]:
    """Every sentence of ``split`` and its label."""
    data = dataset.split(split)
    batch = data.batch(list(range(len(data))))
    return list(batch["text"]), batch["label"].cpu()


def _accuracy(predict: Callable[[list[str]], Tensor], texts: list[str], labels: Tensor, batch_size: int = 256) -> float:
    hits = 0
    for start in range(0, len(texts), batch_size):
        logits = predict(texts[start : start + batch_size])  # (b, K)
        hits += int((logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum())
    return hits / max(len(texts), 1)


def mean_text_patch(mae: MAE, renderer: Any, texts: list[str], batch_size: int = 256) -> Tensor:
    """(P,) the mean normalised target over every text patch of ``texts`` (the predict-the-mean baseline)."""
    total, count = None, 0
    for start in range(0, len(texts), batch_size):
        rendered = renderer.render(texts[start : start + batch_size], truncate=True)
        target = mae.target(renderer.prepare(rendered.images.to(mae.mask_token.device)))  # (b, N, P)
        picked = target[rendered.text.to(target.device)]  # (T, P)
        total = picked.sum(0) if total is None else total + picked.sum(0)
        count += picked.shape[0]
    return total / max(count, 1)


def masked_losses(
    mae: MAE, renderer: Any, texts: list[str], seed: int, mean_patch: Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """Mean masked-patch loss of the MAE and of predicting ``mean_patch`` for every masked patch
    (normalised targets), over span masks drawn with ``seed``."""
    rng = random.Random(seed)
    sums, count = torch.zeros(2, dtype=torch.float64), 0.0
    for start in range(0, len(texts), batch_size):
        rendered = renderer.render(texts[start : start + batch_size], truncate=True)
        out, _ = masked_forward(mae, renderer, rendered, rng)
        weight = out.mask * rendered.valid.to(out.mask.device).float()  # (b, N)
        err = (out.pred - out.target).pow(2).mean(-1)  # (b, N)
        base = (mean_patch.to(out.target.device) - out.target).pow(2).mean(-1)  # (b, N)
        sums += torch.tensor([(err * weight).sum().item(), (base * weight).sum().item()], dtype=torch.float64)
        count += weight.sum().item()
    sums /= max(count, 1e-8)
    return float(sums[0]), float(sums[1])


@torch.no_grad()
def masked_loss_metrics(mae: MAE, renderer: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """``masked_loss`` on ``split`` and ``mean_baseline_loss`` (the train split's mean text patch), with their ratio."""
    texts, _ = split_texts(dataset, split)
    train_texts, _ = split_texts(dataset, "train")
    seed = renderer._render_config().eval_seed
    loss, base = masked_losses(mae, renderer, texts, seed + 1, mean_text_patch(mae, renderer, train_texts))
    return {"masked_loss": loss, "mean_baseline_loss": base, "masked_loss_ratio": loss / max(base, 1e-12)}


@torch.no_grad()
def evaluate(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """``accuracy_clean`` / ``accuracy_perturbed`` (PIXEL), ``token_accuracy_clean`` /
    ``token_accuracy_perturbed`` (byte baseline) over ``perturb_draws`` perturbed copies of the split,
    their drops, the same on the sentences changed by
    letter-for-letter look-alikes only (``…_perturbed_letters``) and by digit look-alikes only
    (``…_perturbed_digits``), and the frozen MAE's masked-patch loss against the predict-the-mean
    baseline on held-out text."""
    with eval_mode(model):
        texts, labels = split_texts(dataset, split)
        seed, subs, draws = model.config.pretrain.eval_seed, model.config.substitutions, model.config.perturb_draws
        dev = model._device()

        def pixel(batch: list[str]) -> Tensor:
            r = model.render(batch, truncate=True)
            return model(r.images.to(dev), r.valid.to(dev))

        def perturbed(table: dict[str, str] | None) -> tuple[list[str], Tensor]:
            """``draws`` perturbed copies of the split (only the sentences the table changes)."""
            rows = [
                (t, y)
                for d in range(draws)
                for t, c, y in zip(perturbed_texts(texts, subs, seed + d, table), texts, labels.tolist())
                if t != c
            ]
            return [t for t, _ in rows], torch.tensor([y for _, y in rows], dtype=torch.long)

        noisy, noisy_labels = perturbed(None)
        out = {
            "accuracy_clean": _accuracy(pixel, texts, labels),
            "accuracy_perturbed": _accuracy(pixel, noisy, noisy_labels),
            "token_accuracy_clean": _accuracy(model.token_logits, texts, labels),
            "token_accuracy_perturbed": _accuracy(model.token_logits, noisy, noisy_labels),
        }
        out["accuracy_drop"] = out["accuracy_clean"] - out["accuracy_perturbed"]
        out["token_accuracy_drop"] = out["token_accuracy_clean"] - out["token_accuracy_perturbed"]
        for kind, table in (("letters", LETTER_LOOKALIKES), ("digits", DIGIT_LOOKALIKES)):
            kind_texts, kind_labels = perturbed(table)
            out[f"accuracy_perturbed_{kind}"] = _accuracy(pixel, kind_texts, kind_labels)
            out[f"token_accuracy_perturbed_{kind}"] = _accuracy(model.token_logits, kind_texts, kind_labels)
        out.update(masked_loss_metrics(model.mae, model, dataset, split))
        out.update({"samples": len(texts), "perturbed_samples": len(noisy), "perturbed_example": noisy[0]})
    return out


@torch.no_grad()
def reconstruction_rows(mae: MAE, renderer: Any, texts: Sequence[str], seed: int = 0) -> Tensor:
    """(B, 1, 3p, N·p): each sentence rendered, with its span mask (hidden patches mid-grey), and the
    MAE's reconstruction (visible patches as given, hidden ones predicted)."""
    with eval_mode(mae):
        rendered = renderer.render(list(texts), truncate=True)
        out, spans = masked_forward(mae, renderer, rendered, random.Random(seed))
        spans = spans.to(out.pred.device).float()  # (B, N): the span mask (not the padding dropped to even the batch)
        images = rendered.images.to(out.pred.device)  # (B, 1, p, N·p)
        recon = 1.0 - mae.reconstruct(out.pred, renderer.prepare(images), spans)  # back to black on white
        cells = spans.repeat_interleave(renderer.patch, dim=1)[:, None, None, :]  # (B, 1, 1, N·p)
        masked = images * (1 - cells) + 0.5 * cells  # (B, 1, p, N·p)
    return torch.cat([images, masked, recon], dim=2).cpu()


def sample_to_folder(
    mae: MAE, renderer: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0
) -> list[Path]:
    """Write :func:`reconstruction_rows` of ``prompt`` (or ``n`` embedded test sentences) as PNGs plus ``grid.png``."""
    from polymodal.data import load_dataset
    from polymodal.eval.images import write_samples

    texts = [prompt] if prompt is not None else split_texts(load_dataset("text"), "test")[0][:n]
    return write_samples(reconstruction_rows(mae, renderer, texts, seed), out, grid_scale=3)


__all__ = [
    "evaluate",
    "masked_loss_metrics",
    "masked_losses",
    "mean_text_patch",
    "perturbed_texts",
    "reconstruction_rows",
    "sample_to_folder",
    "split_texts",
]
