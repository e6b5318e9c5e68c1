"""Issue 14 ("Nothing lost, nothing silent"), loading and configs: loading never trains and never
guesses, configs are strict.

* a saved folder's ``config.json`` whose part names ``"auto"`` or a path is refused (loading reads
  the folder's own sub-folders only; ``"auto"`` is resolved at creation, never at load);
* composites with non-default (differently sized) parts save, load back and compute the same;
* missing config fields, an unknown ``format`` and a tensor of another dtype are LoadErrors;
* converters refuse source tensors they did not use (a smaller ``num_hidden_layers``, a stray key);
* ``--set`` refuses a non-object for a nested config and an object beside dotted keys for the
  same field; validators refuse NaN and infinities.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import polymodal
import polymodal.api as polymodal_api
from polymodal.cli import main
from polymodal.config import apply_overrides, config, field, from_dict, in_range, parse_overrides, to_dict
from polymodal.io import LoadError
from polymodal.io.folders import FORMAT
from polymodal.registry import get_registry
from polymodal.testing import contracts
from polymodal.train import TrainConfig
from polymodal.train.trainer import train as REAL_TRAIN

REAL_TRAIN_MODEL = polymodal_api.train_model


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """An empty cache, and any training is a test failure (loading must never train)."""
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("loading trained a model")

    monkeypatch.setattr("polymodal.api.train_model", refuse)
    monkeypatch.setattr("polymodal.train.trainer.train", refuse)


def _edit_header(folder: Path, change) -> None:
    path = folder / "config.json"
    header = json.loads(path.read_text())
    change(header)
    path.write_text(json.dumps(header))


@pytest.fixture
def flamingo_folder(tmp_path):
    model = contracts.build("flamingo").eval()
    model.save(tmp_path / "fl")
    return model, tmp_path / "fl"


@pytest.fixture
def vit_folder(tmp_path):
    model = contracts.build("vit").eval()
    model.save(tmp_path / "vit")
    return model, tmp_path / "vit"


# -- loading never trains and reads only the folder ----------------------------------------------


@pytest.mark.parametrize("path", ["auto", "../elsewhere", "/abs/lm"])
def test_a_part_path_in_a_saved_config_is_refused_not_trained_nor_followed(flamingo_folder, path):
    model, folder = flamingo_folder
    model.part_modules()["lm"].save(folder.parent / "elsewhere")  # a loadable folder the path would reach

    def change(header):
        header["config"]["lm"]["path"] = path

    _edit_header(folder, change)
    with pytest.raises(LoadError, match=r"(?s)lm.*" + repr(path).replace(".", r"\.") + r".*lm/"):
        polymodal.load(folder)


def test_a_saved_composite_loads_its_parts_from_its_own_sub_folders_only(flamingo_folder, monkeypatch):
    model, folder = flamingo_folder
    monkeypatch.chdir(folder.parent)
    loaded = polymodal.load(folder)
    assert loaded.config.lm.path == "" and loaded.config.vision.path == ""
    assert loaded.part_sources == {"lm": str(folder / "lm"), "vision": str(folder / "vision")}


# -- composites with non-default parts save and load back ---------------------------------------


def test_flamingo_with_differently_sized_parts_reloads_and_evaluates_the_same(tmp_path):
    contracts.check_nondefault_parts("flamingo")


def test_flamingo_trained_with_part_folders_reloads_to_the_same_metrics(tmp_path):
    from polymodal.api import evaluate_folder
    from polymodal.data import load_dataset

    reg = get_registry()
    lm_spec, clip_spec = reg.get("model", "lm"), reg.get("model", "clip")
    lm_cfg = contracts.tiny_config(lm_spec.model_class, lm_spec.config)
    lm_spec.instantiate(attrs.evolve(lm_cfg, dim=24, heads=3)).save(tmp_path / "lm")
    clip_spec.instantiate(contracts.tiny_config(clip_spec.model_class, clip_spec.config)).save(tmp_path / "clip")
    digits = load_dataset("digits")
    spec = reg.get("model", "flamingo")
    cfg = spec.config_for(digits, (f"lm={tmp_path / 'lm'}", f"vision={tmp_path / 'clip'}", "eval_limit=5"))
    model = spec.instantiate(cfg)
    recipe = attrs.evolve(spec.train, steps=2, batch_size=4, warmup_steps=0, checkpoint_every=0)
    model = REAL_TRAIN(model, digits, recipe, out=tmp_path / "fl", progress=False)
    metrics = model.evaluate(digits)
    model.save(tmp_path / "fl", metrics=metrics)
    assert polymodal.load(tmp_path / "fl").config_dict() == model.config_dict()
    assert evaluate_folder(tmp_path / "fl") == metrics


# -- strict configs, format and dtypes ----------------------------------------------------------


def test_missing_config_fields_are_a_load_error_naming_them(vit_folder):
    _, folder = vit_folder

    def change(header):
        del header["config"]["pool"]
        del header["config"]["encoder"]["block"]["act"]

    _edit_header(folder, change)
    with pytest.raises(LoadError, match=r"config\.json.*ViTConfig.*missing.*encoder\.block\.act, pool"):
        polymodal.load(folder)


def test_from_dict_requires_every_field_while_overrides_keep_defaults():
    from polymodal.plugins.vit.model import ViTConfig

    full = to_dict(ViTConfig())
    assert from_dict(ViTConfig, full) == ViTConfig()
    partial = {k: v for k, v in full.items() if k != "pool"}
    with pytest.raises(ValueError, match=r"ViTConfig.*missing.*pool"):
        from_dict(ViTConfig, partial)
    nested = json.loads(json.dumps(full))
    del nested["encoder"]["depth"]
    with pytest.raises(ValueError, match=r"ViTConfig.*missing.*encoder\.depth"):
        from_dict(ViTConfig, nested)
    # creation from overrides: the fields not given keep their defaults
    cfg = apply_overrides(ViTConfig(), ['encoder={"depth": 2}'])
    assert cfg.encoder.depth == 2 and cfg.pool == ViTConfig().pool


@pytest.mark.parametrize("fmt", ["polymodal/2", "other/1", None])
def test_an_unknown_or_newer_format_is_refused_naming_both(vit_folder, fmt):
    _, folder = vit_folder

    def change(header):
        if fmt is None:
            del header["format"]
        else:
            header["format"] = fmt

    _edit_header(folder, change)
    found = f"format {fmt!r}" if fmt else "no 'format'"
    with pytest.raises(LoadError, match=rf"config\.json has {found}.*reads '{FORMAT}'"):
        polymodal.load(folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_tensor_of_another_dtype_is_refused_naming_it_and_both_dtypes(vit_folder, dtype):
    _, folder = vit_folder
    path = folder / "model.safetensors"
    state = load_file(str(path))
    key = "head.weight"
    state[key] = state[key].to(dtype)
    save_file(state, str(path), metadata={"family": "vit", "format": FORMAT})
    with pytest.raises(LoadError, match=rf"(?s)head\.weight.*{str(dtype).split('.')[-1]}.*float32"):
        polymodal.load(folder)


def test_folders_written_today_still_load(vit_folder, flamingo_folder):
    for model, folder in (vit_folder, flamingo_folder):
        loaded = polymodal.load(folder)
        assert loaded.config == model.config


# -- converters refuse what they did not use -------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _source(kind: str, root: Path) -> tuple[Path, str, Callable[[dict], None]]:
    """A random 2-layer transformers folder of ``kind``: (folder, converter name, fewer-layers edit)."""
    torch.manual_seed(0)
    if kind == "vit":
        cfg = transformers.ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=8,
            num_labels=3,
        )
        hf, conv = transformers.ViTForImageClassification(cfg), "hf-vit"

        def fewer(c):
            c["num_hidden_layers"] = 1

    elif kind == "vit-model":
        cfg = transformers.ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=8,
        )
        hf, conv = transformers.ViTModel(cfg, add_pooling_layer=True), "hf-vit"

        def fewer(c):
            c["num_hidden_layers"] = 1

    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
        hf, conv = transformers.GPT2LMHeadModel(cfg), "hf-gpt2"

        def fewer(c):
            c["n_layer"] = 1

    elif kind == "gpt2-model":
        cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
        hf, conv = transformers.GPT2Model(cfg), "hf-gpt2"

        def fewer(c):
            c["n_layer"] = 1

    elif kind == "clip":
        text = dict(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=12,
            eos_token_id=2,
        )
        vision = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
        hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
        conv = "hf-clip"

        def fewer(c):
            c["vision_config"]["num_hidden_layers"] = 1

    elif kind == "imagegpt":
        cfg = transformers.ImageGPTConfig(vocab_size=17, n_positions=16, n_embd=16, n_layer=2, n_head=2)
        hf, conv = transformers.ImageGPTForCausalImageModeling(cfg), "hf-imagegpt"

        def fewer(c):
            c["n_layer"] = 1

    else:
        cfg = transformers.ViTMAEConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=4,
            decoder_hidden_size=8,
            decoder_num_hidden_layers=2,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=16,
        )
        hf, conv = transformers.ViTMAEForPreTraining(cfg), "hf-vitmae"

        def fewer(c):
            c["decoder_num_hidden_layers"] = 1

    _randomise(hf, 1)
    hf.save_pretrained(root / "hf", safe_serialization=True)
    return root / "hf", conv, fewer


def _convert(conv: str, src: Path):
    return get_registry().get("converter", conv)(src) if conv != "hf-vitmae" else _vitmae(src)


def _vitmae(src):
    from polymodal.plugins.pixel.convert import convert_hf_vitmae

    return convert_hf_vitmae(src)


KINDS = ["vit", "vit-model", "gpt2", "gpt2-model", "clip", "imagegpt", "vitmae"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_converter_uses_every_source_tensor_of_a_full_folder(tmp_path, kind):
    src, conv, _ = _source(kind, tmp_path)
    model = _convert(conv, src)
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("kind", KINDS)
def test_a_converter_refuses_the_layers_a_smaller_config_leaves_out(tmp_path, kind):
    src, conv, fewer = _source(kind, tmp_path)
    hf = json.loads((src / "config.json").read_text())
    fewer(hf)
    (src / "config.json").write_text(json.dumps(hf))
    with pytest.raises(LoadError, match=r"(?s)model\.safetensors.*(unused|not used).*\.1\."):
        _convert(conv, src)


@pytest.mark.parametrize("kind", KINDS)
def test_a_converter_refuses_a_stray_source_tensor_by_name(tmp_path, kind):
    src, conv, _ = _source(kind, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state["stray.adapter.weight"] = torch.zeros(2, 2)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"(?s)(unused|not used).*stray\.adapter\.weight"):
        _convert(conv, src)


# -- --set and validators -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["null", "5", "[1]", '"text"'])
def test_a_nested_config_given_a_non_object_is_a_value_error_naming_it(value):
    cfg = get_registry().get("model", "vit").config
    with pytest.raises(ValueError, match=r"^--set encoder=.*: encoder is a nested .*JSON object"):
        apply_overrides(cfg, [f"encoder={value}"])
    with pytest.raises(ValueError, match=r"ViTConfig\.encoder.*JSON object"):
        parse_overrides(type(cfg), [f"encoder={value}"])


@pytest.mark.parametrize("order", ["object-first", "dotted-first"])
def test_an_object_beside_dotted_keys_for_the_same_field_is_an_error(order):
    cfg = get_registry().get("model", "vit").config
    pairs = ["encoder={}", "encoder.depth=2"]
    if order == "dotted-first":
        pairs.reverse()
    with pytest.raises(ValueError, match=r"encoder=.*encoder\.depth"):
        apply_overrides(cfg, pairs)


def test_a_part_path_string_beside_dotted_part_keys_still_works():
    cfg = get_registry().get("model", "flamingo").config
    out = apply_overrides(cfg, ["lm=/some/dir", "lm.variant=lm"])
    assert out.lm.path == "/some/dir" and out.lm.variant == "lm"


def test_the_cli_reports_a_bad_nested_value_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("polymodal.api.train_model", REAL_TRAIN_MODEL)  # the overrides fail before any training
    result = CliRunner().invoke(
        main, ["train", "vit", "--set", "encoder=null", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    assert "encoder" in result.output


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_validators_refuse_nan_and_infinities(value):
    with pytest.raises(ValueError, match=r"--set grad_clip=.*: grad_clip must be a finite number"):
        apply_overrides(TrainConfig(), [f"grad_clip={value}"])


def test_in_range_allows_infinity_only_when_asked():
    @config
    class Open:
        """A toy config."""

        x: float = field(0.0, "Open-ended.", check=in_range(0.0))
        y: float = field(0.0, "May be infinite.", check=in_range(0.0, allow_inf=True))

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"Open\.x"):
            Open(x=bad)
    assert Open(y=float("inf")).y == float("inf")
    with pytest.raises(ValueError, match=r"Open\.y"):
        Open(y=float("nan"))
    with pytest.raises(ValueError, match=r"Open\.y"):
        Open(y=float("-inf"))


@pytest.mark.parametrize(
    "kind,buffers",
    [
        ("gpt2", ["h.0.attn.bias", "h.1.attn.masked_bias"]),  # causal-mask buffers older transformers saved
        ("imagegpt", ["transformer.h.0.attn.bias"]),
        ("clip", ["text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"]),
    ],
)
def test_buffers_transformers_derives_from_the_config_are_declared_ignorable(tmp_path, kind, buffers):
    src, conv, _ = _source(kind, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    for key in buffers:
        state[key] = torch.ones(1, 1, 4, 4)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert isinstance(_convert(conv, src), torch.nn.Module)


def test_a_half_precision_source_is_cast_and_the_card_says_so(tmp_path):
    src, conv, _ = _source("vit", tmp_path)
    state = {k: v.half() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["convert", "--from", conv, str(src), str(tmp_path / "pm")])
    assert result.exit_code == 0, result.output
    assert "weights cast from float16 to float32" in (tmp_path / "pm" / "README.md").read_text()
    assert polymodal.load(tmp_path / "pm").head.weight.dtype == torch.float32


def test_the_cli_names_unused_source_tensors_in_one_line(tmp_path):
    src, conv, fewer = _source("gpt2", tmp_path)
    hf = json.loads((src / "config.json").read_text())
    fewer(hf)
    (src / "config.json").write_text(json.dumps(hf))
    result = CliRunner().invoke(main, ["convert", "--from", conv, str(src), str(tmp_path / "pm")])
    assert result.exit_code != 0 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert "unused tensor(s)" in result.output and "h.1." in result.output
    assert not (tmp_path / "pm").exists()
