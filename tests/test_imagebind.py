"""ImageBind: DTMF audio and log-mel, modality encoders, properties, bad input, model folders, arithmetic."""

from __future__ import annotations

import shutil

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polymodal
from polymodal.config import evolve
from polymodal.data.base import Dataset, Split
from polymodal.objectives import similarity_logits
from polymodal.plugins.imagebind import ImageBind, ImageBindConfig, compose, retrieve
from polymodal.plugins.imagebind.audio import (
    CLIP_SAMPLES,
    DTMF_COLS,
    DTMF_ROWS,
    SAMPLE_RATE,
    dtmf_clips,
    dtmf_frequencies,
    load_digits_audio,
    log_mel,
    mel_filterbank,
)
from polymodal.plugins.imagebind.modalities import ThermalEncoderConfig
from polymodal.plugins.imagebind.model import bind_loss, default_clip_folder
from polymodal.registry.loader import register_plugin, unregister_plugin
from polymodal.testing import contracts
from polymodal.train import TrainConfig, param_groups
from polymodal.train import train as run_training


def tiny_model(seed: int = 0, **overrides) -> ImageBind:
    """Fresh tiny CLIP towers (frozen) plus tiny audio/thermal trunks."""
    return contracts.build("imagebind", seed=seed, **overrides)


def inputs(model: ImageBind, b: int, seed: int = 0) -> dict:
    images, ids, audio, thermal = model.example_inputs(b, torch.Generator().manual_seed(seed))
    return {"image": images, "text": ids, "audio": audio, "thermal": thermal}


# -- DTMF audio and the log-mel spectrogram -----------------------------------------------------


def test_dtmf_uses_the_telephone_keypad():
    assert dtmf_frequencies(1) == (697.0, 1209.0)
    assert dtmf_frequencies(5) == (770.0, 1336.0)
    assert dtmf_frequencies(9) == (852.0, 1477.0)
    assert dtmf_frequencies(0) == (941.0, 1336.0)
    assert {dtmf_frequencies(d) for d in range(10)} <= {(r, c) for r in DTMF_ROWS for c in DTMF_COLS}
    with pytest.raises(ValueError, match="0..9"):
        dtmf_frequencies(10)


@pytest.mark.parametrize("digit", range(10))
def test_a_clip_sounds_its_two_tones(digit):
    wave = dtmf_clips(torch.tensor([digit]), torch.Generator().manual_seed(digit), noise=(0.0, 0.0))[0]
    spectrum = torch.fft.rfft(wave.double(), n=8 * CLIP_SAMPLES).abs()
    freqs = torch.fft.rfftfreq(8 * CLIP_SAMPLES, 1 / SAMPLE_RATE)
    low, high = spectrum[freqs < 1100], spectrum[freqs >= 1100]
    row, col = dtmf_frequencies(digit)
    assert abs(freqs[low.argmax()] - row) < 15 and abs(freqs[(freqs < 1100).sum() + high.argmax()] - col) < 15


def test_clips_are_deterministic_per_seed_and_random_across_seeds():
    labels = torch.arange(10)
    a = dtmf_clips(labels, torch.Generator().manual_seed(0))
    assert a.shape == (10, CLIP_SAMPLES) and a.dtype == torch.float32
    assert torch.equal(a, dtmf_clips(labels, torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, dtmf_clips(labels, torch.Generator().manual_seed(1)))


def test_log_mel_shape_filterbank_and_too_short_audio():
    fb = mel_filterbank(256, 32, SAMPLE_RATE, 300.0, 2000.0)
    assert fb.shape == (129, 32) and fb.max() <= 1.0 + 1e-6 and (fb.sum(0) > 0).all()
    spec = log_mel(dtmf_clips(torch.tensor([1, 2])))
    assert spec.shape == (2, 32, 32) and torch.isfinite(spec).all()
    with pytest.raises(ValueError, match=r"at least n_fft=256 samples, got 100"):
        log_mel(torch.zeros(2, 100))


def test_digits_audio_is_aligned_with_the_digits_split():
    data = load_digits_audio()
    digits = polymodal.data.load_digits()
    assert len(data.train) == len(digits.train) == 1437 and len(data.test) == 360
    assert torch.equal(data.train["label"], digits.train["label"]) and torch.equal(
        data.test["image"], digits.test["image"]
    )
    assert data.train["audio"].shape == (1437, CLIP_SAMPLES)
    assert torch.equal(data.test["audio"], load_digits_audio().test["audio"])  # fixed by the seed
    row = dtmf_frequencies(int(data.test["label"][0]))[0]
    spectrum = torch.fft.rfft(data.test["audio"][0].double()).abs()
    freqs = torch.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)
    assert abs(freqs[spectrum * (freqs < 1100) == (spectrum * (freqs < 1100)).max()][0] - row) < 10


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 4), seed=st.integers(0, 100))
def test_normalised_embeddings_have_unit_norm(b, seed):
    model = tiny_model().eval()
    for modality, x in inputs(model, b, seed).items():
        z = model.embed(modality, x, normalize_only=True)
        assert z.shape == (b, model.clip.config.embed_dim)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(b), atol=1e-5, rtol=0)
        scaled = model.embed(modality, x)
        torch.testing.assert_close(scaled.norm(dim=-1), model.post[modality].scale().expand(b), atol=1e-4, rtol=1e-5)


def test_fixed_scales_for_the_other_modalities_and_learnable_text_scale():
    model = contracts.build("imagebind", perturb=False)
    assert float(model.post["audio"].scale()) == pytest.approx(20.0)
    assert float(model.post["thermal"].scale()) == pytest.approx(10.0)
    params = {id(p) for p in model.parameters()}
    assert id(model.post["audio"].log_scale) not in params and id(model.post["thermal"].log_scale) not in params
    assert isinstance(model.post["text"].log_scale, nn.Parameter)  # CLIP's learnable scale, frozen with the tower
    assert float(model.post["text"].scale()) == pytest.approx(float(model.clip.logit_scale.exp()), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), d=st.integers(2, 8), seed=st.integers(0, 1000), scale=st.floats(1.0, 50.0))
def test_loss_is_symmetric_in_swapping_the_modalities(b, d, seed, scale):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    o = scale * torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    torch.testing.assert_close(
        similarity_logits(o, a, 1.0, normalize=False), similarity_logits(a, o, 1.0, normalize=False).t()
    )
    torch.testing.assert_close(bind_loss(a, o), bind_loss(o, a))


def test_batch_independence_in_eval_mode():
    model = tiny_model().eval()
    for modality, x in inputs(model, 3, seed=5).items():
        full = model.embed(modality, x)
        for i in range(3):
            torch.testing.assert_close(model.embed(modality, x[i : i + 1]), full[i : i + 1], atol=1e-5, rtol=0)


def _toy_dataset(model: ImageBind, n: int = 16) -> Dataset:
    batch = model.example_batch(n, torch.Generator().manual_seed(0))
    return Dataset(
        "toy",
        Split(dict(batch)),
        Split(dict(batch)),
        {"num_classes": 10, "class_names": list(polymodal.data.DIGIT_WORDS)},
    )


def test_frozen_clip_towers_are_unchanged_by_training_steps():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    trunk = {k: v.clone() for k, v in model.encoders.state_dict().items()}
    assert all(not p.requires_grad for p in model.clip.parameters())
    trainable = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert trainable and not trainable & {id(p) for p in model.clip.parameters()}
    run_training(
        model,
        _toy_dataset(model),
        TrainConfig(steps=2, batch_size=8, warmup_steps=0, checkpoint_every=0),
        progress=False,
    )
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, before[k]), f"frozen CLIP weight {k} changed"
    assert any(not torch.equal(v, trunk[k]) for k, v in model.encoders.state_dict().items())
    model.train()
    assert model.encoders.training and not model.clip.training


# -- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_naming_expected_and_given():
    model = tiny_model().eval()
    v = model.clip.config.vision
    s, c = v.image_size, v.channels
    with pytest.raises(
        ValueError, match=rf"expected images \(B, {c}, {s}, {s}\); got shape \(2, {c}, {s + 2}, {s + 2}\)"
    ):
        model.embed("image", torch.rand(2, c, s + 2, s + 2))
    with pytest.raises(ValueError, match=rf"expected images \(B, {c}, {s}, {s}\); got shape \(2, {c + 2}, {s}, {s}\)"):
        model.embed("image", torch.rand(2, c + 2, s, s))
    with pytest.raises(ValueError, match="audio too short.*n_fft=256 samples, got 64"):
        model.embed("audio", torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"thermal: expected images \(B, 1, 16, 16\); got shape \(2, 1, 8, 8\)"):
        model.embed("thermal", torch.rand(2, 1, 8, 8))
    for modality, x in inputs(model, 2).items():
        with pytest.raises(ValueError, match="non-empty|batch size 0"):
            model.embed(modality, x[:0])
    with pytest.raises(ValueError, match="non-empty"):
        model.embed("text", [])
    with pytest.raises(ValueError, match=r"expected token ids in \[0, \d+\).*got ids from 1000000"):
        model.embed("text", torch.full((1, 4), 10**6))
    with pytest.raises(ValueError, match="unknown modality 'smell'.*image, text, audio, thermal"):
        model.embed("smell", torch.zeros(1))
    with pytest.raises(ValueError, match="modalities"):
        ImageBindConfig(modalities=("audio", "text"))


def test_a_missing_clip_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="no-such-clip"):
        ImageBind(evolve(ImageBindConfig(dim=16, depth=1, heads=2), clip=str(tmp_path / "no-such-clip")))


# -- model folders ------------------------------------------------------------------------------


def test_saved_folder_is_self_contained(tmp_path):
    model = tiny_model(seed=3).eval()
    x = inputs(model, 2, seed=7)
    model.save(tmp_path / "a")
    assert (tmp_path / "a" / "clip" / "config.json").is_file() and (
        tmp_path / "a" / "clip" / "model.safetensors"
    ).is_file()
    shutil.move(tmp_path / "a", tmp_path / "moved")
    loaded = polymodal.load(tmp_path / "moved")
    assert all(not p.requires_grad for p in loaded.clip.parameters())
    for modality, value in x.items():
        torch.testing.assert_close(loaded.embed(modality, value), model.embed(modality, value), atol=0, rtol=0)


def test_auto_reuses_a_clip_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    clip = tiny_model().clip
    folder = default_clip_folder("clip", "digits")
    clip.save(folder)
    model = ImageBind(ImageBindConfig(dim=16, depth=1, heads=2))  # clip.path is 'auto'
    assert model.part_sources["clip"] == str(folder)
    assert model.config_dict()["clip"]["path"] == ""  # the saved folder never points elsewhere
    for k, v in clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[k], v)


def test_auto_trains_the_default_clip_first_when_the_cache_is_empty(tmp_path, monkeypatch):
    import polymodal.api

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    clip, calls = tiny_model().clip, []

    def fake_train_model(name, *, data=None, out=None, **kw):  # stands in for minutes of CLIP training
        calls.append((name, data, out))
        clip.save(out)
        return clip, {}

    monkeypatch.setattr(polymodal.api, "train_model", fake_train_model)
    with pytest.raises(ValueError, match="no trained `clip`"):  # a constructor never trains
        ImageBind(ImageBindConfig(dim=16, depth=1, heads=2))
    assert calls == []
    model = polymodal.api.create("imagebind", dim=16, depth=1, heads=2)  # the API trains it first
    assert calls == [("clip", "digits", default_clip_folder("clip", "digits"))]
    assert model.part_sources["clip"] == str(default_clip_folder("clip", "digits"))
    polymodal.api.create("imagebind", dim=16, depth=1, heads=2)
    assert len(calls) == 1  # the second build reuses the cached folder
    spec = polymodal.api.spec("imagebind")
    assert spec.parts() == [("clip", "clip")] and spec.data == "digits"
    assert ImageBind.config_for_data(spec.config, polymodal.data.load_digits()).clip.data == "digits"


def test_evaluate_reports_emergent_and_image_to_modality_accuracy():
    model = tiny_model().eval()
    digits = polymodal.data.load_digits()
    small = Dataset("digits", digits.train.subset(list(range(20))), digits.test.subset(list(range(30))), digits.meta)
    metrics = model.evaluate(small)
    for key in (
        "emergent_text_to_audio_accuracy",
        "emergent_text_to_audio_accuracy_heldout",
        "image_to_audio_accuracy",
        "emergent_text_to_thermal_accuracy",
        "image_to_thermal_accuracy",
        "zero_shot_image_accuracy",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics == model.evaluate(small)  # the synthesised clips are fixed by data_seed


# -- embedding arithmetic -----------------------------------------------------------------------


def test_embedding_arithmetic_image_plus_audio_retrieves_images():
    model = tiny_model().eval()
    x = inputs(model, 3)
    gallery = model.embed("image", model.example_inputs(10, torch.Generator().manual_seed(1))[0], normalize_only=True)
    query = compose(model, {"image": x["image"], "audio": x["audio"]})
    assert query.shape == (3, model.clip.config.embed_dim)
    torch.testing.assert_close(query.norm(dim=-1), torch.ones(3))
    scores, index = retrieve(query, gallery, k=4)
    assert scores.shape == index.shape == (3, 4) and index.max() < 10
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    with pytest.raises(ValueError, match="at least one"):
        compose(model, {})


# -- a plugin adds a modality ---------------------------------------------------------------------


class ProfileEncoder(nn.Module):
    """A 1-D ink profile (B, 16) → tokens (B, 1 + 16, dim): a plugin-added modality."""

    config_class = ThermalEncoderConfig
    modality = "profile"
    logit_scale = 5.0

    def __init__(self, cfg=None, **overrides):
        super().__init__()
        cfg = attrs.evolve(cfg or ThermalEncoderConfig(), **overrides)
        self.out_dim = cfg.dim
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.proj = nn.Linear(1, cfg.dim)

    def forward(self, x):
        tokens = self.proj(x.unsqueeze(-1))  # (B, 16, dim)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)

    def derive(self, batch, generator=None):
        return torch.nn.functional.interpolate(batch["image"].float().mean((1, 2)).unsqueeze(1), size=16).squeeze(1)

    def example_inputs(self, batch_size=2, generator=None):
        return (torch.rand(batch_size, 16, generator=generator),)


class ProfilePlugin:
    @polymodal.hookimpl
    def register_encoders(self, register):
        register("imagebind-profile", ProfileEncoder, doc="Test-only 1-D profile modality.")


def test_a_plugin_adds_a_modality():
    register_plugin(ProfilePlugin(), "test-imagebind-profile")
    try:
        model = tiny_model(modalities=("audio", "profile"))
        batch = model.example_batch(4, torch.Generator().manual_seed(0))
        assert batch["profile"].shape == (4, 16)
        loss, metrics = model.loss(batch)
        loss.backward()
        assert "loss_profile" in metrics and model.encoders["profile"].proj.weight.grad is not None
        assert float(model.post["profile"].scale()) == pytest.approx(5.0)
    finally:
        unregister_plugin("test-imagebind-profile")
