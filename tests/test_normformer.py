"""NormFormer's extra norms as a core block option (OFA's blocks): per-head scales, post-attention norms, MLP mid norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.nn import Block, BlockConfig, KVCache


def _randomise(block: Block) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name or "head_scale" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def test_off_adds_nothing_to_the_block():
    plain = Block(BlockConfig(dim=16, heads=2, cross_attention=True))
    names = set(dict(plain.named_parameters()))
    assert not any("head_scale" in n or "out_norm" in n or "mid_norm" in n for n in names)


def test_the_block_computes_normformer_s_formula():
    torch.manual_seed(0)
    block = Block(BlockConfig(dim=16, heads=2, normformer=True)).eval()
    _randomise(block)
    x = torch.randn(2, 5, 16)
    a = block.attn
    q, k, v = (t.view(2, 5, 2, 8).transpose(1, 2) for t in a.qkv(block.norm1(x)).chunk(3, -1))  # (B, H, N, Dh)
    heads = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1) @ v  # (B, H, N, Dh)
    heads = heads * a.head_scale[:, None, None]
    x1 = x + block.attn_out_norm(a.proj(heads.transpose(1, 2).reshape(2, 5, 16)))
    m = block.mlp
    expected = x1 + m.fc2(m.mid_norm(F.gelu(m.fc1(block.norm2(x1)))))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_a_head_scaled_to_zero_is_silenced():
    torch.manual_seed(0)
    block = Block(BlockConfig(dim=16, heads=2, normformer=True)).eval()
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        block.attn.head_scale[1] = 0.0
        before = block(x)
        block.attn.qkv.weight[2 * 16 + 8 :] += 1.0  # the values of head 1 only
        after = block(x)
    torch.testing.assert_close(before, after)


def test_cached_steps_equal_the_full_pass_with_cross_attention():
    torch.manual_seed(0)
    block = Block(BlockConfig(dim=16, heads=2, normformer=True, cross_attention=True)).eval()
    _randomise(block)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    full = block(x, context, causal=True)
    cache = KVCache()
    steps = [block(x[:, :2], context, causal=True, cache=cache)]
    steps += [block(x[:, t : t + 1], context, causal=True, cache=cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
