"""The MoVQ family (``movq-shapes``), the core's spatially conditioned decoder, and the diffusers ``VQModel`` converter.

Unit tests on tiny configs: shapes and the quantised / unquantised round trips, the spatial norm's formula, the
loss's terms, the metrics' definitions, bad input refused naming expected vs given. Parity: randomly initialised
(and randomised) diffusers ``VQModel(norm_type="spatial")`` folders, converted with ``polymodal convert --from
diffusers-movq``, give the same latents, codes and decoded images (quantised and not) at atol 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import polymodal
from polymodal.io import LoadError
from polymodal.nn.autoencoder import Decoder, SpatialNorm
from polymodal.plugins.movq import MoVQ, MoVQConfig
from polymodal.plugins.movq.convert import load_diffusers_movq, movq_config_from_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(image_size=8, channels=1, block_channels=(8, 16), norm_groups=4, decoder_norm_groups=4, codebook_size=16)


def _model(**changes) -> MoVQ:
    torch.manual_seed(0)
    return MoVQ(MoVQConfig(**{**TINY, **changes})).eval()


class _Data:
    """A stand-in dataset: ``split(name)['image']`` and ``name``."""

    def __init__(self, test, name="digits"):
        self.splits, self.name, self.meta = {"test": {"image": test}}, name, {}

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
def test_shapes_and_round_trips(changes, latent):
    model = _model(**changes)
    c, s = model.config.channels, model.config.image_size
    x = torch.rand(3, c, s, s)
    with torch.no_grad():
        h = model.encode(x)
        assert h.shape == (3, *latent) == (3, *model.latent_shape)
        zq, codes, commitment = model.quantize(h)
        assert zq.shape == h.shape and codes.shape == (3, *latent[1:])
        torch.testing.assert_close(zq, model.codebook.embed[codes].permute(0, 3, 1, 2))  # the codes' vectors
        torch.testing.assert_close(commitment, ((h - zq) ** 2).mean())
        assert torch.equal(model.encode_codes(x), codes)
        out = model.decode(h)  # quantised (diffusers' decode)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        torch.testing.assert_close(out, model.decode(zq, quantize=False))
        torch.testing.assert_close(out, model.decode_codes(codes))
        assert torch.equal(model(x), out)
        raw = model.decode(h, quantize=False, clamp=False)  # Kandinsky 2.1's decode of continuous latents
        assert not torch.allclose(raw.clamp(0, 1), out)
        assert torch.equal(model.decode(h, quantize=False), raw.clamp(0, 1))
        assert torch.equal(model.encode_latents(x), h)  # what a latent diffusion model reads and writes
        assert torch.equal(model.decode_latents(h, clamp=False), raw)


def test_spatial_norm_is_groupnorm_modulated_by_the_upsampled_latent():
    torch.manual_seed(0)
    norm = SpatialNorm(8, 3, groups=4)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    f, zq = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 3, 3)
    up = zq.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest ×2
    gn = F.group_norm(f, 4, norm.norm.weight, norm.norm.bias, eps=1e-6)
    expected = gn * F.conv2d(up, norm.conv_y.weight, norm.conv_y.bias) + F.conv2d(
        up, norm.conv_b.weight, norm.conv_b.bias
    )
    torch.testing.assert_close(norm(f, zq), expected)


def test_the_conditioned_decoder_requires_its_condition_and_uses_it():
    torch.manual_seed(0)
    plain = Decoder(1, (8, 16), 1, 4, 4, True)
    spatial = Decoder(1, (8, 16), 1, 4, 4, True, condition_channels=4)
    assert not any(isinstance(m, SpatialNorm) for m in plain.modules())
    norms = [n for n, m in spatial.named_modules() if isinstance(m, SpatialNorm)]
    # every residual block's two norms, the middle attention's and the output norm
    assert len(norms) == 2 * (2 + 2 * 2) + 1 + 1
    groupnorms = [n for n, m in spatial.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert sorted(groupnorms) == sorted(f"{n}.norm" for n in norms)  # no unconditioned norm is left
    z = torch.randn(2, 4, 4, 4)
    assert plain(z).shape == spatial(z, z).shape == (2, 1, 8, 8)
    assert not torch.allclose(spatial(z, z), spatial(z, z * 2))  # the condition changes the output
    with pytest.raises(ValueError, match=r"takes a z_q of 4 channels \(condition_channels=4\); got None"):
        spatial(z)
    with pytest.raises(ValueError, match=r"takes no z_q \(condition_channels=0\); got \(2, 4, 4, 4\)"):
        plain(z, z)
    with pytest.raises(ValueError, match=r"expected z_q \(B, 4, h, w\); got \(2, 3, 4, 4\)"):
        spatial(z, z[:, :3])


def test_loss_is_quantised_reconstruction_plus_weighted_commitment():
    model = _model(commitment=0.5, decay=1.0, dead_code_steps=0).train()  # decay 1: the EMA step keeps the codes
    with torch.no_grad():
        model.codebook.init_from(torch.randn(64, 4))
    x = torch.rand(4, 1, 8, 8)
    loss, metrics = model.loss({"image": x})
    with torch.no_grad():
        model.eval()
        zq, codes, commitment = model.quantize(model.encode(x))
        mse = ((model.decode(zq, quantize=False, clamp=False) - x) ** 2).mean()
    torch.testing.assert_close(loss, mse + 0.5 * commitment)
    torch.testing.assert_close(metrics["recon_mse"], mse)
    torch.testing.assert_close(metrics["commitment"], commitment)
    assert metrics["codes_in_batch"].item() == codes.unique().numel()


def test_the_loss_trains_the_encoder_through_the_quantiser():
    model = _model().train()
    loss, _ = model.loss({"image": torch.rand(4, 1, 8, 8)})
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.decoder.mid.resnets[0].norm1.conv_y.weight.grad.abs().sum() > 0


def test_evaluate_reports_both_reconstructions_against_the_pixel_variance():
    model = _model()
    test = torch.rand(10, 1, 8, 8)
    metrics = model.evaluate(_Data(test))
    variance = test.double().var(unbiased=False).item()
    with torch.no_grad():
        q = ((model(test).double() - test.double()) ** 2).mean().item()
        raw = ((model.decode(model.encode(test), quantize=False).double() - test.double()) ** 2).mean().item()
    assert metrics["recon_mse"] == pytest.approx(q, rel=1e-5)
    assert metrics["normalised_recon_mse"] == pytest.approx(q / variance, rel=1e-5)
    assert metrics["normalised_recon_mse_unquantised"] == pytest.approx(raw / variance, rel=1e-5)
    assert 1 <= metrics["codes_used"] <= 16 and 1 <= metrics["codebook_perplexity"] <= 16
    assert metrics["samples"] == 10 and metrics["latent_std"] > 0


def test_polymodal_train_runs_and_saves(tmp_path):
    from polymodal.api import train_model

    tiny = ("block_channels=[8,16]", "norm_groups=4", "decoder_norm_groups=4", "codebook_size=16")
    model, metrics = train_model("movq-shapes", set_=tiny, steps=3, out=tmp_path / "m", progress=False)
    assert {"normalised_recon_mse", "normalised_recon_mse_unquantised", "codes_used"} <= set(metrics)
    loaded = polymodal.load(tmp_path / "m").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
        assert bool(loaded.codebook.initted)


def test_bad_input_names_expected_and_given():
    model = _model()
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, 4, 4\) = \(B, L, h, w\); got \(2, 3, 4, 4\)"):
        model.decode(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, 4, 4\) = \(B, L, h, w\); got \(2, 3, 4, 4\)"):
        model.decode(torch.zeros(2, 3, 4, 4), quantize=False)
    with pytest.raises(ValueError, match=r"expected latents .* got \(2, 4, 8, 8\)"):
        model.quantize(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"expected floating-point latents; got dtype torch.int64"):
        model.decode(torch.zeros(2, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\) in \[0, 1\]; got \(2, 1, 16, 16\)"):
        model.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\) in \[0, 1\]; got \(2, 3, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected images .* got list"):
        model.loss({"image": [[0.0]]})
    with pytest.raises(ValueError, match=r"expected codes \(B, 4, 4\); got \(2, 4\)"):
        model.decode_codes(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"code ids must be in \[0, 16\); got ids from 0 to 16"):
        model.decode_codes(torch.tensor([[[0] * 4] * 3 + [[16] * 4]]))
    with pytest.raises(ValueError, match=r"block_channels must be multiples of decoder_norm_groups=32; got \[8, 16\]"):
        MoVQConfig(block_channels=(8, 16), norm_groups=4, decoder_norm_groups=32)
    with pytest.raises(ValueError, match=r"level_attention must be empty or one bool per level \(2\); got \(True,\)"):
        MoVQConfig(block_channels=(8, 16), norm_groups=4, decoder_norm_groups=4, level_attention=(True,))
    with pytest.raises(ValueError, match=r"image_size must be divisible by 2\^\(levels − 1\) = 4 .* got image_size=6"):
        MoVQConfig(image_size=6, block_channels=(8, 8, 8), norm_groups=4, decoder_norm_groups=4)


def test_sample_to_folder_writes_reconstructions(tmp_path):
    model = _model(data="digits")
    paths = model.sample_to_folder(tmp_path / "s", n=3, seed=0)
    assert {"sample_000.png", "original_002.png", "pairs.png", "grid.png"} <= {p.name for p in paths}
    with pytest.raises(ValueError, match="takes no prompt"):
        model.sample_to_folder(tmp_path / "p", n=1, prompt="a three")
    with pytest.raises(ValueError, match="takes no options; got temperature"):
        model.sample_to_folder(tmp_path / "o", n=1, temperature=0.5)


# --------------------------------------------------------------------------- diffusers parity
diffusers_configs = [  # diffusers' SpatialNorm has 32 groups: decoder widths are multiples of 32
    dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=16),
    dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        norm_num_groups=16,
        latent_channels=3,
        vq_embed_dim=3,
        num_vq_embeddings=32,
        sample_size=8,
        in_channels=1,
        out_channels=1,
        mid_block_add_attention=False,
    ),
    dict(  # Kandinsky 2.1's layout in miniature: attention at the lowest resolution, in the encoder and the decoder
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        latent_channels=4,
        vq_embed_dim=4,
        num_vq_embeddings=24,
        sample_size=16,
    ),
]


def _diffusers_folder(tmp_path, cfg: dict, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n}
    ref = diffusers.VQModel(**{**blocks, "norm_type": "spatial", **cfg}).eval()
    with torch.no_grad():  # randomise every tensor, so no branch (a norm's affine, a bias) is trivial
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    folder = tmp_path / "movq"
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.mark.parametrize("index", range(len(diffusers_configs)))
def test_a_converted_diffusers_movq_encodes_quantises_and_decodes_the_same(tmp_path, index):
    from click.testing import CliRunner

    from polymodal.cli import main

    cfg = diffusers_configs[index]
    ref, folder = _diffusers_folder(tmp_path, cfg, seed=index)
    result = CliRunner().invoke(main, ["convert", "--from", "diffusers-movq", str(folder), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = polymodal.load(tmp_path / "out").eval()
    assert isinstance(model, MoVQ) and model.config.decoder_norm_groups == 32
    attention = "down_block_types" in cfg
    assert model.config.level_attention == ((False, True) if attention else ())
    layers = cfg["layers_per_block"]  # the encoder's levels have that many blocks, the decoder's one more
    assert (len(model.encoder.down[-1].attentions), len(model.decoder.up[0].attentions)) == (
        layers * attention,
        (layers + 1) * attention,
    )
    c, s = cfg.get("in_channels", 3), cfg["sample_size"]
    g = torch.Generator().manual_seed(index)
    x = torch.rand(3, c, s, s, generator=g)  # (B, C, S, S) in [0, 1]
    with torch.no_grad():
        theirs = ref.encode(x * 2 - 1).latents  # diffusers' autoencoders take [-1, 1]
        ours = model.encode(x)
        assert (ours - theirs).abs().max() < 1e-4
        _, _, (_, _, ids) = ref.quantize(theirs)
        assert torch.equal(model.encode_codes(x).flatten(), ids.flatten())
        quantised = (ref.decode(theirs).sample + 1) / 2  # through the quantiser, back to [0, 1]
        assert (model.decode(theirs, clamp=False) - quantised).abs().max() < 1e-4
        assert (model.decode(theirs) - quantised.clamp(0, 1)).abs().max() < 1e-4
        z = torch.randn(theirs.shape, generator=g)  # continuous latents, as a diffusion model gives
        raw = (ref.decode(z, force_not_quantize=True).sample + 1) / 2
        assert (model.decode(z, quantize=False, clamp=False) - raw).abs().max() < 1e-4
        assert (model(x) - ((ref(x * 2 - 1).sample + 1) / 2).clamp(0, 1)).abs().max() < 1e-4


def test_convert_without_from_picks_the_converter_and_a_pipeline_movq_folder(tmp_path):
    from click.testing import CliRunner

    from polymodal.cli import main

    ref, folder = _diffusers_folder(tmp_path, diffusers_configs[0])
    (tmp_path / "pipe").mkdir()
    folder.rename(tmp_path / "pipe" / "movq")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "pipe" / "movq"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = load_diffusers_movq(tmp_path / "pipe")  # the pipeline folder: its movq/ is read
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert (model.encode(x) - polymodal.load(tmp_path / "out").encode(x)).abs().max() == 0
        assert (model.encode(x) - ref.encode(x * 2 - 1).latents).abs().max() < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "AutoencoderKL"}, r"reads VQModel folders; .*'AutoencoderKL'"),
        ({"norm_type": "group"}, r"the MoVQ cannot express norm_type='group' \(supported: 'spatial'\)"),
        ({"down_block_types": ["DownEncoderBlock2D", "KDownBlock2D"]}, r"down_block_types entry='KDownBlock2D'"),
        (
            {"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]},
            r"up_block_types=\[.*\] \(supported: the down",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, r"up_block_types \['UpDecoderBlock2D'\] needs one entry per"),
        ({"act_fn": "gelu"}, r"act_fn='gelu' \(supported: 'silu', 'swish'\)"),
        ({"vq_embed_dim": 8}, r"vq_embed_dim=8 \(supported: None or latent_channels=4\)"),
        ({"lookup_from_codebook": True}, r"lookup_from_codebook=True"),
        ({"out_channels": 1}, r"out_channels=1 \(supported: in_channels=3\)"),
        ({"sample_size": [16, 8]}, r"sample_size=\[16, 8\] \(supported: a square size\)"),
    ],
)
def test_unsupported_diffusers_options_are_refused_by_name(change, message):
    cfg = {
        **diffusers_configs[0],
        "norm_type": "spatial",
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        movq_config_from_diffusers(cfg)


def test_every_source_tensor_must_be_used_and_no_pickle_is_read(tmp_path):
    from safetensors.torch import load_file, save_file

    ref, folder = _diffusers_folder(tmp_path, diffusers_configs[0])
    path = folder / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(LoadError, match=r"1 unused tensor\(s\) the VQModel conversion would drop: extra\.weight"):
        load_diffusers_movq(folder)
    del weights["decoder.conv_norm_out.conv_y.weight"]
    save_file(weights, str(path))
    with pytest.raises(LoadError, match=r"lacks the VQModel weight 'decoder\.conv_norm_out\.conv_y\.weight'"):
        load_diffusers_movq(folder)
    path.unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match=r"diffusion_pytorch_model\.bin, which it does not unpickle"):
        load_diffusers_movq(folder)
