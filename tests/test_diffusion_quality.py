"""Diffusion quality bars (issue 16 §3), measured by training the default recipes (slow).

``trained("ddpm")`` runs exactly ``polymodal train ddpm``; its ``evaluate`` (metrics.json) computes the
judge's Fréchet distances (1,000 DDPM samples, 1,000 DDIM-50 samples, 1,000 train images, all against
the test split), DDIM inversion and RePaint inpainting, so these tests read them. DALL·E's ``fd_judge``
comes from its 100 evaluation samples, so the DDPM is compared at the same n: its first 100 samples.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_ddpm_beats_dalle_and_is_near_the_data(trained):
    """fd_judge below DALL·E's on the digits (same n = 100), and ≤ 3× the train-vs-test split's own FD (n = 1,000)."""
    _, m = trained("ddpm")
    _, dalle = trained("dalle")
    assert m["samples"] == 1000 and dalle["samples"] == 100
    assert m["fd_judge_100"] < dalle["fd_judge"], (m, dalle)
    assert m["fd_judge"] <= 3 * m["fd_train_test"], m


def test_ddim_50_steps_within_20_percent_of_ddpm(trained):
    """DDIM-50 (η = 0) samples: FD at most 20 % above the 1,000-step DDPM's (same n, same seed)."""
    _, m = trained("ddpm")
    assert m["fd_judge_ddim"] <= 1.2 * m["fd_judge"], m


def test_ddim_inversion_reconstructs_test_images(trained):
    """DDIM-50 inversion then reconstruction of 100 test images: MSE ≤ 1e-3 (pixels in [0, 1])."""
    _, m = trained("ddpm")
    assert m["inversion_mse"] <= 1e-3, m


def test_inpainted_bottom_halves_keep_the_digit(trained):
    """RePaint with reconstruction guidance on the bottom half of every test image: the judge reads the
    original label ≥ 0.85 (measured 0.90, seed 0; RePaint alone at r = 20: 0.76)."""
    _, m = trained("ddpm")
    assert m["inpaint_accuracy"] >= 0.85, m
    assert m["inpaint_accuracy"] > m["inpaint_baseline_accuracy"], m


def test_classifier_free_guidance_hits_the_label(trained):
    """ddpm-cfg: judge accuracy at the default w ≥ 0.95 and strictly above w = 0; FD at w = 8 above w = 1."""
    _, m = trained("ddpm-cfg")
    assert m["sample_accuracy"] >= 0.95, m
    assert m["sample_accuracy"] > m["guidance_w0_accuracy"], m
    assert m["guidance_w8_fd"] > m["guidance_w1_fd"], m


def test_classifier_guidance_steers_the_unconditional_model(trained):
    """The unconditional ddpm guided by the noisy classifier: judge accuracy ≥ 0.90 (chance 0.10)."""
    from polymodal.api import load
    from polymodal.data import load_dataset
    from polymodal.plugins.diffusion.evaluate import classifier_guidance_accuracy

    model, clf = load(trained("ddpm")[0]), load(trained("ddpm-classifier")[0])
    m = classifier_guidance_accuracy(model, clf, load_dataset("digits"), GUIDED_SCALE, per_class=10, **GUIDED_SAMPLING)
    assert m["sample_accuracy"] >= 0.90, m


GUIDED_SCALE = 4.0
GUIDED_SAMPLING = {"sampler": "ddim", "steps": 50}
