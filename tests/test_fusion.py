"""Fusions: shapes, identity at initialisation, gates that learn, segment ids, adapters."""

from __future__ import annotations

import pytest
import torch

from polymodal.nn import BlockConfig, StackConfig, TransformerStack
from polymodal.nn.fusion import AdapterFusion, ConcatFusion, CrossAttentionFusion


@pytest.mark.parametrize("cls", [ConcatFusion, CrossAttentionFusion, AdapterFusion])
def test_builds_with_no_args_and_runs_example_inputs(cls):
    module = cls()
    assert isinstance(module.cfg, cls.config_class)
    out = module(*module.example_inputs(3))
    first = out[0] if isinstance(out, tuple) else out
    assert first.shape[0] == 3 and torch.isfinite(first).all()


def test_registry_has_fusions():
    import polymodal

    assert polymodal.registry.get("fusion", "cross-attention") is CrossAttentionFusion
    assert polymodal.registry.get("fusion", "concat") is ConcatFusion
    assert polymodal.registry.get("fusion", "adapter") is AdapterFusion


def test_concat_segments_and_padding():
    fusion = ConcatFusion(dim=8, num_segments=3)
    a, b, c = torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    pad_b = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = fusion(a, b, c, paddings=[None, pad_b, None])
    assert out.x.shape == (2, 8, 8)
    assert out.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]] * 2
    assert out.key_padding.tolist()[0] == [True] * 3 + [True, True, False, False] + [True]
    w = fusion.segments.weight
    assert torch.allclose(out.x[:, :3], a + w[0]) and torch.allclose(out.x[:, 3:7], b + w[1])
    x, ids, mask = fusion(a, b)  # a NamedTuple unpacks
    assert x.shape == (2, 7, 8) and mask.all()


def test_concat_rejects_bad_streams():
    fusion = ConcatFusion(dim=8, num_segments=2)
    with pytest.raises(ValueError, match="at most 2"):
        fusion(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="stream 1"):
        fusion(torch.randn(1, 2, 8), torch.randn(1, 2, 4))


def test_cross_attention_shapes_and_identity_at_init():
    fusion = CrossAttentionFusion(dim=16, context_dim=12, heads=2)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    out = fusion(x, ctx)
    assert out.shape == (2, 5, 16)
    assert torch.equal(out, x)  # tanh(0) gates: exactly the input


def test_cross_attention_ungated_changes_input():
    fusion = CrossAttentionFusion(dim=16, heads=2, gate=False, mlp_ratio=0.0)
    assert fusion.mlp is None
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(fusion(x, torch.randn(2, 3, 16)), x)


def test_gradient_flows_into_gates():
    fusion = CrossAttentionFusion(dim=16, heads=2)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    fusion(x, ctx).pow(2).sum().backward()
    assert fusion.attn_gate.grad is not None and fusion.attn_gate.grad.abs().item() > 0
    assert fusion.mlp_gate.grad is not None and fusion.mlp_gate.grad.abs().item() > 0
    opt = torch.optim.SGD(fusion.parameters(), lr=0.1)
    opt.step()
    assert not torch.equal(fusion(x, ctx), x)


def test_cross_attention_context_padding_and_mask():
    torch.manual_seed(1)
    fusion = CrossAttentionFusion(dim=16, heads=2, mlp_ratio=0.0)
    with torch.no_grad():
        fusion.attn_gate.fill_(1.0)
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    pad = torch.tensor([[True, True, False, False]])
    # padded context tokens are ignored: changing them does not change the output
    ctx2 = ctx.clone()
    ctx2[:, 2:] = torch.randn(1, 2, 16)
    assert torch.allclose(fusion(x, ctx, context_padding=pad), fusion(x, ctx2, context_padding=pad), atol=1e-6)
    # a position that may see no media token is left unchanged
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    mask[:, 0] = False
    out = fusion(x, ctx, mask=mask)
    assert torch.allclose(out[:, 0], x[:, 0]) and not torch.allclose(out[:, 1:], x[:, 1:])


def test_cross_attention_requires_context():
    with pytest.raises(ValueError, match="context"):
        CrossAttentionFusion(dim=16, heads=2)(torch.randn(1, 2, 16))


def test_cross_attention_injects_into_stack():
    stack = TransformerStack(StackConfig(depth=2, block=BlockConfig(dim=16, heads=2)))
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    before = stack(x, causal=True)
    stack.inject(1, CrossAttentionFusion(dim=16, heads=2))
    after = stack(x, causal=True, inject_kwargs={"context": ctx})
    assert torch.allclose(before, after)  # gated at 0: the pretrained stack is unchanged


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_adapter_shapes(kind):
    adapter = AdapterFusion(in_dim=12, out_dim=20, tokens=3, kind=kind)
    assert adapter(torch.randn(2, 12)).shape == (2, 3, 20)
    assert adapter(torch.randn(2, 4, 12)).shape == (2, 12, 20)
    stream = torch.randn(2, 6, 20)
    joined = adapter(torch.randn(2, 12), stream)
    assert joined.shape == (2, 9, 20) and torch.equal(joined[:, 3:], stream)


def test_adapter_tokens_follow_their_input():
    adapter = AdapterFusion(in_dim=4, out_dim=6, tokens=2)
    x = torch.randn(1, 3, 4)
    out = adapter(x)  # (1, 6, 6)
    for i in range(3):
        assert torch.allclose(out[:, 2 * i : 2 * i + 2], adapter(x[:, i]))


def test_adapter_rejects_wrong_width():
    with pytest.raises(ValueError, match="Din=12"):
        AdapterFusion(in_dim=12)(torch.randn(2, 5))


def test_config_validation():
    with pytest.raises(ValueError, match="heads must divide dim"):
        CrossAttentionFusion(dim=10, heads=3)
    with pytest.raises(ValueError, match="kind"):
        AdapterFusion(kind="conv")
