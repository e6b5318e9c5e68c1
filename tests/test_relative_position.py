"""T5's relative position bias as a core option (``BlockConfig.position_bias="t5"``), T5's unscaled logits
(``attn_scale=1.0``) and the gated-GELU MLP (``act="geglu_tanh"``): the buckets equal transformers', a core
stack on a transformers T5 encoder's (and decoder's) weights computes its hidden states, on every backend,
with padding, causal masks and the KV cache; the defaults stay off and old saved configs still load.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.attention import AttentionError, MathBackend, attention, backends, use_backend
from polymodal.config import from_dict, to_dict
from polymodal.generation.decoder import CausalDecoder
from polymodal.io.folders import LoadError
from polymodal.io.hf import t5_stack_state
from polymodal.nn import Block, BlockConfig, KVCache, Mlp, StackConfig, TransformerStack
from polymodal.nn.relative import (
    GridRelativePositionBias,
    RelativePositionBias,
    block_diagonal_bias,
    bucket_layout,
    grid_relative_index,
    relative_position_bucket,
)
from polymodal.registry import get_registry

transformers = pytest.importorskip("transformers")
from transformers.models.t5.modeling_t5 import T5Attention, T5Stack  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("one_thread"),
]

ATOL = 1e-5
BUCKETS, MAX_DISTANCE = 8, 20
theirs_bucket = T5Attention._relative_position_bucket


# -- buckets ---------------------------------------------------------------------------------------


@st.composite
def bucket_settings(draw):
    bidirectional = draw(st.booleans())
    num_buckets = draw(st.integers(4 if bidirectional else 2, 64))
    exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    return bidirectional, num_buckets, draw(st.integers(exact + 1, 300))


@settings(max_examples=150, deadline=None)
@given(bucket_settings(), st.integers(1, 48), st.integers(1, 400), st.integers(0, 400))
def test_buckets_equal_transformers(layout, nq, nk, past):
    bidirectional, num_buckets, max_distance = layout
    q_pos = torch.arange(past, past + nq)[:, None]  # (Nq, 1): queries after `past` cached positions
    relative = torch.arange(nk)[None, :] - q_pos  # (Nq, Nk)
    ours = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    ref = theirs_bucket(relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert ours.dtype == torch.long and torch.equal(ours, ref)
    assert int(ours.min()) >= 0 and int(ours.max()) < num_buckets


WIDE = [(n, d, both) for n, d in [(32, 128), (BUCKETS, MAX_DISTANCE), (4, 3), (64, 1000)] for both in (True, False)]


@pytest.mark.parametrize(("num_buckets", "max_distance", "bidirectional"), [*WIDE, (2, 2, False)])
def test_every_offset_in_a_wide_range_takes_transformers_bucket(num_buckets, max_distance, bidirectional):
    assert bucket_layout(num_buckets, max_distance, bidirectional) is None
    relative = torch.arange(-5000, 5001)  # (N,)
    kw = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(relative_position_bucket(relative, **kw), theirs_bucket(relative, **kw))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_the_bias_equals_t5s_compute_bias_with_and_without_a_past(bidirectional):
    hf_cfg = _t5_config(is_decoder=not bidirectional)
    theirs = T5Attention(hf_cfg, has_relative_attention_bias=True, layer_idx=0)
    ours = RelativePositionBias(4, num_buckets=BUCKETS, max_distance=MAX_DISTANCE, bidirectional=bidirectional)
    ours.embedding.weight.data.copy_(theirs.relative_attention_bias.weight)
    for nq, nk, past in [(7, 7, 0), (1, 13, 12), (3, 40, 37)]:
        ref = theirs.compute_bias(nq, nk, past_seen_tokens=past)  # (1, H, Nq, Nk)
        got = ours(torch.arange(past, past + nq), torch.arange(nk))
        assert got.shape == (1, 4, nq, nk) and torch.equal(got, ref)


# -- parity with transformers' T5 ------------------------------------------------------------------


def _t5_config(feed_forward: str = "gated-gelu", is_decoder: bool = False):
    return transformers.T5Config(
        vocab_size=61,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=BUCKETS,
        relative_attention_max_distance=MAX_DISTANCE,
        feed_forward_proj=feed_forward,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_decoder=is_decoder,
        use_cache=False,
    )


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("layer_norm.weight") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _core_block(feed_forward: str, **over) -> BlockConfig:
    """The core block T5 v1.1 / mT5 (gated-gelu) or T5 (relu) is: RMSNorm pre-norm, no biases, unscaled logits."""
    fields = dict(
        dim=32,
        heads=4,
        mlp_ratio=2.0,
        norm="rmsnorm",
        norm_eps=1e-6,
        act="geglu_tanh" if feed_forward == "gated-gelu" else "relu",
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        attn_scale=1.0,
        position_bias="t5",
        relative_buckets=BUCKETS,
        relative_max_distance=MAX_DISTANCE,
    )
    return BlockConfig(**{**fields, **over})


def _encoder_pair(feed_forward: str):
    hf = _randomise(transformers.T5EncoderModel(_t5_config(feed_forward)), 0)
    ours = TransformerStack(StackConfig(depth=2, block=_core_block(feed_forward))).eval()
    ours.load_state_dict(t5_stack_state(hf.state_dict(), 2, ""), strict=True)
    return hf, ours


def _padded_ids(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (3, 13), generator=g)  # (B, L)
    keep = torch.ones(3, 13, dtype=torch.long)
    keep[1, 9:] = 0  # padded at the end
    keep[2, 4:] = 0
    return ids, keep


@pytest.mark.parametrize("name", sorted(backends()))
@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_a_core_stack_on_t5_encoder_weights_gives_its_hidden_states(feed_forward, name):
    if backends()[name].available() is not None:
        pytest.skip(f"{name}: {backends()[name].available()}")
    hf, ours = _encoder_pair(feed_forward)
    ids, keep = _padded_ids()
    with torch.no_grad(), use_backend(name):
        ref = hf(input_ids=ids, attention_mask=keep).last_hidden_state  # (B, L, D)
        got = ours(hf.shared(ids), key_padding=keep.bool())  # (B, L, D)
    err = (got - ref).abs().max().item()
    print(f"T5 encoder ({feed_forward}, {name}): max |ours - transformers| = {err:.3g}")
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_a_core_stack_on_t5_decoder_weights_gives_its_hidden_states(feed_forward):
    """Causal buckets, causal and padding masks, and cross-attention (no bias there) over an encoder's output."""
    cfg = _t5_config(feed_forward, is_decoder=True)
    hf = _randomise(T5Stack(cfg), 2)
    block = _core_block(feed_forward, relative_bidirectional=False, cross_attention=True)
    ours = TransformerStack(StackConfig(depth=2, block=block)).eval()
    ours.load_state_dict(t5_stack_state(hf.state_dict(), 2, "", prefix=""), strict=True)
    ids, keep = _padded_ids(3)
    g = torch.Generator().manual_seed(4)
    memory = torch.randn(3, 6, 32, generator=g)  # (B, M, D): an encoder's output
    memory_keep = torch.ones(3, 6, dtype=torch.long)
    memory_keep[0, 4:] = 0
    embeds = hf.embed_tokens(ids)  # (B, L, D)
    with torch.no_grad():
        ref = hf(
            inputs_embeds=embeds, attention_mask=keep, encoder_hidden_states=memory, encoder_attention_mask=memory_keep
        ).last_hidden_state
        got = ours(embeds, memory, causal=True, key_padding=keep.bool(), context_padding=memory_keep.bool())
    print(f"T5 decoder ({feed_forward}): max |ours - transformers| = {(got - ref).abs().max().item():.3g}")
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_a_smaller_head_width_than_the_model_is_refused_by_the_mapping():
    hf = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=8, d_model=32, d_kv=4, num_heads=4, d_ff=16, num_layers=1)
    )
    with pytest.raises(LoadError, match=r"num_heads \* d_kv must equal d_model.*\(16, 32\)"):
        t5_stack_state(hf.state_dict(), 1, "")


def test_packed_sequences_get_the_bias_of_their_own_positions():
    """Offsets within a packed sequence are those it has alone; across sequences nothing is seen."""
    stack = _encoder_pair("gated-gelu")[1]
    g = torch.Generator().manual_seed(8)
    parts = [torch.randn(1, n, 32, generator=g) for n in (5, 9, 3)]  # (1, N_i, D) each
    with torch.no_grad():
        packed = stack(torch.cat(parts, 1), seqlens=[5, 9, 3])  # (1, 17, D)
        alone = torch.cat([stack(p) for p in parts], 1)
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)


# -- causal decoding over a KV cache -----------------------------------------------------------------


def _causal_stack(seed: int = 0) -> TransformerStack:
    torch.manual_seed(seed)
    block = _core_block("gated-gelu", relative_bidirectional=False, relative_max_distance=6)
    return _randomise(TransformerStack(StackConfig(depth=2, block=block)), seed)


def test_cached_steps_see_the_bias_of_their_positions():
    stack = _causal_stack()
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(5))  # (B, N, D)
    with torch.no_grad():
        full = stack(x, causal=True)
        cache = KVCache()
        steps = [stack(x[:, :4], causal=True, cache=cache)]  # the prompt, then one token at a time
        steps += [stack(x[:, i : i + 1], causal=True, cache=cache) for i in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


def test_static_decoder_steps_see_the_bias_of_their_positions():
    """The compiled path's static step (tensor positions, a bucket of keys), run eagerly."""
    stack = _causal_stack(1)
    table = torch.nn.Embedding(17, 32)
    head = torch.nn.Linear(32, 17)
    decoder = CausalDecoder(stack, tokens=table, positions=lambda pos: 0.0, head=head, max_len=40)
    ids = torch.randint(0, 17, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = decoder(ids)  # (B, N, V)
        cache = decoder.new_cache()
        steps = [decoder(ids[:, :3], cache)]
        steps += [decoder._step_static(ids[:, i : i + 1], cache, decoder.static_step) for i in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


# -- training ----------------------------------------------------------------------------------------


def test_the_table_learns_and_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        stack = _encoder_pair("gated-gelu")[1]
        stack.checkpointing = checkpointing
        stack.train()
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7))
        keep = torch.ones(2, 9, dtype=torch.bool)
        keep[1, 6:] = False
        stack(x, key_padding=keep).square().mean().backward()
        grads.append(stack.relative_bias.embedding.weight.grad)
    assert grads[0].isfinite().all() and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# -- backends without additive masks -----------------------------------------------------------------


class NoBias(MathBackend):
    """A backend that cannot take an additive mask, ranked above every built-in one."""

    name = "no-bias"
    priority = 1000
    mask_kinds = ("none", "causal", "padding", "block", "bool")

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def test_auto_passes_over_a_backend_without_additive_masks_and_forcing_it_says_why():
    registry, backend = get_registry(), NoBias()
    registry.add("attention_backend", "no-bias", backend, plugin="test_relative_position", doc="no additive masks")
    try:
        hf, ours = _encoder_pair("gated-gelu")
        ids, keep = _padded_ids()
        with torch.no_grad():
            got = ours(hf.shared(ids), key_padding=keep.bool())
            assert backend.calls == 0  # auto fell back to a backend that takes the bias
            attention(*torch.randn(3, 1, 1, 4, 8), key_padding=torch.ones(1, 4, dtype=torch.bool))
            assert backend.calls == 1  # and it is auto's pick when there is no bias
            torch.testing.assert_close(got, hf(input_ids=ids, attention_mask=keep).last_hidden_state, atol=ATOL, rtol=0)
            with use_backend("no-bias"), pytest.raises(AttentionError, match="no-bias.*additive"):
                ours(hf.shared(ids))
    finally:
        registry.remove("attention_backend", "no-bias")


# -- configuration -----------------------------------------------------------------------------------


def test_the_options_default_to_off_and_add_nothing():
    cfg = BlockConfig()
    assert (cfg.position_bias, cfg.attn_scale) == ("none", None)
    stack = TransformerStack(StackConfig(depth=2, block=BlockConfig(dim=16, heads=2)))
    assert stack.relative_bias is None and not any("relative" in k for k in stack.state_dict())
    assert all(b.attn.scale is None for b in stack.blocks)


def test_a_config_saved_before_the_options_existed_loads_with_them_off():
    from polymodal.plugins.vit.model import ViTConfig

    data = to_dict(ViTConfig())
    for name in ("attn_scale", "position_bias", "relative_buckets", "relative_max_distance", "relative_bidirectional"):
        del data["encoder"]["block"][name]
    assert from_dict(ViTConfig, data) == ViTConfig()
    del data["encoder"]["block"]["act"]  # an older field is still required
    with pytest.raises(ValueError, match=r"missing field\(s\) encoder\.block\.act;"):
        from_dict(ViTConfig, data)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(relative_buckets=3), r"bidirectional buckets need relative_buckets >= 4; got 3"),
        (dict(relative_buckets=8, relative_max_distance=2), r"exceed the 2 exact buckets.*got 2"),
        (dict(relative_bidirectional=False, relative_buckets=8, relative_max_distance=4), r"4 exact.*got 4"),
        (dict(relative_buckets=1), r"relative_buckets must be in \[2, 4096\], got 1"),
        (dict(position_bias="alibi"), r"position_bias must be one of 'none', 't5'; got 'alibi'"),
    ],
)
def test_unusable_bucket_settings_are_refused_naming_them(changes, needle):
    with pytest.raises(ValueError, match=needle):
        BlockConfig(dim=16, heads=2, **{"position_bias": "t5", **changes})


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_a_bad_attention_scale_is_refused(scale):
    with pytest.raises(ValueError, match=r"BlockConfig\.attn_scale must be None or a positive number"):
        BlockConfig(attn_scale=scale)


def test_a_block_alone_needs_the_shared_bias():
    block = Block(BlockConfig(dim=16, heads=2, position_bias="t5")).eval()
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="position_bias='t5': pass the shared bias"):
        block(x)
    bias = RelativePositionBias(2).for_tokens(5)  # (1, H, N, N)
    assert block(x, position_bias=bias).shape == x.shape


def test_the_attention_scale_reaches_the_logits():
    block = BlockConfig(dim=16, heads=2, attn_scale=0.5)
    stack = TransformerStack(StackConfig(depth=1, block=block, final_norm=False)).eval()
    x = torch.randn(2, 5, 16)
    attn = stack.blocks[0].attn
    q, k, v = (attn._heads(t) for t in attn.qkv(stack.blocks[0].norm1(x)).chunk(3, dim=-1))
    with torch.no_grad():
        probs = attn.probabilities(stack.blocks[0].norm1(x))
        ref = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
    torch.testing.assert_close(probs, ref)


@pytest.mark.parametrize(("act", "gate"), [("geglu", "none"), ("geglu_tanh", "tanh"), ("swiglu", None)])
def test_gated_mlps_gate_the_linear_branch(act, gate):
    mlp = Mlp(8, 12, act, bias=True)
    x = torch.randn(3, 8)
    g = mlp.gate(x)
    g = torch.nn.functional.silu(g) if gate is None else torch.nn.functional.gelu(g, approximate=gate)
    torch.testing.assert_close(mlp(x), mlp.fc2(g * mlp.fc1(x)), atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6))
def test_grid_index_gives_one_id_per_2d_offset(rows, cols):
    """The id of (query, key) is a function of the offset (Δrow, Δcol) alone, and distinct offsets differ."""
    index = grid_relative_index(rows, cols)  # (N, N)
    r, c = torch.arange(rows * cols) // cols, torch.arange(rows * cols) % cols
    offsets = {}
    for i in range(rows * cols):
        for j in range(rows * cols):
            offset = (int(r[j] - r[i]), int(c[j] - c[i]))
            assert offsets.setdefault(offset, int(index[i, j])) == int(index[i, j])
    assert len(set(offsets.values())) == len(offsets)  # injective
    assert 0 <= int(index.min()) and int(index.max()) < (2 * rows - 1) * (2 * cols - 1)
    assert int(index[0, 0]) == (rows - 1) * (2 * cols - 1) + cols - 1  # offset (0, 0): the table's centre


def test_grid_bias_is_translation_invariant_and_learned():
    torch.manual_seed(0)
    bias = GridRelativePositionBias(heads=3, rows=3, cols=4)
    out = bias()  # (1, 3, 12, 12)
    assert out.shape == (1, 3, 12, 12)
    at = lambda row, col: row * 4 + col  # noqa: E731
    assert torch.equal(out[0, :, at(0, 0), at(1, 2)], out[0, :, at(1, 1), at(2, 3)])  # the same offset (1, 2)
    assert not torch.equal(out[0, :, at(0, 0), at(1, 2)], out[0, :, at(0, 0), at(2, 1)])  # another offset
    out.sum().backward()
    assert bias.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="rows, cols >= 1; got 0, 4"):
        GridRelativePositionBias(heads=3, rows=0, cols=4)


def test_a_block_diagonal_bias_keeps_each_block_s_own_bias_and_nothing_between():
    image, text = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 3, 3)
    bias = block_diagonal_bias([image, text])  # (1, 2, 7, 7)
    assert bias.shape == (1, 2, 7, 7)
    assert torch.equal(bias[:, :, :4, :4], image) and torch.equal(bias[:, :, 4:, 4:], text)
    assert not bias[:, :, :4, 4:].any() and not bias[:, :, 4:, :4].any()  # nothing between image and text


def test_a_block_diagonal_bias_refuses_blocks_that_do_not_fit_together():
    with pytest.raises(ValueError, match="got none"):
        block_diagonal_bias([])
    with pytest.raises(ValueError, match=r"expected \(1, 2, n, n\) biases; got \(1, 3, 3, 3\)"):
        block_diagonal_bias([torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3, 3)])
    with pytest.raises(ValueError, match=r"got \(1, 2, 4, 3\)"):
        block_diagonal_bias([torch.zeros(1, 2, 4, 3)])
