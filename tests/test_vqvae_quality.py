"""VQ-VAE quality bars, measured by training the default recipes for real (digits and shapes)."""

from __future__ import annotations

import json

import pytest
import torch

import polymodal
from polymodal.data import load_digits, load_shapes

pytestmark = pytest.mark.slow


def test_default_vqvae_reconstructs_digits_and_uses_its_64_code_book(trained):
    folder, metrics = trained("vqvae")
    model = polymodal.load(folder)
    assert model.codebook_size == 64 and model.grid == (4, 4)
    assert metrics["recon_mse_normalized"] <= 0.10, metrics
    assert metrics["codebook_perplexity"] >= 16, metrics
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["recon_mse_normalized"] == pytest.approx(metrics["recon_mse_normalized"])
    again = model.evaluate(load_digits())  # the folder reproduces the numbers
    assert again["recon_mse_normalized"] == pytest.approx(metrics["recon_mse_normalized"], rel=1e-6)
    assert again["codebook_perplexity"] == pytest.approx(metrics["codebook_perplexity"], rel=1e-6)
    card = (folder / "README.md").read_text()
    assert "64-code" in card and "digits" in card


def test_default_vqvae_shapes_keeps_colours_through_the_round_trip(trained):
    folder, metrics = trained("vqvae-shapes")
    model = polymodal.load(folder)
    assert model.grid == (8, 8)
    assert metrics["recon_mse_normalized"] <= 0.10, metrics
    assert metrics["codebook_perplexity"] >= 16, metrics
    # The colour of each one-object test scene, read off the decoded pixels under the object's
    # mask as the nearest palette colour, must be the scene's colour.
    shapes = load_shapes()
    test = shapes.test
    single = test["count"] == 1
    images, masks = test["image"][single], test["masks"][single]  # (N, 3, S, S), (N, S, S)
    recon = model.decode(model.encode(images))  # (N, 3, S, S)
    weights = masks[:, None].float()  # (N, 1, S, S)
    mean_rgb = (recon * weights).sum((2, 3)) / weights.sum((2, 3))  # (N, 3)
    palette = torch.tensor(shapes.meta["colour_values"])  # (6, 3)
    read = torch.cdist(mean_rgb, palette).argmin(1)  # (N,)
    accuracy = (read == test["colour"][single]).float().mean().item()
    assert accuracy >= 0.98, accuracy
