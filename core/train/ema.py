"""Exponential moving averages of weights: a DINO teacher, a diffusion model's EMA weights."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_momentum(step: int, total: int, base: float) -> float:
    """DINO's teacher momentum at ``step`` of ``total``: ``1 - (1 - base)(cos(π step/total) + 1)/2``.

    Starts at ``base``, rises to 1 at ``total`` and stays there afterwards.
    """
    if total <= 0:
        raise ValueError(f"the momentum schedule needs total > 0 steps; got {total}")
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"the base momentum must be in [0, 1]; got {base}")
    progress = min(max(step / total, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``teacher ← m·teacher + (1 − m)·student`` for every parameter (buffers are copied).

    The two modules must have the same parameter names and shapes. ``momentum = 1`` leaves
    the teacher exactly unchanged; ``0`` copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1]; got {momentum}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError(f"teacher and student parameters differ: {sorted(set(t_params) ^ set(s_params))[:5]}")
    if momentum == 1.0:
        return
    for name, t in t_params.items():
        s = s_params[name].detach()
        if t.shape != s.shape:
            raise ValueError(f"teacher {name} has shape {tuple(t.shape)}, the student's is {tuple(s.shape)}")
        t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
    s_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        if name in s_buffers:
            b.copy_(s_buffers[name])


__all__ = ["cosine_momentum", "ema_update_"]
