"""ImageBind's quality bar: emergent text→audio zero-shot classification on the digits (never trained on text–audio)."""

from __future__ import annotations

import json

import pytest
import torch

import polymodal
from polymodal.data import load_digits
from polymodal.plugins.imagebind import compose, retrieve
from polymodal.plugins.imagebind.audio import dtmf_clips

pytestmark = pytest.mark.slow


def test_default_imagebind_aligns_audio_with_text_through_images(trained):
    folder, metrics = trained("imagebind")  # reuses trained("clip") as its frozen towers
    assert metrics["emergent_text_to_audio_accuracy"] >= 0.80, metrics  # chance: 0.10
    assert metrics["image_to_audio_accuracy"] >= 0.70, metrics  # chance: 0.10
    assert metrics["emergent_text_to_thermal_accuracy"] >= 0.5, metrics
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["emergent_text_to_audio_accuracy"] == pytest.approx(metrics["emergent_text_to_audio_accuracy"])
    model = polymodal.load(folder)  # self-contained: the frozen CLIP is inside
    again = model.evaluate(load_digits())
    assert again["emergent_text_to_audio_accuracy"] == pytest.approx(metrics["emergent_text_to_audio_accuracy"])
    card = (folder / "README.md").read_text()
    assert "emergent_text_to_audio_accuracy" in card and "DTMF" in card and "a handwritten {numeral}" in card


def test_embedding_arithmetic_on_the_trained_model(trained):
    model = polymodal.load(trained("imagebind")[0])
    test = load_digits().test
    gallery = model.embed("image", model.prepare_images(test["image"]), normalize_only=True)  # (360, E)
    audio = dtmf_clips(torch.tensor([7]), torch.Generator().manual_seed(0))
    scores, index = retrieve(compose(model, {"audio": audio}), gallery, k=10)
    assert (test["label"][index[0]] == 7).float().mean() >= 0.7  # the sound of 7 retrieves images of 7
    three = int((test["label"] == 3).nonzero()[0])
    scores, index = retrieve(
        compose(model, {"image": model.prepare_images(test["image"][three : three + 1]), "audio": audio}), gallery, k=10
    )
    assert scores.shape == (1, 10) and set(test["label"][index[0]].tolist()) <= set(range(10))
