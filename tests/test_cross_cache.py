"""Cross-attention keys/values computed once per generation (Flamingo) and FROMAGe's cached retrieval-generation.

Flamingo: the generation's :class:`polymodal.nn.KVCache` also holds the keys and values of the visual context
(``KVCache.cross_kv``), so every decoding step reuses them; the logits must equal the uncached paths (full
recompute, and the self-attention cache with the context projected again each step) at every step, the context
projected once per block per generation, and the media mask still exact. FROMAGe: cached and uncached generation
(captions, interleaved prompts, [RET] retrieval) agree, and with a cache every position runs through the LM once.
"""

from __future__ import annotations

import pytest
import torch

from polymodal.nn import KVCache
from polymodal.plugins.fromage import infer
from polymodal.plugins.fromage.infer import generate as fromage_generate
from polymodal.testing.contracts import build

pytestmark = pytest.mark.usefixtures("one_thread")

FOUR_SHOT = (  # 4 shots and a query; 19 tokens (the tiny LM holds 48)
    "<image>a one<|endofchunk|><image>a two<|endofchunk|><image>a six<|endofchunk|><image>a zero<|endofchunk|><image>a"
)


@pytest.fixture(scope="module")
def flamingo():
    """A tiny perturbed Flamingo with its gates open, so the images change every logit."""
    m = build("flamingo", seed=1)
    with torch.no_grad():
        for block in m.xattn_blocks():
            block.attn_gate.fill_(0.8)
            block.mlp_gate.fill_(0.5)
    return m.eval()


def images_for(model, n: int, seed: int = 0) -> torch.Tensor:
    v = model.vision.config.vision
    return torch.rand(n, v.channels, v.image_size, v.image_size, generator=torch.Generator().manual_seed(seed))


class Counter:
    """Counts the calls of (and rows through) a module with a forward hook."""

    def __init__(self, modules):
        self.calls, self.rows = 0, 0
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, module, args, out):
        self.calls += 1
        self.rows += args[0].shape[1]

    def remove(self):
        for h in self.handles:
            h.remove()


def kv_projections(model):
    """The context key/value projection of every gated cross-attention block."""
    return [block.attn.kv for block in model.xattn_blocks()]


@torch.no_grad()
def test_flamingo_cross_cache_equals_uncached_at_every_step(flamingo):
    """Four shots and a query; 8 greedy steps: the cross-cached step, the step that projects the context again,
    and the full recompute give the same next-token logits at every step."""
    m = flamingo
    ids = torch.tensor([m.encode_text(FOUR_SHOT)])  # (1, T)
    context, _ = m.media([images_for(m, 5)], 1)  # (1, 5·L, Dv)
    cached, recomputed = m.step_fn(context), m.step_fn(context, cross_cache=False)
    c1, c2 = KVCache(), KVCache()
    feed, seq = ids, ids
    for _ in range(8):
        full = m.logits(m.hidden(seq, context))[:, -1]  # (1, V + 2)
        a = cached(feed, c1)[:, -1]
        b = recomputed(feed, c2)[:, -1]
        torch.testing.assert_close(a, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(b, full, atol=1e-5, rtol=0)
        nxt = full.argmax(-1, keepdim=True)  # (1, 1)
        feed, seq = nxt, torch.cat([seq, nxt], dim=1)
    assert c1.cross_entries == len(m.xattn_blocks()) and c2.cross_entries == 0


@torch.no_grad()
def test_flamingo_cross_cache_keeps_the_media_mask_exact(flamingo):
    """Each cached step's cross-attention gets the full pass's media-mask rows for its positions (the latest image
    at or before each token only), however the prompt is split into steps."""
    m = flamingo
    ids = torch.tensor([m.encode_text(FOUR_SHOT)])  # (1, T)
    context, _ = m.media([images_for(m, 5)], 1)
    block = m.xattn_blocks()[0]
    masks = []
    handle = block.register_forward_pre_hook(lambda mod, args, kw: masks.append(kw["mask"]), with_kwargs=True)
    try:
        m.hidden(ids, context)
        full = masks.pop()  # (1, T, 5·L)
        step, cache = m.step_fn(context), KVCache()
        cuts = [0, 1, 2, 7, 8, 13, ids.shape[1] - 1, ids.shape[1]]  # single tokens, <image> tokens, chunks
        for lo, hi in zip(cuts, cuts[1:]):
            step(ids[:, lo:hi], cache)
            assert torch.equal(masks.pop(), full[:, lo:hi]), (lo, hi)
    finally:
        handle.remove()
    seen = full[0].view(ids.shape[1], 5, m.config.num_latents).any(-1)  # (T, 5): which images each token sees
    assert torch.equal(seen.sum(-1), (torch.cumsum(ids[0] == m.image_id, 0) > 0).long())  # one image, once one came


def test_flamingo_context_projected_once_per_generation(flamingo):
    """With the cross cache each block projects the context once per generation; without it once per step."""
    m = flamingo
    images, blocks = images_for(m, 5), len(m.xattn_blocks())
    counter = Counter(kv_projections(m))
    try:
        for cross_cache, per_step in ((True, False), (False, True)):
            counter.calls = 0
            steps = Counter([m.lm.stack.blocks[0]])
            try:
                m.continue_text(FOUR_SHOT, images, max_new_tokens=6, cross_cache=cross_cache, temperature=1.0)
            finally:
                steps.remove()
            assert counter.calls == (steps.calls * blocks if per_step else blocks), (cross_cache, steps.calls)
            assert steps.calls > 1
    finally:
        counter.remove()


@pytest.mark.parametrize("seed", [0, 3])
def test_flamingo_sampled_ids_agree_across_paths(flamingo, seed):
    """Seeded sampling gives the same text with the cross cache, without it, and without any cache."""
    m, images = flamingo, images_for(flamingo, 5, seed=seed)
    opts = dict(max_new_tokens=8, seed=seed, temperature=1.0)
    a = m.continue_text(FOUR_SHOT, images, **opts)
    assert a == m.continue_text(FOUR_SHOT, images, cross_cache=False, **opts)
    assert a == m.continue_text(FOUR_SHOT, images, use_cache=False, **opts)


def test_cross_cache_recomputes_for_a_new_context(flamingo):
    """A cache reused with a different context tensor (or one changed in place) projects it again."""
    m = flamingo
    block = m.xattn_blocks()[0]
    x = torch.randn(1, 3, m.lm.dim)
    c1 = torch.randn(1, 4, m.config.vision_dim)
    c2 = torch.randn(1, 4, m.config.vision_dim)
    cache = KVCache()
    with torch.no_grad():
        torch.testing.assert_close(block(x, c1, cache=cache), block(x, c1), atol=1e-6, rtol=0)
        torch.testing.assert_close(block(x, c2, cache=cache), block(x, c2), atol=1e-6, rtol=0)
        c2.mul_(2.0)
        torch.testing.assert_close(block(x, c2, cache=cache), block(x, c2), atol=1e-6, rtol=0)


# -- FROMAGe --------------------------------------------------------------------------------------------


def fromage(bos_first: bool = True, ret_layer: int = -1):
    """A tiny perturbed FROMAGe."""
    return build("fromage", seed=2, bos_first=bos_first, ret_layer=ret_layer).eval()


@pytest.mark.parametrize(("bos_first", "ret_layer"), [(True, -1), (False, -1), (True, 1), (False, -2)])
def test_fromage_retrieval_generation_cached_equals_uncached(bos_first, ret_layer):
    """Plain and interleaved prompts + [RET] retrieval: the same text, retrieved images and scores with and
    without a cache, for both prompt orders and the states the [RET] query may read (``ret_layer``)."""
    model = fromage(bos_first, ret_layer)
    assert model.config.ret_layer == ret_layer
    images, _ = model.example_inputs(2, torch.Generator().manual_seed(5))
    gallery, _ = model.example_inputs(7, torch.Generator().manual_seed(6))
    for prompt, imgs in (("the digit", None), ("<image> is a <image> and a", images)):
        for max_new in (1, 3, 6):
            opts = dict(images=imgs, gallery=gallery, k=4, max_new_tokens=max_new)
            a = fromage_generate(model, prompt, **opts)
            b = fromage_generate(model, prompt, **opts, use_cache=False)
            assert a["text"] == b["text"] and a["emitted_ret"] == b["emitted_ret"]
            assert torch.equal(a["retrieved"], b["retrieved"])
            torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)


def test_fromage_cached_generation_runs_each_position_once(monkeypatch):
    """With a cache, the prompt, the kept generated tokens and [RET] each pass through the LM once: the [RET]
    query reads on from the generation's cache instead of rerunning the whole sequence."""
    model = fromage()
    real, seen = infer.core_generate, {}

    def spy(*args, **kwargs):
        seen["ids"] = real(*args, **kwargs)
        return seen["ids"]

    monkeypatch.setattr(infer, "core_generate", spy)
    gallery, _ = model.example_inputs(5, torch.Generator().manual_seed(7))
    checked = 0
    for prompt in ("the digit", "a", "the number is", "this one shows"):
        for max_new in (2, 5):
            rows = Counter([model.lm.stack.blocks[0]])
            try:
                fromage_generate(model, prompt, gallery=gallery, k=2, max_new_tokens=max_new)
            finally:
                rows.remove()
            used = len(model.tokenizer.encode(prompt, add_bos=True, add_eos=False))
            row = seen["ids"][0, used:].tolist()
            kept, _ = infer._cut(model, row)
            if len(row) - 1 <= len(kept):  # the cache holds the prompt and a prefix of the kept ids
                assert rows.rows == used + len(kept) + 1, (prompt, max_new, rows.rows, used, row)
                checked += 1
    assert checked >= 4


def test_preallocated_caches_hold_the_longest_generations(flamingo):
    """Generations that fill the LM's context (the caches are preallocated for exactly prompt + new tokens, and
    [RET] for FROMAGe) run and agree with the uncached path."""
    m, images = flamingo, images_for(flamingo, 5)
    long = dict(max_new_tokens=m.lm.max_len, temperature=1.0, top_k=3)  # cut to the room the prompt leaves
    assert m.continue_text(FOUR_SHOT, images, **long) == m.continue_text(FOUR_SHOT, images, use_cache=False, **long)
    model = fromage()
    gallery, _ = model.example_inputs(4, torch.Generator().manual_seed(8))
    room = model.lm.max_len - len(model.tokenizer.encode("the digit", add_bos=True, add_eos=False)) - 1
    opts = dict(gallery=gallery, k=2, max_new_tokens=room, temperature=1.0)
    a, b = fromage_generate(model, "the digit", **opts), fromage_generate(model, "the digit", **opts, use_cache=False)
    assert a["text"] == b["text"] and torch.equal(a["retrieved"], b["retrieved"])
    assert infer.caption(model, gallery, max_new_tokens=model.lm.max_len - model.config.prefix_tokens) == infer.caption(
        model, gallery, max_new_tokens=model.lm.max_len - model.config.prefix_tokens, use_cache=False
    )


# -- the benchmark rows ---------------------------------------------------------------------------------


def test_fusion_rows_quick_schema():
    """``bench_fusion.fusion_rows`` (tiny parts): the four rows in the models-suite schema, timed and agreeing."""
    import argparse

    import bench_fusion

    import bench

    device = torch.device("cpu")
    args = argparse.Namespace(quick=True, dtypes="float32", rounds=1, round_s=0.0)
    rows = bench_fusion.fusion_rows(args, device, bench.machine(device))
    assert [r["key"] for r in rows] == [
        "Flamingo|4-shot caption|b1|float32",
        "Flamingo|4-shot caption, no KV cache|b1|float32",
        "Flamingo (paper proportions: 64 latents, width 512)|4-shot caption|b1|float32",
        "FROMAGe|retrieval-generation|b1|float32",
    ]
    paper = rows[2]
    sizes = bench_fusion.PAPER_QUICK
    assert paper["context_tokens"] == 5 * sizes["num_latents"]
    assert paper["sizes"]["lm_dim"] == sizes["lm_dim"] and paper["sizes"]["num_latents"] == sizes["num_latents"]
    assert paper["sizes"]["xattn_blocks"] == sizes["lm_depth"]  # cross_every=1: one block per LM block
    # the uncached path projects the context again at every step: strictly more counted FLOPs
    assert paper["baseline_gflop"] > paper["gflop"] > paper["media_gflop"] > 0
    assert paper["flop_ratio"] == pytest.approx(paper["baseline_gflop"] / paper["gflop"], rel=1e-2)
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["suite"] == "models" and r["mode"] == "eager" and r["new_tokens"] >= 1
        assert r["polymodal_ms"] > 0 and r["baseline_ms"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_ms"] / r["polymodal_ms"], rel=1e-2)
