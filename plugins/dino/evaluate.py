"""Frozen-feature evaluation of a DINO model: weighted k-NN, a linear probe, attention-mask IoU.

- Weighted k-NN (DINO's protocol): L2-normalised features; a test image's ``k`` nearest
  training images by cosine vote for their labels with weight ``exp(cos / T)``.
- Linear probe: a linear classifier on standardised frozen features, trained full-batch
  with AdamW on the train split, scored on the test split.
- On data with object masks (``masks``, the shapes scenes): the IoU of the thresholded
  head-averaged [CLS] attention with the true objects (``attention_mask_iou``), the best
  single head, and a centred blob of the same pixel area as each attention mask
  (``centred_blob_iou``), the baseline the attention must beat.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.nn import eval_mode

from .attention_maps import attention_masks, centred_blobs, iou


@torch.no_grad()
def extract(model, split, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(N, F) frozen teacher features and (N,) labels of a split."""
    device = next(model.parameters()).device
    feats, labels = [], []
    for start in range(0, len(split), batch_size):
        batch = split.batch(list(range(start, min(start + batch_size, len(split)))))
        feats.append(model.features(batch["image"].to(device)).float().cpu())  # (b, F)
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Accuracy of DINO's temperature-weighted k-NN vote on cosine similarity."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"k-NN needs training and test samples; got {len(train_x)} and {len(test_x)}")
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    a, b = F.normalize(train_x, dim=-1), F.normalize(test_x, dim=-1)
    sims = b @ a.t()  # (Nt, N)
    top, idx = sims.topk(min(k, len(a)), dim=-1)  # (Nt, k)
    weights = (top / temperature).exp()  # (Nt, k)
    votes = torch.zeros(len(b), c).scatter_add_(1, train_y[idx], weights)  # (Nt, C)
    return (votes.argmax(-1) == test_y).float().mean().item()


def linear_probe_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    steps: int = 500,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> float:
    """Test accuracy of a linear classifier trained full-batch on standardised frozen features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xa, xb = (train_x - mean) / std, (test_x - mean) / std  # (N, F), (Nt, F)
    c = int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(xa.shape[1], c, generator=g)).requires_grad_(True)
    bias = torch.zeros(c, requires_grad=True)
    opt = torch.optim.AdamW([w, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(xa @ w + bias, train_y).backward()
            opt.step()
    return ((xb @ w + bias).argmax(-1) == test_y).float().mean().item()


@torch.no_grad()
def mask_ious(model, split, batch_size: int = 256) -> dict[str, float]:
    """Mean IoU of thresholded [CLS] attention with ``masks`` (head-averaged and best head) and of centred blobs."""
    device = next(model.parameters()).device
    per_head, mean_map, blob = [], [], []
    for start in range(0, len(split), batch_size):
        batch = split.batch(list(range(start, min(start + batch_size, len(split)))))
        heads, avg = attention_masks(model, batch["image"].to(device))  # (b, H, S, S), (b, S, S)
        truth = batch["masks"].to(device).bool()  # (b, S0, S0)
        if truth.shape[-2:] != avg.shape[-2:]:
            truth = F.interpolate(truth[:, None].float(), size=avg.shape[-2:], mode="nearest")[:, 0].bool()
        per_head.append(torch.stack([iou(heads[:, h], truth) for h in range(heads.shape[1])], 1).cpu())  # (b, H)
        mean_map.append(iou(avg, truth).cpu())  # (b,)
        blob.append(iou(centred_blobs(avg.flatten(1).sum(1).cpu(), avg.shape[-1]), truth.cpu()))  # (b,)
    heads_iou = torch.cat(per_head).mean(0)  # (H,)
    return {
        "attention_mask_iou": torch.cat(mean_map).mean().item(),
        "attention_mask_iou_best_head": heads_iou.max().item(),
        "centred_blob_iou": torch.cat(blob).mean().item(),
    }


@torch.no_grad()
def evaluate_dino(model, dataset: Any, split: str = "test") -> dict[str, Any]:
    """``knn_accuracy``, ``linear_probe_accuracy`` (and the attention IoUs where the data has masks)."""
    with eval_mode(model):
        test = dataset.split(split)
        train_x, train_y = extract(model, dataset.train)
        test_x, test_y = extract(model, test)
        c = model.config
        metrics: dict[str, Any] = {
            "knn_accuracy": knn_accuracy(
                train_x, train_y, test_x, test_y, c.knn_k, c.knn_temperature, dataset.meta.get("num_classes")
            ),
            "linear_probe_accuracy": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        }
        if "masks" in test:
            metrics.update(mask_ious(model, test))
        metrics["samples"] = len(test)
    return metrics
