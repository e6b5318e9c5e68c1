"""KL-VAE metrics and the latent scaling factor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polymodal.nn import eval_mode

SCALE_IMAGES = 512
"""Training images whose latents set the scaling factor (the first ones of the split; LDM used one batch)."""

SCALE_SEED = 0
"""Seed of the generator that draws the posterior samples behind the scaling factor and ``latent_std``."""


@torch.no_grad()
def latent_std(model: Any, images: Tensor, batch_size: int = 256) -> float:
    """Std of posterior samples z of ``images`` (N, C, S, S) over all their elements, drawn with a generator seeded
    :data:`SCALE_SEED` (so the same weights and images give the same number)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not len(images):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected a non-empty image batch (N, C, S, S); got {got}")
    g = torch.Generator().manual_seed(SCALE_SEED)
    total, total_sq, count = 0.0, 0.0, 0
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            z = model.encode(images[start : start + batch_size]).sample(g).double()  # (b, L, h, w)
            total += z.sum().item()
            total_sq += z.pow(2).sum().item()
            count += z.numel()
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0) ** 0.5


def training_ended(model: Any) -> bool:
    """False while the trainer is mid-run (an ``eval_every`` evaluation: ``begin_step`` has set a step before the
    last); True once its last step has run, and for a model outside the trainer."""
    return not (model.train_steps and model.train_step + 1 < model.train_steps)


@torch.no_grad()
def evaluate_klvae(model: Any, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
    """Metrics of ``model`` on a split of ``dataset``.

    First, when ``config.scaling_factor`` is 0 (not computed) and training has ended (:func:`training_ended`),
    it is set to 1 / :func:`latent_std` of the first :data:`SCALE_IMAGES` images of the training split, so the
    folder that ``polymodal train`` saves after evaluating carries it; a factor already set (a trained folder, a
    converted VAE) is never changed.

    ``recon_mse``: mean squared error of ``decode(encode(x).mode())`` (clamped to [0, 1]) per pixel and channel;
    ``normalised_recon_mse``: that divided by the split's pixel variance (the variance of all its pixel values
    about their one mean, so 1.0 is the error of predicting the mean pixel everywhere); ``latent_std``: std of the
    split's posterior samples (as :func:`latent_std`); ``scaled_latent_std``: that times the scaling factor (≈ 1
    when the factor generalises to the split); ``scaling_factor``; ``kl``: mean per-image KL(q ‖ N(0, I));
    ``samples``.
    """
    if not model.config.scaling_factor and training_ended(model):
        model.compute_scaling_factor(dataset.split("train")["image"][:SCALE_IMAGES].float(), batch_size)
    with eval_mode(model):
        images = dataset.split(split)["image"].float()  # (N, C, S, S)
        model.check_images(images)
        sq_err, kl = 0.0, 0.0
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]  # (b, C, S, S)
            posterior = model.encode(x)
            recon = model.decode(posterior.mode()).cpu()  # (b, C, S, S)
            sq_err += (recon.double() - x.double()).pow(2).sum().item()
            kl += posterior.kl().double().sum().item()
    mse = sq_err / images.numel()
    variance = images.double().var(unbiased=False).item()
    std = latent_std(model, images, batch_size)
    return {
        "recon_mse": mse,
        "normalised_recon_mse": mse / max(variance, 1e-12),
        "latent_std": std,
        "scaled_latent_std": std * model.config.scaling_factor,
        "scaling_factor": model.config.scaling_factor,
        "kl": kl / len(images),
        "samples": len(images),
    }
