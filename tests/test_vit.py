"""ViT: parity with transformers through ``polymodal convert --from hf-vit``, shapes, input checks, variants.

Every transformers model here is built from a small config with random weights (nothing is
downloaded), saved with ``save_pretrained`` (safetensors), converted on the command line and
loaded back with ``polymodal.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import polymodal
from polymodal.attention import AttentionSpec, backends, use_backend
from polymodal.cli import main
from polymodal.io import LoadError
from polymodal.io.hf import mlp_ratio_for
from polymodal.plugins.vit.convert import convert_hf_vit

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SMALL = dict(
    hidden_size=48,
    num_attention_heads=4,
    intermediate_size=96,
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_act="gelu",
)


def cpu_backends() -> list[str]:
    """Attention backends that can run a ViT's (unmasked, fp32, inference) call on the CPU."""
    spec = AttentionSpec("cpu", torch.float32, False, False, False, False, "", False, 17, 17, 12)
    return sorted(name for name, b in backends().items() if b.supports(spec) is None)


BACKENDS = cpu_backends()

# name: (transformers class, extra config, layers)
CASES = {
    "eps1e-12": ("ViTForImageClassification", dict(layer_norm_eps=1e-12), 3),
    "eps1e-5": ("ViTForImageClassification", dict(layer_norm_eps=1e-5), 2),
    "no-qkv-bias": ("ViTForImageClassification", dict(layer_norm_eps=1e-12, qkv_bias=False), 2),
    "gelu-tanh": ("ViTForImageClassification", dict(layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"), 2),
    "vitmodel": ("ViTModel", dict(layer_norm_eps=1e-12), 2),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Replace every weight (norms included) by a visible random value, so that a swapped,
    transposed or dropped tensor changes the output far beyond the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def convert_cli(src: Path, dst: Path) -> None:
    result = CliRunner().invoke(main, ["convert", "--from", "hf-vit", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert f"wrote {dst}" in result.output


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name → (transformers model in eval mode, polymodal model loaded from the converted folder)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cls_name, extra, layers = CASES[name]
            cfg = transformers.ViTConfig(**{**SMALL, **extra}, num_hidden_layers=layers, num_labels=5)
            torch.manual_seed(0)
            if cls_name == "ViTModel":
                hf = transformers.ViTModel(cfg, add_pooling_layer=True)
            else:
                hf = getattr(transformers, cls_name)(cfg)
            randomise(hf, seed=len(cache) + 1)
            hf.eval()
            root = tmp_path_factory.mktemp(name)
            hf.save_pretrained(root / "hf", safe_serialization=True)
            assert (root / "hf" / "model.safetensors").is_file()
            convert_cli(root / "hf", root / "pm")
            cache[name] = (hf, polymodal.load(root / "pm"), root)
        return cache[name]

    return get


def pixels(b: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- parity -------------------------------------------------------------------------------------


def test_cpu_backends_include_math_and_sdpa():
    assert {"math", "sdpa"} <= set(BACKENDS)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["eps1e-12", "eps1e-5", "no-qkv-bias", "gelu-tanh"])
def test_logits_match_transformers(converted, case, backend):
    hf, pm, _ = converted(case)
    assert not pm.training and not hf.training
    x = pixels()
    with torch.no_grad():
        want = hf(pixel_values=x).logits  # (B, 5)
        with use_backend(backend):
            got = pm(x)
    assert got.shape == want.shape == (3, 5)
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", BACKENDS)
def test_vitmodel_features_are_the_cls_token(converted, backend):
    hf, pm, _ = converted("vitmodel")
    assert pm.config.num_classes == 0 and pm.head is None  # the pooler is dropped
    x = pixels()
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state[:, 0]  # (B, 48)
        with use_backend(backend):
            got = pm(x)
            tokens = pm.encoder(x)
        hidden = hf(pixel_values=x).last_hidden_state
    assert got.shape == (3, 48)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tokens, hidden, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [(48, 48), (32, 48)])
def test_interpolated_positions_match_transformers(converted, size):
    hf, pm, _ = converted("eps1e-12")
    x = pixels(2, *size)
    with torch.no_grad():
        want = hf(pixel_values=x, interpolate_pos_encoding=True).logits
        with use_backend("math"):
            got = pm(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_config_mirrors_the_source(converted, case):
    hf, pm, root = converted(case)
    src, enc = hf.config, pm.config.encoder
    assert (enc.dim, enc.depth, enc.block.heads) == (src.hidden_size, src.num_hidden_layers, src.num_attention_heads)
    assert (enc.image_size, enc.patch_size, enc.channels) == (32, 8, 3)
    assert enc.block.norm_eps == src.layer_norm_eps
    assert all(m.eps == src.layer_norm_eps for m in pm.modules() if isinstance(m, torch.nn.LayerNorm))
    assert pm.encoder.blocks.blocks[0].mlp.fc1.out_features == src.intermediate_size
    assert (pm.encoder.blocks.blocks[0].attn.qkv.bias is not None) == src.qkv_bias
    header = json.loads((root / "pm" / "config.json").read_text())
    assert header["family"] == "vit" and "hf-vit" in header["source"]


def test_convert_python_api_returns_the_model_without_writing(converted, tmp_path):
    hf, pm, root = converted("eps1e-5")
    model = convert_hf_vit(root / "hf")
    assert not model.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), pm.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_mlp_ratio_is_exact_for_awkward_widths():
    assert int(11 * (30 / 11)) == 29  # why the converter does not use hidden / dim directly
    for dim, hidden in [(11, 30), (48, 96), (768, 3072), (44, 100), (7, 1)]:
        assert int(dim * mlp_ratio_for(dim, hidden)) == hidden


# -- shapes and input checks ------------------------------------------------------------------------


def test_loaded_model_maps_images_to_logits(converted):
    _, pm, _ = converted("eps1e-12")
    assert pm(pixels(4)).shape == (4, 5)
    assert pm(pixels(1)).shape == (1, 5)


@pytest.mark.parametrize("size", [(16, 16), (48, 48), (40, 64)])
def test_other_image_sizes_interpolate_positions(converted, size):
    _, pm, _ = converted("eps1e-12")
    assert pm(pixels(2, *size)).shape == (2, 5)


@pytest.mark.parametrize(
    "bad, needles",
    [
        (torch.randn(2, 1, 32, 32), ["3 channels", "got 1"]),
        (torch.randn(2, 4, 32, 32), ["3 channels", "got 4"]),
        (torch.randn(2, 3, 30, 32), ["patch size 8", "30×32"]),
        (torch.randn(2, 3, 32, 36), ["patch size 8", "32×36"]),
        (torch.randn(3, 32, 32), ["4-D", "(B, 3, H, W)", "(3, 32, 32)"]),
        (torch.randn(1, 2, 3, 32, 32), ["4-D", "(1, 2, 3, 32, 32)"]),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["floating-point", "torch.uint8"]),
        (torch.zeros(2, 3, 32, 32, dtype=torch.int64), ["floating-point", "torch.int64"]),
    ],
)
def test_bad_images_raise_a_value_error_naming_expected_and_given(converted, bad, needles):
    _, pm, _ = converted("eps1e-12")
    with pytest.raises(ValueError) as info:
        pm(bad)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


# -- converter errors -----------------------------------------------------------------------------


def run_convert(src: Path, dst: Path):
    return CliRunner().invoke(main, ["convert", "--from", "hf-vit", str(src), str(dst)])


def test_non_vit_config_is_a_clear_error(converted, tmp_path):
    _, _, root = converted("eps1e-12")
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 48}))
    (src / "model.safetensors").write_bytes((root / "hf" / "model.safetensors").read_bytes())
    result = run_convert(src, tmp_path / "out")
    assert result.exit_code != 0
    assert "'bert'" in result.output and "model_type 'vit'" in result.output
    assert str(src / "config.json") in result.output
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_names_the_file(converted, tmp_path):
    _, _, root = converted("eps1e-12")
    src = tmp_path / "cut"
    src.mkdir()
    (src / "config.json").write_text((root / "hf" / "config.json").read_text())
    data = (root / "hf" / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run_convert(src, tmp_path / "out")
    assert result.exit_code != 0
    assert str(src / "model.safetensors") in result.output
    with pytest.raises(LoadError, match="model.safetensors"):
        convert_hf_vit(src)
    assert not (tmp_path / "out").exists()


def test_missing_weight_and_unsupported_activation_are_named(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, root = converted("eps1e-12")
    src = tmp_path / "partial"
    src.mkdir()
    state = load_file(str(root / "hf" / "model.safetensors"))
    del state["vit.encoder.layer.1.attention.attention.value.weight"]
    save_file(state, str(src / "model.safetensors"))
    hf_cfg = json.loads((root / "hf" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(LoadError, match=r"encoder\.layer\.1\.attention\.attention\.value\.weight"):
        convert_hf_vit(src)
    (src / "config.json").write_text(json.dumps({**hf_cfg, "hidden_act": "silu"}))
    with pytest.raises(LoadError, match="unsupported hidden_act 'silu'"):
        convert_hf_vit(src)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_convert(tmp_path / "empty", tmp_path / "out")
    assert result.exit_code != 0 and "config.json" in result.output
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    result = run_convert(tmp_path / "empty", tmp_path / "out")
    assert result.exit_code != 0 and "model.safetensors" in result.output


# -- registered variants ----------------------------------------------------------------------------


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_create_vit_digits_recipe():
    model = polymodal.create("vit")
    e = model.config.encoder
    assert (e.image_size, e.patch_size, e.channels, e.dim, e.depth, e.block.heads) == (8, 2, 1, 128, 4, 4)
    assert model.config.num_classes == 10
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, width, depth, heads, params",
    [
        ("vit-s16", 384, 12, 6, 22_050_664),  # timm vit_small_patch16_224
        ("vit-b16", 768, 12, 12, 86_567_656),  # timm vit_base_patch16_224
    ],
)
def test_create_imagenet_variants(name, width, depth, heads, params):
    model = polymodal.create(name)
    e = model.config.encoder
    assert (e.image_size, e.patch_size, e.channels, e.dim, e.depth, e.block.heads) == (224, 16, 3, width, depth, heads)
    assert model.config.num_classes == 1000
    assert len(model.encoder.blocks.blocks) == depth
    assert n_params(model) == pytest.approx(params, rel=0.01)
    if name == "vit-s16":
        with torch.no_grad():
            assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1000)
