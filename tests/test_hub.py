"""Pretrained models by name from the Hugging Face Hub, and transformers folders loaded directly.

Offline: a Hub cache (huggingface_hub's layout, ``models--ORG--NAME/{refs/main, snapshots/<commit>/…}``)
is built in a temporary folder from randomly initialised tiny transformers models, with
``HF_HUB_CACHE`` pointed at it and ``HF_HUB_OFFLINE=1``; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import polymodal
from polymodal.cli import main
from polymodal.io import LoadError
from polymodal.io import hub as hub_module
from polymodal.io.hf import HUB_FILES, folder_model_type

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

ATOL = 1e-5
ORG = "tiny-org"


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Visible random values for every weight (norm gains around 1), so a swapped tensor would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = any(k in name for k in ("norm", "layrnorm", ".ln_", "ln_f")) and name.endswith("weight")
            p.copy_((1.0 if norm else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_models() -> dict[str, torch.nn.Module]:
    """One small random transformers model per converter family, by repository name."""
    torch.manual_seed(0)
    gpt2 = dict(n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    vit = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16)
    return {
        "vit": transformers.ViTForImageClassification(transformers.ViTConfig(**vit, patch_size=8, num_labels=3)),
        "clip": transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config=dict(
                    vocab_size=99,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=16,
                    eos_token_id=7,
                    bos_token_id=5,
                    pad_token_id=1,
                ),
                vision_config={**vit, "patch_size": 8},
                projection_dim=24,
            )
        ),
        "imagegpt": transformers.ImageGPTForCausalImageModeling(
            transformers.ImageGPTConfig(vocab_size=17, layer_norm_epsilon=1e-5, **gpt2)
        ),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, **gpt2)),
        "vit-mae": transformers.ViTMAEForPreTraining(
            transformers.ViTMAEConfig(
                **{**vit, "image_size": 16},
                patch_size=4,
                decoder_hidden_size=24,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=48,
            )
        ),
    }


def add_repo(cache: Path, repo: str, model: torch.nn.Module) -> str:
    """Write ``model`` into the Hub cache ``cache`` as ``repo``'s default branch; returns the commit hash."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    storage = cache / huggingface_hub.file_download.repo_folder_name(repo_id=repo, repo_type="model")
    model.save_pretrained(storage / "snapshots" / commit, safe_serialization=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(Hub cache folder, {name: transformers model}, {name: commit}) for every family."""
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    models = {name: randomise(m, seed) for seed, (name, m) in enumerate(tiny_models().items())}
    commits = {name: add_repo(cache, f"{ORG}/{name}", m) for name, m in models.items()}
    return cache, models, commits


@pytest.fixture(autouse=True)
def offline_hub(hub_cache, tmp_path, monkeypatch):
    """The Hub cache above, offline, and a fresh polymodal cache for each test."""
    cache = hub_cache[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "pm-cache"))
    # huggingface_hub reads these two variables once, when it is imported: the same values for this process
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "pm-cache"


def outputs(name: str, model: torch.nn.Module, ours: bool) -> torch.Tensor:
    """The same inputs through a transformers model (``ours=False``) or its conversion."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if name == "vit":
            x = torch.rand(2, 3, 16, 16, generator=g)
            return model(x) if ours else model(pixel_values=x).logits
        if name == "clip":
            x, ids = torch.rand(2, 3, 16, 16, generator=g), torch.randint(8, 99, (2, 10), generator=g)
            ids[:, 6] = 7  # eos
            if ours:
                return torch.cat([model.encode_image(x), model.encode_text(ids)])
            image, text = model.get_image_features(pixel_values=x), model.get_text_features(input_ids=ids)
            pooled = [t if isinstance(t, torch.Tensor) else t.pooler_output for t in (image, text)]
            return torch.cat(pooled)
        vocab = 17 if name == "imagegpt" else 300
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        return model(ids) if ours else model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["vit", "clip", "imagegpt", "gpt2"])
def test_load_by_name_converts_once_matches_transformers_and_reuses_the_cache(hub_cache, offline_hub, name, capsys):
    _, models, commits = hub_cache
    model = polymodal.load(f"hf:{ORG}/{name}")
    want = outputs(name, models[name], ours=False)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(outputs(name, model, ours=True), want, atol=ATOL, rtol=0)
    folder = offline_hub / "hub" / ORG / name / commits[name]
    err = capsys.readouterr().err
    assert f"hf:{ORG}/{name}: converted commit {commits[name][:12]} with hf-" in err and str(folder) in err
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert f"hf:{ORG}/{name} (commit {commits[name][:12]}, from the Hugging Face Hub)" in card
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reusing the cached folder")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_module, "pick_converter", no_conversion)
        again = polymodal.load(f"hf:{ORG}/{name}@{commits[name]}")  # the same commit, named by its hash
    assert f"reused the conversion of commit {commits[name][:12]} cached in {folder}" in capsys.readouterr().err
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    torch.testing.assert_close(outputs(name, again, ours=True), want, atol=ATOL, rtol=0)


def test_the_converter_is_picked_by_model_type_for_every_converter_family():
    picked = {mt: name for mt, (name, _) in hub_module.converters().items()}
    assert {
        "vit": "hf-vit",
        "clip": "hf-clip",
        "imagegpt": "hf-imagegpt",
        "gpt2": "hf-gpt2",
        "vit_mae": "hf-vitmae",
    }.items() <= picked.items()


def test_vitmae_is_fetched_by_name_and_converts_into_an_mae_model(hub_cache):
    """ViTMAE converts into the mae family (hf-vitmae); PIXEL's convert_hf_vitmae still gives the core MAE."""
    from polymodal.plugins.pixel.convert import convert_hf_vitmae

    _, models, commits = hub_cache
    model = polymodal.load(f"hf:{ORG}/vit-mae")
    assert model.family == "mae"
    folder = hub_module.snapshot(f"hf:{ORG}/vit-mae@main")
    assert folder.name == commits["vit-mae"] and folder_model_type(folder) == "vit_mae"
    mae = convert_hf_vitmae(folder)
    x, noise = torch.rand(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        want = models["vit-mae"](pixel_values=x, noise=noise).logits
        torch.testing.assert_close(model.masked(x, noise=noise).pred, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(mae(x, noise=noise).pred, want, atol=ATOL, rtol=0)


def test_a_broken_cached_conversion_is_converted_again(hub_cache, offline_hub, capsys):
    _, models, commits = hub_cache
    polymodal.load(f"hf:{ORG}/vit")
    folder = offline_hub / "hub" / ORG / "vit" / commits["vit"]
    (folder / "model.safetensors").write_bytes(b"truncated")
    model = polymodal.load(f"hf:{ORG}/vit@main")
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and "converting it again" in err
    torch.testing.assert_close(outputs("vit", model, True), outputs("vit", models["vit"], False), atol=ATOL, rtol=0)
    polymodal.load(f"hf:{ORG}/vit")
    assert "reused" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["hf:", "hf:a/b/c", "hf:org/name@", "hf:../x", "hf:org/na me"])
def test_a_malformed_hub_name_is_one_clear_error(bad):
    with pytest.raises(LoadError, match=r"hf:ORG/NAME|revision"):
        polymodal.load(bad)


def test_a_repository_missing_offline_names_it_and_the_offline_cache():
    with pytest.raises(LoadError) as info:
        polymodal.load("hf:nobody/nothing@v1")
    message = str(info.value)
    assert message.startswith("hf:nobody/nothing@v1: huggingface_hub could not provide it (offline")
    assert "\n" not in message


def test_only_configs_safetensors_and_tokenizer_files_are_fetched():
    repo = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "model.ckpt",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
        "onnx/model.onnx",
        "extra/model.safetensors",
    ]
    kept = set(huggingface_hub.utils.filter_repo_objects(repo, allow_patterns=list(HUB_FILES)))
    assert kept == {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} | {
        "preprocessor_config.json"
    }


def test_a_transformers_folder_loads_directly_converted_in_memory(tmp_path, offline_hub, capsys):
    torch.manual_seed(3)
    hf = randomise(tiny_models()["vit"], 9)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = polymodal.load(tmp_path / "hf")
    err = capsys.readouterr().err
    assert f"{tmp_path / 'hf'} is a transformers folder (model_type 'vit'): converted it in memory with hf-vit" in err
    torch.testing.assert_close(outputs("vit", model, True), outputs("vit", hf, False), atol=ATOL, rtol=0)
    assert not offline_hub.exists() and sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_a_folder_that_is_neither_gives_the_existing_load_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LoadError, match="lacks 'family' and 'config'; is this a polymodal model folder"):
        polymodal.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LoadError, match=r"config\.json says model_type 'bert', which no registered converter reads"):
        polymodal.load(tmp_path)


def test_convert_picks_the_converter_and_checks_from(hub_cache, tmp_path):
    _, models, _ = hub_cache
    result = CliRunner().invoke(main, ["convert", f"hf:{ORG}/imagegpt", str(tmp_path / "pm")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'pm'} (converted with hf-imagegpt)" in result.output
    want = outputs("imagegpt", models["imagegpt"], False)
    torch.testing.assert_close(outputs("imagegpt", polymodal.load(tmp_path / "pm"), True), want, atol=ATOL, rtol=0)
    result = CliRunner().invoke(main, ["convert", "--from", "hf-clip", f"hf:{ORG}/vit", str(tmp_path / "x")])
    assert result.exit_code != 0 and not (tmp_path / "x").exists()
    assert "hf-clip reads model_type 'clip', but hf:tiny-org/vit (config.json) says 'vit'" in result.output
    assert "(`hf-vit` does; leave the converter out" in result.output
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "y")])
    assert result.exit_code != 0 and "expected a folder or hf:ORG/NAME[@REVISION]" in result.output


def test_convert_on_the_command_line_honours_the_hub_environment(hub_cache, tmp_path):
    """A fresh process: HF_HUB_CACHE and HF_HUB_OFFLINE reach huggingface_hub through the environment alone."""
    cache, models, _ = hub_cache
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["POLYMODAL_CACHE"] = str(tmp_path / "pm-cache")
    out = str(tmp_path / "pm")
    cmd = [sys.executable, "-m", "polymodal.cli", "convert", "--from", "hf-gpt2", f"hf:{ORG}/gpt2", out]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = outputs("gpt2", models["gpt2"], False)
    torch.testing.assert_close(outputs("gpt2", polymodal.load(tmp_path / "pm"), True), want, atol=ATOL, rtol=0)
