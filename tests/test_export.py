"""``polymodal export``: model folders to transformers folders (round trips through ``from_pretrained`` and
back through the converters), the refusals, the output guard, the exporter registry kind, and
``--weights-only`` (the folder without its training checkpoint)."""

from __future__ import annotations

import json
import os
import sys

import attrs
import pytest
import torch
from click.testing import CliRunner

import polymodal
from polymodal import hookimpl
from polymodal.cli import main
from polymodal.io.export import MARK, Exporter, ExportError, export_folder, export_weights_only
from polymodal.registry import get_registry
from polymodal.registry.loader import register_plugin, unregister_plugin

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def _tiny(variant: str, **changes):
    """A tiny model of ``variant`` with visible random weights (a swapped tensor would show), in eval mode."""
    spec = get_registry().get("model", variant)
    cls = spec.model_class
    config = cls.tiny_config(spec.config)
    if changes:
        config = attrs.evolve(config, **changes)
    torch.manual_seed(0)
    model = cls(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _export(tmp_path, model, *extra):
    model.save(tmp_path / "pm")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "hf"), "--to", "hf", *extra])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'hf'}" in result.output
    return tmp_path / "hf"


def _load_hf(cls, folder):
    hf, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _round_trip(converter: str, folder, tmp_path):
    """The exported folder converted back with our own converter (the full round trip)."""
    result = CliRunner().invoke(main, ["convert", "--from", converter, str(folder), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    return polymodal.load(tmp_path / "back")


# -- round trips, one per family with a transformers counterpart ------------------------------------


@pytest.mark.parametrize("num_classes", [10, 0])
def test_vit_exports_to_vit_for_image_classification_and_back(tmp_path, num_classes):
    model = _tiny("vit", num_classes=num_classes, pool="cls")  # transformers' ViT reads the [CLS] token only
    folder = _export(tmp_path, model)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    hf = _load_hf(transformers.ViTForImageClassification, folder)
    images = torch.rand(3, model.config.encoder.channels, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(images)
        torch.testing.assert_close(hf(pixel_values=images).logits, ours, atol=ATOL, rtol=0)
        back = _round_trip("hf-vit", folder, tmp_path)
        torch.testing.assert_close(back(images), ours, atol=ATOL, rtol=0)
    assert back.config.encoder == model.config.encoder.with_block(drop_path=0.0)  # training-only, not exported
    assert back.config.num_classes == num_classes


def test_clip_exports_to_clip_model_with_its_tokenizer_and_back(tmp_path):
    model = _tiny("clip")
    folder = _export(tmp_path, model)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    hf = _load_hf(transformers.CLIPModel, folder)
    pixels, ids = model.example_inputs(3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids)
        torch.testing.assert_close(_features(hf.get_image_features(pixel_values=pixels)), image, atol=ATOL, rtol=0)
        torch.testing.assert_close(_features(hf.get_text_features(input_ids=ids)), text, atol=ATOL, rtol=0)
        assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item())
        back = _round_trip("hf-clip", folder, tmp_path)
        torch.testing.assert_close(back.encode_image(pixels), image, atol=ATOL, rtol=0)
        torch.testing.assert_close(back.encode_text(ids), text, atol=ATOL, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a red circle")["input_ids"] == model.tokenize("a red circle")[0].tolist()
    assert back.tokenize("a red circle").tolist() == model.tokenize("a red circle").tolist()


def test_lm_exports_to_gpt2_with_its_tokenizer_and_back(tmp_path):
    model = _tiny("lm")
    folder = _export(tmp_path, model)
    hf = _load_hf(transformers.GPT2LMHeadModel, folder)
    assert "lm_head.weight" not in __import__("safetensors.torch").torch.load_file(folder / "model.safetensors")
    (ids,) = model.example_inputs(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, atol=ATOL, rtol=0)
        back = _round_trip("hf-gpt2", folder, tmp_path)
        torch.testing.assert_close(back(ids), ours, atol=ATOL, rtol=0)
    tok = model.tokenizer
    prompt = [tok.special_tokens["bos"], *tok.encode("seven eight", add_bos=False, add_eos=False)]  # as `sample` does
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer("seven eight")["input_ids"] == prompt
    assert hf.config.bos_token_id == tok.special_tokens["bos"] and hf.config.eos_token_id == tok.special_tokens["eos"]
    assert back.config.dim == model.config.dim and back.config.act == model.config.act


@pytest.mark.parametrize("channels", [1, 3])
def test_igpt_exports_to_imagegpt_with_its_palette_and_back(tmp_path, channels):
    model = _tiny("igpt", channels=channels)
    with torch.no_grad():
        model.palette.copy_(torch.rand(model.palette.shape, generator=torch.Generator().manual_seed(3)))
        model.palette_fitted.fill_(True)
    folder = _export(tmp_path, model)
    hf = _load_hf(transformers.ImageGPTForCausalImageModeling, folder)
    (ids,) = model.example_inputs(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, atol=ATOL, rtol=0)
        back = _round_trip("hf-imagegpt", folder, tmp_path)
        torch.testing.assert_close(back(ids), ours, atol=ATOL, rtol=0)
    expected = model.palette.expand(-1, 3)  # a grey palette comes back as three equal channels
    torch.testing.assert_close(back.palette, expected, atol=1e-6, rtol=0)
    processor = transformers.ImageGPTImageProcessor.from_pretrained(folder)
    assert len(processor.clusters) == model.config.palette_size


@pytest.mark.parametrize("channels", [1, 3])
def test_imagegpts_processor_quantises_images_to_the_models_tokens(tmp_path, channels):
    import numpy as np
    from PIL import Image

    model = _tiny("igpt", channels=channels)
    with torch.no_grad():
        model.palette.copy_(torch.rand(model.palette.shape, generator=torch.Generator().manual_seed(3)))
        model.palette_fitted.fill_(True)
    folder = _export(tmp_path, model)
    processor = transformers.ImageGPTImageProcessor.from_pretrained(folder)
    side = model.config.image_size
    pixels = (torch.rand(2, side, side, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    images = [Image.fromarray(p.numpy(), "RGB") for p in pixels]
    if channels == 1:
        images = [i.convert("L").convert("RGB") for i in images]  # grey, as three equal channels
    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])).permute(0, 3, 1, 2)
    ours = model.tokens(x[:, :channels])  # (B, N)
    theirs = processor(images=images, return_tensors="pt").input_ids
    assert theirs.tolist() == ours.tolist()


@pytest.mark.parametrize(("variant", "channels"), [("vit", 1), ("vit", 3), ("clip", 1), ("clip", 3)])
def test_the_image_processor_prepares_images_as_preprocess_does(tmp_path, variant, channels):
    from PIL import Image

    model = _tiny(variant)
    key = "encoder" if variant == "vit" else "vision"
    pool = {"pool": "cls"} if variant == "vit" else {}  # the digits recipe pools the mean, which transformers lacks
    model = _tiny(variant, **{key: attrs.evolve(getattr(model.config, key), channels=channels)}, **pool)
    folder = _export(tmp_path, model)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pixels = torch.rand(13, 17, 3, generator=torch.Generator().manual_seed(4))
    image = Image.fromarray((pixels.numpy() * 255).astype("uint8"), "RGB")  # another size than the model's
    ours = model.preprocess(image)
    theirs = processor(images=image if channels == 3 else image.convert("L"), return_tensors="pt").pixel_values
    assert theirs.shape == ours.shape == (1, channels, *ours.shape[-2:])
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    with torch.no_grad():  # and the processed image runs through the exported model as through ours
        hf = transformers.AutoModel.from_pretrained(folder).eval()
        if variant == "vit":  # AutoModel: ViTModel, whose [CLS] output is the classifier's features
            got, ref = hf(pixel_values=theirs).last_hidden_state[:, 0], model.features(ours)
        else:
            got, ref = _features(hf.get_image_features(pixel_values=theirs)), model.encode_image(ours)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


# -- refusals -----------------------------------------------------------------------------------------


REFUSED = {
    "vit-mean-pool": ("vit", lambda c: attrs.evolve(c, pool="mean"), "ViTConfig.pool='mean'"),
    "vit-sincos": ("vit", lambda c: _enc(c, pos_embed="sincos"), "ViTConfig.encoder.pos_embed='sincos'"),
    "vit-ln-pre": ("vit", lambda c: _enc(c, ln_pre=True), "ViTConfig.encoder.ln_pre=True"),
    "vit-grid": ("vit", lambda c: _enc(c, grid=(1, 4)), "ViTConfig.encoder.grid=(1, 4)"),
    "vit-rmsnorm": ("vit", lambda c: _block(c, norm="rmsnorm"), "ViTConfig.encoder.block.norm='rmsnorm'"),
    "vit-swiglu": ("vit", lambda c: _block(c, act="swiglu"), "ViTConfig.encoder.block.act='swiglu'"),
    "clip-eos-2": ("clip", lambda c: attrs.evolve(c, eos_id=2, tokenizer="none"), "CLIPConfig.eos_id=2"),
    "clip-patch-bias": (
        "clip",
        lambda c: attrs.evolve(c, vision=attrs.evolve(c.vision, patch_bias=True)),
        "CLIPConfig.vision.patch_bias=True",
    ),
}


def _enc(config, **changes):
    return attrs.evolve(config, encoder=attrs.evolve(config.encoder, **changes))


def _block(config, **changes):
    return attrs.evolve(config, encoder=config.encoder.with_block(**changes))


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_setting_transformers_cannot_express_is_refused_by_name(tmp_path, case):
    variant, change, needle = REFUSED[case]
    spec = get_registry().get("model", variant)
    spec.model_class(change(spec.model_class.tiny_config(spec.config))).save(tmp_path / "pm")
    with pytest.raises(ExportError, match="cannot export to transformers") as info:
        export_folder(tmp_path / "pm", tmp_path / "hf")
    assert needle in str(info.value)
    assert not (tmp_path / "hf").exists()  # nothing written
    result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "hf"), "--to", "hf"])
    assert result.exit_code == 1 and result.output.startswith("Error: cannot export") and needle in result.output


def test_pixels_strip_mae_is_refused_naming_the_grid(tmp_path):
    """PIXEL's MAE works on a 1×N strip of patches; transformers' ViTMAE builds square grids only."""
    _tiny("pixel-mae").save(tmp_path / "pm")
    with pytest.raises(ExportError, match=r"ViTMAE: it has no counterpart for PixelMAEConfig\.mae\.grid_rows=1"):
        export_folder(tmp_path / "pm", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    cfg = transformers.ViTMAEConfig(
        image_size=[12, 288],
        patch_size=12,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_channels=1,
    )
    with pytest.raises(RuntimeError):  # why: transformers cannot build a non-square ViTMAE at all
        transformers.ViTMAEForPreTraining(cfg)


def test_a_family_or_format_without_an_exporter_lists_the_installed_ones(tmp_path):
    _tiny("vqvae").save(tmp_path / "vq")
    with pytest.raises(ExportError, match=r"no exporter writes a 'vqvae' model folder as 'hf'.*vit → hf"):
        export_folder(tmp_path / "vq", tmp_path / "out")
    _tiny("vit").save(tmp_path / "pm")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "out"), "--to", "onnx"])
    assert result.exit_code == 1 and "no exporter writes a 'vit' model folder as 'onnx'" in result.output


def test_without_transformers_the_export_says_what_to_install(tmp_path, monkeypatch):
    _tiny("vit").save(tmp_path / "pm")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "hf"), "--to", "hf"])
    assert result.exit_code == 1 and "needs the transformers package (pip install transformers)" in result.output
    assert not (tmp_path / "hf").exists()


def test_the_command_needs_exactly_one_of_to_and_weights_only(tmp_path):
    _tiny("vit").save(tmp_path / "pm")
    for args in ([], ["--to", "hf", "--weights-only"]):
        result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and "--to FORMAT" in result.output and "--weights-only" in result.output


# -- the output guard ---------------------------------------------------------------------------------


def test_export_never_writes_over_other_files_and_replaces_an_export_only_with_overwrite(tmp_path):
    model = _tiny("vit", pool="cls")
    folder = _export(tmp_path, model)
    assert json.loads((folder / "config.json").read_text())[MARK]["family"] == "vit"
    again = ["export", str(tmp_path / "pm"), str(folder), "--to", "hf"]
    result = CliRunner().invoke(main, again)
    assert result.exit_code == 1 and "already holds an exported model; pass --overwrite" in result.output
    result = CliRunner().invoke(main, [*again, "--overwrite"])
    assert result.exit_code == 0, result.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    model.save(tmp_path / "pm2")
    for target in (mine, tmp_path / "pm2"):  # someone's files; a polymodal model folder
        result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(target), "--to", "hf", "--overwrite"])
        assert result.exit_code == 1 and "is not a folder an export wrote" in result.output
    assert (mine / "notes.txt").read_text() == "keep me" and polymodal.load(tmp_path / "pm2") is not None
    result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "pm" / "hf"), "--to", "hf"])
    assert result.exit_code == 1 and "inside it" in result.output


# -- the registry kind ----------------------------------------------------------------------------------


def test_a_plugin_adds_an_exporter_picked_by_family_and_format(tmp_path):
    def write_summary(model, folder):
        """The config as JSON."""
        (folder / "summary.json").write_text(json.dumps({"family": model.family, "dim": model.config.encoder.dim}))

    class Plugin:
        """Registers one exporter."""

        @hookimpl
        def register_exporters(self, register):
            register("test-vit-summary", Exporter("vit", "summary", write_summary, "a JSON summary"))

    assert register_plugin(Plugin(), "test-export-plugin").status == "loaded"
    try:
        _tiny("vit").save(tmp_path / "pm")
        result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "s"), "--to", "summary"])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "s" / "summary.json").read_text()) == {"family": "vit", "dim": 16}
        listed = CliRunner().invoke(main, ["list", "exporter"])
        assert "test-vit-summary" in listed.output and "hf-vit" in listed.output
    finally:
        unregister_plugin("test-export-plugin")


def test_every_family_with_a_transformers_converter_registers_an_exporter():
    exporters = {(e.obj.family, e.obj.to) for e in get_registry().entries("exporter")}
    assert {("vit", "hf"), ("clip", "hf"), ("lm", "hf"), ("igpt", "hf")} <= exporters


# -- weights only ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A vit folder after a 2-step run: it holds checkpoint/ (the optimiser state)."""
    from polymodal.api import train_model

    out = tmp_path_factory.mktemp("run") / "vit"
    sets = ["encoder.depth=1", "encoder.block.dim=16", "encoder.block.heads=2"]
    train_model("vit", set_=sets, steps=2, out=str(out), progress=False)
    assert (out / "checkpoint").is_dir()
    return out


def test_weights_only_copies_the_folder_without_its_checkpoint(trained, tmp_path):
    out = tmp_path / "slim"
    result = CliRunner().invoke(main, ["export", str(trained), str(out), "--weights-only"])
    assert result.exit_code == 0, result.output
    assert not (out / "checkpoint").exists() and (trained / "checkpoint").is_dir()  # the source is untouched
    assert sorted(os.listdir(out)) == sorted(n for n in os.listdir(trained) if n != "checkpoint")
    images = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(polymodal.load(out)(images), polymodal.load(trained)(images), atol=0, rtol=0)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < sum(f.stat().st_size for f in trained.rglob("*") if f.is_file()) / 2


def test_weights_only_is_guarded_like_train_out(trained, tmp_path):
    out = tmp_path / "slim"
    export_weights_only(trained, out)
    with pytest.raises(ValueError, match="already holds a polymodal vit model folder; pass --overwrite"):
        export_weights_only(trained, out)
    export_weights_only(trained, out, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a polymodal model folder"):
        export_weights_only(trained, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"DIR .* is not a polymodal model folder \(it holds notes\.txt\)"):
        export_weights_only(mine, tmp_path / "other")
    result = CliRunner().invoke(main, ["export", str(trained), str(trained), "--weights-only", "--overwrite"])
    assert result.exit_code == 1 and "is the model folder" in result.output and (trained / "checkpoint").is_dir()
