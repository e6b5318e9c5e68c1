"""The reconstruction samples folder the image autoencoders (VQ-VAE, KL-VAE, MoVQ) write for ``polymodal sample``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.eval.images import make_grid, save_png, write_samples
from polymodal.nn import eval_mode


def write_reconstructions(
    model: Any,
    out: str | Path,
    *,
    n: int = 8,
    prompt: str | None = None,
    seed: int = 0,
    what: str = "autoencoder",
    reconstruct: Callable[[Tensor], Tensor] | None = None,
    **options: Any,
) -> list[Path]:
    """Write ``n`` random test images of the model's dataset (drawn with ``seed``) and their reconstructions to
    ``out``: ``sample_000.png`` … the reconstructions, ``original_000.png`` … the inputs, ``grid.png`` the
    reconstructions tiled and ``pairs.png`` originals (top row) over reconstructions (bottom row).

    ``reconstruct`` maps images (n, C, S, S) in [0, 1] to their reconstructions (default: ``model(images)``, in
    eval mode without gradients); ``what`` names the model in errors. An autoencoder takes no prompt and no
    sampling options: either is a ValueError, as is an ``n`` below 1 or a model adapted to no built-in dataset.
    """
    from polymodal.data import load_dataset

    if options:
        raise ValueError(
            f"{what} sampling writes reconstructions and takes no options; got {', '.join(sorted(options))}"
        )
    if prompt:
        raise ValueError(f"a {what} is an unconditional autoencoder and takes no prompt; got {prompt!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not model.default_data:
        raise ValueError(
            f"this {what} was adapted to no built-in dataset (config.data={model.config.data!r}); nothing to reconstruct"
        )
    test = load_dataset(model.default_data).test["image"].float()  # (N, C, S, S)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    originals: Tensor = test[pick]  # (n, C, S, S)
    with torch.no_grad(), eval_mode(model):
        recon = (model(originals) if reconstruct is None else reconstruct(originals)).cpu()  # (n, C, S, S)
    out = Path(out)
    paths = write_samples(recon, out)
    paths += [save_png(img, out / f"original_{i:03d}.png") for i, img in enumerate(originals)]
    paths.append(save_png(make_grid(torch.cat([originals, recon]), nrow=len(originals)), out / "pairs.png", scale=4))
    return paths


__all__ = ["write_reconstructions"]
