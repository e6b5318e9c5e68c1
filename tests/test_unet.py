"""The core diffusion UNet (``polymodal.nn.UNet``) and the diffusers ``UNet2DModel`` converter.

Unit tests: shapes over several configs, bad configs and inputs refused by name, timesteps as
numbers or tensors, each conditioning path changes the output, gradients reach every parameter.
Parity: randomly initialised (and randomised) diffusers ``UNet2DModel`` folders, converted, give the
same output at atol 1e-4; unsupported diffusers options are refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.io import LoadError
from polymodal.nn import UNet, UNetConfig
from polymodal.nn.unet import timestep_embedding
from polymodal.plugins.diffusion.convert import (
    load_diffusers_unet,
    schedule_overrides_from_diffusers,
    unet_config_from_diffusers,
)

SMALL = dict(channels=(8, 16), attention_levels=(False, True), attention_head_dim=8, norm_groups=4, layers_per_block=1)


def _unet(**changes) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**SMALL, **changes}))


@pytest.mark.parametrize(
    "changes, size",
    [
        ({}, 8),
        ({"in_channels": 3, "out_channels": 6, "channels": (8, 16, 24), "attention_levels": (True, False, True)}, 16),
        ({"channels": (8,), "attention_levels": (False,), "layers_per_block": 2}, 5),
        ({"scale_shift": True, "in_channels": 2, "out_channels": 1}, 12),
    ],
)
def test_output_shape_matches_the_input_for_several_configs(changes, size):
    unet = _unet(**changes).eval()
    x = torch.randn(3, unet.cfg.in_channels, size, size)  # (B, C, H, W)
    out = unet(x, torch.tensor([0, 10, 999]))
    assert out.shape == (3, unet.cfg.out_channels, size, size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"channels": (8, 18)}, r"channels must be multiples of norm_groups=4; got \[18\]"),
        ({"channels": (8, 20), "attention_head_dim": 8}, r"attention_head_dim=8 must divide .* got widths \[20\]"),
        ({"attention_levels": (True,)}, r"attention_levels needs one flag per level \(2"),
        ({"channels": ()}, r"channels must be positive integers"),
        ({"scale_shift": True, "freq_shift": 3}, r"freq_shift must be in \[0, 1\], got 3"),
    ],
)
def test_a_bad_config_is_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**SMALL, **changes})


def test_config_round_trips_through_json():
    from polymodal.config import from_json, to_json

    cfg = UNetConfig(**{**SMALL, "num_classes": 3, "context_dim": 5})
    assert from_json(UNetConfig, to_json(cfg)) == cfg


def test_bad_inputs_are_refused_naming_expected_and_given():
    unet = _unet(num_classes=4)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"in_channels=1, H, W\) with H and W multiples of 2.*got \(2, 1, 7, 8\)"):
        unet(torch.randn(2, 1, 7, 8), 3, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"num_classes=4: class_labels is required; got None"):
        unet(x, 3)
    with pytest.raises(ValueError, match=r"embedding_dim=0: expected no embedding"):
        unet(x, 3, class_labels=torch.tensor([0, 1]), embedding=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"t of shape \(\) or \(B,\) = \(2,\); got \(3,\)"):
        unet(x, torch.tensor([1, 2, 3]), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class_labels must be \(B,\) = \(2,\); got \(2, 1\)"):
        unet(x, 3, class_labels=torch.tensor([[0], [1]]))


def test_t_as_int_float_scalar_or_batch_gives_the_same_output():
    unet = _unet().eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = unet(x, torch.tensor([7, 7]))
        assert torch.equal(unet(x, 7), ref)
        assert torch.equal(unet(x, torch.tensor(7)), ref)
        assert torch.equal(unet(x, 7.0), ref)
        assert not torch.allclose(unet(x, 7.5), ref)  # fractional t (SR3's continuous noise level) is its own input
        assert not torch.allclose(unet(x, torch.tensor([7, 500])), ref)


def test_timestep_embedding_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for flip, shift, dim in ((True, 0, 32), (False, 1, 16), (True, 1, 7)):
        ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
        theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.allclose(ours, theirs, atol=1e-6), (flip, shift, dim)
    assert diffusers


@pytest.mark.parametrize(
    "changes, inputs",
    [
        ({"num_classes": 5}, lambda b: {"class_labels": torch.tensor([1, 3])}),
        ({"embedding_dim": 6}, lambda b: {"embedding": torch.randn(b, 6)}),
        ({"context_dim": 12}, lambda b: {"context": torch.randn(b, 3, 12)}),
    ],
)
def test_each_conditioning_path_changes_the_output_and_trains(changes, inputs):
    unet = _unet(**changes)
    with torch.no_grad():  # initial zero-free weights: make every branch matter
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 400])
    kw = inputs(2)
    other = {k: (v.flip(0) if v.dtype == torch.long else torch.randn_like(v)) for k, v in kw.items()}
    out = unet(x, t, **kw)
    assert not torch.allclose(out, unet(x, t, **other), atol=1e-5)
    out.square().mean().backward()
    no_grad = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_context_mask_hides_padded_tokens():
    unet = _unet(context_dim=4).eval()
    x, ctx = torch.randn(1, 1, 8, 8), torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        a = unet(x, 5, context=ctx, context_mask=mask)
        ctx2 = ctx.clone()
        ctx2[0, 2] = 100.0  # a padded token may hold anything
        assert torch.allclose(a, unet(x, 5, context=ctx2, context_mask=mask), atol=1e-6)
        assert not torch.allclose(a, unet(x, 5, context=ctx2), atol=1e-4)
    with pytest.raises(ValueError, match=r"context_mask must be \(1, 3\); got \(1, 2\)"):
        unet(x, 5, context=ctx, context_mask=mask[:, :2])


def test_attention_goes_through_the_dispatcher(monkeypatch):
    import polymodal.nn.block as block

    calls = []
    real = block.attention

    def spy(q, k, v, **kw):
        calls.append(tuple(q.shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(block, "attention", spy)
    unet = _unet(channels=(8, 16, 16), attention_levels=(False, True, True), layers_per_block=1).eval()
    with torch.no_grad():
        unet(torch.randn(2, 1, 8, 8), 1)
    # level 1 (4×4): 1 down + 2 up; level 2 (2×2): 1 down + 2 up; the middle (2×2): 1; heads = 16 / 8 = 2
    assert sorted(calls) == sorted([(2, 2, 16, 8)] * 3 + [(2, 2, 4, 8)] * 4)


# --------------------------------------------------------------------------- diffusers parity
diffusers_configs = [
    dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    dict(  # class embeddings, attention at two resolutions, one layer, (sin, cos) with freq_shift 1
        sample_size=16,
        in_channels=2,
        out_channels=4,
        block_out_channels=(16, 32, 48),
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
        attention_head_dim=16,
        num_class_embeds=5,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    dict(  # ADM's scale-shift, three layers, learned-variance-style output, one head per level
        sample_size=8,
        in_channels=1,
        out_channels=2,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=3,
        attention_head_dim=None,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=4,
        dropout=0.1,
    ),
]


def _diffusers_folder(tmp_path, cfg: dict, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():  # randomise every tensor (diffusers zero-inits nothing, but be sure no branch is trivial)
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    folder = tmp_path / "unet"
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.mark.parametrize("index", range(len(diffusers_configs)))
def test_a_converted_diffusers_unet_gives_the_same_output(tmp_path, index):
    cfg = diffusers_configs[index]
    ref, folder = _diffusers_folder(tmp_path, cfg, seed=index)
    unet, _ = load_diffusers_unet(folder)
    g = torch.Generator().manual_seed(index)
    x = torch.randn(3, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)  # (B, C, H, W)
    t = torch.tensor([0, 437, 999])
    kw = {"class_labels": torch.tensor([0, 4, 2])} if cfg.get("num_class_embeds") else {}
    with torch.no_grad():
        theirs = ref(x, t, **kw).sample
        ours = unet(x, t, **kw)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    with torch.no_grad():  # fractional timesteps too (a float tensor: diffusers casts a Python float to long)
        tf = torch.tensor([12.5, 0.25, 700.75])
        assert torch.allclose(unet(x, tf, **kw), ref(x, tf, **kw).sample, atol=1e-4)


@st.composite
def _drawn_diffusers_configs(draw):
    levels = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([2, 4]))
    head = draw(st.sampled_from([4, 8]))
    widths = tuple(draw(st.sampled_from([8, 16, 24])) for _ in range(levels))
    attend = [draw(st.booleans()) for _ in range(levels)]
    scale_shift = draw(st.booleans())
    cfg = dict(
        sample_size=2 ** (levels - 1) * draw(st.integers(1, 3)),
        in_channels=draw(st.integers(1, 4)),
        out_channels=draw(st.integers(1, 4)),
        block_out_channels=widths,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        layers_per_block=draw(st.integers(1, 2)),
        norm_num_groups=groups,
        attention_head_dim=head,
        flip_sin_to_cos=draw(st.booleans()),
        freq_shift=draw(st.integers(0, 1)),
        num_class_embeds=draw(st.sampled_from([None, 3])),
    )
    if scale_shift:
        cfg.update(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=groups)
    return cfg


@settings(max_examples=8, deadline=None)
@given(cfg=_drawn_diffusers_configs(), seed=st.integers(0, 2**16))
def test_drawn_diffusers_configs_convert_to_the_same_function(cfg, seed):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ref, folder = _diffusers_folder(Path(tmp), cfg, seed=seed)
        unet, _ = load_diffusers_unet(folder)
    g = torch.Generator().manual_seed(seed)
    s = cfg["sample_size"]
    x = torch.randn(2, cfg["in_channels"], s, s, generator=g)  # (B, C, H, W)
    t = torch.randint(0, 1000, (2,), generator=g)
    kw = {"class_labels": torch.tensor([0, 2])} if cfg["num_class_embeds"] else {}
    with torch.no_grad():
        assert torch.allclose(unet(x, t, **kw), ref(x, t, **kw).sample, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")},
            r"down_block_types entry='CrossAttnDownBlock2D'",
        ),
        ({"up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D")}, r"up_block_types=\[.*\] \(supported: the mirror"),
        ({"add_attention": False}, r"add_attention=False"),
        ({"resnet_time_scale_shift": "spatial"}, r"resnet_time_scale_shift='spatial'"),
        ({"resnet_time_scale_shift": "scale_shift"}, r"attn_norm_num_groups=None .*norm_num_groups=8 with scale_shift"),
        ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier'"),
        ({"class_embed_type": "timestep"}, r"class_embed_type='timestep'"),
        ({"center_input_sample": True}, r"center_input_sample=True"),
        ({"mid_block_scale_factor": 2.0}, r"mid_block_scale_factor=2.0"),
        ({"_class_name": "UNet2DConditionModel"}, r"reads UNet2DModel folders; .*'UNet2DConditionModel'"),
    ],
)
def test_unsupported_diffusers_options_are_refused_by_name(change, message):
    cfg = {**diffusers_configs[0], **change}
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers(cfg)


def test_every_source_tensor_must_be_used_and_no_pickle_is_read(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = _diffusers_folder(tmp_path, diffusers_configs[0])
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LoadError, match=r"1 unused tensor\(s\) the UNet2DModel conversion would drop: extra\.weight"):
        load_diffusers_unet(folder)
    del weights["conv_in.weight"]
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LoadError, match=r"lacks the UNet2DModel weight 'conv_in\.weight'"):
        load_diffusers_unet(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match=r"diffusion_pytorch_model\.bin, which it does not unpickle"):
        load_diffusers_unet(folder)


def test_scheduler_config_maps_to_schedule_fields():
    sched = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500, "prediction_type": "v_prediction"}
    got = schedule_overrides_from_diffusers(sched)
    assert got == {
        "kind": "squaredcos_cap_v2",
        "timesteps": 500,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction": "v_prediction",
    }
    with pytest.raises(ValueError, match=r"scheduler beta_schedule='sigmoid'"):
        schedule_overrides_from_diffusers({"beta_schedule": "sigmoid"})


def test_a_pipeline_folder_with_unet_subfolder_is_read(tmp_path):
    cfg = diffusers_configs[0]
    ref, folder = _diffusers_folder(tmp_path, cfg)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    unet, _ = load_diffusers_unet(tmp_path)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(unet(x, 3), ref(x, 3).sample, atol=1e-4)


# --------------------------------------------------------------------------- the model folder
def test_convert_cli_writes_a_diffusion_model_folder_with_the_pipelines_schedule(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from click.testing import CliRunner

    import polymodal
    from polymodal.cli import main

    cfg = {**diffusers_configs[0], "in_channels": 1, "out_channels": 1, "sample_size": 8, "num_class_embeds": 10}
    ref, _ = _diffusers_folder(tmp_path, cfg)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    diffusers.DDPMPipeline(unet=ref, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    result = CliRunner().invoke(
        main, ["convert", "--from", "diffusers-unet", str(tmp_path / "pipe" / "unet"), str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    model = polymodal.load(tmp_path / "out")
    assert type(model).__name__ == "DiffusionModel" and model.config.condition == "label"
    assert (model.config.schedule.kind, model.config.schedule.timesteps) == ("squaredcos_cap_v2", 500)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 400]), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), ref(x, t, class_labels=y).sample, atol=1e-4)


def test_convert_without_from_picks_the_converter_and_refuses_unsupported_blocks_by_name(tmp_path):
    pytest.importorskip("diffusers")
    from click.testing import CliRunner

    import polymodal
    from polymodal.cli import main

    ref, folder = _diffusers_folder(tmp_path, diffusers_configs[0])
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = polymodal.load(tmp_path / "out")
    assert model.config.condition == "none" and model.config.schedule.timesteps == 1000
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, torch.tensor([5, 900])), ref(x, torch.tensor([5, 900])).sample, atol=1e-4)
    config = json.loads((folder / "config.json").read_text())
    config["down_block_types"] = ["DownBlock2D", "SkipDownBlock2D"]
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["convert", "--from", "diffusers-unet", str(folder), str(tmp_path / "bad")])
    assert result.exit_code != 0 and "down_block_types entry='SkipDownBlock2D'" in result.output
    assert not (tmp_path / "bad").exists()
