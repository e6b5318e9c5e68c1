"""DINO's quality bars, measured by training the default recipes for real on the embedded data (no labels)."""

from __future__ import annotations

import json

import pytest

import polymodal
from polymodal.data import load_dataset

pytestmark = pytest.mark.slow


def test_default_dino_knn_on_digits(trained):
    folder, metrics = trained("dino")
    assert metrics["knn_accuracy"] >= 0.90, metrics
    assert metrics["linear_probe_accuracy"] >= 0.90, metrics
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["knn_accuracy"] == pytest.approx(metrics["knn_accuracy"])
    # The saved folder reproduces the number.
    again = polymodal.load(folder).evaluate(load_dataset("digits"))
    assert again["knn_accuracy"] == pytest.approx(metrics["knn_accuracy"], abs=1e-6)
    card = (folder / "README.md").read_text()
    assert "knn_accuracy" in card and "no labels in pre-training" in card


def test_dino_shapes_attention_finds_the_objects(trained):
    folder, metrics = trained("dino-shapes")
    # The thresholded [CLS] attention overlaps the true object masks far better than a centred blob of the same area.
    assert metrics["attention_mask_iou"] >= 0.20, metrics
    assert metrics["attention_mask_iou"] >= 3 * metrics["centred_blob_iou"], metrics
