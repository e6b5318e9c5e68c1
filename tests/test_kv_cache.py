"""Decoding through a causal TransformerStack with a KVCache, one token or a chunk at a time,
equals the full causal forward (attention's causal mask is bottom-right aligned, so a chunk
of queries appended after the cache sees everything before it)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polymodal.attention import backends, use_backend
from polymodal.nn import BlockConfig, KVCache, StackConfig, TransformerStack

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("one_thread"),
]

ATOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIM, HEADS, DEPTH = 32, 4, 3


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    return TransformerStack(StackConfig(depth=DEPTH, block=BlockConfig(dim=DIM, heads=HEADS))).eval()


def split(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Chunks [start, end) covering 0..n at the given cut points."""
    points = sorted({c for c in cuts if 0 < c < n})
    edges = [0, *points, n]
    return list(zip(edges[:-1], edges[1:]))


@st.composite
def decodes(draw, max_len: int = 20):
    """(batch, length, chunks, seed): a random length cut into random chunks (sometimes one token each)."""
    n = draw(st.integers(1, max_len))
    if draw(st.booleans()):
        chunks = [(i, i + 1) for i in range(n)]
    else:
        chunks = split(n, draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4)))
    return draw(st.integers(1, 3)), n, chunks, draw(st.integers(0, 2**31 - 1))


def decode(stack, x, chunks, **mask_for):
    cache = KVCache()
    outs = []
    for start, end in chunks:
        kw = {name: f(start, end) for name, f in mask_for.items()}
        outs.append(stack(x[:, start:end], causal=True, cache=cache, **kw))  # (B, end - start, D)
        assert cache.length == end
    return torch.cat(outs, dim=1)  # (B, N, D)


@pytest.mark.parametrize("name", sorted(backends()))
def test_cached_decoding_equals_full_forward(stack, name):
    if backends()[name].available() is not None:
        pytest.skip(f"{name}: {backends()[name].available()}")

    @given(decodes())
    @SETTINGS
    def check(case):
        b, n, chunks, seed = case
        x = torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed))  # (B, N, D)
        with torch.no_grad(), use_backend(name):
            full = stack(x, causal=True)
            torch.testing.assert_close(decode(stack, x, chunks), full, atol=ATOL, rtol=1e-5)

    check()


def test_cached_decoding_with_a_global_mask(stack):
    """A bool mask (N, N) over the whole sequence, sliced to (chunk, prefix) per step."""

    @given(decodes(), st.floats(0.2, 0.9))
    @SETTINGS
    def check(case, density):
        b, n, chunks, seed = case
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, n, DIM, generator=g)  # (B, N, D)
        mask = torch.rand(n, n, generator=g) < density  # (N, N); rows may see nothing
        with torch.no_grad():
            full = stack(x, causal=True, mask=mask)
            got = decode(stack, x, chunks, mask=lambda s, e: mask[s:e, :e])
        torch.testing.assert_close(got, full, atol=ATOL, rtol=1e-5)

    check()


def test_cached_decoding_with_per_layer_masks_and_padding(stack):
    """One mask per layer (a list) and left-padded prompts (key_padding over the prefix)."""

    @given(decodes(), st.data())
    @SETTINGS
    def check(case, data):
        b, n, chunks, seed = case
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, n, DIM, generator=g)  # (B, N, D)
        masks = [torch.rand(b, 1, n, n, generator=g) < 0.7 for _ in range(DEPTH)]  # (B, 1, N, N) each
        pad = torch.tensor([data.draw(st.integers(0, n - 1)) for _ in range(b)])  # (B,) left padding
        kp = torch.arange(n).unsqueeze(0) >= pad.unsqueeze(1)  # (B, N), True = real
        with torch.no_grad():
            full = stack(x, causal=True, mask=masks, key_padding=kp)
            got = decode(
                stack, x, chunks, mask=lambda s, e: [m[..., s:e, :e] for m in masks], key_padding=lambda s, e: kp[:, :e]
            )
        torch.testing.assert_close(got, full, atol=ATOL, rtol=1e-5)

    check()


def test_cache_select_keeps_rows(stack):
    """After ``select`` (beam/candidate pruning) decoding continues for the kept rows only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, DIM, generator=g)
    keep = torch.tensor([2, 0])
    with torch.no_grad():
        full = stack(x[keep], causal=True)
        cache = KVCache()
        first = stack(x[:, :4], causal=True, cache=cache)[keep]
        cache.select(keep)
        rest = stack(x[keep, 4:], causal=True, cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=ATOL, rtol=1e-5)
