"""VQ-VAE metrics (reconstruction error, codebook use) and the reconstruction samples folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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


def write_reconstructions(
    model: Any, out: str | Path, *, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """Write ``n`` random test images of the model's dataset and their reconstructions to ``out``.

    ``sample_000.png`` … are the reconstructions (native size), ``original_000.png`` … the
    inputs, ``grid.png`` the reconstructions tiled and ``pairs.png`` originals (top row) over
    reconstructions (bottom row). A VQ-VAE takes no prompt and no sampling options.
    """
    from polymodal.data import load_dataset
    from polymodal.eval.images import make_grid, save_png, write_samples

    if options:
        raise ValueError(
            f"vqvae sampling writes reconstructions and takes no options; got {', '.join(sorted(options))}"
        )
    if prompt:
        raise ValueError(f"vqvae is an unconditional tokenizer and takes no prompt; got {prompt!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not model.default_data:
        raise ValueError(
            f"this vqvae was adapted to no built-in dataset (config.data={model.config.data!r}); nothing to reconstruct"
        )
    test = load_dataset(model.default_data).test["image"].float()  # (N, C, H, W)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    originals: Tensor = test[pick]  # (n, C, H, W)
    recon = model.decode(model.encode(originals)).cpu()  # (n, C, H, W)
    out = Path(out)
    paths = write_samples(recon, out)
    paths += [save_png(img, out / f"original_{i:03d}.png") for i, img in enumerate(originals)]
    paths.append(save_png(make_grid(torch.cat([originals, recon]), nrow=len(originals)), out / "pairs.png", scale=4))
    return paths
