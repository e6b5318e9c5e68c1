"""MoVQ metrics: reconstruction through the quantiser and without it, codebook use."""

from __future__ import annotations

import math
from typing import Any

import torch

from polymodal.nn import eval_mode


@torch.no_grad()
def evaluate_movq(model: Any, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
    """Metrics of ``model`` on a split of ``dataset``.

    ``recon_mse``: mean squared error of ``decode(encode(x))`` — through the quantiser, the honest reconstruction
    of a VQ autoencoder — clamped to [0, 1], per pixel and channel; ``normalised_recon_mse``: that divided by the
    split's pixel variance (the variance of all its pixel values about their one mean, so 1.0 is the error of
    predicting the mean pixel everywhere; the KL-VAE's definition). ``recon_mse_unquantised`` and
    ``normalised_recon_mse_unquantised``: the same for ``decode(encode(x), quantize=False)``, how Kandinsky 2.1
    decodes continuous latents. ``latent_std``: std of the split's continuous latents over all their elements;
    ``codebook_perplexity``: exp of the entropy of code use over the split; ``codes_used``; ``samples``.
    """
    with eval_mode(model):
        images = dataset.split(split)["image"].float()  # (N, C, S, S)
        model.check_images(images)
        counts = torch.zeros(model.codebook_size, dtype=torch.float64)
        sq_err, sq_err_raw, total, total_sq, count = 0.0, 0.0, 0.0, 0.0, 0
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]  # (b, C, S, S)
            latents = model.encode(x)  # (b, L, h, w)
            zq, codes, _ = model.quantize(latents)  # (b, L, h, w), (b, h, w)
            recon = model.decode(zq, quantize=False).cpu().double()  # (b, C, S, S): zq is already quantised
            raw = model.decode(latents, quantize=False).cpu().double()  # (b, C, S, S)
            sq_err += (recon - x.double()).pow(2).sum().item()
            sq_err_raw += (raw - x.double()).pow(2).sum().item()
            counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
            z = latents.double()
            total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    variance = max(images.double().var(unbiased=False).item(), 1e-12)
    mse, mse_raw = sq_err / images.numel(), sq_err_raw / images.numel()
    mean = total / count
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "recon_mse": mse,
        "normalised_recon_mse": mse / variance,
        "recon_mse_unquantised": mse_raw,
        "normalised_recon_mse_unquantised": mse_raw / variance,
        "latent_std": max(total_sq / count - mean * mean, 0.0) ** 0.5,
        "codebook_perplexity": math.exp(entropy),
        "codes_used": int((counts > 0).sum()),
        "samples": len(images),
    }
