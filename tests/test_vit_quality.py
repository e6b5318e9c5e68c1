"""ViT's quality bar, measured by training the default recipe for real on the embedded digits."""

from __future__ import annotations

import json

import pytest

import polymodal
from polymodal.data import load_digits

pytestmark = pytest.mark.slow


def test_default_vit_reaches_97_percent_on_the_fixed_digits_split(trained):
    folder, metrics = trained("vit")
    assert metrics["accuracy"] >= 0.97, metrics
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(metrics["accuracy"])
    # The saved folder reproduces the number: nothing in evaluation depends on training state.
    model = polymodal.load(folder)
    assert model.evaluate(load_digits())["accuracy"] == pytest.approx(metrics["accuracy"])
    card = (folder / "README.md").read_text()
    assert "accuracy" in card and "digits" in card
