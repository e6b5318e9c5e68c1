"""Attention: every backend computes what ``math`` computes, for every mask kind; the
dispatcher picks, forces and refuses backends as documented; the benchmark runs.

Tensors come from a drawn seed (fast, and hypothesis shrinks shapes, not values).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polymodal.attention as A
from polymodal.attention import (
    AttentionError,
    AttentionSpec,
    MathBackend,
    attention,
    backends,
    select_backend,
    use_backend,
)
from polymodal.attention.dispatch import _spec
from polymodal.nn import Block, BlockConfig, StackConfig, TransformerStack
from polymodal.registry import get_registry

# flex runs eagerly (unfused) on the CPU and says so once per process; that is expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("one_thread"),
]

ATOL = 1e-5
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL = sorted(backends())
FUSED = [n for n in ALL if n != "math"]
seeds = st.integers(0, 2**31 - 1)
head_dims = st.sampled_from([8, 16])


def usable(name: str) -> A.Backend:
    """The backend ``name``, or skip the test naming why it cannot run in this process."""
    backend = backends()[name]
    why = backend.available()
    if why is not None:
        pytest.skip(f"{name}: {why}")
    return backend


def qkv(seed: int, b: int, h: int, nq: int, nk: int, d: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)  # (B, H, Nq, D)
    k = torch.randn(b, h, nk, d, generator=g, dtype=dtype)  # (B, H, Nk, D)
    v = torch.randn(b, h, nk, d, generator=g, dtype=dtype)  # (B, H, Nk, D)
    return q, k, v, g


def run_or_skip(name: str, q, k, v, **kw):
    """``attention`` forced to ``name``; skip (with the backend's reason) a call it does not support."""
    spec = _spec(
        q,
        k,
        kw.get("causal", False),
        kw.get("key_padding"),
        kw.get("seqlens"),
        kw.get("mask"),
        kw.get("dropout_p", 0.0),
        v,
    )
    why = backends()[name].supports(spec)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    return attention(q, k, v, backend=name, **kw)


# -- drawn calls ---------------------------------------------------------------------------------

KINDS = [
    "none",
    "causal",
    "padding",
    "seqlens",
    "bool",
    "additive",
    "causal+padding",
    "causal+seqlens",
    "bool+causal",
    "additive+causal",
    "additive+padding",
    "bool+padding+causal",
    "scale",
]


@st.composite
def calls(draw, kind: str):
    """(q, k, v, kwargs) for mask ``kind``; masks may leave whole rows with no visible key."""
    parts = set(kind.split("+"))
    d, seed = draw(head_dims), draw(seeds)
    h = draw(st.integers(1, 3))
    if "seqlens" in parts:
        seqlens = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
        b, nq = 1, sum(seqlens)
        nk = nq
    else:
        b, nq, nk = draw(st.integers(1, 3)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    q, k, v, g = qkv(seed, b, h, nq, nk, d)
    kw: dict = {}
    if "causal" in parts:
        kw["causal"] = True
    if "seqlens" in parts:
        kw["seqlens"] = seqlens
    if "padding" in parts:
        lengths = torch.randint(0, nk + 1, (b,), generator=g)  # (B,), 0 = fully padded row
        kp = torch.arange(nk).unsqueeze(0) < lengths.unsqueeze(1)  # (B, Nk)
        if draw(st.booleans()):  # padding anywhere, not only at the end
            kp = torch.rand(b, nk, generator=g) < 0.7
        kw["key_padding"] = kp
    if "bool" in parts or "additive" in parts:
        shape = draw(st.sampled_from([(nq, nk), (b, 1, nq, nk), (1, h, nq, nk), (b, h, nq, nk)]))
        keep = torch.rand(shape, generator=g) < draw(st.sampled_from([0.3, 0.7, 1.0]))
        if draw(st.booleans()):
            keep[..., 0, :] = False  # a row that sees nothing
        if "bool" in parts:
            kw["mask"] = keep
        else:
            bias = torch.randn(shape, generator=g)
            kw["mask"] = bias.masked_fill(~keep, float("-inf"))
    if "scale" in parts:
        kw["scale"] = draw(st.sampled_from([0.1, 1.0, 2.5]))
    return q, k, v, kw


def reference(q, k, v, *, causal=False, key_padding=None, seqlens=None, mask=None, scale=None):
    """Attention written out element by element in float64, independent of ``masks.py``."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    seq_id = None
    if seqlens is not None:
        seq_id = [i for i, n in enumerate(seqlens) for _ in range(n)]
    dense = None if mask is None else mask.expand(b, h, nq, nk)
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                logits, values = [], []
                for j in range(nk):
                    if causal and j > i + nk - nq:
                        continue
                    if key_padding is not None and not key_padding[bi, j]:
                        continue
                    if seq_id is not None and seq_id[i] != seq_id[j]:
                        continue
                    extra = 0.0
                    if dense is not None:
                        if dense.dtype == torch.bool:
                            if not dense[bi, hi, i, j]:
                                continue
                        else:
                            extra = float(dense[bi, hi, i, j])
                            if extra == float("-inf"):
                                continue
                    logits.append(float(q[bi, hi, i].double() @ k[bi, hi, j].double()) * scale + extra)
                    values.append(v[bi, hi, j].double())
                if logits:
                    w = torch.tensor(logits, dtype=torch.float64).softmax(0)
                    out[bi, hi, i] = (w.unsqueeze(1) * torch.stack(values)).sum(0)
    return out


# -- every backend equals math -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_math_matches_written_out_reference(kind):
    @given(calls(kind))
    @settings(max_examples=12, deadline=None)
    def check(call):
        q, k, v, kw = call
        out = attention(q, k, v, backend="math", **kw)
        torch.testing.assert_close(out.double(), reference(q, k, v, **kw), atol=ATOL, rtol=1e-5)

    check()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FUSED)
def test_backend_matches_math(name, kind):
    usable(name)

    @given(calls(kind))
    @SETTINGS
    def check(call):
        q, k, v, kw = call
        out = run_or_skip(name, q, k, v, **kw)
        assert out.shape == q.shape[:3] + v.shape[-1:]
        assert not out.isnan().any(), f"{name} returned NaN for mask kind {kind}"
        torch.testing.assert_close(out, attention(q, k, v, backend="math", **kw), atol=ATOL, rtol=1e-5)

    check()


@pytest.mark.parametrize("name", ALL)
def test_float64_matches_math(name):
    usable(name)

    @given(calls("causal+padding"))
    @FEW
    def check(call):
        q, k, v, kw = call
        q, k, v = q.double(), k.double(), v.double()
        out = run_or_skip(name, q, k, v, **kw)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, attention(q, k, v, backend="math", **kw), atol=1e-10, rtol=1e-10)

    check()


@pytest.mark.parametrize(
    "kind", ["none", "causal", "padding", "causal+seqlens", "additive+causal", "bool+padding+causal"]
)
@pytest.mark.parametrize("name", [n for n in FUSED if n != "flex"])  # flex has no CPU backward
def test_gradients_match_math(name, kind):
    usable(name)

    @given(calls(kind))
    @FEW
    def check(call):
        q, k, v, kw = call
        grads = []
        for backend in (name, "math"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            g = torch.Generator().manual_seed(1)
            out = run_or_skip(backend, *leaves, **kw)
            (out * torch.randn(out.shape, generator=g)).sum().backward()
            grads.append([t.grad for t in leaves])
        for got, want, label in zip(*grads, "qkv"):
            assert got.isfinite().all(), f"{name}: non-finite d{label}"
            torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4, msg=lambda m, label=label: f"d{label}: {m}")

    check()


@pytest.mark.parametrize("name", [n for n in FUSED if n != "flex"])
def test_additive_bias_gradient_matches_math(name):
    """A learned additive bias (relative positions) gets the same gradient from every backend."""
    usable(name)
    q, k, v, g = qkv(3, 2, 3, 7, 9, 8)
    bias = torch.randn(1, 3, 7, 9, generator=g)
    bias[..., 2, :] = float("-inf")  # a row that sees nothing
    bias[..., 4] = float("-inf")
    grads = []
    for backend in (name, "math"):
        b = bias.clone().requires_grad_()
        attention(q, k, v, mask=b, causal=True, backend=backend).square().sum().backward()
        grads.append(b.grad)
    finite = grads[1].isfinite()
    assert torch.equal(grads[0].isfinite(), finite)
    torch.testing.assert_close(grads[0][finite], grads[1][finite], atol=ATOL, rtol=1e-4)


# -- properties of the function itself -----------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_packed_equals_separate(name):
    """Sequences packed with ``seqlens`` give what each gives on its own (causal or not)."""
    usable(name)

    @given(st.lists(st.integers(1, 8), min_size=1, max_size=4), st.booleans(), head_dims, seeds)
    @SETTINGS
    def check(seqlens, causal, d, seed):
        q, k, v, _ = qkv(seed, 1, 2, sum(seqlens), sum(seqlens), d)
        packed = run_or_skip(name, q, k, v, seqlens=seqlens, causal=causal)
        parts, start = [], 0
        for n in seqlens:
            s = slice(start, start + n)
            parts.append(run_or_skip(name, q[:, :, s], k[:, :, s], v[:, :, s], causal=causal))
            start += n
        torch.testing.assert_close(packed, torch.cat(parts, dim=2), atol=ATOL, rtol=1e-5)

    check()


@pytest.mark.parametrize("name", ALL)
def test_packed_equals_padded(name):
    """Packed variable-length sequences equal the same batch padded, with ``key_padding``."""
    usable(name)

    @given(st.lists(st.integers(1, 8), min_size=1, max_size=3), head_dims, seeds)
    @FEW
    def check(seqlens, d, seed):
        total, longest, b = sum(seqlens), max(seqlens), len(seqlens)
        q, k, v, _ = qkv(seed, 1, 2, total, total, d)
        packed = run_or_skip(name, q, k, v, seqlens=seqlens)
        pad = [torch.zeros(b, 2, longest, d) for _ in range(3)]
        kp = torch.zeros(b, longest, dtype=torch.bool)
        start = 0
        for i, n in enumerate(seqlens):
            for dst, src in zip(pad, (q, k, v)):
                dst[i, :, :n] = src[0, :, start : start + n]
            kp[i, :n] = True
            start += n
        padded = run_or_skip(name, *pad, key_padding=kp)
        unpadded = torch.cat([padded[i : i + 1, :, :n] for i, n in enumerate(seqlens)], dim=2)
        torch.testing.assert_close(packed, unpadded, atol=ATOL, rtol=1e-5)

    check()


@pytest.mark.parametrize("name", ALL)
def test_causal_ignores_the_future(name):
    """Under ``causal``, changing keys, values and queries at positions >= t never changes rows < t."""
    usable(name)

    @given(st.integers(2, 24), st.data(), head_dims, seeds)
    @SETTINGS
    def check(n, data, d, seed):
        t = data.draw(st.integers(1, n - 1))
        q, k, v, g = qkv(seed, 2, 2, n, n, d)
        before = run_or_skip(name, q, k, v, causal=True)
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] = torch.randn(x[:, :, t:].shape, generator=g) * 10
        after = run_or_skip(name, q2, k2, v2, causal=True)
        torch.testing.assert_close(after[:, :, :t], before[:, :, :t], atol=ATOL, rtol=1e-5)
        assert not torch.allclose(after[:, :, t:], before[:, :, t:])

    check()


@pytest.mark.parametrize("name", ALL)
def test_key_padding_ignores_padded_values(name):
    """Whatever sits at padded key positions does not change the output."""
    usable(name)

    @given(calls("padding"))
    @FEW
    def check(call):
        q, k, v, kw = call
        kp = kw["key_padding"]
        k2 = torch.where(kp[:, None, :, None], k, torch.randn_like(k) * 100)
        v2 = torch.where(kp[:, None, :, None], v, torch.randn_like(v) * 100)
        torch.testing.assert_close(
            run_or_skip(name, q, k2, v2, **kw), run_or_skip(name, q, k, v, **kw), atol=ATOL, rtol=1e-5
        )

    check()


@pytest.mark.parametrize("name", ALL)
def test_fully_masked_rows_are_zero(name):
    """A query that may see no key gets zeros, never NaN, whichever mask hides everything."""
    usable(name)
    q, k, v, _ = qkv(0, 2, 2, 5, 6, 8)
    kp = torch.ones(2, 6, dtype=torch.bool)
    kp[1] = False
    rows = torch.ones(5, 6, dtype=torch.bool)
    rows[3] = False
    bias = torch.zeros(2, 2, 5, 6)
    bias[0, 1, 2] = float("-inf")
    cases = {
        "padding": (dict(key_padding=kp), (slice(1, 2), slice(None), slice(None))),
        "bool": (dict(mask=rows), (slice(None), slice(None), slice(3, 4))),
        "additive": (dict(mask=bias), (slice(0, 1), slice(1, 2), slice(2, 3))),
        "causal Nq > Nk": (dict(causal=True, mask=torch.ones(5, 3, dtype=torch.bool)), None),
        "all": (dict(key_padding=torch.zeros(2, 6, dtype=torch.bool), causal=True), (slice(None),) * 3),
    }
    for label, (kw, empty) in cases.items():
        kk, vv = (k, v) if label != "causal Nq > Nk" else (k[:, :, :3], v[:, :, :3])
        if label == "causal Nq > Nk":
            empty = (slice(None), slice(None), slice(0, 2))  # queries 0, 1 see keys j <= i - 2
        out = run_or_skip(name, q, kk, vv, **kw)
        assert not out.isnan().any(), f"{name}, {label}: NaN"
        assert torch.equal(out[empty], torch.zeros_like(out[empty])), f"{name}, {label}: rows not zero"
        torch.testing.assert_close(out, attention(q, kk, vv, backend="math", **kw), atol=ATOL, rtol=1e-5)


def test_fully_masked_rows_have_finite_gradients():
    for name in [n for n in ALL if n != "flex" and backends()[n].available() is None]:
        leaves = [t.requires_grad_() for t in qkv(1, 2, 2, 4, 5, 8)[:3]]
        kp = torch.tensor([[True] * 5, [False] * 5])
        attention(*leaves, key_padding=kp, backend=name).sum().backward()
        for t in leaves:
            assert t.grad.isfinite().all(), name
        assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1])), name


@pytest.mark.parametrize("name", ALL)
def test_single_query_after_cache_sees_everything(name):
    """Decoding: one query appended after a cache, causal, attends to every key (bottom-right)."""
    usable(name)
    q, k, v, _ = qkv(2, 2, 2, 1, 11, 16)
    torch.testing.assert_close(
        run_or_skip(name, q, k, v, causal=True), run_or_skip(name, q, k, v), atol=ATOL, rtol=1e-5
    )


def block_inputs(seed: int, b: int, n: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, dim, generator=g), torch.randperm(n, generator=g), g


@pytest.mark.parametrize("name", ALL)
def test_block_is_permutation_equivariant(name):
    """Without position embeddings a block commutes with permuting the tokens (and their padding)."""
    usable(name)
    torch.manual_seed(0)
    block = Block(BlockConfig(dim=32, heads=4)).eval()
    stack = TransformerStack(StackConfig(depth=2, block=BlockConfig(dim=32, heads=2))).eval()

    @given(st.integers(1, 3), st.integers(1, 16), st.booleans(), seeds)
    @FEW
    def check(b, n, padded, seed):
        x, perm, g = block_inputs(seed, b, n, 32)
        kp = None
        if padded:
            kp = torch.rand(b, n, generator=g) < 0.7
            kp[:, 0] = True
        with torch.no_grad(), use_backend(name):
            for module in (block, stack):
                out = module(x, key_padding=kp)
                out_p = module(x[:, perm], key_padding=None if kp is None else kp[:, perm])
                torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)

    check()


# -- the dispatcher ------------------------------------------------------------------------------


class Recording(MathBackend):
    """``math`` that remembers it ran; registered around the tests that need it."""

    name = "recording"
    priority = -100

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


@pytest.fixture
def recording():
    registry = get_registry()
    backend = Recording()
    registry.add("attention_backend", "recording", backend, plugin="test_attention", doc="records calls")
    try:
        yield backend
    finally:
        registry.remove("attention_backend", "recording")


def spec(**over) -> AttentionSpec:
    fields = dict(
        device="cpu",
        dtype=torch.float32,
        grad=False,
        causal=False,
        padding=False,
        packed=False,
        dense="",
        dropout=False,
        nq=8,
        nk=8,
        head_dim=16,
    )
    fields.update(over)
    return AttentionSpec(**fields)


@pytest.mark.parametrize(
    "over",
    [
        {},
        dict(causal=True),
        dict(padding=True),
        dict(packed=True),
        dict(dense="bool"),
        dict(dense="additive", causal=True),
        dict(grad=True),
        dict(dropout=True),
        dict(dtype=torch.float64),
        dict(dtype=torch.bfloat16),
        dict(nq=1, nk=300),
    ],
)
def test_auto_never_picks_flex_on_cpu(over):
    assert select_backend(spec(**over)).name != "flex"
    registry = get_registry()
    entry = registry.entry("attention_backend", "sdpa")
    registry.remove("attention_backend", "sdpa")  # flex now outranks everything left on the CPU
    try:
        chosen = select_backend(spec(**over))
        assert chosen.name != "flex"
        assert chosen.name == "math"
    finally:
        registry.add("attention_backend", "sdpa", entry.obj, plugin=entry.plugin, doc=entry.doc)
    assert select_backend(spec(**over)).name == "sdpa"


def test_auto_prefers_sdpa_on_cpu():
    q, k, v, _ = qkv(0, 1, 1, 4, 4, 8)
    assert select_backend(_spec(q, k, True, None, None, None, 0.0, v)).name == "sdpa"


def test_auto_respects_size_dependent_support(recording, monkeypatch):
    """``auto``'s cache must not reuse a choice for a call the chosen backend rejects."""
    recording.priority = 1000
    monkeypatch.setattr(
        Recording, "supports", lambda self, s: None if s.head_dim <= 8 else "head_dim > 8", raising=False
    )
    get_registry().version += 1  # priorities are read when the registry changes
    q, k, v, _ = qkv(0, 1, 1, 4, 4, 8)
    attention(q, k, v)
    assert recording.calls == 1
    q, k, v, _ = qkv(0, 1, 1, 4, 4, 16)
    attention(q, k, v)
    assert recording.calls == 1, "a backend that refused the call was picked from the cache"
    assert select_backend(spec(head_dim=8)).name == "recording"
    assert select_backend(spec(head_dim=16)).name != "recording"
    assert select_backend(spec(head_dim=8)).name == "recording"


def test_force_by_argument_context_and_env(recording, monkeypatch):
    q, k, v, _ = qkv(0, 2, 2, 3, 5, 8)
    want = attention(q, k, v, backend="math")
    monkeypatch.delenv("POLYMODAL_ATTENTION", raising=False)

    torch.testing.assert_close(attention(q, k, v, backend="recording"), want)
    assert recording.calls == 1
    with use_backend("recording"):
        attention(q, k, v)
        attention(q, k, v, backend="math")  # the argument beats the context manager
    assert recording.calls == 2
    with use_backend("recording"), use_backend("auto"):
        attention(q, k, v)  # the inner block asks to choose again
    assert recording.calls == 2
    monkeypatch.setenv("POLYMODAL_ATTENTION", "recording")
    attention(q, k, v)
    assert recording.calls == 3
    with use_backend("math"):
        attention(q, k, v)  # the context manager beats the environment
    assert recording.calls == 3
    attention(q, k, v, backend="auto")
    assert recording.calls == 3
    monkeypatch.setenv("POLYMODAL_ATTENTION", "auto")
    attention(q, k, v)
    assert recording.calls == 3


def test_auto_is_used_when_nothing_forced(recording, monkeypatch):
    monkeypatch.delenv("POLYMODAL_ATTENTION", raising=False)
    q, k, v, _ = qkv(0, 1, 1, 3, 3, 8)
    attention(q, k, v)
    assert recording.calls == 0  # lowest priority: never auto's pick while others support the call


def test_forced_backend_that_cannot_run_raises_with_reason():
    if "flex" not in ALL:
        pytest.skip("flex is not registered")
    q, k, v, _ = qkv(0, 1, 1, 4, 4, 8)
    with pytest.raises(AttentionError, match="flex.*dropout"):
        attention(q, k, v, dropout_p=0.1, backend="flex")
    with use_backend("flex"), pytest.raises(AttentionError, match="backward"):
        attention(q.requires_grad_(), k, v)
    with use_backend("flex"), pytest.raises(AttentionError, match="backward"):
        attention(q.detach(), k, v.requires_grad_())  # a gradient for v alone is still training
    with use_backend("flex"), pytest.raises(AttentionError, match="bfloat16|float32"):
        attention(q.detach().bfloat16(), k.bfloat16(), v.bfloat16())


def test_forced_xformers_without_cuda_raises_with_reason():
    if "xformers" not in ALL or backends()["xformers"].available() is None:
        pytest.skip("xformers is usable here")
    q, k, v, _ = qkv(0, 1, 1, 4, 4, 8)
    with pytest.raises(AttentionError, match="xformers") as info:
        attention(q, k, v, backend="xformers")
    assert backends()["xformers"].available() in str(info.value)


def test_unknown_backend_lists_registered(monkeypatch):
    q, k, v, _ = qkv(0, 1, 1, 4, 4, 8)
    with pytest.raises(AttentionError, match="unknown attention backend 'nope'") as info:
        attention(q, k, v, backend="nope")
    for name in ALL:
        assert name in str(info.value)
    monkeypatch.setenv("POLYMODAL_ATTENTION", "also-nope")
    with pytest.raises(AttentionError, match="also-nope.*registered: .*math"):
        attention(q, k, v)


def test_registry_changes_are_seen(recording):
    assert "recording" in backends()
    get_registry().remove("attention_backend", "recording")
    try:
        assert "recording" not in backends()
        with pytest.raises(AttentionError, match="unknown"):
            attention(*qkv(0, 1, 1, 2, 2, 8)[:3], backend="recording")
    finally:
        get_registry().add("attention_backend", "recording", recording, plugin="test_attention", doc="r")


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    return calls


def test_sdpa_causal_square_uses_is_causal(sdpa_calls):
    if "sdpa" not in ALL:
        pytest.skip("sdpa is not registered")
    q, k, v, _ = qkv(0, 2, 2, 6, 6, 8)
    out = attention(q, k, v, causal=True, backend="sdpa")
    assert len(sdpa_calls) == 1
    assert sdpa_calls[0].get("attn_mask") is None and sdpa_calls[0].get("is_causal") is True
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="math"), atol=ATOL, rtol=1e-5)


def test_sdpa_bottom_right_causal_uses_a_mask(sdpa_calls):
    """Nq != Nk: the kernel's is_causal is top-left aligned, so the backend must pass a mask."""
    q, k, v, _ = qkv(0, 1, 2, 3, 7, 8)
    out = attention(q, k, v, causal=True, backend="sdpa")
    assert not sdpa_calls[0].get("is_causal", False) and sdpa_calls[0].get("attn_mask") is not None
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="math"), atol=ATOL, rtol=1e-5)


def test_sdpa_single_query_needs_no_mask(sdpa_calls):
    q, k, v, _ = qkv(0, 1, 2, 1, 7, 8)
    attention(q, k, v, causal=True, backend="sdpa")
    assert sdpa_calls[0].get("attn_mask") is None and not sdpa_calls[0].get("is_causal", False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", ["none", "padding", "additive"])
def test_sdpa_runs_a_reduced_precision_decoding_step_in_float32_on_the_cpu(monkeypatch, dtype, masked):
    from polymodal.attention.backends import WIDEN_MIN_SCORES, widen_on_cpu

    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, *a, **kw: seen.append(q.dtype) or real(q, *a, **kw),
    )
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g).to(dtype) for n in (1, 96, 96))  # 2 × 4 × 96 scores
    assert 2 * 4 * 96 >= WIDEN_MIN_SCORES
    kw = {
        "none": {},
        "padding": {"key_padding": torch.arange(96)[None, :] < torch.tensor([[60], [96]])},
        "additive": {"mask": torch.randn(1, 4, 1, 96, generator=g).to(dtype)},
    }[masked]
    wide = {n: (m.double() if m.dtype != torch.bool else m) for n, m in kw.items()}
    exact = attention(q.double(), k.double(), v.double(), backend="math", **wide)  # (2, 4, 1, 16)
    with torch.no_grad():
        assert widen_on_cpu(q, k, v, 0.0) and not widen_on_cpu(q, k, v, 0.1)
        out = attention(q, k, v, backend="sdpa", **kw)
    assert out.dtype == dtype and seen == [torch.float32]  # the kernel ran in float32
    # one rounding of a float32 result to the low precision (2^-8 relative for bfloat16, 2^-11 for float16)
    torch.testing.assert_close(out.double(), exact, atol=1e-6, rtol=2**-8 if dtype == torch.bfloat16 else 2**-11)
    assert not widen_on_cpu(q.float(), k.float(), v.float(), 0.0)  # float32 runs as it is
    assert not widen_on_cpu(q.expand(2, 4, 2, 16), k, v, 0.0)  # two queries: not a decoding step
    small = [t[:1, :1] for t in (q, k, v)]  # 1 × 1 × 96 scores: the casts would cost more than they save
    assert not widen_on_cpu(*small, 0.0)
    assert not widen_on_cpu(q.clone().requires_grad_(), k, v, 0.0)  # training keeps the low-precision kernel


@pytest.mark.parametrize(
    "shapes",
    [
        ((4, 5, 8), (1, 4, 5, 8), (1, 4, 5, 8)),
        ((1, 4, 5, 8), (4, 5, 8), (4, 5, 8)),
        ((1, 2, 5, 8), (1, 2, 6, 16), (1, 2, 6, 16)),
        ((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 7, 8)),
    ],
)
def test_bad_shapes_raise_naming_them(shapes):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(AttentionError) as info:
        attention(q, k, v)
    for s in shapes:
        assert str(s) in str(info.value)


def test_bad_padding_and_seqlens_raise():
    q, k, v, _ = qkv(0, 2, 1, 4, 4, 8)
    with pytest.raises(AttentionError, match=r"key_padding must be \(B, Nk\) = \(2, 4\); got \(2, 3\)"):
        attention(q, k, v, key_padding=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(AttentionError, match="B == 1"):
        attention(q, k, v, seqlens=[2, 2])
    with pytest.raises(AttentionError, match="sum"):
        attention(q[:1], k[:1], v[:1], seqlens=[2, 3])


def test_env_is_read_per_call(monkeypatch):
    q, k, v, _ = qkv(0, 1, 1, 4, 4, 8)
    monkeypatch.setenv("POLYMODAL_ATTENTION", "flex" if "flex" in ALL else "math")
    with pytest.raises(AttentionError):
        attention(q, k, v, dropout_p=0.5) if "flex" in ALL else attention(q, k, v, backend="nope")
    monkeypatch.delenv("POLYMODAL_ATTENTION")
    attention(q, k, v, dropout_p=0.5)


def test_every_backend_declares_support_reasons():
    for name, backend in backends().items():
        why = backend.available()
        assert why is None or (isinstance(why, str) and why), name
        for over in ({}, dict(device="cuda"), dict(grad=True, dropout=True), dict(dtype=torch.float16)):
            why = backend.supports(spec(**over))
            assert why is None or (isinstance(why, str) and why), (name, over)


# -- the benchmark -------------------------------------------------------------------------------

ROW_KEYS = {
    "suite",
    "backend",
    "case",
    "shape",
    "dtype",
    "device",
    "device_name",
    "mode",
    "status",
    "reason",
    "median_ms",
    "iqr_ms",
    "gflops",
    "peak_mem_mb",
    "torch",
    "threads",
}


def test_bench_quick_writes_rows(tmp_path, capsys):
    import bench

    out = tmp_path / "attention.json"
    # flex is left out: unfused on the CPU it is slow, and the equivalence tests above cover it.
    names = ",".join(n for n in ALL if n != "flex")
    assert bench.main(["attention", "--quick", "--threads", "1", "--backends", names, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"machine", "rows", "overhead"} <= set(report)
    assert {"device_name", "torch", "threads", "device"} <= set(report["machine"])
    rows = report["rows"]
    assert rows and all(ROW_KEYS <= set(row) for row in rows)
    assert {row["backend"] for row in rows} >= {"math", "sdpa"}
    for row in rows:
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and row["gflops"] > 0 and row["reason"] is None
        else:
            assert row["reason"]
    assert {"attention_ms", "sdpa_ms", "ratio"} <= set(report["overhead"])
    assert "backend" in capsys.readouterr().out  # the table was printed


def test_bench_rejects_unknown_suite(capsys):
    import bench

    assert bench.main(["nope"]) == 2
    assert "usage" in capsys.readouterr().err
    assert bench.main(["attention", "--quick", "--backends", "nope"]) == 2
    assert "unknown backend" in capsys.readouterr().err
