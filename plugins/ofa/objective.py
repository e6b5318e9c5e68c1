"""OFA's training objective over a mixed batch: each task's teacher-forced cross-entropy, averaged over its target
tokens and weighted by its share of the rows.

The task parts are run as few forward passes as they can share: every part that shows the encoder an image in one,
the image-free ones (text-to-image, the text task) in another — instructions and targets right-padded to the
longest of the pass, padding masked in the encoder and ignored by the loss —, so a step costs two passes however
many tasks it mixes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.objectives import cross_entropy


def _pad_cat(rows: list[Tensor], pad: int) -> Tensor:
    """(b_i, L_i) long tensors → (Σ b_i, max L_i), right-padded with ``pad``."""
    width = max(r.shape[1] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[1]), value=pad) for r in rows])  # (B, L)


def mixed_task_loss(model: Any, parts: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Any]]:
    """``Σ_task rows_task / rows · mean CE(task's target tokens)`` over the collated ``parts`` (each pass one
    segment-weighted :func:`~polymodal.objectives.cross_entropy`, a part a segment); logs ``accuracy`` and
    ``loss_<task>``."""
    pad = model.vocab.pad
    total_rows = sum(len(p["instruction"]) for p in parts)
    loss, accuracy, logs = 0.0, 0.0, {}
    for sees_image in (True, False):
        group = [p for p in parts if ("encoder_images" in p) == sees_image]
        if not group:
            continue
        targets = [model.part_target(p) for p in group]
        rows = torch.tensor([len(t) for t in targets])  # (parts,)
        target = _pad_cat(targets, pad)  # (B, T)
        start = target.new_full((target.shape[0], 1), model.vocab.bos)
        decoder_ids = torch.cat([start, target[:, :-1]], dim=1)  # (B, T)
        images = torch.cat([p["encoder_images"] for p in group]) if sees_image else None  # (B, 3, S, S)
        logits = model(images, _pad_cat([p["instruction"] for p in group], pad), decoder_ids)  # (B, T, V)
        part_of_row = torch.repeat_interleave(torch.arange(len(group)), rows)[:, None]  # (B, 1)
        group_loss, metrics = cross_entropy(
            logits,
            target.masked_fill(target == pad, -100),
            segment_ids=part_of_row,
            segment_weights=(rows / total_rows).tolist(),
        )
        loss = loss + group_loss
        accuracy = accuracy + metrics["accuracy"] * (int(rows.sum()) / total_rows)
        logs.update({f"loss_{p.get('task', 'task')}": metrics[f"ce_segment_{i}"] for i, p in enumerate(group)})
    return loss, {"accuracy": accuracy, **logs}


__all__ = ["mixed_task_loss"]
