"""The core causal decoder and its preallocated KV cache: cached generation equals uncached at every step.

Random tiny decoders (depth 1-3, 1-2 heads, batch 1-3, random prompt lengths) are run two ways: the
cached path (:meth:`CausalDecoder.generate`: prefill, then one token per step over the preallocated
cache) and a hand-written reference that runs the whole sequence through the stack each step with the
full (T, T) masks. Every step's logits must agree (atol 1e-5) and, with a seeded generator, so must the
drawn ids. Covered: plain causal attention; per-layer sparse image masks of
:func:`polymodal.attention.image_pattern_mask` in the DALL·E (``[text][image]``) and RuDolph
(``[left][image][right]``) layouts; cross-attention over a fixed context, whose keys and values are
projected once and never served stale for a new context; in-place writes and growth of the cache;
``select`` after a prefix (RuDolph's caption scoring); and the compiled static step (slow).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from polymodal.attention import image_pattern_mask
from polymodal.generation.decoder import CausalDecoder
from polymodal.generation.sampling import generate
from polymodal.nn import BlockConfig, KVCache, StackConfig, TransformerStack

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

ATOL = 1e-5
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = 23
PATTERNS = ("full", "row", "column", "conv")


class TinyLM(nn.Module):
    """A family-like owner of a causal decoder: token table, learned positions, stack, head, optional masks.

    ``masks_full`` (one (T, T) bool per layer, or None) is the whole-stream pattern; the decoder gets its
    rows ``pos`` and keys ``:keys`` per call, as DALL·E and RuDolph give theirs.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        depth: int,
        max_len: int,
        masks_full: list[Tensor] | None = None,
        cross: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        block = BlockConfig(dim=dim, heads=heads, mlp_ratio=2.0, cross_attention=cross, cross_dim=12 if cross else None)
        self.token_embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.5)
        self.stack = TransformerStack(StackConfig(depth=depth, block=block))
        self.head = nn.Linear(dim, VOCAB)
        with torch.no_grad():  # noisy weights: every input matters to the logits
            for p in self.parameters():
                p.add_(0.3 * torch.randn(p.shape))
        self.max_len = max_len
        self.masks_full = masks_full
        self.eval()

    def position_rows(self, pos: Tensor) -> Tensor:
        """(n, D) the learned positions ``pos`` (n,)."""
        return self.pos[pos]

    def masks(self, pos: Tensor, keys: int) -> list[Tensor]:
        """Per layer, rows ``pos`` (n,) and keys ``:keys`` of the layer's pattern (n, keys)."""
        return [m[pos, :keys] for m in self.masks_full]

    @property
    def decoder(self) -> CausalDecoder:
        """The core decoder over this model's modules (built once, kept out of the state dict)."""
        if "_decoder" not in self.__dict__:
            self.__dict__["_decoder"] = CausalDecoder(
                self.stack,
                tokens=self.token_embed,
                positions=self.position_rows,
                head=self.head,
                max_len=self.max_len,
                masks=None if self.masks_full is None else self.masks,
                owner=self,
            )
        return self.__dict__["_decoder"]

    @torch.no_grad()
    def reference(self, ids: Tensor, context: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) of the whole sequence, computed without the decoder or any cache."""
        t = ids.shape[1]
        x = self.token_embed(ids) + self.pos[:t]  # (B, T, D)
        mask = None if self.masks_full is None else [m[:t, :t] for m in self.masks_full]
        return self.head(self.stack(x, context, causal=True, mask=mask))  # (B, T, V)


def sparse_layout(draw, depth: int) -> tuple[int, list[Tensor]]:
    """(stream length, per-layer masks) of a DALL·E ``[text][h×w]`` or RuDolph ``[left][h×w][right]`` stream."""
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    prefix = draw(st.integers(1, 4))
    suffix = draw(st.integers(0, 3))  # 0: DALL·E's layout; > 0: RuDolph's right text
    kernel = draw(st.sampled_from((1, 3)))
    schedule = [draw(st.sampled_from(PATTERNS)) for _ in range(depth)]
    masks = [image_pattern_mask(p, (h, w), prefix=prefix, suffix=suffix, kernel=kernel) for p in schedule]
    return prefix + h * w + suffix, masks


@st.composite
def decoders(draw, sparse: bool, cross: bool = False):
    """(model, prompt ids (B, P), new tokens, seed) for a random tiny decoder."""
    depth, heads = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    if sparse:
        max_len, masks = sparse_layout(draw, depth)
    else:
        max_len, masks = draw(st.integers(2, 16)), None
    seed = draw(st.integers(0, 2**31 - 1))
    model = TinyLM(
        dim=8 * heads, heads=heads, depth=depth, max_len=max_len, masks_full=masks, cross=cross, seed=seed % 1000
    )
    batch = draw(st.integers(1, 3))
    prompt = draw(st.integers(1, max_len - 1))
    new = draw(st.integers(1, max_len - prompt))
    ids = torch.randint(0, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    return model, ids, new, seed


def recorded(step):
    """``step`` wrapped to keep the last-position logits (B, V) of each call in ``.seen``."""

    def run(ids, cache):
        logits = step(ids, cache)  # (B, n, V)
        run.seen.append(logits[:, -1].clone())
        return logits

    run.seen = []
    return run


def check_every_step(model: TinyLM, ids: Tensor, new: int, seed: int, compile: bool = False, **kw) -> None:
    """Cached generation (the decoder) and the whole-sequence reference: same logits each step, same draws."""
    ref = recorded(lambda full, cache: model.reference(full))
    want = generate(ref, ids, new, use_cache=False, generator=torch.Generator().manual_seed(seed), **kw)
    dec = model.decoder
    cached = recorded(dec.step_fn(compile=compile))
    got = generate(cached, ids, new, generator=torch.Generator().manual_seed(seed), new_cache=dec.new_cache, **kw)
    assert len(cached.seen) == len(ref.seen) == new
    for step, (a, b) in enumerate(zip(cached.seen, ref.seen)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
    assert torch.equal(got, want)


# -- (a) plain causal and (b) sparse per-layer masks -----------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["causal", "sparse"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_cached_generation_equals_uncached_at_every_step(sparse, greedy):
    @given(decoders(sparse))
    @SETTINGS
    def check(case):
        model, ids, new, seed = case
        check_every_step(model, ids, new, seed, greedy=greedy, temperature=1.3)

    check()


# -- (c) cross-attention over a fixed context --------------------------------------------------------------


def cross_step(model: TinyLM, context: Tensor):
    """A step function running ``model``'s cross-attention stack over ``context`` (B, M, 12)."""

    def step(ids: Tensor, cache: KVCache | None) -> Tensor:
        start, n = (cache.length if cache is not None else 0), ids.shape[1]
        x = model.token_embed(ids) + model.pos[start : start + n]  # (B, n, D)
        return model.head(model.stack(x, context, causal=True, cache=cache))  # (B, n, V)

    return step


def count_kv(model: TinyLM) -> list[int]:
    """A one-element counter of the calls of every cross-attention key/value projection of ``model``."""
    calls = [0]
    for block in model.stack.blocks:
        block.cross_attn.kv.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@st.composite
def cross_cases(draw):
    """(model, context (B, M, 12), prompt ids (B, P), new tokens, seed) for a cross-attention decoder."""
    model, ids, new, seed = draw(decoders(sparse=False, cross=True))
    m = draw(st.integers(1, 5))
    context = torch.randn(ids.shape[0], m, 12, generator=torch.Generator().manual_seed(seed + 1))  # (B, M, C)
    return model, context, ids, new, seed


@given(cross_cases(), st.booleans())
@SETTINGS
def test_cross_attention_cache_equals_uncached_and_projects_the_context_once(case, greedy):
    model, context, ids, new, seed = case
    ref = recorded(lambda full, cache: model.reference(full, context))
    want = generate(ref, ids, new, use_cache=False, greedy=greedy, generator=torch.Generator().manual_seed(seed))
    calls = count_kv(model)
    cached = recorded(cross_step(model, context))
    with torch.no_grad():
        got = generate(
            cached, ids, new, greedy=greedy, generator=torch.Generator().manual_seed(seed), new_cache=KVCache
        )
    for step, (a, b) in enumerate(zip(cached.seen, ref.seen, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
    assert torch.equal(got, want)
    assert calls[0] == len(model.stack.blocks)  # once per layer for the whole generation, not once per step


@given(decoders(sparse=False, cross=True), st.integers(1, 4))
@SETTINGS
def test_a_new_or_changed_context_is_never_served_stale_keys(case, m):
    """One layer (its self-attention keys do not depend on the context), one cache: the prompt and a token run
    over context A, the next token over a NEW tensor B, the next over B changed in place; each step's logits
    equal the whole-sequence reference over the context of that step, and the context is projected only when
    it is new or changed."""
    model, ids, _, seed = case
    assume(model.max_len >= 4)
    ids = ids[:, : model.max_len - 3]  # (B, P): room for three more tokens
    model.stack.blocks = model.stack.blocks[:1]
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(ids.shape[0], m, 12, generator=g) for _ in range(2))  # (B, M, C) each
    calls = count_kv(model)
    cache, full = KVCache(), ids
    with torch.no_grad():
        cross_step(model, a)(ids, cache)
        for context, change, projections in ((a, False, 1), (b, False, 2), (b, True, 3)):
            if change:
                b.mul_(-1.5)  # the same tensor object, new values
            nxt = torch.randint(0, VOCAB, (ids.shape[0], 1), generator=g)  # (B, 1)
            full = torch.cat([full, nxt], dim=1)  # (B, t)
            got = cross_step(model, context)(nxt, cache)[:, -1]  # (B, V)
            assert calls[0] == projections
            want = model.reference(full, context)[:, -1]
            calls[0] = projections  # the reference's own projection is not the cache's
            torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@given(cross_cases())
@SETTINGS
def test_select_recomputes_the_context_of_the_kept_rows(case):
    """After ``select`` the cross-attention keys follow the new batch (the kept rows' context)."""
    model, context, ids, new, seed = case
    g = torch.Generator().manual_seed(seed)
    keep = torch.randint(0, ids.shape[0], (ids.shape[0] + 1,), generator=g)  # rows kept, repeats allowed
    rest = torch.randint(0, VOCAB, (len(keep), new), generator=g)  # (K, new)
    with torch.no_grad():
        cache = KVCache()
        cross_step(model, context)(ids, cache)
        cache.select(keep)
        got = cross_step(model, context[keep])(rest, cache)  # (K, new, V)
        want = model.reference(torch.cat([ids[keep], rest], dim=1), context[keep])[:, ids.shape[1] :]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


# -- (d) the preallocated cache: in place, and growing --------------------------------------------------------


@given(decoders(sparse=True))
@SETTINGS
def test_a_preallocated_cache_is_written_in_place(case):
    """With capacity for the whole generation, every step writes into the same buffers (no copy of the past)."""
    model, ids, new, seed = case
    cache = model.decoder.new_cache(ids.shape[1] + new)
    update, ptrs, past = cache.update, set(), []

    def spy(layer, k, v):
        k_all, v_all = update(layer, k, v)
        if layer == 0:
            ptrs.add((k_all.data_ptr(), v_all.data_ptr()))
            past.append(k_all.clone())
        return k_all, v_all

    cache.update = spy
    step = model.decoder.step_fn(compile=False)
    with torch.no_grad():
        step(ids, cache)
        for i in range(new - 1):
            step(torch.randint(0, VOCAB, (ids.shape[0], 1), generator=torch.Generator().manual_seed(i)), cache)
    assert len(ptrs) == 1
    assert cache.length == ids.shape[1] + new - 1
    for before, after in zip(past, past[1:]):  # a step never rewrites the positions before it
        assert torch.equal(after[:, :, : before.shape[2]], before)


@given(st.integers(1, 2), st.lists(st.integers(1, 70), min_size=1, max_size=8), st.integers(0, 2**31 - 1))
@SETTINGS
def test_a_cache_without_capacity_grows_and_returns_what_concatenation_would(batch, chunks, seed):
    g = torch.Generator().manual_seed(seed)
    cache, keys, values, ptrs = KVCache(), [], [], []
    for n in chunks:
        k, v = torch.randn(2, batch, 2, n, 4, generator=g)  # (B, H, n, Dh) each
        keys.append(k)
        values.append(v)
        k_all, v_all = cache.update(0, k, v)
        assert torch.equal(k_all, torch.cat(keys, dim=2)) and torch.equal(v_all, torch.cat(values, dim=2))
        ptrs.append(k_all.data_ptr())
    assert cache.length == sum(chunks)
    # grows by doubling from 64 positions: one buffer per doubling, not one per step
    assert len(set(ptrs)) <= 1 + (-(-sum(chunks) // 64) - 1).bit_length()


def test_generation_past_the_first_allocation_grows_the_cache_and_stays_exact():
    """A cache without capacity (64 positions, then doubling) under 140 generated tokens: each step equals the
    reference, across the two reallocations."""
    model = TinyLM(dim=8, heads=2, depth=2, max_len=150, seed=4)
    ids = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(0))
    ref = recorded(lambda full, cache: model.reference(full))
    want = generate(ref, ids, 140, use_cache=False, generator=torch.Generator().manual_seed(2))
    caches: list[KVCache] = []
    cached = recorded(model.decoder.step_fn(compile=False))
    got = generate(
        cached,
        ids,
        140,
        generator=torch.Generator().manual_seed(2),
        new_cache=lambda n: caches.append(KVCache()) or caches[-1],
    )
    for step, (a, b) in enumerate(zip(cached.seen, ref.seen, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
    assert torch.equal(got, want)
    assert caches[0].length == 142 and caches[0].buffers[0][0].shape[2] == 256  # 64 → 128 → 256


def test_a_full_cache_names_its_capacity():
    cache = KVCache(capacity=4)
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="4 positions; got 5"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


# -- (e) select after a prefix (RuDolph's caption scoring) ----------------------------------------------------


@given(decoders(sparse=True), st.integers(1, 3))
@SETTINGS
def test_select_after_a_prefix_equals_recomputation(case, k):
    """A shared prefix runs once, ``select`` copies each row's cache ``k`` times, ``k`` different continuations
    run together: their logits equal running every full sequence from scratch."""
    model, ids, new, seed = case
    b = ids.shape[0]
    rows = torch.arange(b).repeat_interleave(k)  # (b·k,)
    rest = torch.randint(0, VOCAB, (b * k, new), generator=torch.Generator().manual_seed(seed))  # (b·k, new)
    with torch.no_grad():
        cache = model.decoder.new_cache()
        model.decoder(ids, cache)
        cache.select(rows)
        got = model.decoder(rest, cache)  # (b·k, new, V)
        want = model.reference(torch.cat([ids[rows], rest], dim=1))[:, ids.shape[1] :]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


# -- (f) the compiled static step --------------------------------------------------------------------------


@pytest.mark.slow
def test_the_compiled_static_step_equals_eager_at_every_step():
    """One small sparse DALL·E-layout decoder: the compiled step (static shapes, keys bucketed) and the
    whole-sequence reference agree at every step, sampled with a seed."""
    masks = [image_pattern_mask(p, (3, 3), prefix=3) for p in ("row", "conv")]
    model = TinyLM(dim=16, heads=2, depth=2, max_len=12, masks_full=masks, seed=3)
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    check_every_step(model, ids, 8, seed=1, compile=True, temperature=0.8, top_k=10)
