"""The KL-VAE family (``kl-vae``, ``kl-vae-shapes``) and the diffusers ``AutoencoderKL`` converter.

Unit tests on tiny configs: shapes and the round trip, the posterior's KL against the closed form, the loss's
terms, the latent scaling factor (computed once training ends, stored in ``config.json``, used by
``encode_latents`` / ``decode_latents``), bad input refused naming expected vs given. Parity: randomly
initialised (and randomised) diffusers ``AutoencoderKL`` folders, converted with ``polymodal convert --from
diffusers-vae``, give the same encode mean and log-variance and the same decode output at atol 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

import polymodal
from polymodal.io import LoadError
from polymodal.nn.unet import ResBlock, UNetConfig
from polymodal.plugins.klvae import KLVAE, KLVAEConfig
from polymodal.plugins.klvae.convert import load_diffusers_vae, vae_config_from_diffusers
from polymodal.plugins.klvae.evaluate import latent_std
from polymodal.plugins.klvae.nets import DiagonalGaussian

TINY = dict(image_size=8, channels=1, block_channels=(8, 16), norm_groups=4)


def _model(**changes) -> KLVAE:
    torch.manual_seed(0)
    return KLVAE(KLVAEConfig(**{**TINY, **changes})).eval()


class _Data:
    """A stand-in dataset: ``split(name)['image']`` and ``name``."""

    def __init__(self, train, test, name="digits"):
        self.splits, self.name, self.meta = {"train": {"image": train}, "test": {"image": test}}, name, {}

    def split(self, name):
        return self.splits[name]


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize(
    "changes, latent",
    [
        ({}, (4, 4, 4)),
        ({"image_size": 16, "channels": 3, "block_channels": (8, 16, 16), "layers_per_block": 2}, (4, 4, 4)),
        ({"block_channels": (8,), "latent_channels": 3, "mid_attention": False}, (3, 8, 8)),
    ],
)
def test_shapes_and_round_trip(changes, latent):
    model = _model(**changes)
    c, s = model.config.channels, model.config.image_size
    x = torch.rand(3, c, s, s)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (3, *latent) == (3, *model.latent_shape)
        assert torch.equal(posterior.mode(), posterior.mean)
        a, b = posterior.sample(torch.Generator().manual_seed(1)), posterior.sample(torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and not torch.equal(a, posterior.mean)
        out = model.decode(posterior.mean)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        assert torch.equal(model(x), out)
        raw = model.decode(posterior.mean, clamp=False)
        assert torch.equal(raw.clamp(0, 1), out)


def test_kl_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 2, 2, generator=g) * 2  # (B, 2L, h, w)
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))  # (B,)
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    assert DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl().item() == 0.0  # q = N(0, I)
    clamped = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], 1))
    assert clamped.logvar.item() == -30.0  # as diffusers


def test_loss_is_reconstruction_plus_weighted_kl_per_pixel():
    model = _model(kl_weight=1e-2).train()
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(5)
    loss, metrics = model.loss({"image": x})
    torch.manual_seed(5)
    posterior = model.encode(x)
    recon = model.decode(posterior.sample(), clamp=False)
    mse = ((recon - x) ** 2).mean()
    kl = posterior.kl().mean()
    torch.testing.assert_close(loss, mse + 1e-2 * kl / 64)
    torch.testing.assert_close(metrics["recon_mse"], mse.detach())
    torch.testing.assert_close(metrics["kl"], kl.detach())
    l1_model = _model(kl_weight=0.0, recon_loss="l1").train()  # the same weights (same seed)
    torch.manual_seed(5)
    l1, _ = l1_model.loss({"image": x})
    torch.manual_seed(5)
    posterior = model.encode(x)
    torch.testing.assert_close(l1, (model.decode(posterior.sample(), clamp=False) - x).abs().mean())


def test_scaling_factor_is_computed_stored_and_used(tmp_path):
    model = _model()
    x = torch.rand(6, 1, 8, 8)
    with pytest.raises(ValueError, match="no scaling_factor yet"):
        model.encode_latents(x)
    with pytest.raises(ValueError, match="no scaling_factor yet"):
        model.decode_latents(torch.zeros(1, 4, 4, 4))
    train, test = torch.rand(20, 1, 8, 8), torch.rand(10, 1, 8, 8)
    data = _Data(train, test)
    model.begin_step(3, 10)  # mid-run (an eval_every evaluation): reported, not stored
    metrics = model.evaluate(data)
    assert model.config.scaling_factor == 0.0 and metrics["scaling_factor"] == 0.0
    model.begin_step(9, 10)  # the last step has run
    metrics = model.evaluate(data)
    std = latent_std(model, train)
    assert (
        model.config.scaling_factor == pytest.approx(1 / std)
        and metrics["scaling_factor"] == model.config.scaling_factor
    )
    with torch.no_grad():  # the same posterior samples the factor was computed from, scaled: unit std
        scaled = model.encode_latents(train, generator=torch.Generator().manual_seed(0))
        assert scaled.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
        scaled = model.encode_latents(x, sample=False)
        torch.testing.assert_close(scaled, model.config.scaling_factor * model.encode(x).mean)
        torch.testing.assert_close(model.decode_latents(scaled), model.decode(scaled / model.config.scaling_factor))
    factor = model.config.scaling_factor
    model.evaluate(_Data(train * 0.5, test))  # a set factor is never changed
    assert model.config.scaling_factor == factor
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["scaling_factor"] == factor
    assert polymodal.load(tmp_path / "m").config.scaling_factor == factor


def test_polymodal_train_stores_the_factor_in_the_saved_config(tmp_path):
    from polymodal.api import train_model

    tiny = ("block_channels=[8,16]", "norm_groups=4")
    _, metrics = train_model("kl-vae", set_=tiny, steps=3, out=tmp_path / "m", progress=False)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["config"]
    assert saved["scaling_factor"] > 0 and saved["scaling_factor"] == metrics["scaling_factor"]
    assert {"recon_mse", "normalised_recon_mse", "latent_std"} <= set(metrics)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["scaling_factor"] == saved["scaling_factor"]


def test_bad_input_names_expected_and_given():
    model = _model()
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, 4, 4\) = \(B, L, h, w\); got \(2, 3, 4, 4\)"):
        model.decode(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected latents .* got \(4, 4, 4\)"):
        model.decode(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match=r"expected floating-point latents; got dtype torch.int64"):
        model.decode(torch.zeros(2, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\) in \[0, 1\]; got \(2, 1, 16, 16\)"):
        model.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\) in \[0, 1\]; got \(2, 3, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected images .* got list"):
        model.loss({"image": [[0.0]]})
    with pytest.raises(ValueError, match=r"expected floating-point images in \[0, 1\]; got dtype torch.uint8"):
        model.encode(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"block_channels must be multiples of norm_groups=4; got \[6\]"):
        KLVAEConfig(block_channels=(8, 6), norm_groups=4)
    with pytest.raises(ValueError, match=r"image_size must be divisible by 2\^\(levels − 1\) = 4 .* got image_size=6"):
        KLVAEConfig(image_size=6, block_channels=(8, 8, 8), norm_groups=4)
    with pytest.raises(ValueError, match=r"recon_loss must be one of"):
        KLVAEConfig(recon_loss="l2")


def test_the_core_resblock_without_time_conditioning():
    cfg = UNetConfig(channels=(8,), attention_levels=(False,), attention_head_dim=8, norm_groups=4)
    plain = ResBlock(8, 16, cfg, time_conditioned=False)
    assert plain.time_emb_proj is None and not any("time_emb_proj" in k for k in plain.state_dict())
    x = torch.randn(2, 8, 4, 4)
    assert plain(x).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"takes no time embedding \(time_conditioned=False\); got \(2, 32\)"):
        plain(x, torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"takes a time embedding; got None"):
        ResBlock(8, 16, cfg)(x)


def test_sample_to_folder_writes_reconstructions(tmp_path):
    model = _model(data="digits")
    paths = model.sample_to_folder(tmp_path / "s", n=3, seed=0)
    names = {p.name for p in paths}
    assert {"sample_000.png", "original_002.png", "pairs.png", "grid.png"} <= names
    with pytest.raises(ValueError, match="takes no prompt"):
        model.sample_to_folder(tmp_path / "p", n=1, prompt="a three")
    with pytest.raises(ValueError, match="takes no options; got temperature"):
        model.sample_to_folder(tmp_path / "o", n=1, temperature=0.5)


# --------------------------------------------------------------------------- diffusers parity
diffusers_configs = [
    dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=16),
    dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=2,
        latent_channels=3,
        sample_size=8,
        in_channels=1,
        out_channels=1,
        mid_block_add_attention=False,
        scaling_factor=0.5,
    ),
]


def _diffusers_folder(tmp_path, cfg: dict, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **cfg
    ).eval()
    with torch.no_grad():  # randomise every tensor, so no branch (a norm's affine, a bias) is trivial
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    folder = tmp_path / "vae"
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.mark.parametrize("index", range(len(diffusers_configs)))
def test_a_converted_diffusers_vae_encodes_and_decodes_the_same(tmp_path, index):
    from click.testing import CliRunner

    from polymodal.cli import main

    cfg = diffusers_configs[index]
    ref, folder = _diffusers_folder(tmp_path, cfg, seed=index)
    result = CliRunner().invoke(main, ["convert", "--from", "diffusers-vae", str(folder), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = polymodal.load(tmp_path / "out").eval()
    assert isinstance(model, KLVAE) and model.config.scaling_factor == cfg.get("scaling_factor", 0.18215)
    c, s = cfg.get("in_channels", 3), cfg["sample_size"]
    g = torch.Generator().manual_seed(index)
    x = torch.rand(3, c, s, s, generator=g)  # (B, C, S, S) in [0, 1]
    with torch.no_grad():
        theirs = ref.encode(x * 2 - 1).latent_dist  # diffusers' VAEs take [-1, 1]
        ours = model.encode(x)
        assert (ours.mean - theirs.mean).abs().max() < 1e-4
        assert (ours.logvar - theirs.logvar).abs().max() < 1e-4
        z = torch.randn(theirs.mean.shape, generator=g) * 2  # (B, L, h, w)
        decoded = (ref.decode(z).sample + 1) / 2  # back to [0, 1]
        assert (model.decode(z, clamp=False) - decoded).abs().max() < 1e-4
        assert (model.decode(z) - decoded.clamp(0, 1)).abs().max() < 1e-4
        assert (model(x) - ((ref(x * 2 - 1).sample + 1) / 2).clamp(0, 1)).abs().max() < 1e-4


def test_convert_without_from_picks_the_converter_and_a_pipeline_vae_folder(tmp_path):
    from click.testing import CliRunner

    from polymodal.cli import main

    ref, folder = _diffusers_folder(tmp_path, diffusers_configs[0])
    (tmp_path / "pipe").mkdir()
    folder.rename(tmp_path / "pipe" / "vae")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "pipe" / "vae"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = load_diffusers_vae(tmp_path / "pipe")  # the pipeline folder: its vae/ is read
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert (model.encode(x).mean - polymodal.load(tmp_path / "out").encode(x).mean).abs().max() == 0
        assert (model.encode(x).mean - ref.encode(x * 2 - 1).latent_dist.mean).abs().max() < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "AutoencoderTiny"}, r"reads AutoencoderKL folders; .*'AutoencoderTiny'"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, r"down_block_types entry='AttnDown"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, r"up_block_types \['UpDecoderBlock2D'\] needs one entry per"),
        ({"act_fn": "gelu"}, r"act_fn='gelu' \(supported: 'silu', 'swish'\)"),
        ({"use_quant_conv": False}, r"use_quant_conv=False"),
        ({"shift_factor": 0.1}, r"shift_factor=0.1"),
        ({"latents_mean": [0.0] * 4}, r"latents_mean=\[0.0"),
        ({"out_channels": 1}, r"out_channels=1 \(supported: in_channels=3\)"),
        ({"sample_size": [16, 8]}, r"sample_size=\[16, 8\] \(supported: a square size\)"),
    ],
)
def test_unsupported_diffusers_options_are_refused_by_name(change, message):
    cfg = {
        **diffusers_configs[0],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        vae_config_from_diffusers(cfg)


def test_every_source_tensor_must_be_used_old_names_are_read_and_no_pickle_is_read(tmp_path):
    from safetensors.torch import load_file, save_file

    ref, folder = _diffusers_folder(tmp_path, diffusers_configs[0])
    path = folder / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in weights.items():  # diffusers' pre-0.14 attention names
        for new, was in old.items():
            key = key.replace(f".{new}.", f".{was}.")
        renamed[key] = value
    save_file(renamed, str(path))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert (load_diffusers_vae(folder).encode(x).mean - ref.encode(x * 2 - 1).latent_dist.mean).abs().max() < 1e-4
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(LoadError, match=r"1 unused tensor\(s\) the AutoencoderKL conversion would drop: extra\.weight"):
        load_diffusers_vae(folder)
    del weights["quant_conv.weight"]
    save_file(weights, str(path))
    with pytest.raises(LoadError, match=r"lacks the AutoencoderKL weight 'quant_conv\.weight'"):
        load_diffusers_vae(folder)
    path.unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match=r"diffusion_pytorch_model\.bin, which it does not unpickle"):
        load_diffusers_vae(folder)
