"""Sampling: greedy, temperature, top-k, top-p, guidance, and generation with a KV cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polymodal.generation.sampling import apply_cfg, generate, sample_next, sample_top_k, sample_top_p
from polymodal.nn import BlockConfig, KVCache, StackConfig, TransformerStack

seeds = st.integers(0, 2**31 - 1)


def _logits(seed: int, batch: int = 4, vocab: int = 20) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=50, deadline=None)
@given(seeds)
def test_greedy_is_argmax(seed):
    logits = _logits(seed)
    assert torch.equal(sample_next(logits, greedy=True), logits.argmax(-1))


@settings(max_examples=50, deadline=None)
@given(seeds, st.integers(1, 20), st.floats(0.05, 5.0))
def test_top_k_never_outside_top_k(seed, k, temperature):
    logits = _logits(seed)
    top = logits.topk(k, dim=-1).indices  # (B, k)
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        ids = sample_next(logits, top_k=k, temperature=temperature, generator=g)
        assert (top == ids.unsqueeze(-1)).any(-1).all()


def test_top_k_one_is_greedy():
    logits = _logits(3)
    assert torch.equal(sample_next(logits, top_k=1), logits.argmax(-1))


@settings(max_examples=50, deadline=None)
@given(seeds, st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_set_with_mass_p(seed, p):
    logits = _logits(seed, batch=1)
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    size = int((cum < p).sum().item()) + 1  # smallest prefix whose mass reaches p
    size = min(size, probs.numel())
    nucleus = set(order[:size].tolist())
    g = torch.Generator().manual_seed(seed)
    seen = {sample_next(logits, top_p=p, generator=g).item() for _ in range(200)}
    assert seen <= nucleus
    if size == 1:
        assert seen == nucleus


def test_top_p_exact_small_case():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, top_p=0.8, generator=g).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8
    seen = {sample_next(logits, top_p=0.81, generator=g).item() for _ in range(300)}
    assert seen == {0, 1, 2}


def test_temperature_to_zero_is_greedy():
    logits = _logits(7, batch=16)
    g = torch.Generator().manual_seed(0)
    for t in (1e-3, 1e-8, 1e-30):
        assert torch.equal(sample_next(logits, temperature=t, generator=g), logits.argmax(-1))


def test_high_temperature_spreads():
    logits = _logits(7, batch=1)
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, temperature=100.0, generator=g).item() for _ in range(300)}
    assert len(seen) > 10


def test_determinism_given_generator():
    logits = _logits(1, batch=8, vocab=50)
    a = [sample_next(logits, top_p=0.9, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_allowed_mask():
    logits = _logits(2, batch=3)
    allowed = torch.zeros(20, dtype=torch.bool)
    allowed[[3, 4]] = True
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        assert set(sample_next(logits, allowed=allowed, generator=g).tolist()) <= {3, 4}
    assert set(sample_next(logits, allowed=allowed, greedy=True).tolist()) <= {3, 4}
    with pytest.raises(ValueError, match="no token"):
        sample_next(logits, allowed=torch.zeros(20, dtype=torch.bool))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise(bad):
    logits = _logits(0)
    logits[1, 5] = bad
    with pytest.raises(ValueError, match="non-finite"):
        sample_next(logits)
    with pytest.raises(ValueError, match="non-finite"):
        sample_next(logits, greedy=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be a number > 0, got 0.0"),
        ({"temperature": -1}, "got -1"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, "got 1.5"),
    ],
)
def test_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(_logits(0), **kwargs)


def test_cfg():
    cond, uncond = _logits(1), _logits(2)
    assert torch.equal(apply_cfg(cond, uncond, 1.0), cond)
    assert torch.allclose(apply_cfg(cond, uncond, 0.0), uncond)
    assert torch.allclose(apply_cfg(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_registered_token_samplers():
    import polymodal

    logits = _logits(4)
    assert torch.equal(polymodal.registry.get("token_sampler", "greedy")(logits), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    for name in ("temperature", "top-k", "top-p"):
        ids = polymodal.registry.get("token_sampler", name)(logits, generator=g)
        assert ids.shape == (4,) and ids.dtype == torch.long
    assert torch.equal(sample_top_k(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_top_p(logits, top_p=1e-6), logits.argmax(-1))


# ---------------------------------------------------------------- generation with a tiny model
class TinyLM(nn.Module):
    """Embedding + learned positions + causal TransformerStack + head."""

    def __init__(self, vocab: int = 17, dim: int = 32, max_len: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.stack = TransformerStack(StackConfig(depth=2, block=BlockConfig(dim=dim, heads=4)))
        self.head = nn.Linear(dim, vocab)

    def step(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + ids.shape[1])  # (n,)
        x = self.tok(ids) + self.pos(pos)  # (B, n, D)
        return self.head(self.stack(x, causal=True, cache=cache))  # (B, n, V)


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


@pytest.mark.parametrize("kwargs", [{"greedy": True}, {"top_k": 5, "temperature": 0.8}, {"top_p": 0.9}])
def test_generate_with_cache_equals_without(lm, kwargs):
    prompt = torch.randint(0, 17, (3, 4), generator=torch.Generator().manual_seed(1))
    runs = [
        generate(lm.step, prompt, 12, use_cache=c, generator=torch.Generator().manual_seed(2), **kwargs)
        for c in (True, False)
    ]
    assert runs[0].shape == (3, 16) and torch.equal(runs[0][:, :4], prompt)
    assert torch.equal(runs[0], runs[1])


def test_cached_logits_match_full_recompute(lm):
    ids = torch.randint(0, 17, (2, 9))
    full = lm.step(ids, None)  # (2, 9, V)
    cache = KVCache()
    parts = [lm.step(ids[:, :5], cache)] + [lm.step(ids[:, i : i + 1], cache) for i in range(5, 9)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_generate_cfg(lm):
    prompt = torch.randint(0, 17, (2, 3))
    uncond = torch.zeros(2, 1, dtype=torch.long)
    plain = generate(lm.step, prompt, 6, greedy=True)
    same = generate(lm.step, prompt, 6, greedy=True, cfg_scale=1.0, uncond_ids=uncond)
    assert torch.equal(plain, same)
    for cache in (True, False):
        out = generate(lm.step, prompt, 6, greedy=True, cfg_scale=3.0, uncond_ids=uncond, use_cache=cache)
        assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="uncond_ids"):
        generate(lm.step, prompt, 2, cfg_scale=2.0)


def test_generate_eos_and_allowed(lm):
    prompt = torch.randint(0, 17, (2, 3))
    allowed = torch.zeros(17, dtype=torch.bool)
    allowed[[2, 5]] = True
    out = generate(lm.step, prompt, 8, allowed=allowed, generator=torch.Generator().manual_seed(0))
    assert set(out[:, 3:].flatten().tolist()) <= {2, 5}
    only_eos = torch.zeros(17, dtype=torch.bool)
    only_eos[0] = True
    out = generate(lm.step, prompt, 8, allowed=only_eos, eos_id=0)
    assert out.shape == (2, 4)  # every row finished at once
    seen = []
    generate(lm.step, prompt, 3, greedy=True, allowed=lambda ids: seen.append(ids.shape[1]) or allowed)
    assert seen == [3, 4, 5]


def test_generate_non_finite_raises():
    def step(ids, cache):
        return torch.full((ids.shape[0], ids.shape[1], 5), float("nan"))

    with pytest.raises(ValueError, match="non-finite"):
        generate(step, torch.zeros(1, 2, dtype=torch.long), 3)


def test_generate_with_registered_sampler(lm):
    import polymodal

    prompt = torch.randint(0, 17, (2, 3))
    out = generate(lm.step, prompt, 4, sampler=polymodal.registry.get("token_sampler", "top-k"), top_k=1)
    assert torch.equal(out, generate(lm.step, prompt, 4, greedy=True))
