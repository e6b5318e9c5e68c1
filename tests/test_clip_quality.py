"""CLIP's quality bars, measured by training the default recipes for real on the embedded data."""

from __future__ import annotations

import json

import pytest

import polymodal
from polymodal.data import load_digits

pytestmark = pytest.mark.slow


def test_default_clip_zero_shot_on_held_out_digit_templates(trained):
    folder, metrics = trained("clip")
    assert metrics["zero_shot_accuracy_heldout"] >= 0.90, metrics
    assert metrics["zero_shot_accuracy"] >= 0.90, metrics
    for key in ("image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["logit_scale"] <= 100.0
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["zero_shot_accuracy_heldout"] == pytest.approx(metrics["zero_shot_accuracy_heldout"])
    # The saved folder (weights + tokenizer) reproduces the number.
    model = polymodal.load(folder)
    again = model.evaluate(load_digits())
    assert again["zero_shot_accuracy_heldout"] == pytest.approx(metrics["zero_shot_accuracy_heldout"], abs=1e-6)
    card = (folder / "README.md").read_text()
    assert "zero_shot_accuracy_heldout" in card and "digits" in card and "Held-out templates" in card


def test_clip_shapes_zero_shot_colour_and_kind(trained):
    folder, metrics = trained("clip-shapes")
    assert metrics["zero_shot_colour_accuracy"] >= 0.90, metrics
    assert metrics["zero_shot_kind_accuracy"] >= 0.90, metrics
    assert metrics["single_object_samples"] >= 200, metrics  # the bar is measured on enough scenes
    assert metrics["logit_scale"] <= 100.0
    card = (folder / "README.md").read_text()
    assert "shapes" in card and "zero_shot_colour_accuracy" in card and "zero_shot_kind_accuracy" in card
    assert "Caption views per step" in card
