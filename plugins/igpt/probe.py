"""iGPT's linear probe: average-pooled features of every layer, a logistic regression per layer, a plot.

The lecture's "per layer linear probe" figure: a generative model's best features for
classification sit in the middle of the stack, not at its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.io import atomic_write


@torch.no_grad()
def pooled_features(model, ids: Tensor, batch_size: int = 256) -> list[Tensor]:
    """For input streams ``ids`` (B, N): per layer (``depth + 1`` of them) the mean over positions (B, D)."""
    per_layer: list[list[Tensor]] = []
    for chunk in ids.split(batch_size):
        hidden = model.hidden_states(chunk)  # depth + 1 tensors (b, N, D)
        if not per_layer:
            per_layer = [[] for _ in hidden]
        for store, h in zip(per_layer, hidden):
            store.append(h.float().mean(1).cpu())  # (b, D)
    return [torch.cat(store) for store in per_layer]


def fit_linear(x: Tensor, y: Tensor, classes: int, l2: float = 1e-4, steps: int = 300) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on ``x`` (N, F): full-batch L-BFGS on the mean cross-entropy
    plus ``l2/2 · |W|²`` (the bias is not penalised); returns the weight (F, K) and bias (K,)."""
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=steps,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    x, y = x.double(), y.long()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def probe_accuracies(
    train: Sequence[Tensor], train_y: Tensor, test: Sequence[Tensor], test_y: Tensor, l2: float = 1e-4
) -> list[float]:
    """Test accuracy, per layer, of a linear probe fitted on standardised train features (:func:`fit_linear`)."""
    if len(train) != len(test):
        raise ValueError(f"need features of the same layers for train and test; got {len(train)} and {len(test)}")
    classes = int(max(train_y.max(), test_y.max())) + 1
    accs = []
    for a, b in zip(train, test):
        mean, std = a.double().mean(0), a.double().std(0).clamp(min=1e-6)  # (F,) each, from train only
        w, bias = fit_linear((a.double() - mean) / std, train_y, classes, l2)
        pred = (((b.double() - mean) / std) @ w + bias).argmax(-1)  # (N_test,)
        accs.append((pred == test_y.long()).double().mean().item())
    return accs


def plot_probe(
    accs: Sequence[float], path: str | Path, title: str = "linear probe by layer", size: tuple[int, int] = (560, 360)
) -> Path:
    """Draw probe accuracy against layer (axes, ticks, line, points, labels) as a PNG at ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    if not accs:
        raise ValueError("plot_probe needs at least one accuracy")
    w, h = size
    left, right, top, bottom = 64, 40, 52, 52
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    n = len(accs)
    lo = max(0.0, np.floor(min(accs) * 10) / 10 - 0.1)

    def xy(i: int, a: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(n - 1, 1))
        y = top + (h - top - bottom) * (1 - (a - lo) / max(1.0 - lo, 1e-9))
        return x, y

    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black", width=1)  # axes
    for k in range(int(round((1.0 - lo) * 10)) + 1):  # y ticks every 0.1
        a = lo + k / 10
        _, y = xy(0, a)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.line([(left + 1, y), (w - right, y)], fill=(230, 230, 230))
        draw.text((left - 36, y - 6), f"{a:.1f}", fill="black", font=font)
    for i in range(n):  # x ticks: one per layer
        x, _ = xy(i, lo)
        draw.line([(x, h - bottom), (x, h - bottom + 4)], fill="black")
        draw.text((x - 3, h - bottom + 8), str(i), fill="black", font=font)
    points = [xy(i, a) for i, a in enumerate(accs)]
    if n > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    best = int(np.argmax(accs))
    for i, (x, y) in enumerate(points):
        colour = (214, 39, 40) if i == best else (31, 119, 180)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((x + 6, y + 4), f"{accs[i]:.2f}", fill=colour, font=font)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text(((w - left) // 2, h - 20), "layer (0 = embeddings, last = final norm)", fill="black", font=font)
    draw.text((6, top - 22), "probe accuracy", fill="black", font=font)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


__all__ = ["fit_linear", "plot_probe", "pooled_features", "probe_accuracies"]
