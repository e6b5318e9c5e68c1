"""Noise schedules: the betas of the forward process q(x_t | x_0) and the conversions between what a
model may predict (the noise ε, the clean sample x0, or the velocity v).

The betas are computed as diffusers computes them (``DDPMScheduler(beta_schedule=...)``) and kept
as float32 tensors; every coefficient is gathered from the float32 ``alphas_cumprod`` and cast to
the sample's dtype before use, the same arithmetic as diffusers, so the two agree to rounding.

Timesteps ``t`` are integers in ``[0, T)``: a Python int or an int64 tensor (B,).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polymodal.config import config, field, in_range, one_of

KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
WEIGHTINGS = ("none", "min_snr")


@config
class ScheduleConfig:
    """The forward (noising) process and what the denoising model predicts."""

    kind: str = field(
        "linear",
        "Beta schedule: 'linear' (DDPM, Ho et al.), 'scaled_linear' (linear in sqrt(beta), latent diffusion) "
        "or 'squaredcos_cap_v2' (the cosine schedule of improved DDPM, betas capped at 0.999).",
        check=one_of(*KINDS),
    )
    timesteps: int = field(
        1000, "T, the number of diffusion steps of training.", check=in_range(1, 100_000, integer=True)
    )
    beta_start: float = field(1e-4, "beta_1 of the linear and scaled-linear schedules.", check=in_range(0.0, 1.0))
    beta_end: float = field(0.02, "beta_T of the linear and scaled-linear schedules.", check=in_range(0.0, 1.0))
    prediction: str = field(
        "epsilon",
        "What the model predicts: 'epsilon' (the noise), 'sample' (x0) or 'v_prediction' (v = sqrt(ab) eps - "
        "sqrt(1 - ab) x0, Salimans & Ho).",
        check=one_of(*PREDICTIONS),
    )


def _cosine_betas(steps: int, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule: beta_t = 1 - abar(t+1)/abar(t), abar(s) = cos²((s/T + 0.008)/1.008 · π/2)."""

    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float32)  # (T,)


class NoiseSchedule:
    """The forward process of one :class:`ScheduleConfig`: ``betas``, ``alphas``, ``alphas_cumprod`` (T,) float32.

    It is never changed by a sampler: respaced sampling reads it at the steps it visits.
    """

    def __init__(self, cfg: ScheduleConfig | None = None):
        """Compute the betas of ``cfg`` (the default config if None)."""
        cfg = cfg if cfg is not None else ScheduleConfig()
        if not isinstance(cfg, ScheduleConfig):
            raise ValueError(f"NoiseSchedule expects a ScheduleConfig; got {type(cfg).__name__}")
        if cfg.kind != "squaredcos_cap_v2" and not 0.0 < cfg.beta_start <= cfg.beta_end < 1.0:
            raise ValueError(
                f"the {cfg.kind} schedule expects 0 < beta_start <= beta_end < 1; "
                f"got beta_start={cfg.beta_start}, beta_end={cfg.beta_end}"
            )
        self.cfg = cfg
        self.T = cfg.timesteps
        if cfg.kind == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, self.T, dtype=torch.float32)  # (T,)
        elif cfg.kind == "scaled_linear":
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, self.T, dtype=torch.float32) ** 2  # (T,)
        else:
            betas = _cosine_betas(self.T)  # (T,)
        self.betas = betas  # (T,) float32
        self.alphas = 1.0 - betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)

    def __repr__(self) -> str:
        """The schedule's kind, T and prediction type."""
        return f"NoiseSchedule(kind={self.cfg.kind!r}, T={self.T}, prediction={self.cfg.prediction!r})"

    @property
    def prediction(self) -> str:
        """What the model predicts (``cfg.prediction``)."""
        return self.cfg.prediction

    def check_timesteps(self, t: Tensor | int) -> Tensor:
        """``t`` as an int64 tensor, refusing values outside ``[0, T)`` or non-integer dtypes."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timesteps must be integers in [0, {self.T}); got a {t.dtype} tensor")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(
                f"timesteps must lie in [0, {self.T}) for this schedule; got min {int(t.min())}, max {int(t.max())}"
            )
        return t.long()

    def alpha_bar(self, t: Tensor | int, like: Tensor) -> Tensor:
        """ᾱ_t in ``like``'s dtype and device, shaped to broadcast over it: (B, 1, …, 1), or 0-d for an int t."""
        t = self.check_timesteps(t)
        ab = self.alphas_cumprod.to(device=like.device)[t.to(like.device)].to(like.dtype)  # (B,) or ()
        if t.dim() == 0:
            return ab
        if t.dim() != 1 or (like.dim() and t.shape[0] not in (1, like.shape[0])):
            raise ValueError(f"timesteps must have shape (B,) with B = {like.shape[0]}; got {tuple(t.shape)}")
        return ab.reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)

    def _check_pair(self, a: Tensor, b: Tensor, names: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{names} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """q(x_t | x_0): ``sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise``."""
        self._check_pair(x0, noise, "x0 and noise")
        ab = self.alpha_bar(t, x0)  # (B, 1, 1, 1)
        return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise  # (B, C, H, W)

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The velocity ``v = sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0``."""
        self._check_pair(x0, noise, "x0 and noise")
        ab = self.alpha_bar(t, x0)  # (B, 1, 1, 1)
        return ab**0.5 * noise - (1 - ab) ** 0.5 * x0  # (B, C, H, W)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """What the model is trained to predict, by ``cfg.prediction``: the noise, x0 or v."""
        if self.prediction == "epsilon":
            self._check_pair(x0, noise, "x0 and noise")
            return noise
        if self.prediction == "sample":
            self._check_pair(x0, noise, "x0 and noise")
            return x0
        return self.velocity(x0, noise, t)

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The predicted x0 from a model output (of ``cfg.prediction``) at ``x_t``."""
        self._check_pair(output, x_t, "the model output and x_t")
        ab = self.alpha_bar(t, x_t)  # (B, 1, 1, 1)
        if self.prediction == "epsilon":
            return (x_t - (1 - ab) ** 0.5 * output) / ab**0.5  # (B, C, H, W)
        if self.prediction == "sample":
            return output
        return ab**0.5 * x_t - (1 - ab) ** 0.5 * output  # (B, C, H, W)

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The predicted noise from a model output (of ``cfg.prediction``) at ``x_t``."""
        self._check_pair(output, x_t, "the model output and x_t")
        ab = self.alpha_bar(t, x_t)  # (B, 1, 1, 1)
        if self.prediction == "epsilon":
            return output
        if self.prediction == "sample":
            return (x_t - ab**0.5 * output) / (1 - ab) ** 0.5  # (B, C, H, W)
        return ab**0.5 * output + (1 - ab) ** 0.5 * x_t  # (B, C, H, W)

    def from_eps(self, eps: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The model output (of ``cfg.prediction``) that corresponds to the noise estimate ``eps`` at ``x_t``."""
        self._check_pair(eps, x_t, "eps and x_t")
        ab = self.alpha_bar(t, x_t)  # (B, 1, 1, 1)
        if self.prediction == "epsilon":
            return eps
        x0 = (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5  # (B, C, H, W)
        if self.prediction == "sample":
            return x0
        return ab**0.5 * eps - (1 - ab) ** 0.5 * x0  # (B, C, H, W)

    def snr(self, t: Tensor | int) -> Tensor:
        """The signal-to-noise ratio ᾱ_t / (1 - ᾱ_t), float32 (computed in float64), shaped like ``t``."""
        t = self.check_timesteps(t)
        ab = self.alphas_cumprod.double()[t]  # (B,)
        return (ab / (1 - ab)).float()  # (B,)

    def loss_weight(self, t: Tensor | int, weighting: str = "none", gamma: float = 5.0) -> Tensor:
        """Per-sample weights (B,) of the MSE on ``cfg.prediction``'s target.

        ``"none"``: ones. ``"min_snr"`` (Hang et al. 2023, Min-SNR-γ): the x0-space weight min(SNR, γ),
        expressed for the target: min(SNR, γ)/SNR for ε, min(SNR, γ) for x0, min(SNR, γ)/(SNR + 1) for v.
        """
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0; got {gamma!r}")
        snr = self.snr(t)  # (B,)
        if weighting == "none":
            return torch.ones_like(snr)
        clipped = snr.clamp(max=gamma)  # (B,)
        if self.prediction == "epsilon":
            return clipped / snr
        if self.prediction == "sample":
            return clipped
        return clipped / (snr + 1)
