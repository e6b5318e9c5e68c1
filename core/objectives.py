"""Objectives: losses that return ``(scalar_loss, {metric: float})``.

- :func:`cross_entropy` — next-token / classification cross-entropy with optional
  per-segment weights (DALL·E weights text 1/8 and image 7/8).
- :func:`info_nce` — CLIP's symmetric InfoNCE (:func:`info_nce_from_logits` on a similarity
  matrix); :class:`ContrastiveLoss` — the same loss as a module with a learnable temperature.
  With ``gather=True`` the negatives are the global batch of every rank (open_clip's local loss
  over features gathered with gradients, :func:`gathered_logits`); identical in one process.

Masked reconstruction lives with the masked autoencoder in :mod:`polymodal.nn.mae`
(:func:`~polymodal.nn.mae.masked_patch_loss`, registered as ``masked-patches``) and
self-distillation with its head and EMA in :mod:`polymodal.plugins.dino.distill`
(:class:`~polymodal.plugins.dino.distill.DINOLoss`, ``self-distillation``); diffusion objectives are to come.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import config, field, in_range
from polymodal.nn.collectives import gather_with_grad, is_distributed, rank, share_of_global_mean


def _token_mean(total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` (a zero count counts as one). While training on several ranks, the count is
    averaged over ranks first, so the ranks' averaged losses (and gradients) are the mean over every
    counted token of the global batch, as one process computes it, although ranks hold different numbers
    of padding tokens (:func:`polymodal.nn.collectives.share_of_global_mean`)."""
    if is_distributed() and torch.is_grad_enabled():
        return share_of_global_mean(total, count)
    return total / count.clamp(min=1)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    segment_ids: Tensor | None = None,
    segment_weights: Sequence[float] | Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of ``logits`` (..., V) against ``targets`` (...), with optional segment weights.

    Without ``segment_weights`` the loss is the mean over all tokens whose target is not
    ``ignore_index``. With ``segment_ids`` (same shape as ``targets``, or the sequence
    dimension only, values ``0..S-1``) and ``segment_weights`` ``(w_0, …, w_{S-1})``::

        loss = Σ_s  w_s · mean(CE over the counted tokens of segment s)

    so DALL·E's objective is ``segment_weights=(1/8, 7/8)`` with text as segment 0 and image
    as segment 1. A segment with no counted tokens contributes 0 (and so does an input
    with no counted tokens at all, instead of NaN). The weights are used as given, not
    renormalised.

    Metrics: ``accuracy`` (arg-max over counted tokens) and, with ``segment_ids``,
    ``ce_segment_{s}`` (mean CE of each segment).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits (..., V) must match targets (...); got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if segment_weights is not None and segment_ids is None:
        raise ValueError("segment_weights needs segment_ids (one segment index per target)")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    v = logits.shape[-1]
    flat_t = targets.reshape(-1)  # (T,)
    ce = F.cross_entropy(
        logits.reshape(-1, v).float(),
        flat_t,
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )  # (T,)
    counted = flat_t != ignore_index  # (T,)
    with torch.no_grad():
        hits = (logits.reshape(-1, v).argmax(-1) == flat_t) & counted  # (T,)
        metrics = {"accuracy": hits.sum() / counted.sum().clamp(min=1)}  # a device scalar: no host sync
    if segment_ids is None:
        return _token_mean((ce * counted).sum(), counted.sum()), metrics
    seg = segment_ids.to(targets.device).long().expand_as(targets).reshape(-1)  # (T,)
    lo, num = (int(seg.min().item()), int(seg.max().item()) + 1) if seg.numel() else (0, 0)
    if lo < 0:
        raise ValueError(f"segment_ids must be >= 0, got {lo}")
    if segment_weights is not None:
        w = torch.as_tensor(segment_weights, dtype=torch.float32, device=ce.device).reshape(-1)  # (S,)
        if num > w.numel():
            raise ValueError(
                f"segment_ids must lie in [0, {w.numel() - 1}] for {w.numel()} segment_weights; got ids up to {num - 1}"
            )
        num = w.numel()
    one_hot = F.one_hot(seg, num).float() * counted.unsqueeze(-1)  # (T, S)
    per_seg = _token_mean((ce.unsqueeze(-1) * one_hot).sum(0), one_hot.sum(0))  # (S,)
    metrics.update({f"ce_segment_{s}": per_seg[s].detach() for s in range(num)})
    if segment_weights is None:
        return _token_mean((ce * counted).sum(), counted.sum()), metrics
    return (w * per_seg).sum(), metrics


def similarity_logits(
    a: Tensor, b: Tensor, logit_scale: float | Tensor, *, normalize: bool = True, gather: bool = False
) -> Tensor:
    """``logit_scale · â @ b̂ᵀ`` for embeddings a (B, D), b (B', D); rows index ``a``.

    With ``gather=True`` and a process group, the columns are every rank's ``b`` gathered with
    gradients (:func:`polymodal.nn.collectives.gather_with_grad`): (B, W·B'), this rank's ``b``
    at columns ``rank·B' …``; identical to ``gather=False`` in one process.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embeddings must be (B, D) with the same D; got {tuple(a.shape)} and {tuple(b.shape)}")
    if normalize:
        a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)  # (B, D), (B', D)
    if gather:
        b = gather_with_grad(b)  # (W·B', D)
    return logit_scale * a @ b.t()  # (B, B') or (B, W·B')


def gathered_logits(
    a: Tensor, b: Tensor, logit_scale: float | Tensor, *, normalize: bool = True
) -> tuple[Tensor, Tensor, int]:
    """The two halves of the "local loss" over the global batch: ``(logits_ab, logits_ba, offset)``.

    ``logits_ab`` (B, W·B): this rank's rows of ``a`` against every rank's ``b``; ``logits_ba``
    (B, W·B): this rank's rows of ``b`` against every rank's ``a`` (both gathered with gradients,
    in one collective); ``offset = rank·B`` is where this rank's pairs sit among the columns. In
    one process it is ``(L, Lᵀ, 0)`` with ``L = similarity_logits(a, b, logit_scale)``.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"expected two (B, D) embedding batches of one shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if normalize:
        a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)  # (B, D), (B, D)
    if not is_distributed():
        logits = logit_scale * a @ b.t()  # (B, B)
        return logits, logits.t(), 0
    dtype = torch.promote_types(a.dtype, b.dtype)
    both = gather_with_grad(torch.stack([a.to(dtype), b.to(dtype)], dim=1))  # (W·B, 2, D)
    a_all, b_all = both.unbind(1)  # (W·B, D) each
    return logit_scale * a @ b_all.t(), logit_scale * b @ a_all.t(), rank() * a.shape[0]  # (B, W·B) ×2


def info_nce(
    a: Tensor, b: Tensor, logit_scale: float | Tensor, *, normalize: bool = True, gather: bool = False
) -> Tensor:
    """Symmetric InfoNCE: pair ``i`` of ``a`` (B, D) and ``b`` (B, D) is the positive.

    ``logit_scale`` is the multiplier (``1/temperature``), not its log. The loss is the mean
    of the cross-entropies over rows (a→b) and over columns (b→a), so swapping ``a`` and
    ``b`` gives the same value.

    ``gather=True`` makes the negatives the global batch when training on several ranks
    (open_clip's local loss): this rank's rows of ``a`` are scored against every rank's ``b``
    and its rows of ``b`` against every rank's ``a`` (:func:`gathered_logits`), the targets
    offset by ``rank·B``, the mean taken over the local rows. The mean over ranks of these
    losses is the one-process loss on the global batch, and so are the data-parallel
    (rank-averaged) gradients. Identical to ``gather=False`` in one process.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"info_nce needs as many rows in a as in b; got {a.shape[0]} and {b.shape[0]}")
    if gather and is_distributed():
        logits_ab, logits_ba, offset = gathered_logits(a, b, logit_scale, normalize=normalize)  # (B, W·B) ×2
        return info_nce_from_logits(logits_ab, logits_ba, offset=offset)
    return info_nce_from_logits(similarity_logits(a, b, logit_scale, normalize=normalize))  # (B, B) logits


def info_nce_from_logits(logits: Tensor, logits_t: Tensor | None = None, *, offset: int = 0) -> Tensor:
    """Symmetric InfoNCE of a similarity matrix (B, B) whose diagonal holds the positive pairs: the
    mean of the cross-entropies over rows and over columns (what :func:`info_nce` computes).

    The gathered form takes the two halves of :func:`gathered_logits`: ``logits`` (B, N) rows of
    ``a`` against all ``b``, ``logits_t`` (B, N) rows of ``b`` against all ``a``; row ``i``'s
    positive is column ``offset + i``.
    """
    if logits_t is None:
        if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
            raise ValueError(f"InfoNCE needs a square (B, B) similarity matrix; got {tuple(logits.shape)}")
        if offset:
            raise ValueError(f"offset needs the gathered form (logits and logits_t); got offset={offset}")
        logits_t = logits.t()  # (B, B)
    elif logits.dim() != 2 or logits.shape != logits_t.shape or not 0 <= offset <= logits.shape[1] - logits.shape[0]:
        raise ValueError(
            f"gathered InfoNCE needs logits and logits_t of one shape (B, N) with 0 <= offset <= N - B; "
            f"got {tuple(logits.shape)}, {tuple(logits_t.shape)} and offset={offset}"
        )
    labels = torch.arange(logits.shape[0], device=logits.device) + offset  # (B,)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits_t, labels)) / 2


@torch.no_grad()
def retrieval_accuracies(logits: Tensor, logits_t: Tensor | None = None, *, offset: int = 0) -> dict[str, float]:
    """``accuracy_i2t`` / ``accuracy_t2i``: how often the diagonal wins its row / its column of the
    similarity matrix (B, B) whose rows index images and columns texts.

    The gathered form takes the halves of :func:`gathered_logits` (images' rows, texts' rows,
    ``offset``): the accuracies of this rank's rows, whose mean over ranks is the global one.
    """
    labels = torch.arange(logits.shape[0], device=logits.device) + offset  # (B,)
    if logits_t is None:
        return {
            "accuracy_i2t": (logits.argmax(1) == labels).float().mean().item(),
            "accuracy_t2i": (logits.argmax(0) == labels).float().mean().item(),
        }
    return {
        "accuracy_i2t": (logits.argmax(1) == labels).float().mean().item(),
        "accuracy_t2i": (logits_t.argmax(1) == labels).float().mean().item(),
    }


@config
class ContrastiveConfig:
    """CLIP's contrastive loss."""

    init_temperature: float = field(
        0.07, "Initial temperature; the learnable log-scale starts at ln(1/T).", check=in_range(1e-4, 100.0)
    )
    max_logit_scale: float = field(
        100.0, "Upper bound of the logit scale exp(s) (CLIP: 100).", check=in_range(1.0, 1e6)
    )
    learnable: bool = field(True, "Learn the temperature (else keep it fixed).")


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between two modalities with a learnable logit scale.

    ``forward(image_emb (B, D), text_emb (B, D))`` normalises both, scores every pair with
    ``exp(s)·cos``, and returns ``(loss, {"accuracy_i2t", "accuracy_t2i", "logit_scale"})``.
    The log-scale ``s`` starts at ``ln(1/0.07)`` and is kept at most ``ln(100)``: it is
    clamped in ``forward`` and, as in CLIP, in place by :meth:`clamp_` after each optimiser step.
    """

    config_class = ContrastiveConfig

    def __init__(self, cfg: ContrastiveConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or ContrastiveConfig(), **overrides)
        self.cfg = cfg
        self.max_log_scale = math.log(cfg.max_logit_scale)
        init = torch.tensor(math.log(1.0 / cfg.init_temperature))
        self.logit_scale = nn.Parameter(init, requires_grad=cfg.learnable)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the log-scale in place to ``[0, ln(max_logit_scale)]`` (call after ``optimizer.step()``)."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def scale(self) -> Tensor:
        """The current multiplier ``exp(min(s, ln max))``."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, a: Tensor, b: Tensor, *, gather: bool = False) -> tuple[Tensor, dict[str, float]]:
        """Loss and retrieval accuracies for aligned batches a (B, D) (e.g. images) and b (B, D) (texts).

        ``gather=True``: negatives from every rank (see :func:`info_nce`); the accuracies are then
        this rank's rows' against the global batch. Identical to ``gather=False`` in one process.
        """
        scale = self.scale()
        if gather and is_distributed():
            logits_ab, logits_ba, offset = gathered_logits(a, b, scale)  # (B, W·B) ×2
            loss = info_nce_from_logits(logits_ab, logits_ba, offset=offset)
            accuracies = retrieval_accuracies(logits_ab, logits_ba, offset=offset)
            return loss, {**accuracies, "logit_scale": scale.item()}
        logits = similarity_logits(a, b, scale)  # (B, B)
        return info_nce_from_logits(logits), {**retrieval_accuracies(logits), "logit_scale": scale.item()}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Two random embedding batches (B, 16)."""
        return torch.randn(batch_size, 16, generator=generator), torch.randn(batch_size, 16, generator=generator)


__all__ = [
    "ContrastiveConfig",
    "ContrastiveLoss",
    "cross_entropy",
    "gathered_logits",
    "info_nce",
    "info_nce_from_logits",
    "retrieval_accuracies",
    "similarity_logits",
]
