"""The Python API as timm / open_clip / transformers users expect it (issue 15).

``polymodal.create`` with nested and dotted overrides, ``polymodal.list_models`` with wildcards,
``polymodal.train`` returning ``(model, metrics)``, ``model.preprocess`` on every image family
(equal to the dataset's own tensors), and ``model.generate`` on the text families.
"""

from __future__ import annotations

import fnmatch
import json

import numpy as np
import pytest
import torch
from PIL import Image

import polymodal
import polymodal.api
from polymodal.data import load_dataset
from polymodal.eval.images import save_png
from polymodal.models import PolymodalModel
from polymodal.registry import get_registry
from polymodal.testing.contracts import build


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))


# -- create ----------------------------------------------------------------------------------------
def test_create_merges_a_nested_dict_into_the_variants_config():
    base = polymodal.api.spec("vit").config.encoder
    model = polymodal.create("vit", encoder={"depth": 1})
    assert model.config.encoder.depth == 1
    # the other encoder fields stay the variant's (timm's kwargs), not the class defaults
    assert model.config.encoder.patch_size == base.patch_size
    assert model.config.encoder.block == base.block and base.block != type(base.block)()
    assert len(model.encoder.blocks.blocks) == 1  # the built model has one block


def test_create_takes_dotted_keys_and_deeper_dicts():
    model = polymodal.create("vit", **{"encoder.depth": 1, "encoder.block.heads": 2}, head_dropout=0.5)
    assert (model.config.encoder.depth, model.config.encoder.block.heads, model.config.head_dropout) == (1, 2, 0.5)
    both = polymodal.create("vit", encoder={"block": {"heads": 2}}, **{"encoder.depth": 1})
    assert both.config.encoder == model.config.encoder


def test_create_names_a_bad_field_dotted():
    with pytest.raises(ValueError, match=r"unknown field 'encoder\.dpth' \(known fields of encoder: .*depth"):
        polymodal.create("vit", encoder={"dpth": 2})
    with pytest.raises(ValueError, match=r"unknown field 'encoder\.block\.hedas'"):
        polymodal.create("vit", **{"encoder.block.hedas": 2})
    with pytest.raises(ValueError, match=r"unknown field 'hed' \(known ViTConfig fields: "):
        polymodal.create("vit", hed=2)
    with pytest.raises(ValueError, match=r"'encoder\.depth' is set twice"):
        polymodal.create("vit", encoder={"depth": 2}, **{"encoder.depth": 3})
    with pytest.raises(ValueError, match=r"^encoder\.block\.heads must divide"):
        polymodal.create("vit", encoder={"block": {"heads": 5}})
    with pytest.raises(ValueError, match=r"^encoder\.depth must be"):
        polymodal.create("vit", **{"encoder.depth": 0})


def test_create_adapts_to_a_dataset_given_by_name():
    model = polymodal.create("vit", "shapes", encoder={"depth": 1})
    assert (model.config.encoder.channels, model.config.encoder.depth) == (3, 1)
    assert model.image_spec().channels == 3


# -- list_models -----------------------------------------------------------------------------------
def test_list_models_filters_with_wildcards_like_timm():
    names = get_registry().names("model")
    assert polymodal.list_models() == sorted(names)
    vit = polymodal.list_models("vit*")
    assert vit == sorted(n for n in names if n.startswith("vit")) and "vit" in vit and "clip" not in vit
    both = polymodal.list_models(["clip*", "*-shapes"], exclude_filters="dalle*")
    assert both == sorted(
        n for n in names if (n.startswith("clip") or n.endswith("-shapes")) and not n.startswith("dalle")
    )
    assert polymodal.list_models("no-such-*") == []
    assert polymodal.list_models("vit?s16") == [n for n in names if fnmatch.fnmatchcase(n, "vit?s16")]
    with pytest.raises(ValueError, match="fnmatch patterns"):
        polymodal.list_models([3])


# -- train -----------------------------------------------------------------------------------------
def test_train_returns_model_and_metrics_and_writes_the_folder(tmp_path):
    out = tmp_path / "vit"
    model, metrics = polymodal.train(
        "vit", steps=2, out=out, progress=False, encoder={"depth": 1}, train_set={"lr": 1e-3, "batch_size": 16}
    )
    assert isinstance(model, PolymodalModel) and model.config.encoder.depth == 1
    assert metrics["steps"] == 2 and metrics["data"] == "digits" and "accuracy" in metrics
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert json.loads((out / "config.json").read_text())["config"]["encoder"]["depth"] == 1
    trainer = json.loads((out / "checkpoint" / "trainer.json").read_text())["train"]
    assert (trainer["lr"], trainer["batch_size"]) == (1e-3, 16)
    loaded = polymodal.load(out)
    x = loaded.preprocess(np.zeros((8, 8), dtype=np.uint8))
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)


def test_train_passes_its_options_on(tmp_path):
    out = tmp_path / "vit"
    _, metrics = polymodal.train(
        "vit", data="shapes", steps=1, seed=3, out=out, keep_checkpoint=False, progress=False, **{"encoder.depth": 1}
    )
    assert (metrics["data"], metrics["steps"], metrics["seed"]) == ("shapes", 1, 3)
    assert not (out / "checkpoint").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="not a JSON value"):
        polymodal.train("vit", steps=1, encoder={"depth": object()})


def test_polymodal_train_is_callable_and_still_the_package():
    import polymodal.train as package
    from polymodal.train import TrainConfig

    assert polymodal.train is package and callable(polymodal.train)
    assert polymodal.train.TrainConfig is TrainConfig
    with pytest.raises(ValueError, match="steps must be a whole number"):
        polymodal.train("vit", steps=0)
    assert {"create", "list_models", "train", "load"} <= set(polymodal.__all__)


# -- preprocess ------------------------------------------------------------------------------------
def _png_of(dataset_image: torch.Tensor, path) -> str:
    save_png(dataset_image, path)
    return str(path)


@pytest.mark.parametrize(("name", "data"), [("vit", "digits"), ("vqvae-shapes", "shapes")])
def test_preprocess_of_a_dataset_png_equals_the_dataset_tensor(name, data, tmp_path):
    dataset = load_dataset(data)
    model = polymodal.create(name, dataset).eval()
    images = dataset.test["image"][:3]  # (3, C, S, S) in [0, 1]
    for i, image in enumerate(images):
        path = _png_of(image, tmp_path / f"{i}.png")
        x = model.preprocess(path)
        assert x.shape == (1, *image.shape) and x.dtype == torch.float32
        assert torch.allclose(x[0], image, atol=0.5 / 255 + 1e-6)  # only the PNG's 8-bit rounding
        with torch.no_grad():
            ours, theirs = model(model.preprocess(Image.open(path))), model(image[None])
        out = ours if isinstance(ours, torch.Tensor) else ours[0]
        ref = theirs if isinstance(theirs, torch.Tensor) else theirs[0]
        assert torch.allclose(out, ref, atol=0.05)


def test_preprocess_takes_every_kind_of_image(tmp_path):
    model = polymodal.create("vit", "shapes", encoder={"depth": 1})  # 32 × 32 RGB
    rgb = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    want = model.preprocess(Image.fromarray(rgb))
    assert want.shape == (1, 3, 32, 32) and 0 <= want.min() and want.max() <= 1
    assert torch.equal(model.preprocess(path), want) and torch.equal(model.preprocess(str(path)), want)
    assert torch.equal(model.preprocess(rgb), want)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # (C, H, W) float: resized by torch
    assert model.preprocess(tensor).shape == (1, 3, 32, 32)
    same = torch.from_numpy(np.array(Image.fromarray(rgb).resize((32, 32), Image.BILINEAR))).permute(2, 0, 1)
    assert torch.allclose(model.preprocess(same), want) and torch.allclose(model.preprocess(same[None]), want)
    assert torch.allclose(model.preprocess(same.permute(1, 2, 0).numpy().astype(np.float32) / 255), want)
    grey = np.full((32, 32), 128, dtype=np.uint8)  # a grey image feeds an RGB model as three equal channels
    assert torch.allclose(model.preprocess(grey), torch.full((1, 3, 32, 32), 128 / 255))
    rgba = np.concatenate([rgb, np.zeros((20, 24, 1), np.uint8)], axis=-1)  # alpha dropped
    assert torch.equal(model.preprocess(rgba), want)


def test_preprocess_converts_rgb_to_grey_as_pillow_does():
    model = polymodal.create("vit", encoder={"depth": 1})  # digits: 8 × 8 grey
    rgb = (np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.uint8)
    pil = model.preprocess(Image.fromarray(rgb))
    assert pil.shape == (1, 1, 8, 8)
    assert torch.allclose(model.preprocess(torch.from_numpy(rgb).permute(2, 0, 1)), pil, atol=1 / 255 + 1e-6)


def test_preprocess_refuses_what_is_not_an_image(tmp_path):
    model = polymodal.create("vit", encoder={"depth": 1})
    with pytest.raises(
        ValueError, match=r"preprocess: expected a PIL image, a path, a numpy array or a tensor; got dict"
    ):
        model.preprocess({"x": 1})
    with pytest.raises(ValueError, match=r"expected an image .* got \(2, 5, 5\)"):
        model.preprocess(torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]; got 0 to 255 \(divide 0–255 values by 255"):
        model.preprocess(np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8))
    with pytest.raises(ValueError, match="cannot read image 'missing.png'"):
        model.preprocess(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="reads no images"):
        build("lm").preprocess(np.zeros((8, 8)))


IMAGE_VARIANTS = [e.name for e in get_registry().entries("model") if e.obj.model_class.image_fields]


def test_every_image_family_declares_its_images():
    families = {get_registry().get("model", n).model_class.family for n in IMAGE_VARIANTS}
    assert families >= {"vit", "clip", "dino", "vqvae", "igpt", "dalle", "rudolph", "imagebind", "flamingo", "fromage"}


@pytest.mark.parametrize("name", IMAGE_VARIANTS)
def test_image_family_preprocess_contract(name, tmp_path):
    model = build(name).eval()
    spec = model.image_spec()
    assert spec is not None and spec.channels in (1, 3) and spec.size >= 1
    rgb = (np.random.default_rng(0).random((13, 11, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    x = model.preprocess(tmp_path / "in.png")
    assert x.shape == (1, spec.channels, spec.size, spec.size) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    # the model takes it where its example inputs hold images
    inputs, used = list(model.example_inputs(1)), False
    for i, arg in enumerate(inputs):
        if isinstance(arg, torch.Tensor) and arg.is_floating_point() and tuple(arg.shape[-3:]) == tuple(x.shape[1:]):
            inputs[i], used = x.reshape((1,) * (arg.dim() - 3) + tuple(x.shape[1:])).expand_as(arg), True
    with torch.no_grad():
        if used:
            model(*inputs)
        else:  # the token families read images through their tokenizer
            reader = {"dalle": "image_codes", "rudolph": "encode_images", "igpt": "tokens"}[model.family]
            getattr(model, reader)(x)
    # the saved folder's config records what preprocess does
    model.save(tmp_path / "m")
    header = json.loads((tmp_path / "m" / "config.json").read_text())
    assert header["family"] == model.family and header["preprocess"] == spec.to_dict()
    loaded = polymodal.load(tmp_path / "m")
    assert loaded.image_spec() == spec and torch.equal(loaded.preprocess(tmp_path / "in.png"), x)


# -- generate --------------------------------------------------------------------------------------
def test_lm_generate_returns_text_greedy_or_sampled():
    lm = build("lm")
    text = lm.generate("the", max_new_tokens=6)
    assert isinstance(text, str) and text == lm.generate("the", max_new_tokens=6)  # greedy: deterministic
    start = lm.prompt_ids("the")
    ids = lm.generate_ids(torch.tensor([start]), 6, greedy=True)
    assert text == lm.decode_new(ids, len(start))[0]
    sampled = lm.generate("the", max_new_tokens=6, temperature=0.9, top_k=5, top_p=0.9, seed=3)
    assert sampled == lm.generate("the", max_new_tokens=6, temperature=0.9, top_k=5, top_p=0.9, seed=3)
    assert lm.generate("the", 6, include_prompt=True) == "the" + text
    assert (
        len(lm.tokenizer.encode(lm.generate("", max_new_tokens=3, temperature=1.0), add_bos=False, add_eos=False)) <= 3
    )
    with pytest.raises(ValueError, match=r"^temperature must be a number > 0, got 0"):
        lm.generate("x", temperature=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 2"):
        lm.generate("x", top_p=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        lm.generate("x", max_new_tokens=0)


def test_flamingo_generate_takes_images_and_shots(tmp_path):
    model = build("flamingo")
    spec = model.image_spec()
    image = torch.rand(spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    path = _png_of(image, tmp_path / "q.png")
    text = model.generate(images=path, max_new_tokens=4)
    query = model.preprocess(path)[0]
    assert isinstance(text, str) and text == model.caption(query, None, max_new_tokens=4)[1]
    assert isinstance(model.generate("This is", images=[path], shots=2, max_new_tokens=3, temperature=0.8), str)
    two = model.generate("<image>a one<|endofchunk|><image>This is", images=[path, path], max_new_tokens=3)
    assert isinstance(two, str)
    with pytest.raises(ValueError, match="needs images="):
        model.generate("hello")
    with pytest.raises(ValueError, match="shots= goes with a prompt without <image>"):
        model.generate("<image>x", images=path, shots=1)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        model.generate(images=path, top_k=0)


def test_fromage_generate_captions_and_continues(tmp_path):
    model = build("fromage")
    spec = model.image_spec()
    image = torch.rand(spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    path = _png_of(image, tmp_path / "q.png")
    from polymodal.plugins.fromage import infer

    text = model.generate(images=path, max_new_tokens=3)
    want = infer.generate(model, "<image>", images=model.preprocess(path), max_new_tokens=3)["text"]
    assert text == want
    assert isinstance(model.generate("a digit", max_new_tokens=3, temperature=0.7, seed=1), str)
    with pytest.raises(ValueError, match=r"1 <image> token\(s\) but 2 image\(s\)"):
        model.generate("<image> and", images=[path, path], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        model.generate("x", temperature=-1.0)
