"""Diffusion samplers: small objects that step ``x_t → x_{t_prev}`` from one model output.

``DDPMSampler`` is the ancestral sampler of Ho et al. (fixed-small / fixed-large variance, or
improved DDPM's learned range), ``DDIMSampler`` the implicit sampler of Song et al. (η, respaced
timesteps, inversion). Each ``step`` is the same function as diffusers' ``DDPMScheduler.step`` /
``DDIMScheduler.step`` for the same options; the coefficients are computed in the same order from
the schedule's float32 ``alphas_cumprod``. A sampler reads its :class:`NoiseSchedule` and never
changes it. They register as the ``diffusion_sampler`` kind ("ddpm", "ddim"); build one with
:func:`make_sampler`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from polymodal.config import config, evolve, field, in_range, one_of
from polymodal.diffusion.schedule import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


@config
class SamplerConfig:
    """How a diffusion sampler walks the schedule back from noise."""

    name: str = field(
        "ddpm", "The sampler, a registered diffusion_sampler: 'ddpm' (ancestral), 'ddim' (implicit) or a plugin's."
    )
    steps: int = field(
        0,
        "Steps to visit: 0 = all T (DDPM) or min(50, T) (DDIM); at most T. Never changes the stored schedule.",
        check=in_range(0, 100_000, integer=True),
    )
    eta: float = field(0.0, "DDIM's η: 0 is deterministic, 1 has DDPM's posterior variance.", check=in_range(0.0, 10.0))
    spacing: str = field(
        "leading",
        "How respaced timesteps are chosen: 'leading' (0, k, 2k, … + steps_offset), 'trailing' (from T-1 down) or "
        "'linspace' (evenly over [0, T-1], rounded), as diffusers' timestep_spacing.",
        check=one_of(*SPACINGS),
    )
    steps_offset: int = field(
        0, "Added to 'leading' timesteps (diffusers' steps_offset).", check=in_range(0, 1000, integer=True)
    )
    variance: str = field(
        "fixed_small",
        "DDPM variance: 'fixed_small' (the posterior's β̃_t), 'fixed_large' (β_t) or 'learned_range' "
        "(improved DDPM: the model outputs 2C channels, the second C interpolating log β̃_t … log β_t).",
        check=one_of(*VARIANCES),
    )
    clip_sample: bool = field(True, "Clip the predicted x0 to [-clip_range, clip_range] (static clipping).")
    clip_range: float = field(1.0, "The static clipping bound.", check=in_range(0.0, 1e6))
    thresholding: bool = field(
        False, "Imagen's dynamic thresholding of the predicted x0 (replaces static clipping when on)."
    )
    threshold_ratio: float = field(
        0.995, "The percentile of |x0| (per sample) used as the threshold s.", check=in_range(0.0, 1.0)
    )
    threshold_max: float = field(
        1.0, "The largest threshold s (clamped to [1, threshold_max]).", check=in_range(1.0, 1e6)
    )
    set_alpha_to_one: bool = field(True, "DDIM's final step goes to ᾱ = 1 (else to ᾱ_0).")


class StepOutput(NamedTuple):
    """One sampler step: ``prev`` the sample at the previous timestep, ``x0`` the (clipped) predicted x0."""

    prev: Tensor
    x0: Tensor


def spaced_timesteps(T: int, steps: int, spacing: str, offset: int = 0) -> Tensor:
    """The ``steps`` timesteps (descending, int64) a respaced sampler visits, as diffusers' ``set_timesteps``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= T:
        raise ValueError(f"steps must be an integer in [1, T={T}] (the trained number of timesteps); got {steps!r}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    if ts.max() >= T:
        raise ValueError(f"steps_offset={offset} puts timestep {int(ts.max())} beyond T - 1 = {T - 1}")
    return torch.from_numpy(ts.copy())  # (S,)


def threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding: s = the ``ratio`` percentile of |x0| per sample, clamped to
    [1, ``max_value``]; x0 is clipped to [-s, s] and divided by s."""
    dtype = x0.dtype
    b = x0.shape[0]
    flat = x0.float() if dtype not in (torch.float32, torch.float64) else x0
    flat = flat.reshape(b, -1)  # (B, C*H*W)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)  # (B, C, H, W)


class _Sampler:
    """Shared parts: the schedule, the config, the visited timesteps, x0 prediction and clipping."""

    name = ""
    config_class = SamplerConfig

    def __init__(self, schedule: NoiseSchedule, cfg: SamplerConfig | None = None):
        """A sampler over ``schedule`` (read, never changed) with the options of ``cfg``."""
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"a diffusion sampler expects a NoiseSchedule; got {type(schedule).__name__}")
        cfg = cfg if cfg is not None else SamplerConfig(name=self.name)
        if not isinstance(cfg, SamplerConfig):
            raise ValueError(f"a diffusion sampler expects a SamplerConfig; got {type(cfg).__name__}")
        if cfg.steps > schedule.T:
            raise ValueError(f"steps must be at most the trained T={schedule.T}; got {cfg.steps}")
        self.schedule = schedule
        self.cfg = cfg
        self.T = schedule.T
        self.alphas_cumprod = schedule.alphas_cumprod  # (T,) float32, the schedule's own tensor

    def __repr__(self) -> str:
        """The sampler's name, its number of steps and the schedule."""
        return f"{type(self).__name__}(steps={len(self.timesteps)}, {self.schedule!r})"

    def _check_t(self, t: int | Tensor) -> int:
        t = int(t) if isinstance(t, (int, np.integer)) or (isinstance(t, Tensor) and t.numel() == 1) else t
        if not isinstance(t, int) or not 0 <= t < self.T:
            raise ValueError(f"step expects one integer timestep in [0, {self.T}); got {t!r}")
        return t

    def _split(self, output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """The model output's prediction and, for a 2C-channel output, its variance channels."""
        c = x_t.shape[1]
        if output.dim() == x_t.dim() and output.shape[1] == 2 * c and output.shape[2:] == x_t.shape[2:]:
            return output[:, :c], output[:, c:]
        if output.shape != x_t.shape:
            raise ValueError(
                f"the model output must have the sample's shape {tuple(x_t.shape)} (or 2C channels for a learned "
                f"variance); got {tuple(output.shape)}"
            )
        return output, None

    def _x0_eps(self, output: Tensor, x_t: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
        """The predicted x0 and noise from ``output`` at ᾱ_t = ``ab`` (0-d float32), as diffusers computes them."""
        bp = 1 - ab
        pred = self.schedule.prediction
        if pred == "epsilon":
            x0, eps = (x_t - bp**0.5 * output) / ab**0.5, output  # (B, C, H, W)
        elif pred == "sample":
            x0, eps = output, (x_t - ab**0.5 * output) / bp**0.5  # (B, C, H, W)
        else:
            x0, eps = ab**0.5 * x_t - bp**0.5 * output, ab**0.5 * output + bp**0.5 * x_t  # (B, C, H, W)
        return x0, eps

    def _clip(self, x0: Tensor) -> Tensor:
        if self.cfg.thresholding:
            return threshold(x0, self.cfg.threshold_ratio, self.cfg.threshold_max)
        if self.cfg.clip_sample:
            return x0.clamp(-self.cfg.clip_range, self.cfg.clip_range)
        return x0


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling; with ``steps`` < T the respaced chain of diffusers' ``set_timesteps``."""

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, cfg: SamplerConfig | None = None):
        """See :class:`_Sampler`; ``cfg.steps`` = 0 visits every timestep T-1 … 0."""
        super().__init__(schedule, cfg)
        self.respaced = self.cfg.steps not in (0,)
        if self.respaced:
            self.timesteps = spaced_timesteps(self.T, self.cfg.steps, self.cfg.spacing, self.cfg.steps_offset)
        else:
            self.timesteps = torch.arange(self.T - 1, -1, -1, dtype=torch.long)  # (T,)
        self._next = {int(a): int(b) for a, b in zip(self.timesteps[:-1], self.timesteps[1:])}

    def previous(self, t: int) -> int:
        """The timestep visited after ``t`` (-1 after the last one)."""
        t = self._check_t(t)
        if not self.respaced:
            return t - 1
        if t not in self._next and t != int(self.timesteps[-1]):
            raise ValueError(f"timestep {t} is not one of this sampler's {len(self.timesteps)} respaced timesteps")
        return self._next.get(t, -1)

    def step(self, output: Tensor, t: int, x_t: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        """x_{t_prev} ~ p(x_{t_prev} | x_t): the posterior mean at the predicted x0 plus the chosen variance."""
        t = self._check_t(t)
        prev = self.previous(t)
        output, var_out = self._split(output, x_t)
        if self.cfg.variance == "learned_range" and var_out is None:
            raise ValueError(
                f"variance 'learned_range' expects a model output of 2C = {2 * x_t.shape[1]} channels; "
                f"got {output.shape[1]}"
            )
        ab = self.alphas_cumprod[t]  # ()
        ab_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)  # ()
        bp, bp_prev = 1 - ab, 1 - ab_prev
        alpha_t = ab / ab_prev
        beta_t = 1 - alpha_t
        x0, _ = self._x0_eps(output, x_t, ab)
        x0 = self._clip(x0)  # (B, C, H, W)
        mean = (ab_prev**0.5 * beta_t) / bp * x0 + alpha_t**0.5 * bp_prev / bp * x_t  # (B, C, H, W)
        if t == 0:
            return StepOutput(mean, x0)
        noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)  # (B, C, H, W)
        small = torch.clamp(bp_prev / bp * beta_t, min=1e-20)  # () the posterior variance β̃_t
        if self.cfg.variance == "fixed_small":
            return StepOutput(mean + small**0.5 * noise, x0)
        if self.cfg.variance == "fixed_large":
            return StepOutput(mean + beta_t**0.5 * noise, x0)
        frac = (var_out + 1) / 2  # (B, C, H, W) in [0, 1] for outputs in [-1, 1]
        log_var = frac * torch.log(beta_t) + (1 - frac) * torch.log(small)  # (B, C, H, W)
        return StepOutput(mean + torch.exp(0.5 * log_var) * noise, x0)


class DDIMSampler(_Sampler):
    """DDIM (Song et al.): deterministic at η = 0, over ``steps`` respaced timesteps; inversion with ``invert_step``."""

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, cfg: SamplerConfig | None = None):
        """See :class:`_Sampler`; ``cfg.steps`` = 0 means min(50, T) steps."""
        super().__init__(schedule, cfg)
        self.steps = self.cfg.steps or min(50, self.T)
        self.timesteps = spaced_timesteps(self.T, self.steps, self.cfg.spacing, self.cfg.steps_offset)  # (S,)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def previous(self, t: int) -> int:
        """``t - T // steps``, as diffusers' DDIMScheduler (the next visited timestep for 'leading' spacing;
        for 'trailing' and 'linspace' a step of the same size); negative means the final ᾱ."""
        return self._check_t(t) - self.T // self.steps

    def step(self, output: Tensor, t: int, x_t: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        """x_{t_prev} = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev - σ²) ε + σ z, with σ = η · sqrt(β̃)."""
        t = self._check_t(t)
        prev = self.previous(t)
        output, _ = self._split(output, x_t)
        ab = self.alphas_cumprod[t]  # ()
        ab_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod  # ()
        x0, eps = self._x0_eps(output, x_t, ab)
        x0 = self._clip(x0)  # (B, C, H, W)
        variance = ((1 - ab_prev) / (1 - ab)) * (1 - ab / ab_prev)  # ()
        std = self.cfg.eta * variance**0.5  # ()
        x_prev = ab_prev**0.5 * x0 + (1 - ab_prev - std**2) ** 0.5 * eps  # (B, C, H, W)
        if self.cfg.eta > 0:
            noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)
            x_prev = x_prev + std * noise  # (B, C, H, W)
        return StepOutput(x_prev, x0)

    def next_visited(self, t: int) -> int:
        """The visited timestep just above ``t`` (the next, noisier one for inversion)."""
        t = self._check_t(t)
        above = [int(s) for s in self.timesteps if int(s) > t]
        if not above:
            raise ValueError(f"timestep {t} has no visited timestep above it (the highest is {int(self.timesteps[0])})")
        return min(above)

    def invert_step(self, output: Tensor, t: int, x_t: Tensor) -> Tensor:
        """DDIM inversion: the η = 0 update run towards noise, from ``x_t`` at ``t`` to the next visited timestep
        above it, with the model output at ``t`` (x0 and ε estimated at t; no clipping)."""
        t = self._check_t(t)
        up = self.next_visited(t)
        output, _ = self._split(output, x_t)
        ab, ab_up = self.alphas_cumprod[t], self.alphas_cumprod[up]  # ()
        x0, eps = self._x0_eps(output, x_t, ab)
        return ab_up**0.5 * x0 + (1 - ab_up) ** 0.5 * eps  # (B, C, H, W)


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def make_sampler(schedule: NoiseSchedule, cfg: SamplerConfig | None = None, **overrides):
    """A sampler over ``schedule``: ``cfg`` (default: ``SamplerConfig()``) with ``overrides`` applied.

    The class is looked up among the registered ``diffusion_sampler`` kind when a registry is loaded
    (so plugins can add samplers), else among the built-in ddpm and ddim.
    """
    cfg = cfg if cfg is not None else SamplerConfig()
    if not isinstance(cfg, SamplerConfig):
        raise ValueError(f"make_sampler expects a SamplerConfig; got {type(cfg).__name__}")
    if overrides:
        cfg = evolve(cfg, **overrides)
    cls = SAMPLERS.get(cfg.name)
    if cls is None:
        from polymodal.registry import get_registry

        known = get_registry().names("diffusion_sampler")
        if cfg.name not in known:
            raise ValueError(f"sampler name must be one of {sorted(known)}; got {cfg.name!r}")
        cls = get_registry().get("diffusion_sampler", cfg.name)
    return cls(schedule, cfg)
