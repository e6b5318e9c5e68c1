"""polymodal.nn.conditioning.AttentionPooling: a learned, masked attention pooling of token features."""

from __future__ import annotations

import pytest
import torch

from polymodal.nn.conditioning import AttentionPooling

pytestmark = pytest.mark.usefixtures("one_thread")


def by_hand(pool: AttentionPooling, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same function written out per row and head with an explicit softmax."""
    rows = []
    for x, m in zip(tokens, mask.bool(), strict=True):
        real = x[m]  # (n, D)
        if not len(real):
            rows.append(pool.out.bias.detach().clone())
            continue
        q, k, v = pool.q_proj(real.mean(0)), pool.k_proj(real), pool.v_proj(real)
        heads = []
        for h in range(pool.heads):
            s = slice(h * (q.shape[0] // pool.heads), (h + 1) * (q.shape[0] // pool.heads))
            w = torch.softmax(k[:, s] @ q[s] / (s.stop - s.start) ** 0.5, dim=0)  # (n,)
            heads.append(w @ v[:, s])
        rows.append(pool.out(torch.cat(heads)))
    return torch.stack(rows)


def test_pooling_is_masked_multi_head_attention_from_the_mean_of_the_real_tokens():
    torch.manual_seed(0)
    pool = AttentionPooling(16, 8, heads=4)
    tokens = torch.randn(4, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6, [1, 0, 1, 0, 1, 0]]).bool()
    out = pool(tokens, mask)
    assert out.shape == (4, 8)
    torch.testing.assert_close(out, by_hand(pool, tokens, mask), atol=1e-5, rtol=1e-5)
    # padding never matters, an empty row (a dropped text) gives the projection's bias
    changed = tokens.clone()
    changed[~mask] = 1e3
    torch.testing.assert_close(pool(changed, mask), out)
    torch.testing.assert_close(out[2], pool.out.bias.detach())
    # no positions: the order of the real tokens does not matter; their content does
    torch.testing.assert_close(pool(tokens[:, [2, 0, 1, 3, 4, 5]], mask[:, [2, 0, 1, 3, 4, 5]])[1], out[1])
    assert not torch.allclose(pool(tokens + 1, mask)[1], out[1])


def test_every_projection_learns_and_heads_must_divide_the_width():
    pool = AttentionPooling(8, 3, heads=2)
    pool(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.parameters())
    with pytest.raises(ValueError, match="heads must divide dim=8; got 3"):
        AttentionPooling(8, 3, heads=3)
    with pytest.raises(
        ValueError, match=r"expected tokens \(B, L, 8\) and a mask \(B, L\); got \(2, 5, 6\) and \(2, 5\)"
    ):
        pool(torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(2, 5, 8\) and \(2, 4\)"):
        pool(torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))
