"""The converter template ``polymodal.io.hf.convert_hf_folder``: what every transformers converter
(hf-vit, hf-clip, hf-imagegpt, hf-gpt2, hf-vitmae) checks before and after its family's mapping.

The families' parity with transformers is tested in their own files (test_vit, test_clip,
test_igpt, test_lm, test_mae); here a tiny ViT folder stands for them all.
"""

from __future__ import annotations

import json

import pytest
import torch

import polymodal
from polymodal.io import LoadError
from polymodal.io.hf import convert_hf_folder
from polymodal.plugins.clip.convert import convert_hf_clip
from polymodal.plugins.igpt.convert import convert_hf_imagegpt
from polymodal.plugins.lm.convert import convert_hf_gpt2
from polymodal.plugins.pixel.convert import convert_hf_vitmae
from polymodal.plugins.vit.convert import convert_hf_vit

transformers = pytest.importorskip("transformers")

CONVERTERS = {
    "vit": convert_hf_vit,
    "clip": convert_hf_clip,
    "imagegpt": convert_hf_imagegpt,
    "gpt2": convert_hf_gpt2,
    "vit_mae": convert_hf_vitmae,
}


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    cfg = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit") / "hf"
    transformers.ViTForImageClassification(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("model_type", sorted(CONVERTERS))
def test_a_pickled_checkpoint_is_refused_by_name(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match=r"pytorch_model\.bin.*does not unpickle.*safe_serialization=True"):
        CONVERTERS[model_type](tmp_path)


@pytest.mark.parametrize("model_type", sorted(CONVERTERS))
def test_another_architecture_or_a_non_object_config_is_refused(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LoadError, match=rf"model_type '{model_type}'.*config\.json has 'bert'"):
        CONVERTERS[model_type](tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(LoadError, match="expected a JSON object, got list"):
        CONVERTERS[model_type](tmp_path)


def test_the_template_builds_renames_adds_extras_and_saves(vit_folder, tmp_path):
    from polymodal.plugins.vit.convert import build_model, state_from_hf

    calls = []

    def extras(model, state, weights):
        calls.append(sorted(state) == sorted(model.state_dict()))
        return " (a note)"

    model = convert_hf_folder(
        vit_folder,
        tmp_path / "pm",
        converter="hf-vit",
        model_type="vit",
        label="ViT",
        build_model=build_model,
        extras=extras,
        rename_state=lambda weights, m: state_from_hf(weights, m.config.encoder.depth),
    )
    assert calls == [True] and not model.training
    assert "`polymodal convert --from hf-vit` (a note)" in (tmp_path / "pm" / "README.md").read_text()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(polymodal.load(tmp_path / "pm")(x), model(x))


def test_a_missing_weight_names_the_file_and_the_key(vit_folder):
    from polymodal.plugins.vit.convert import build_model

    def rename(weights, model):
        return {"head.weight": weights["no.such.key"]}

    with pytest.raises(LoadError, match=r"model\.safetensors lacks the ViT weight 'no\.such\.key'"):
        convert_hf_folder(
            vit_folder, converter="hf-vit", model_type="vit", label="ViT", build_model=build_model, rename_state=rename
        )


def test_the_tokenizer_step_notes_a_missing_tokenizer_and_names_the_folder_on_error(vit_folder, tmp_path):
    from polymodal.plugins.vit.convert import build_model, state_from_hf

    def rename(weights, m):
        return state_from_hf(weights, m.config.encoder.depth)

    convert_hf_folder(
        vit_folder,
        tmp_path / "pm",
        converter="hf-vit",
        model_type="vit",
        label="ViT",
        build_model=build_model,
        rename_state=rename,
        tokenizer=lambda folder, model: False,
    )
    assert "(no tokenizer files: the model takes token ids only)" in (tmp_path / "pm" / "README.md").read_text()

    def bad_tokenizer(folder, model):
        raise ValueError("the tokenizer has 9 ids")

    with pytest.raises(LoadError, match=rf"{vit_folder}: the tokenizer has 9 ids"):
        convert_hf_folder(
            vit_folder,
            converter="hf-vit",
            model_type="vit",
            label="ViT",
            build_model=build_model,
            rename_state=rename,
            tokenizer=bad_tokenizer,
        )
