"""Pretrained parts: one PartConfig type, made by the builder before the constructor (which never
trains), each saved once in its own sub-folder of the composite's model folder."""

from __future__ import annotations

import json

import attrs
import pytest
import torch

import polymodal.api
from polymodal.config import apply_overrides, evolve, from_dict, to_dict
from polymodal.io import LoadError, read_state
from polymodal.io.cache import default_part_folder
from polymodal.models.parts import PartConfig, load_part, load_parts, part_fields
from polymodal.plugins.dalle import DALLE
from polymodal.plugins.dalle import VARIANTS as DALLE_VARIANTS
from polymodal.plugins.flamingo import FlamingoConfig
from polymodal.testing import contracts

TINY_VIT = PartConfig(path="", variant="vit", tiny=True)


def test_fresh_part_is_the_variant_or_its_tiny_form():
    model = load_part(TINY_VIT, name="X.vision")
    assert type(model).__name__ == "ViTClassifier"
    full = load_part(attrs.evolve(TINY_VIT, tiny=False), name="X.vision")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


def test_loading_a_part_never_trains_and_keeps_the_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr(polymodal.api, "train_model", lambda *a, **k: pytest.fail("load_part trained a part"))
    with pytest.raises(ValueError, match=r"X.vision: no trained `vit` at .*vit-digits yet; polymodal.create"):
        load_part(PartConfig(variant="vit"), name="X.vision")
    load_part(TINY_VIT).save(tmp_path / "vit")
    state = torch.get_rng_state()
    load_part(PartConfig(path=str(tmp_path / "vit"), variant="vit"))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_constructor_never_trains_an_auto_part(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr(polymodal.api, "train_model", lambda *a, **k: pytest.fail("the constructor trained a part"))
    cfg = contracts.tiny("dalle").config
    with pytest.raises(ValueError, match="DALLEConfig.tokenizer: no trained `vqvae`"):
        DALLE(attrs.evolve(cfg, tokenizer=attrs.evolve(cfg.tokenizer, path="auto", tiny=False)))


def test_prepare_parts_trains_a_missing_auto_part_once_then_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    tiny = load_part(TINY_VIT)
    calls = []

    def fake_train_model(name, *, data=None, out=None, **kw):
        calls.append((name, data, out))
        torch.rand(100)  # training consumes random numbers
        tiny.save(out)
        return tiny, {}

    monkeypatch.setattr(polymodal.api, "train_model", fake_train_model)
    cfg = contracts.tiny("imagebind").config
    cfg = attrs.evolve(cfg, clip=PartConfig(variant="vit"))  # any registered variant: data '' = its default
    state = torch.get_rng_state()
    parts = polymodal.api.prepare_parts(cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert calls == [("vit", "digits", default_part_folder("vit", "digits"))]
    polymodal.api.prepare_parts(cfg, progress=False)
    assert len(calls) == 1
    for k, v in tiny.state_dict().items():
        assert torch.equal(parts["clip"].state_dict()[k], v)


def test_a_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"X.vision must be a model folder with config.json .* has none"):
        load_part(PartConfig(path=str(tmp_path), variant="vit"), name="X.vision")
    with pytest.raises(ValueError, match="X.vision must be a PartConfig; got 3"):
        load_part(3, name="X.vision")


def test_a_part_config_names_a_variant_and_a_part_field_takes_only_part_configs():
    with pytest.raises(ValueError, match="PartConfig.variant must name a registered model variant; got ''"):
        PartConfig()
    with pytest.raises(ValueError, match="FlamingoConfig.lm must be a PartConfig"):
        FlamingoConfig(lm=3)


def test_a_string_for_a_part_field_is_its_path_and_dotted_keys_reach_the_other_fields():
    cfg = FlamingoConfig()
    out = apply_overrides(cfg, ["lm=runs/lm", "vision="])
    assert out.lm == attrs.evolve(cfg.lm, path="runs/lm") and out.vision == attrs.evolve(cfg.vision, path="")
    both = apply_overrides(cfg, ["lm=runs/lm", "lm.variant=lm-big", "lm.tiny=true"])
    assert both.lm == PartConfig(path="runs/lm", variant="lm-big", tiny=True)
    assert evolve(cfg, vision="runs/clip").vision.path == "runs/clip"
    assert from_dict(FlamingoConfig, json.loads(json.dumps(to_dict(both)))) == both


def test_the_variant_a_part_trains_with_is_written_once_in_the_config():
    assert DALLE_VARIANTS["dalle"].parts() == [("tokenizer", "vqvae")]
    assert DALLE_VARIANTS["dalle-shapes"].parts() == [("tokenizer", "vqvae-shapes")]
    assert DALLE_VARIANTS["dalle-shapes"].config.tokenizer == PartConfig(variant="vqvae-shapes", data="shapes")
    assert not hasattr(DALLE_VARIANTS["dalle"], "pretrained_parts")
    assert list(part_fields(FlamingoConfig())) == ["lm", "vision"]


def test_given_parts_are_used_as_they_are_and_unknown_ones_are_named():
    cfg = contracts.tiny("dalle").config
    vq = load_part(cfg.tokenizer)
    assert load_parts(cfg, {"tokenizer": vq})["tokenizer"] is vq
    assert DALLE(cfg, parts={"tokenizer": vq}).vq is vq
    with pytest.raises(ValueError, match="DALLEConfig has no part field.s. lm; its parts: tokenizer"):
        load_parts(cfg, {"lm": vq})


def test_a_saved_composite_keeps_each_part_once_and_loads_it_from_its_folder(tmp_path):
    model = contracts.build("flamingo").eval()
    model.save(tmp_path / "f")
    own = read_state(tmp_path / "f" / "model.safetensors")
    assert not [k for k in own if k.startswith(("lm.", "vision."))]  # the frozen LM and CLIP live in lm/ and vision/
    assert any(k.startswith("xattn.") for k in own)  # the trained joints stay the parent's
    assert json.loads((tmp_path / "f" / "config.json").read_text())["config"]["lm"]["path"] == ""
    loaded = polymodal.api.load(tmp_path / "f")
    assert loaded.part_sources == {"lm": str(tmp_path / "f" / "lm"), "vision": str(tmp_path / "f" / "vision")}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_a_missing_part_folder_or_a_stray_part_weight_is_a_load_error(tmp_path):
    model = contracts.build("imagebind").eval()
    model.save(tmp_path / "ib")
    model.save(tmp_path / "ib2")
    for f in (tmp_path / "ib" / "clip").iterdir():
        f.unlink()
    (tmp_path / "ib" / "clip").rmdir()
    with pytest.raises(LoadError, match="keeps its part `clip` there"):
        polymodal.api.load(tmp_path / "ib")
    from polymodal.io import save_state

    state = read_state(tmp_path / "ib2" / "model.safetensors")
    save_state(
        tmp_path / "ib2" / "model.safetensors",
        {**state, **{f"clip.{k}": v for k, v in model.clip.state_dict().items()}},
        {},
    )
    with pytest.raises(LoadError, match="unexpected keys — clip"):
        polymodal.api.load(tmp_path / "ib2")
