"""The ``mae`` family (square-image masked autoencoders): ViTMAE by name from an offline Hub cache, the
export back to transformers and round trip, evaluation, samples, PIXEL's core-MAE converter; and
RuDolph's ``generate``.

The Hub is a cache folder in huggingface_hub's layout built from a randomly initialised tiny
``ViTMAEForPreTraining`` (``HF_HUB_OFFLINE=1``; nothing is downloaded)."""

from __future__ import annotations

import hashlib
import json

import attrs
import pytest
import torch
from click.testing import CliRunner

import polymodal
from polymodal.cli import main
from polymodal.io.export import ExportError, export_folder
from polymodal.registry import get_registry

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

ATOL = 1e-5
ORG = "tiny-org"


def hf_vitmae(seed: int = 0, *, norm_pix_loss: bool = False, channels: int = 3) -> torch.nn.Module:
    """A tiny random ViTMAEForPreTraining with every weight (position tables included) visibly random."""
    cfg = transformers.ViTMAEConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
        num_channels=channels,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=48,
        norm_pix_loss=norm_pix_loss,
    )
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def add_repo(cache, repo: str, model: torch.nn.Module) -> str:
    """``model`` as ``repo``'s default branch in the Hub cache ``cache``; returns the commit hash."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    storage = cache / huggingface_hub.file_download.repo_folder_name(repo_id=repo, repo_type="model")
    model.save_pretrained(storage / "snapshots" / commit, safe_serialization=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(Hub cache folder, the transformers model, its commit) for ``tiny-org/vit-mae``."""
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    model = hf_vitmae(3, norm_pix_loss=True)
    return cache, model, add_repo(cache, f"{ORG}/vit-mae", model)


@pytest.fixture
def offline_hub(hub_cache, tmp_path, monkeypatch):
    """The Hub cache above, offline, and a fresh polymodal cache."""
    cache = hub_cache[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "pm-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "pm-cache"


def same_outputs(ours, theirs, channels: int = 3, seed: int = 0) -> None:
    """The encoder's latent, the predicted patches, the mask and the loss agree for the same noise."""
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.rand(3, channels, 16, 16, generator=g), torch.rand(3, 16, generator=g)
    with torch.no_grad():
        want = theirs(pixel_values=x, noise=noise)
        latent = theirs.vit(pixel_values=x, noise=noise).last_hidden_state
        got = ours.masked(x, noise=noise)
    assert want.logits.abs().max() > 0.1 and latent.abs().max() > 0.1
    torch.testing.assert_close(got.latent, latent, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pred, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
    assert torch.equal(got.mask, want.mask.float())


# -- ViTMAE by name -------------------------------------------------------------------------------


def test_vitmae_loads_by_hub_name_matches_transformers_and_is_cached(hub_cache, offline_hub, capsys):
    _, theirs, commit = hub_cache
    model = polymodal.load(f"hf:{ORG}/vit-mae")
    assert model.family == "mae" and type(model).__name__ == "MAEModel"
    same_outputs(model, theirs)
    folder = offline_hub / "hub" / ORG / "vit-mae" / commit
    err = capsys.readouterr().err
    assert f"converted commit {commit[:12]} with hf-vitmae" in err and str(folder) in err
    again = polymodal.load(f"hf:{ORG}/vit-mae")
    assert "reused the conversion" in capsys.readouterr().err
    same_outputs(again, theirs, seed=1)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():  # the unmasked encoder (forward) is ViTMAEModel's with mask_ratio 0
        theirs.config.mask_ratio = 0.0
        try:
            want = theirs.vit(pixel_values=x, noise=torch.arange(16.0).expand(2, 16)).last_hidden_state
        finally:
            theirs.config.mask_ratio = 0.75
        torch.testing.assert_close(model(x), want, atol=ATOL, rtol=0)


def test_vitmae_is_picked_by_model_type():
    from polymodal.io import hub

    assert hub.converters()["vit_mae"][0] == "hf-vitmae"


def test_convert_cli_writes_an_mae_model_folder_from_a_hub_name(hub_cache, offline_hub, tmp_path):
    _, theirs, _ = hub_cache
    result = CliRunner().invoke(main, ["convert", f"hf:{ORG}/vit-mae", str(tmp_path / "mae")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "mae" / "config.json").read_text())["family"] == "mae"
    same_outputs(polymodal.load(tmp_path / "mae"), theirs)


def test_a_transformers_folder_loads_directly(tmp_path, capsys):
    theirs = hf_vitmae(4, channels=1)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = polymodal.load(tmp_path / "hf")
    assert "is a transformers folder (model_type 'vit_mae')" in capsys.readouterr().err
    same_outputs(model, theirs, channels=1)


def test_pixels_converter_still_returns_the_core_mae(tmp_path):
    from polymodal.nn.mae import MAE
    from polymodal.plugins.pixel.convert import convert_hf_vitmae, mae_config_from_hf, mae_state_from_hf

    theirs = hf_vitmae(5)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    mae = convert_hf_vitmae(tmp_path / "hf")
    assert type(mae) is MAE
    x, noise = torch.rand(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            mae(x, noise=noise).pred, theirs(pixel_values=x, noise=noise).logits, atol=ATOL, rtol=0
        )
    cfg = mae_config_from_hf(theirs.config.to_dict())
    state = mae_state_from_hf(theirs.state_dict(), cfg.encoder.depth, cfg.decoder_depth)
    assert set(state) == set(mae.state_dict())


def test_a_non_square_vitmae_is_refused_by_name(tmp_path):
    theirs = hf_vitmae(6)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["image_size"] = [16, 32]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(polymodal.io.LoadError, match=r"square image_size only; got \[16, 32\]"):
        polymodal.load(tmp_path / "hf")


# -- export back ----------------------------------------------------------------------------------


def _tiny(variant: str = "vit-mae", **changes):
    spec = get_registry().get("model", variant)
    config = spec.model_class.tiny_config(spec.config)
    if changes:
        config = attrs.evolve(config, mae=attrs.evolve(config.mae, **changes))
    torch.manual_seed(0)
    model = spec.model_class(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize(("variant", "norm_pix_loss"), [("vit-mae", False), ("vit-mae-shapes", True)])
def test_export_to_vitmae_for_pretraining_and_back(tmp_path, variant, norm_pix_loss):
    model = _tiny(variant, norm_pix_loss=norm_pix_loss)
    model.save(tmp_path / "pm")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "pm"), str(tmp_path / "hf"), "--to", "hf"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ViTMAEForPreTraining"]
    theirs, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs.eval()
    e = model.config.mae.encoder
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, e.channels, e.image_size, e.image_size, generator=g)
    noise = torch.rand(3, model.mae.num_patches, generator=g)
    with torch.no_grad():
        want = model.masked(x, noise=noise)
        got = theirs(pixel_values=x, noise=noise)
        assert want.pred.abs().max() > 0.1
        torch.testing.assert_close(got.logits, want.pred, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
    result = CliRunner().invoke(main, ["convert", "--from", "hf-vitmae", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = polymodal.load(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.masked(x, noise=noise).pred, want.pred, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(x), model(x), atol=ATOL, rtol=0)


def test_settings_vitmae_lacks_are_refused_by_name(tmp_path):
    model = _tiny(norm_pix_loss=True, norm_pix_eps=1e-3)
    model.save(tmp_path / "pm")
    with pytest.raises(ExportError, match=r"MAEModelConfig\.mae\.norm_pix_eps=0\.001"):
        export_folder(tmp_path / "pm", tmp_path / "hf")
    enc = attrs.evolve(model.config.mae.encoder, cls_token=False)
    bare = _tiny(encoder=enc)
    bare.save(tmp_path / "bare")
    with pytest.raises(ExportError, match=r"mae\.encoder\.cls_token=False"):
        export_folder(tmp_path / "bare", tmp_path / "hf2")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()


def test_pixels_strip_mae_stays_refused():
    from polymodal.io.export import exporter_for

    assert exporter_for("mae", "hf").label == "transformers ViTMAEForPreTraining"
    assert "refused" in exporter_for("pixel-mae", "hf").label


# -- the family ---------------------------------------------------------------------------------


def test_the_config_refuses_a_strip_grid():
    from polymodal.nn.mae import MAEConfig
    from polymodal.plugins.mae import MAEModelConfig

    with pytest.raises(ValueError, match=r"square patch grid.*1×24"):
        MAEModelConfig(mae=MAEConfig(grid_rows=1, grid_cols=24))


def test_a_few_steps_train_evaluate_and_sample(tmp_path):
    from polymodal.data import load_dataset

    model = polymodal.create("vit-mae")
    data = load_dataset("digits")
    metrics = model.evaluate(data)
    assert {"masked_loss", "mean_baseline_loss", "loss_ratio", "linear_probe_accuracy", "pixel_probe_accuracy"} <= set(
        metrics
    )
    assert metrics["samples"] == len(data.test) and 0 < metrics["masked_loss"]
    torch.testing.assert_close(
        torch.tensor(metrics["loss_ratio"]), torch.tensor(metrics["masked_loss"] / metrics["mean_baseline_loss"])
    )
    assert model.evaluate(data) == metrics  # seeded masks: the same numbers twice
    paths = model.sample_to_folder(tmp_path / "s", n=3, seed=1)
    assert [p.name for p in paths] == ["sample_000.png", "sample_001.png", "sample_002.png", "grid.png"]
    rows = model.reconstruction_rows(data.test.batch([0, 1])["image"])
    assert rows.shape == (2, 1, 8, 24)
    torch.testing.assert_close(rows[..., :8], data.test.batch([0, 1])["image"].float())
    x = model.preprocess(torch.rand(16, 16))  # a user's image at another size
    assert x.shape == (1, 1, 8, 8) and model(x).shape == (1, 17, 64)


@pytest.mark.slow
def test_vit_mae_quality():
    """The default recipe (1000 steps): masked-patch loss clearly below predicting each position's mean
    patch, and a linear probe on the pooled encoder features far above chance. Measured at seeds 0, 1, 2:
    loss_ratio 0.664 / 0.670 / 0.665, linear_probe_accuracy 0.892 / 0.908 / 0.867 (raw pixels: 0.967)."""
    _, metrics = polymodal.train("vit-mae", progress=False)
    assert metrics["loss_ratio"] < 0.72, metrics
    assert metrics["linear_probe_accuracy"] >= 0.83, metrics


# -- RuDolph.generate ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rudolph():
    from polymodal.testing import contracts

    return contracts.build("rudolph").eval()


def _rudolph_images(model, n: int) -> torch.Tensor:
    s, c = model.vq.config.image_size, model.vq.config.channels
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(n))


def test_rudolph_generate_captions_images_greedily_like_caption(rudolph):
    images = _rudolph_images(rudolph, 3)
    want = rudolph.caption(images)
    assert rudolph.generate(images=images) == want
    one = rudolph.generate(images=images[0])
    assert isinstance(one, str) and one == want[0]
    assert rudolph.generate(images=[images[1], images[2]]) == want[1:]


def test_rudolph_generate_continues_the_prompt_with_the_most_likely_token(rudolph):
    from polymodal.plugins.rudolph import text as tx

    image = _rudolph_images(rudolph, 1)
    prompt = "a"
    body = rudolph.text.encode(prompt, add_bos=False, add_eos=False)
    sp = rudolph.text.special_tokens
    codes = rudolph.encode_images(image)
    stream = torch.cat(
        [rudolph.left_text([""], "lt_i2t"), rudolph.codes_to_ids(codes), torch.tensor([[sp["rt_i2t"], *body]])], dim=1
    )
    with torch.no_grad():
        logits = rudolph(stream)[0, -1].masked_fill(~rudolph.vocab_masks[2], float("-inf"))
    best = int(logits.argmax())
    got = rudolph.generate(prompt, images=image[0], max_new_tokens=1)
    want = "" if best in (sp["eos"], *tx.conditions(rudolph.text)) else rudolph.text.decode([best]).rstrip()
    assert got == want


def test_rudolph_generate_samples_reproducibly_and_checks_its_values(rudolph):
    images = _rudolph_images(rudolph, 4)
    a = rudolph.generate(images=images, temperature=2.0, top_k=50, seed=3)
    assert a == rudolph.generate(images=images, temperature=2.0, top_k=50, seed=3)
    draws = {tuple(rudolph.generate(images=images, temperature=3.0, seed=s)) for s in range(4)}
    assert len(draws) > 1  # sampling, not greedy
    with pytest.raises(ValueError, match="temperature must be a number > 0, got 0"):
        rudolph.generate(images=images, temperature=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        rudolph.generate(images=images, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        rudolph.generate(images=images, max_new_tokens=0)
    with pytest.raises(ValueError, match="pass images="):
        rudolph.generate("a")
    with pytest.raises(ValueError, match="right context has room"):
        rudolph.generate("a " * rudolph.config.right_len, images=images[0])
