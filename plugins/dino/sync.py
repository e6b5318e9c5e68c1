"""DINO's batch statistics over the global batch when training on several ranks.

A rank sees ``batch_size / W`` images of each global batch. Everything DINO computes over the
batch is made global so that W ranks train exactly as one process does:

- :class:`SyncBatchNorm1d` — the head's BatchNorm normalises with the mean and variance of the
  global batch (and updates its running statistics with them); differentiable, so the student's
  gradients are those of one process. PyTorch's ``nn.SyncBatchNorm`` needs CUDA tensors; this one
  runs on any device and backend (gloo on CPU included) through :mod:`polymodal.nn.collectives`.
- the teacher centre's batch mean and the collapse statistics are averaged over ranks
  (:meth:`DINOLoss.update_center <polymodal.plugins.dino.distill.DINOLoss.update_center>`,
  :func:`~polymodal.plugins.dino.distill.collapse_stats` with ``across_ranks=True``).
- :func:`teacher_ema_` — the teacher's EMA step from a student whose parameters FSDP2 has
  sharded (DTensors; the frozen teacher is never sharded).

In one process every piece is the plain local computation (``nn.BatchNorm1d.forward`` itself).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.nn.collectives import all_reduce_sum_with_grad, is_distributed
from polymodal.train import ema_update_

__all__ = ["SyncBatchNorm1d", "teacher_ema_"]


@torch.no_grad()
def teacher_ema_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher ← m·teacher + (1 − m)·student`` (buffers copied): :func:`polymodal.train.ema_update_`, except
    that a student parameter FSDP2 has sharded (a DTensor) is all-gathered first (a collective: every rank
    calls this after every step, as the trainer's ``after_step`` does)."""
    from torch.distributed.tensor import DTensor

    s_params = dict(student.named_parameters())
    if not any(isinstance(p, DTensor) for p in s_params.values()):
        ema_update_(teacher, student, momentum)
        return
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1]; got {momentum}")
    if momentum == 1.0:  # as ema_update_: the teacher stays exactly as it is
        return
    for name, t in teacher.named_parameters():
        s = s_params[name].detach()
        s = s.full_tensor() if isinstance(s, DTensor) else s
        t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
    s_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        if name in s_buffers:
            b.copy_(s_buffers[name])


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training-mode statistics are those of the global batch across ranks.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d`` (folders saved with it
    load unchanged). In evaluation mode, or in one process, it is exactly ``nn.BatchNorm1d``.
    With a process group every rank must call it (same layer, same order) while training, with
    inputs (B_local, C) or (B_local, C, L); B_local may differ between ranks.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0,) if x.dim() == 2 else (0, 2)
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # (B, C) or (B, C, L), at least float32
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device, dtype=xf.dtype)  # (1,) local rows
        total = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), count]))  # (C + 1,) sums over every rank
        n = total[-1].detach()  # global rows per channel
        mean = total[:-1] / n  # (C,)
        centred = xf - mean.view(shape)  # (B, C[, L])
        sq = all_reduce_sum_with_grad(centred.pow(2).sum(dims))  # (C,)
        var = sq / n  # (C,) biased, for normalising (as BatchNorm does)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                unbiased = sq.detach() / (n - 1).clamp(min=1)  # (C,)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        y = centred * torch.rsqrt(var + self.eps).view(shape)  # (B, C[, L])
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)
