"""The ``diffusion`` objective: the MSE of a denoising model on its schedule's target (L_simple of Ho et
al.), with optional Min-SNR weighting, and improved DDPM's hybrid loss ``L_simple + λ L_vlb`` for a
model that also outputs its variance (Nichol & Dhariwal).

Images are in [-1, 1]; the discretized decoder likelihood at t = 0 uses 256 bins over that range.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from polymodal.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: Tensor) -> Tensor:
    """A fast approximation of the standard normal CDF (as the ADM / improved-DDPM reference code)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log p(x) in nats, elementwise, of images in [-1, 1] quantised to 256 levels under N(mean, e^{2 log_scale});
    the first and last bins extend to ∓∞."""
    centered = x - mean  # (B, C, H, W)
    inv_std = torch.exp(-log_scale)  # (B, C, H, W)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))  # (B, C, H, W)
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))  # (B, C, H, W)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs  # (B, C, H, W)


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` in ``like``'s dtype, shaped (B, 1, …, 1)."""
    return values.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def posterior(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_{t-1} | x_t, x_0): its mean, the fixed-small log variance log β̃_t (clipped: β̃_0 := β̃_1, as
    improved DDPM) and log β_t, each (B, 1, 1, 1) or (B, C, H, W). Computed in float64, cast to x0's dtype."""
    ab = schedule.alphas_cumprod.double()  # (T,)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])  # (T,)
    betas = 1 - ab / ab_prev  # (T,)
    var = betas * (1 - ab_prev) / (1 - ab)  # (T,)
    log_var = torch.log(torch.cat([var[1:2], var[1:]]) if len(var) > 1 else betas)  # (T,)
    coef_x0 = betas * ab_prev.sqrt() / (1 - ab)  # (T,)
    coef_xt = (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)  # (T,)
    mean = _gather(coef_x0, t, x0) * x0 + _gather(coef_xt, t, x0) * x_t  # (B, C, H, W)
    return mean, _gather(log_var, t, x0), _gather(torch.log(betas), t, x0)


def vlb_terms(schedule: NoiseSchedule, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The per-sample variational bound term L_t in bits per dimension (B,): the KL of q(x_{t-1} | x_t, x0)
    from the model's p(x_{t-1} | x_t) for t > 0, the discretized decoder NLL at t = 0. ``output`` is
    (B, 2C, H, W): the prediction and improved DDPM's variance interpolation v ∈ [-1, 1]."""
    c = x0.shape[1]
    pred, v = output[:, :c], output[:, c:]  # (B, C, H, W) each
    true_mean, min_log, max_log = posterior(schedule, x0, x_t, t)
    frac = (v + 1) / 2  # (B, C, H, W)
    model_log_var = frac * max_log + (1 - frac) * min_log  # (B, C, H, W)
    model_mean, _, _ = posterior(schedule, schedule.to_x0(pred, x_t, t), x_t, t)  # (B, C, H, W)
    kl = normal_kl(true_mean, min_log.expand_as(x0), model_mean, model_log_var)  # (B, C, H, W)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_log_var)  # (B, C, H, W)
    per = torch.where((t == 0).reshape(-1, *([1] * (x0.dim() - 1))), nll, kl)  # (B, C, H, W)
    return per.flatten(1).mean(dim=1) / math.log(2.0)  # (B,)


def diffusion_loss(
    schedule: NoiseSchedule,
    model_fn: ModelFn,
    x0: Tensor,
    *,
    noise: Tensor | None = None,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    weighting: str = "none",
    gamma: float = 5.0,
    learned_variance: bool = False,
    vlb_weight: float = 0.001,
) -> tuple[Tensor, dict[str, float]]:
    """The denoising loss of ``model_fn(x_t, t)`` on clean images ``x0`` (B, C, H, W) in [-1, 1].

    ``t`` (B,) defaults to uniform draws in [0, T) and ``noise`` to standard normal draws (both from
    ``generator``); x_t = q(x_t | x0). The loss is the per-sample MSE against ``schedule.target``,
    weighted by ``schedule.loss_weight(t, weighting, gamma)`` and averaged. With ``learned_variance``
    the model outputs (B, 2C, H, W) and the hybrid loss adds ``vlb_weight · T · L_t`` (the
    uniform-t estimate of λ·L_vlb; with T = 1000 it is improved DDPM's ``mse + vb``), where L_t sees
    the predicted mean through a stop-gradient so it trains only the variance.
    Returns ``(loss, {"mse": …, "vlb": …})``.
    """
    if not isinstance(x0, Tensor) or x0.dim() < 2 or not x0.is_floating_point():
        got = f"{x0.dtype} tensor of shape {tuple(x0.shape)}" if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a float (B, C, …) tensor; got {got}")
    b = x0.shape[0]
    if t is None:
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(0, schedule.T, (b,), generator=generator, device=dev).to(x0.device)  # (B,)
    t = schedule.check_timesteps(t).to(x0.device)
    if t.shape != (b,):
        raise ValueError(f"t must have shape ({b},); got {tuple(t.shape)}")
    if noise is None:
        dev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=dev).to(x0.device)  # (B, C, H, W)
    x_t = schedule.add_noise(x0, noise, t)  # (B, C, H, W)
    output = model_fn(x_t, t)  # (B, C or 2C, H, W)
    c = x0.shape[1]
    want = 2 * c if learned_variance else c
    if output.shape != (b, want, *x0.shape[2:]):
        raise ValueError(
            f"the model output must have shape {(b, want, *x0.shape[2:])} "
            f"({'2C channels: prediction and variance' if learned_variance else 'the image shape'}); "
            f"got {tuple(output.shape)}"
        )
    pred = output[:, :c]  # (B, C, H, W)
    target = schedule.target(x0, noise, t)  # (B, C, H, W)
    mse = (pred - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    weight = schedule.loss_weight(t, weighting, gamma).to(mse)  # (B,)
    loss = (weight * mse).mean()
    metrics = {"mse": float(mse.mean().detach())}
    if learned_variance:
        frozen = torch.cat([pred.detach(), output[:, c:]], dim=1)  # (B, 2C, H, W): stop-gradient on the mean
        vlb = vlb_terms(schedule, frozen, x0, x_t, t)  # (B,)
        loss = loss + vlb_weight * schedule.T * vlb.mean()
        metrics["vlb"] = float(vlb.mean().detach())
    return loss, metrics
