"""General options of the core parts that composite models use instead of patching them from outside:
per-call injection into a TransformerStack, and a ViT encoder's non-square patch grid."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch

from polymodal.config import from_json, to_json
from polymodal.nn import BlockConfig, StackConfig, TransformerStack
from polymodal.nn.embed import sincos_1d, sincos_2d
from polymodal.nn.encoders import ViTEncoder, ViTEncoderConfig
from polymodal.nn.fusion import CrossAttentionFusion
from polymodal.nn.mae import MAE, MAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = BlockConfig(dim=16, heads=2)


def _stack() -> TransformerStack:
    torch.manual_seed(0)
    return TransformerStack(StackConfig(depth=3, block=BlockConfig(dim=16, heads=2))).eval()


def _gated() -> CrossAttentionFusion:
    fusion = CrossAttentionFusion(dim=16, heads=2)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(std=0.3)  # open gates: the fusion changes its input
    return fusion.eval()


def test_per_call_injection_equals_a_registered_one_and_leaves_the_stack_unchanged():
    stack, fusion = _stack(), _gated()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    keys = set(stack.state_dict())
    with torch.no_grad():
        plain = stack(x, causal=True)
        per_call = stack(x, causal=True, injected={1: fusion}, inject_kwargs={"context": ctx})
        assert set(stack.state_dict()) == keys and not len(stack.injected)
        assert torch.equal(stack(x, causal=True), plain)  # nothing stayed behind
        assert not torch.allclose(per_call, plain)
        registered = copy.deepcopy(stack)
        registered.inject(1, fusion)
        torch.testing.assert_close(registered(x, causal=True, inject_kwargs={"context": ctx}), per_call, rtol=0, atol=0)
        by_name = stack(x, causal=True, injected=torch.nn.ModuleDict({"1": fusion}), inject_kwargs={"context": ctx})
        torch.testing.assert_close(by_name, per_call, rtol=0, atol=0)


def test_per_call_injection_runs_after_a_registered_one_at_the_same_layer():
    stack, seen = _stack(), []

    class Tag(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x, **kwargs):
            seen.append(self.name)
            return x

    stack.inject(0, Tag("registered"))
    stack(torch.randn(1, 2, 16), injected={0: Tag("call"), 2: Tag("later")})
    assert seen == ["registered", "call", "later"]


def test_injection_at_a_missing_layer_is_an_error():
    with pytest.raises(ValueError, match=r"injection layer must be in \[0, 2\], got 3"):
        _stack()(torch.randn(1, 2, 16), injected={3: torch.nn.Identity()})


def test_a_non_square_grid_is_configured_and_round_trips():
    cfg = ViTEncoderConfig(
        image_size=4, patch_size=4, channels=1, block=SMALL, depth=1, grid=(2, 5), pos_embed="sincos"
    )
    assert cfg.patch_grid == (2, 5) and cfg.input_size == (8, 20)
    assert from_json(ViTEncoderConfig, to_json(cfg)) == cfg
    enc = ViTEncoder(cfg)
    (images,) = enc.example_inputs(3)
    assert images.shape == (3, 1, 8, 20) and enc(images).shape == (3, 1 + 10, 16)
    torch.testing.assert_close(enc.pos_embed.weight[0, 1:], sincos_2d(2, 5, 16))  # rows × cols, not a square
    strip = ViTEncoder(
        ViTEncoderConfig(image_size=4, patch_size=4, channels=1, block=SMALL, depth=1, grid=(1, 6), pos_embed="sincos")
    )
    torch.testing.assert_close(strip.pos_embed.weight[0, 1:], sincos_1d(6, 16))  # a 1×N strip: 1-D positions
    learned = ViTEncoder(ViTEncoderConfig(image_size=4, patch_size=2, block=SMALL, depth=1, grid=[3, 2]))
    assert learned.cfg.grid == (3, 2) and learned.pos_embed.weight.shape == (1, 1 + 6, 16)


@pytest.mark.parametrize("grid", [(0, 3), (1,), (1.5, 2)])
def test_a_bad_grid_is_refused(grid):
    with pytest.raises(ValueError, match=r"ViTEncoderConfig.grid must be None or \(rows, cols\)"):
        ViTEncoderConfig(grid=grid)


def test_mae_builds_its_encoder_for_its_grid():
    enc = ViTEncoderConfig(image_size=4, patch_size=4, channels=1, block=SMALL, depth=1, pos_embed="sincos")
    mae = MAE(MAEConfig(encoder=enc, grid_rows=1, grid_cols=6, decoder_dim=16, decoder_depth=1, decoder_heads=2))
    assert mae.encoder.cfg.grid == (1, 6) and mae.encoder.pos_embed.grid == (1, 6)
    same = MAE(
        MAEConfig(
            encoder=ViTEncoderConfig(
                image_size=4, patch_size=4, channels=1, block=SMALL, depth=1, pos_embed="sincos", grid=(1, 6)
            ),
            decoder_dim=16,
            decoder_depth=1,
            decoder_heads=2,
        )
    )
    assert same.grid == (1, 6) and same.encoder.cfg == mae.encoder.cfg
    with pytest.raises(ValueError, match=r"grid_rows × grid_cols \(1×6\) and the encoder's grid \(2, 3\) disagree"):
        MAEConfig(encoder=ViTEncoderConfig(image_size=4, patch_size=2, grid=(2, 3)), grid_rows=1, grid_cols=6)


def test_imagebind_audio_trunk_is_configured_for_its_spectrogram_grid():
    from polymodal.plugins.imagebind.modalities import AudioEncoder

    audio = AudioEncoder(mels=16, frames=32, patch=4, dim=16, depth=1, heads=2)
    assert audio.trunk.cfg.patch_grid == (4, 8) and audio.trunk.pos_embed.weight.shape == (1, 1 + 32, 16)
    assert audio(*audio.example_inputs(2)).shape == (2, 1 + 32, 16)


def test_both_encoder_configs_nest_one_block_config():
    from polymodal.config import apply_overrides
    from polymodal.nn.encoders import TextEncoderConfig

    for cls in (ViTEncoderConfig, TextEncoderConfig):
        cfg = cls(block=SMALL, depth=3)
        assert cfg.dim == 16 and cfg.stack() == StackConfig(depth=3, block=SMALL, final_norm=True)
        assert cfg.with_block(heads=4).block == BlockConfig(dim=16, heads=4)
        assert from_json(cls, to_json(cfg)) == cfg
        assert apply_overrides(cfg, ["block.mlp_ratio=2.0"]).block.mlp_ratio == 2.0
        with pytest.raises(ValueError, match=rf"{cls.__name__}.block must be a BlockConfig without cross-attention"):
            cls(block=BlockConfig(cross_attention=True))


def test_a_text_encoder_without_absolute_positions_takes_its_order_from_the_relative_bias():
    from polymodal.nn.encoders import TextEncoder, TextEncoderConfig

    block = BlockConfig(dim=16, heads=2)
    ids = torch.tensor([[5, 9, 3, 7, 11]])
    order = torch.tensor([3, 0, 4, 1, 2])
    for bias, equivariant in (("none", True), ("t5", False)):
        torch.manual_seed(0)
        enc = TextEncoder(
            TextEncoderConfig(causal=False, positions="none", block=attrs.evolve(block, position_bias=bias))
        )
        assert enc.pos_embed is None and not any("pos_embed" in k for k in enc.state_dict())
        enc.eval()
        # no position table: a bag of tokens (permuting the input permutes the output) unless the blocks add a bias
        same = torch.allclose(enc(ids)[:, order], enc(ids[:, order]), atol=1e-5)
        assert same == equivariant
    learned = TextEncoder(TextEncoderConfig(causal=False, block=block)).eval()
    assert not torch.allclose(learned(ids)[:, order], learned(ids[:, order]), atol=1e-5)
