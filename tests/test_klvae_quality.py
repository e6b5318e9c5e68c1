"""KL-VAE quality bar, measured by training the default shapes recipe for real (issue 20's first stage)."""

from __future__ import annotations

import json

import pytest
import torch

import polymodal
from polymodal.data import load_shapes

pytestmark = pytest.mark.slow


def test_default_kl_vae_shapes_reconstructs_and_stores_its_latent_scale(trained):
    folder, metrics = trained("kl-vae-shapes")
    model = polymodal.load(folder)
    assert model.latent_shape == (4, 8, 8)
    # normalised reconstruction MSE: the test split's MSE over its pixel variance (1.0 = the mean pixel everywhere)
    assert metrics["normalised_recon_mse"] <= 0.05, metrics
    # the latent scale, 1 / std of the training latents, is computed after training and saved with the model
    saved = json.loads((folder / "config.json").read_text())["config"]
    assert saved["scaling_factor"] > 0 and saved["scaling_factor"] == pytest.approx(metrics["scaling_factor"])
    assert model.config.scaling_factor == saved["scaling_factor"]
    assert 0.9 <= metrics["scaled_latent_std"] <= 1.1, metrics  # it carries over to the test split
    again = model.evaluate(load_shapes())  # the folder reproduces the numbers and keeps its factor
    assert again["normalised_recon_mse"] == pytest.approx(metrics["normalised_recon_mse"], rel=1e-6)
    assert model.config.scaling_factor == saved["scaling_factor"]
    test = load_shapes().test["image"][:16]
    with torch.no_grad():
        latents = model.encode_latents(test, sample=False)  # what a latent diffusion model trains on
        assert (model.decode_latents(latents) - model(test)).abs().max() < 1e-5
