"""Trained parts a recipe builds on: folder, 'auto' (trained once into the cache) or '' (fresh)."""

from __future__ import annotations

import pytest
import torch

import polymodal.api
from polymodal.parts import default_part_folder, resolve_config_part, resolve_part


def test_fresh_part_is_the_variant_or_its_tiny_form():
    model, source = resolve_part("", "vit", "digits", field="X.vision", tiny=True)
    assert type(model).__name__ == "ViTClassifier" and "fresh" in source
    full, _ = resolve_part("", "vit", "digits", field="X.vision")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


def test_auto_trains_once_then_reuses_and_restores_the_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    calls = []
    tiny, _ = resolve_part("", "vit", "digits", field="X.vision", tiny=True)

    def fake_train_model(name, *, data=None, out=None, **kw):
        calls.append((name, data, out))
        torch.rand(100)  # training consumes random numbers
        tiny.save(out)
        return tiny, {}

    monkeypatch.setattr(polymodal.api, "train_model", fake_train_model)
    state = torch.get_rng_state()
    model, source = resolve_part("auto", "vit", "digits", field="X.vision")
    assert torch.equal(torch.get_rng_state(), state)
    assert calls == [("vit", "digits", default_part_folder("vit", "digits"))]
    assert source == str(tmp_path / "parts" / "vit-digits")
    resolve_part("auto", "vit", "digits", field="X.vision")
    assert len(calls) == 1
    for k, v in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_a_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"X.vision must be a model folder with config.json .* has none"):
        resolve_part(str(tmp_path), "vit", "digits", field="X.vision")
    with pytest.raises(ValueError, match="X.vision must be a model folder, 'auto' or ''; got 3"):
        resolve_part(3, "vit", "digits", field="X.vision")


def test_a_config_names_its_part_by_three_fields(tmp_path, monkeypatch):
    """``name``, ``name_variant``, ``name_data`` ('' = the variant's default data); errors name Config.name."""
    import attrs

    @attrs.define
    class HostConfig:
        vision: str = "auto"
        vision_variant: str = "vit"
        vision_data: str = ""

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    tiny, _ = resolve_part("", "vit", "digits", field="X.vision", tiny=True)
    calls = []

    def fake_train_model(name, *, data=None, out=None, **kw):
        calls.append((name, data))
        tiny.save(out)
        return tiny, {}

    monkeypatch.setattr(polymodal.api, "train_model", fake_train_model)
    _, source = resolve_config_part(HostConfig(), "vision")
    assert calls == [("vit", polymodal.api.spec("vit").data)] and source.endswith("vit-digits")
    with pytest.raises(ValueError, match=r"HostConfig.vision must be a model folder with config.json"):
        resolve_config_part(HostConfig(vision=str(tmp_path / "none")), "vision")
