"""PIXEL's quality bars, measured by training the default recipes for real on the embedded text.

``trained("pixel")`` runs ``polymodal train pixel-mae`` and then ``polymodal train pixel --set
mae=FOLDER``, exactly as a user would.
"""

from __future__ import annotations

import json

import pytest

import polymodal
from polymodal.data import load_dataset

pytestmark = pytest.mark.slow

MAE_RATIO_BAR = 0.75
"""'Well below': the MAE's masked-patch loss is at most this fraction of the predict-the-mean loss."""

CLEAN_BAR = 0.9
"""Both classifiers must first read clean text well, or a small drop would mean nothing."""


def test_masked_patch_loss_is_well_below_predicting_the_mean(trained):
    folder, metrics = trained("pixel-mae")
    assert metrics["masked_loss"] <= MAE_RATIO_BAR * metrics["mean_baseline_loss"], metrics
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["masked_loss"] == pytest.approx(metrics["masked_loss"])


def test_pixel_loses_less_than_the_byte_baseline_on_look_alike_characters(trained):
    folder, metrics = trained("pixel")
    assert metrics["accuracy_clean"] >= CLEAN_BAR and metrics["token_accuracy_clean"] >= CLEAN_BAR, metrics
    assert metrics["accuracy_drop"] < metrics["token_accuracy_drop"], metrics
    # Where the look-alike is another letter ("eiqht", "tvvo", "nlne") the pixels stay close and
    # PIXEL keeps clearly more than the byte model, whose unseen byte breaks the word.
    assert metrics["accuracy_perturbed_letters"] >= metrics["token_accuracy_perturbed_letters"] + 0.1, metrics
    # The folder reproduces every number: the frozen MAE and both classifiers travel inside it.
    again = polymodal.load(folder).evaluate(load_dataset("text"))
    for key in ("accuracy_clean", "accuracy_perturbed", "token_accuracy_perturbed", "masked_loss"):
        assert again[key] == pytest.approx(metrics[key]), key
