"""Self-distillation without labels (DINO, Caron et al., 2021): DINO's head, loss and collapse monitor.

- :class:`DINOHead` — projection head: a 3-layer MLP, a bottleneck, L2 normalisation and a
  weight-normalised last layer whose gain is fixed to 1 (each output unit is the cosine of
  the bottleneck vector with a learned prototype direction).
- :class:`DINOLoss` — the student's cross-entropy against the centred, sharpened teacher
  over every teacher/student view pair except identical views; holds the centre (an EMA of
  the teacher's batch means) and the teacher-temperature warm-up.
- The teacher is an exponential moving average of the student, updated with the trainer's
  :func:`polymodal.train.ema_update_` on DINO's :func:`polymodal.train.cosine_momentum` schedule.
- :func:`collapse_stats` / :class:`CollapseMonitor` — teacher output entropy and the KL of
  each teacher distribution to the batch's mean distribution; a collapsed teacher (every
  image mapped to the same distribution: uniform or one-hot) has a KL near 0.

All tensors are float; shapes are in the comments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import config, field, in_range, one_of
from polymodal.nn.collectives import all_reduce_mean
from polymodal.nn.mlp import make_activation
from polymodal.train import TrainingError

from .sync import SyncBatchNorm1d

__all__ = [
    "DINOHead",
    "DINOHeadConfig",
    "DINOLoss",
    "DINOLossConfig",
    "CollapseError",
    "CollapseMonitor",
    "collapse_stats",
    "teacher_temperature",
]


# -- the projection head ---------------------------------------------------------------------------


@config
class DINOHeadConfig:
    """DINO's projection head on top of a backbone's pooled features."""

    hidden_dim: int = field(2048, "Width of the MLP's hidden layers.", check=in_range(1, 1 << 20, integer=True))
    bottleneck_dim: int = field(
        256, "Width of the bottleneck the MLP ends in (then L2-normalised).", check=in_range(1, 1 << 20, integer=True)
    )
    out_dim: int = field(
        65536,
        "Number of output prototypes K (the distributions live on K classes).",
        check=in_range(2, 1 << 24, integer=True),
    )
    layers: int = field(
        3,
        "Linear layers of the MLP before the bottleneck normalisation (DINO: 3).",
        check=in_range(1, 16, integer=True),
    )
    act: str = field(
        "gelu", "Activation between the MLP's layers.", check=one_of("gelu", "gelu_tanh", "quick_gelu", "relu")
    )
    batchnorm: bool = field(
        False,
        "BatchNorm after each hidden layer of the MLP (the reference code's use_bn_in_head): "
        "it standardises the features across the batch, which keeps a small model from collapsing.",
    )


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation and the gain fixed to 1: ``W = V / ‖V‖`` row-wise.

    Each output is the dot product of the input with a unit-norm prototype; with an
    L2-normalised input that is a cosine in [-1, 1].
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.direction, std=0.02)

    def weight(self) -> Tensor:
        """The (out, in) weight with unit-norm rows."""
        return F.normalize(self.direction, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight().t()  # (..., out)


class DINOHead(nn.Module):
    """Features (B, in_dim) → logits (B, out_dim): MLP → bottleneck → L2 norm → weight-normed linear."""

    def __init__(self, in_dim: int, cfg: DINOHeadConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DINOHeadConfig()
        self.cfg = cfg
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < cfg.layers - 1:
                if cfg.batchnorm:
                    layers.append(SyncBatchNorm1d(b))  # nn.BatchNorm1d over the global batch
                layers.append(make_activation(cfg.act))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # (B, bottleneck), unit norm
        return self.last(z)  # (B, K)


# -- schedules ----------------------------------------------------------------


def teacher_temperature(step: int, start: float, end: float, warmup: int) -> float:
    """Teacher temperature: linear from ``start`` to ``end`` over ``warmup`` steps, then ``end``."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


# -- the loss ---------------------------------------------------------------------------------------


@config
class DINOLossConfig:
    """Temperatures and centring of the DINO loss."""

    student_temp: float = field(0.1, "Student softmax temperature.", check=in_range(1e-4, 100.0))
    teacher_temp: float = field(
        0.04,
        "Teacher softmax temperature after warm-up (below the student's: sharpening).",
        check=in_range(1e-4, 100.0),
    )
    warmup_teacher_temp: float = field(
        0.04, "Teacher temperature at step 0 (linear warm-up to teacher_temp).", check=in_range(1e-4, 100.0)
    )
    warmup_teacher_temp_steps: int = field(
        0, "Steps of the teacher-temperature warm-up.", check=in_range(0, 10**9, integer=True)
    )
    center_momentum: float = field(
        0.9, "EMA momentum of the centre (the running mean of teacher logits).", check=in_range(0.0, 1.0)
    )

    def __attrs_post_init__(self) -> None:
        for name in ("teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) >= self.student_temp:
                raise ValueError(
                    f"DINOLossConfig.{name} must be below student_temp={self.student_temp} "
                    f"(the teacher is sharpened); got {getattr(self, name)}"
                )


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over view pairs.

    ``student`` is a list of (B, K) logits, one per student view (global views first);
    ``teacher`` a list of (B, K) logits for the global views. Teacher view ``i`` and
    student view ``i`` are the same crop, so the pair is skipped; every other pair
    contributes ``-Σ_k q_k log p_k`` averaged over the batch, and the loss is the mean over
    pairs. The centre (1, K) is updated by :meth:`update_center` from the teacher's
    batch mean (call it after the loss, once per training step).
    """

    def __init__(self, out_dim: int, cfg: DINOLossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DINOLossConfig()
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, step: int) -> float:
        """The teacher temperature at training step ``step``."""
        c = self.cfg
        return teacher_temperature(step, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_steps)

    def teacher_probs(self, teacher: Tensor, step: int) -> Tensor:
        """softmax((t − centre) / τ_t): (B, K) centred, sharpened teacher distributions."""
        return F.softmax((teacher.float() - self.center) / self.teacher_temp(step), dim=-1)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor], step: int = 0) -> Tensor:
        """The mean cross-entropy over all (teacher view, student view) pairs with different views."""
        if len(teacher) < 1 or len(student) < 1:
            raise ValueError(f"need at least one teacher and one student view; got {len(teacher)} and {len(student)}")
        if len(student) == 1 and len(teacher) == 1:
            raise ValueError("one teacher view and one student view of the same crop leave no pair to compare")
        k = self.center.shape[-1]
        for v in (*student, *teacher):
            if v.dim() != 2 or v.shape[-1] != k or v.shape[0] != teacher[0].shape[0]:
                raise ValueError(f"expected (B, {k}) logits with one B for every view; got {tuple(v.shape)}")
        targets = [self.teacher_probs(t.detach(), step) for t in teacher]  # each (B, K)
        logps = [F.log_softmax(s.float() / self.cfg.student_temp, dim=-1) for s in student]  # each (B, K)
        total, pairs = 0.0, 0
        for iq, q in enumerate(targets):
            for iv, logp in enumerate(logps):
                if iv == iq:
                    continue  # the same crop seen by both networks
                total = total + (-(q * logp).sum(-1)).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher: Sequence[Tensor]) -> None:
        """``centre ← m·centre + (1 − m)·mean of the teacher logits`` over every global view and sample."""
        self.update_center_from_mean(batch_mean(teacher))

    @torch.no_grad()
    def update_center_from_mean(self, mean: Tensor) -> None:
        """The centre's EMA step from this rank's batch mean (1, K) of the teacher logits, averaged over
        ranks first (each rank holds as many rows of the global batch)."""
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(all_reduce_mean(mean), alpha=1.0 - m)


@torch.no_grad()
def batch_mean(teacher: Sequence[Tensor]) -> Tensor:
    """(1, K) the mean teacher logits over every view (each (B, K)) and sample."""
    return torch.cat([t.detach().float() for t in teacher]).mean(0, keepdim=True)  # (1, K)


# -- collapse monitoring ----------------------------------------------------------------------------


@torch.no_grad()
def collapse_stats(probs: Tensor, *, across_ranks: bool = False) -> dict[str, float]:
    """Collapse statistics of teacher distributions ``probs`` (B, K) (rows sum to 1).

    ``teacher_entropy``: mean entropy of the rows, in nats (0: one-hot; ``log K``: uniform).
    ``kl_to_centre``: mean ``KL(p_i ‖ p̄)`` to the batch's mean distribution ``p̄`` (the mutual
    information between image and output). It is 0 exactly when every image gets the same
    distribution: both ways of collapsing (uniform or one dominant dimension).
    ``max_entropy``: ``log K`` for reference. ``across_ranks``: the statistics of every rank's rows
    together (the same on every rank; every rank must call it, with as many rows).
    """
    p = probs.float().clamp_min(1e-12)  # (B, K)
    entropy = -(p * p.log()).sum(-1).mean()
    mean = p.mean(0, keepdim=True)  # (1, K)
    if across_ranks:
        mean = all_reduce_mean(mean)  # (1, K) the global batch's mean distribution
    kl = (p * (p.log() - mean.log())).sum(-1).mean()
    if across_ranks:
        entropy, kl = all_reduce_mean(torch.stack([entropy, kl])).unbind()
    return {
        "teacher_entropy": entropy.item(),
        "kl_to_centre": max(kl.item(), 0.0),
        "max_entropy": math.log(p.shape[-1]),
    }


class CollapseError(TrainingError):
    """The teacher's outputs no longer depend on the input (DINO collapse); training stops."""


class CollapseMonitor:
    """Raise :class:`CollapseError` when ``kl_to_centre`` stays below ``min_kl`` for ``patience`` checks.

    Checks before ``start`` steps are ignored (a fresh teacher's outputs are nearly equal).
    """

    def __init__(self, min_kl: float, patience: int, start: int = 0) -> None:
        if min_kl < 0 or patience < 1:
            raise ValueError(f"collapse monitor needs min_kl >= 0 and patience >= 1; got {min_kl}, {patience}")
        self.min_kl, self.patience, self.start = min_kl, patience, start
        self.low = 0

    def update(self, step: int, stats: dict[str, float]) -> None:
        """Record one step's :func:`collapse_stats`; raise when the teacher has collapsed."""
        if self.min_kl == 0 or step < self.start:
            return
        self.low = self.low + 1 if stats["kl_to_centre"] < self.min_kl else 0
        if self.low >= self.patience:
            kind = (
                "uniform"
                if stats["teacher_entropy"] > 0.9 * stats["max_entropy"]
                else "one dominant dimension"
                if stats["teacher_entropy"] < 0.1 * stats["max_entropy"]
                else "constant"
            )
            raise CollapseError(
                f"DINO collapse at step {step}: the teacher gives every image the same output ({kind}); "
                f"KL to the centre {stats['kl_to_centre']:.2e} < {self.min_kl:g} for {self.low} steps "
                f"(teacher entropy {stats['teacher_entropy']:.3f} of max {stats['max_entropy']:.3f}). "
                f"Try a lower teacher temperature, a higher centre momentum or a lower learning rate."
            )
