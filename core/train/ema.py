"""Exponential moving averages of weights: a DINO teacher, a diffusion model's EMA weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

WARMUPS = ("none", "step", "power")
"""The EMA decay warm-ups :class:`EMAWeights` knows (see :meth:`EMAWeights.decay_at`)."""


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


class EMAWeights:
    """An exponential moving average of a model's trainable parameters: what the trainer keeps when
    ``TrainConfig.ema_decay > 0``, and what a diffusion model samples with.

    The shadow starts as a copy of the parameters that require a gradient when it is built (the ones
    the optimiser trains; frozen parts and buffers are not averaged: at the end the model keeps its
    own buffers, i.e. they are copied). Each :meth:`update`, after an optimiser step, moves every
    shadow tensor ``s ← s − (1 − d)(s − p)`` with the decay ``d`` of :meth:`decay_at` — the update and
    the warm-ups of diffusers' ``EMAModel`` (``update_after_step = start``), so the two agree exactly.
    """

    def __init__(
        self, model: nn.Module, decay: float, *, warmup: str = "step", power: float = 2 / 3, start: int = 0
    ) -> None:
        """Shadow ``model``'s trainable parameters; ``decay`` in (0, 1), ``warmup`` one of :data:`WARMUPS`,
        ``power`` > 0 (for ``"power"``), ``start`` ≥ 0 updates that only copy the weights."""
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be a number in (0, 1); got {decay!r}")
        if warmup not in WARMUPS:
            raise ValueError(f"EMA warmup must be one of {', '.join(map(repr, WARMUPS))}; got {warmup!r}")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0.0 < power < math.inf:
            raise ValueError(f"EMA power must be a number above 0; got {power!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"EMA start must be a whole number >= 0; got {start!r}")
        self.decay, self.warmup, self.power, self.start = float(decay), warmup, float(power), start
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        self.updates = 0

    def decay_at(self, update: int) -> float:
        """The decay of the ``update``-th update (1-based). With ``k = update − start − 1``: 0 (a copy)
        while ``k ≤ 0``; then ``min(decay, w(k))`` where ``w`` is the warm-up: ``"none"``: ``decay``;
        ``"step"``: ``(1 + k)/(10 + k)`` (diffusers' default); ``"power"``: ``1 − (1 + k)^−power``
        (diffusers' ``use_ema_warmup``, ``inv_gamma = 1``)."""
        k = update - self.start - 1
        if k <= 0:
            return 0.0
        if self.warmup == "step":
            value = (1 + k) / (10 + k)
        elif self.warmup == "power":
            value = 1 - (1 + k) ** -self.power
        else:
            value = self.decay
        return min(value, self.decay)

    def _params(self, model: nn.Module) -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise ValueError(
                f"the model has none of the EMA's parameters {missing[:5]}; is it the model it was built on?"
            )
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step from ``model``'s current parameters; returns the decay it used."""
        self.updates += 1
        d = self.decay_at(self.updates)
        params = self._params(model)
        shadow = list(self.shadow.values())
        current = [params[name].detach().to(s.dtype) for name, s in self.shadow.items()]
        if all(type(t) is Tensor for t in shadow + current):  # plain tensors: the same ops, one launch each
            diff = torch._foreach_sub(shadow, current)  # s − p
            torch._foreach_mul_(diff, 1 - d)  # (1 − d)(s − p)
            torch._foreach_sub_(shadow, diff)
        else:  # DTensors (FSDP2) and other subclasses: tensor by tensor
            for s, p in zip(shadow, current):
                s.sub_((1 - d) * (s - p))
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``'s parameters (in place)."""
        params = self._params(model)
        for name, s in self.shadow.items():
            params[name].copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow tensors by parameter name (what a checkpoint stores)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], updates: int, source: str = "the EMA state") -> None:
        """Restore the shadow from :meth:`state_dict` output and the update count; every name and shape
        must match (a ValueError names what differs)."""
        differ = sorted(set(state) ^ set(self.shadow))
        shapes = [n for n in self.shadow if n in state and state[n].shape != self.shadow[n].shape]
        if differ or shapes:
            raise ValueError(
                f"{source} does not fit this model's trainable parameters: names differ {differ[:5]}, "
                f"shapes differ {shapes[:5]}"
            )
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"{source}: the update count must be a whole number >= 0; got {updates!r}")
        for name, s in self.shadow.items():
            s.copy_(state[name])
        self.updates = updates


__all__ = ["WARMUPS", "EMAWeights", "cosine_momentum", "ema_update_"]
