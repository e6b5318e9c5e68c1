"""Guidance for diffusion sampling: classifier-free (Ho & Salimans) and classifier guidance (ADM).

Both wrap a model function and return a new ``model_fn(x_t, t) -> output`` that any sampler steps
with, so a family composes guidance without the samplers knowing about it:

* :func:`cfg_model` runs the conditional and the unconditional (null-condition) inputs in **one**
  batched call on ``[x, x]`` and returns ``out_u + w · (out_c − out_u)``;
* :func:`classifier_guided` shifts the noise estimate by the gradient of a noisy, time-conditioned
  classifier, ``ε̂ = ε − sqrt(1 − ᾱ_t) · s · ∇ₓ log p(y | x_t)`` (Dhariwal & Nichol 2021, the ε form of
  their Algorithm 2, which works with DDPM and DDIM alike).

A model that learns its variance (improved DDPM) outputs ``2C`` channels for a ``C``-channel image:
only the first ``C`` (the mean part) are guided, the variance half is the conditional one, as GLIDE
and diffusers do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]
CondModelFn = Callable[[Tensor, Tensor, dict], Tensor]

__all__ = [
    "classifier_free",
    "classifier_guided",
    "cfg_model",
    "combine_guidance",
    "double_condition",
    "reconstruction_guided",
]


def _check_scale(scale: float, what: str) -> float:
    """``scale`` as a float, refusing NaN and infinities."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number; got {scale!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be a finite number; got {scale!r}")
    return value


def _alpha_bar(alphas_cumprod: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """ᾱ_t for each sample of ``x`` as float64, shaped to broadcast over it: (B, 1, 1, 1)."""
    ab = alphas_cumprod.to(device=x.device, dtype=torch.float64)[t.long()]  # (B,)
    return ab.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)


def _split_mean(out: Tensor, x: Tensor, learned_variance: bool | None) -> tuple[Tensor, Tensor | None]:
    """Split a model output into the guided part and the learned-variance part (or None).

    ``learned_variance=None`` infers it: an output with twice the sample's channels carries a variance.
    """
    if learned_variance is None:
        learned_variance = out.shape[1] == 2 * x.shape[1]
    if not learned_variance:
        return out, None
    c = x.shape[1]
    if out.shape[1] != 2 * c:
        raise ValueError(
            f"a learned-variance output must have 2 × {c} channels for a {c}-channel sample; "
            f"got {out.shape[1]} channels (output shape {tuple(out.shape)})"
        )
    return out[:, :c], out[:, c:]  # (B, C, H, W) each


def combine_guidance(
    out_c: Tensor, out_u: Tensor, scale: float, x: Tensor | None = None, learned_variance: bool | None = None
) -> Tensor:
    """Classifier-free combination ``out_u + scale · (out_c − out_u)`` of two model outputs.

    ``scale == 1`` returns ``out_c`` and ``scale == 0`` returns ``out_u`` exactly. With ``x`` (the
    sample, to count its channels) a learned-variance output (2C channels) is guided on its first C
    channels only and keeps the conditional variance half.
    """
    if out_c.shape != out_u.shape:
        raise ValueError(
            f"conditional and unconditional outputs must have the same shape; got {tuple(out_c.shape)} "
            f"and {tuple(out_u.shape)}"
        )
    scale = _check_scale(scale, "guidance scale")
    if scale == 1:
        return out_c
    if scale == 0:
        return out_u
    if x is None:
        return out_u + scale * (out_c - out_u)  # (B, C, H, W)
    mean_c, var_c = _split_mean(out_c, x, learned_variance)
    mean_u, _ = _split_mean(out_u, x, learned_variance)
    guided = mean_u + scale * (mean_c - mean_u)  # (B, C, H, W)
    return guided if var_c is None else torch.cat([guided, var_c], dim=1)  # (B, 2C, H, W)


def _expand(value: Tensor, batch: int, key: str, which: str) -> Tensor:
    """``value`` with a batch of ``batch`` (a batch of 1 is broadcast)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{which}[{key!r}] must be a tensor; got {type(value).__name__}")
    if value.dim() == 0:
        raise ValueError(f"{which}[{key!r}] must have a batch dimension; got a 0-d tensor")
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"{which}[{key!r}] must have batch {batch} or 1; got shape {tuple(value.shape)}")


def double_condition(cond: Mapping[str, Tensor], null_cond: Mapping[str, Tensor], batch: int) -> dict[str, Tensor]:
    """The condition for a doubled batch ``[x, x]``: ``cond`` then ``null_cond``, concatenated on dim 0.

    Both must name the same keys (labels (B,), embeddings (B, D), context (B, N, D), masks (B, N) …)
    with the same shape after the batch; a batch of 1 is broadcast to ``batch``.
    """
    if set(cond) != set(null_cond):
        raise ValueError(
            f"the condition and the null condition must name the same inputs; got {sorted(cond)} "
            f"and {sorted(null_cond)}"
        )
    out = {}
    for key in cond:
        c = _expand(cond[key], batch, key, "cond")  # (B, ...)
        u = _expand(null_cond[key], batch, key, "null_cond")  # (B, ...)
        if c.shape[1:] != u.shape[1:] or c.dtype != u.dtype:
            raise ValueError(
                f"cond[{key!r}] and null_cond[{key!r}] must match after the batch: expected shape "
                f"{tuple(c.shape[1:])} {c.dtype}, got {tuple(u.shape[1:])} {u.dtype}"
            )
        out[key] = torch.cat([c, u.to(c.device)], dim=0)  # (2B, ...)
    return out


def classifier_free(model_fn: CondModelFn, scale: float, *, learned_variance: bool | None = None):
    """Classifier-free guidance over a conditional model ``model_fn(x_t, t, cond) -> output``.

    Returns ``guided(x_t, t, cond, null_cond) -> output``: one batched call on ``[x_t, x_t]`` with
    ``cond`` and ``null_cond`` concatenated (:func:`double_condition`), then
    ``out_u + scale · (out_c − out_u)`` (:func:`combine_guidance`). At ``scale == 1`` only the
    conditional half is run, at ``scale == 0`` only the unconditional half (the same result, half the
    work). ``learned_variance`` (None: inferred from 2C output channels) guides the mean half only.
    """
    scale = _check_scale(scale, "guidance scale")

    def guided(x: Tensor, t: Tensor, cond: Mapping[str, Tensor], null_cond: Mapping[str, Tensor]) -> Tensor:
        b = x.shape[0]
        t = t.expand(b) if t.dim() == 1 and t.shape[0] == 1 else t  # (B,)
        if scale == 1:
            return model_fn(x, t, {k: _expand(v, b, k, "cond") for k, v in cond.items()})
        if scale == 0:
            return model_fn(x, t, {k: _expand(v, b, k, "null_cond") for k, v in null_cond.items()})
        both = double_condition(cond, null_cond, b)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, C', H, W)
        if out.shape[0] != 2 * b:
            raise ValueError(f"the model must return one output per input: expected batch {2 * b}, got {out.shape[0]}")
        out_c, out_u = out[:b], out[b:]  # (B, C', H, W) each
        return combine_guidance(out_c, out_u, scale, x, learned_variance)

    return guided


def cfg_model(
    model_fn: CondModelFn,
    cond: Mapping[str, Tensor],
    null_cond: Mapping[str, Tensor],
    scale: float,
    *,
    learned_variance: bool | None = None,
) -> ModelFn:
    """A guided ``model_fn(x_t, t) -> output`` for samplers: :func:`classifier_free` with a fixed condition.

    ``cond`` holds the condition for the batch being sampled (or a batch of 1 for all), ``null_cond``
    the "no condition" input the model was trained with under condition dropout (a null label, an
    empty caption's context …). ``scale`` is w: 1 is the plain conditional model, 0 the unconditional.
    """
    guided = classifier_free(model_fn, scale, learned_variance=learned_variance)
    cond, null_cond = dict(cond), dict(null_cond)
    if set(cond) != set(null_cond):
        raise ValueError(
            f"the condition and the null condition must name the same inputs; got {sorted(cond)} "
            f"and {sorted(null_cond)}"
        )

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return guided(x, t, cond, null_cond)

    return fn


def classifier_guided(
    model_fn: ModelFn,
    schedule,
    classifier_fn: Callable[[Tensor, Tensor], Tensor],
    labels: Tensor,
    scale: float,
    *,
    learned_variance: bool | None = None,
) -> ModelFn:
    """ADM classifier guidance: a ``model_fn(x_t, t)`` whose noise estimate follows ``∇ log p(y | x_t)``.

    ``classifier_fn(x_t, t) -> logits (B, K)`` is a classifier trained on noisy samples at timestep
    ``t``; ``labels`` (B,) or (1,) the wanted classes. The model's output is converted to a noise
    estimate (``schedule.to_eps``), shifted as ``ε̂ = ε − sqrt(1 − ᾱ_t) · scale · ∇ₓ log p(y | x_t)``
    and converted back (``schedule.from_eps``), so ε-, x0- and v-prediction models all work. The
    gradient is taken under ``torch.enable_grad()`` even when sampling runs in ``no_grad``; the
    classifier's parameters get no gradient. ``scale == 0`` returns the model unchanged.
    """
    scale = _check_scale(scale, "classifier guidance scale")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be an integer tensor of shape (B,); got "
            f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if scale == 0:
        return model_fn
    alphas_cumprod = schedule.alphas_cumprod

    def grad_log_prob(x: Tensor, t: Tensor) -> Tensor:
        """∇ₓ log p(y | x_t) for each sample (B, C, H, W)."""
        y = _expand(labels, x.shape[0], "labels", "classifier guidance")  # (B,)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # (B, C, H, W)
            logits = classifier_fn(xg, t)  # (B, K)
            if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the classifier must return logits (B, K) with B = {x.shape[0]}; got {tuple(logits.shape)}"
                )
            if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
                raise ValueError(
                    f"labels must lie in [0, {logits.shape[1]}) for a {logits.shape[1]}-class classifier; "
                    f"got {y.tolist()}"
                )
            log_p = torch.log_softmax(logits.float(), dim=-1)  # (B, K)
            picked = log_p.gather(1, y.to(logits.device)[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, xg)  # (B, C, H, W)
        return grad.to(x.dtype)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 1 and t.shape[0] == 1 else t  # (B,)
        out = model_fn(x, t)  # (B, C', H, W)
        mean, var = _split_mean(out, x, learned_variance)
        eps = schedule.to_eps(mean, x, t)  # (B, C, H, W)
        sigma = (1.0 - _alpha_bar(alphas_cumprod, t, x)).sqrt().to(x.dtype)  # (B, 1, 1, 1)
        eps = eps - sigma * scale * grad_log_prob(x, t)  # (B, C, H, W)
        guided = schedule.from_eps(eps, x, t)  # (B, C, H, W)
        return guided if var is None else torch.cat([guided, var], dim=1)  # (B, 2C, H, W)

    return fn


def reconstruction_guided(
    model_fn: ModelFn,
    schedule,
    known: Tensor,
    mask: Tensor,
    scale: float,
    *,
    learned_variance: bool | None = None,
) -> ModelFn:
    """Reconstruction guidance for inpainting: the noise estimate follows the known pixels.

    Ho et al. (Video Diffusion Models, 2022) and Chung et al. (Improving Diffusion Models for Inverse
    Problems, 2022): with the loss ``L = Σ mask · (x̂0(x_t) − known)²`` the noise estimate becomes
    ``ε̂ = ε + scale · ᾱ_t / sqrt(1 − ᾱ_t) · ∇ₓ L`` (the gradient runs through the model), so the
    predicted x0 moves by about ``−scale · ∂L/∂x̂0``, the same size at every noise level. It complements
    RePaint's replacement of the known region (:func:`polymodal.diffusion.loop.sample` with ``known`` and
    ``mask``): replacement fixes the known pixels, the gradient makes the generated ones agree with them.
    ``known`` (B or 1, C, H, W) in [-1, 1], ``mask`` (B or 1, 1 or C, H, W), True or 1 = known.
    ``scale == 0`` returns the model unchanged.
    """
    scale = _check_scale(scale, "reconstruction guidance scale")
    if scale == 0:
        return model_fn
    alphas_cumprod = schedule.alphas_cumprod
    weight = mask.to(known.dtype)  # (B or 1, 1 or C, H, W)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 1 and t.shape[0] == 1 else t  # (B,)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # (B, C, H, W)
            out = model_fn(xg, t)  # (B, C', H, W)
            mean, var = _split_mean(out, xg, learned_variance)
            x0 = schedule.to_x0(mean, xg, t)  # (B, C, H, W)
            loss = ((x0 - known.to(x0)) ** 2 * weight.to(x0)).sum()
            (grad,) = torch.autograd.grad(loss, xg)  # (B, C, H, W)
        ab = _alpha_bar(alphas_cumprod, t, x)  # (B, 1, 1, 1)
        step = (ab / (1.0 - ab).sqrt()).to(x.dtype)  # (B, 1, 1, 1)
        eps = schedule.to_eps(mean.detach(), x, t) + scale * step * grad  # (B, C, H, W)
        guided = schedule.from_eps(eps, x, t)  # (B, C, H, W)
        return guided if var is None else torch.cat([guided, var.detach()], dim=1)  # (B, 2C, H, W)

    return fn
