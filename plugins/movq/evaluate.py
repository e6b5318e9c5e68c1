"""MoVQ metrics (reconstruction through the quantiser and without it, codebook use) and the reconstruction samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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


def write_reconstructions(
    model: Any, out: str | Path, *, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """Write ``n`` random test images of the model's dataset and their quantised reconstructions to ``out``:
    ``sample_000.png`` … the reconstructions, ``original_000.png`` … the inputs, ``grid.png`` the reconstructions
    tiled and ``pairs.png`` originals (top row) over reconstructions (bottom row). A MoVQ takes no prompt and no
    sampling options."""
    from polymodal.data import load_dataset
    from polymodal.eval.images import make_grid, save_png, write_samples

    if options:
        raise ValueError(f"movq sampling writes reconstructions and takes no options; got {', '.join(sorted(options))}")
    if prompt:
        raise ValueError(f"a movq is an unconditional autoencoder and takes no prompt; got {prompt!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not model.default_data:
        raise ValueError(
            f"this movq was adapted to no built-in dataset (config.data={model.config.data!r}); nothing to reconstruct"
        )
    test = load_dataset(model.default_data).test["image"].float()  # (N, C, S, S)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    originals: Tensor = test[pick]  # (n, C, S, S)
    with torch.no_grad(), eval_mode(model):
        recon = model(originals).cpu()  # (n, C, S, S)
    out = Path(out)
    paths = write_samples(recon, out)
    paths += [save_png(img, out / f"original_{i:03d}.png") for i, img in enumerate(originals)]
    paths.append(save_png(make_grid(torch.cat([originals, recon]), nrow=len(originals)), out / "pairs.png", scale=4))
    return paths
