"""VQ-VAE metrics: reconstruction error and codebook use."""

from __future__ import annotations

import math
from typing import Any

import torch

from polymodal.nn import eval_mode


@torch.no_grad()
def evaluate_vqvae(model: Any, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
    """Metrics of ``model`` on a split of ``dataset``.

    ``recon_mse`` mean squared error of ``decode(encode(x))`` per pixel and channel;
    ``recon_mse_normalized`` that divided by the split's pixel variance (1.0 = predicting the
    mean pixel); ``codebook_perplexity`` exp of the entropy of code usage over the split;
    ``codes_used`` distinct codes used; ``samples``.
    """
    with eval_mode(model):
        images = dataset.split(split)["image"].float()  # (N, C, H, W)
        model.check_images(images)
        counts = torch.zeros(model.codebook_size, dtype=torch.float64)
        sq_err = 0.0
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]  # (b, C, H, W)
            codes = model.encode(x)  # (b, h, w)
            recon = model.decode(codes).cpu()  # (b, C, H, W)
            sq_err += (recon.double() - x.double()).pow(2).sum().item()
            counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
    mse = sq_err / images.numel()
    variance = images.double().var(unbiased=False).item()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "recon_mse": mse,
        "recon_mse_normalized": mse / max(variance, 1e-12),
        "codebook_perplexity": math.exp(entropy),
        "codes_used": int((counts > 0).sum()),
        "samples": len(images),
    }
