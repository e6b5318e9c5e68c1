"""MoVQ quality bars, measured by training the default shapes recipe for real (issue 20's Kandinsky 2.1 decoder)."""

from __future__ import annotations

import pytest
import torch

import polymodal
from polymodal.data import load_shapes

pytestmark = pytest.mark.slow


def test_default_movq_shapes_reconstructs_at_least_as_well_as_the_kl_vae(trained):
    folder, metrics = trained("movq-shapes")
    _, kl = trained("kl-vae-shapes")  # the same latent size (8×8×4), trained in the same run
    model = polymodal.load(folder)
    assert model.latent_shape == kl_shape() == (4, 8, 8)
    # normalised reconstruction MSE (the KL-VAE's definition: test MSE over the test pixel variance), through the
    # quantiser: the honest reconstruction of a VQ autoencoder
    print(  # shown with -rP: the numbers the README quotes, both models from this run
        f"movq-shapes normalised_recon_mse {metrics['normalised_recon_mse']:.4f} (unquantised "
        f"{metrics['normalised_recon_mse_unquantised']:.4f}); kl-vae-shapes {kl['normalised_recon_mse']:.4f}"
    )
    assert metrics["normalised_recon_mse"] <= 0.05, metrics
    assert metrics["normalised_recon_mse"] <= kl["normalised_recon_mse"], (metrics, kl)
    # Kandinsky 2.1 decodes continuous latents without quantising: that decode must reconstruct too
    assert metrics["normalised_recon_mse_unquantised"] <= 0.05, metrics
    assert metrics["codes_used"] >= model.codebook_size // 2, metrics  # the book is used, not collapsed
    again = model.evaluate(load_shapes())  # the folder reproduces the numbers
    assert again["normalised_recon_mse"] == pytest.approx(metrics["normalised_recon_mse"], rel=1e-6)
    test = load_shapes().test["image"][:16]
    with torch.no_grad():
        codes = model.encode_codes(test)  # the image as tokens, decoded back
        assert (model.decode_codes(codes) - model(test)).abs().max() < 1e-5


def kl_shape() -> tuple[int, int, int]:
    """The kl-vae-shapes variant's latent shape, read from its registered config."""
    from polymodal.api import spec

    c = spec("kl-vae-shapes").config
    side = c.image_size // c.downsampling
    return c.latent_channels, side, side
