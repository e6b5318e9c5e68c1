"""The speed paths of the core causal decoder as GPT-2 (``lm``) and iGPT use them.

Decoding runs the float32 and bfloat16 linear layers through the kernel (BLAS or oneDNN) its tuner times faster on the
machine (:mod:`polymodal.generation.linear`; every test runs with the tuner and with oneDNN fixed), skips the head for every prompt position but the last, writes keys and values in place into a preallocated
cache and (slow test) compiles its static step. None of that may change what a model computes: cached
generation equals the uncached reference (the plain eager forward over the whole sequence each step), the
training forward is bit-identical to the hand-written trunk, and nothing serves stale weights after a
training step or ``load_state_dict`` (the fast path reads the live weights; compiled code takes them as
inputs, not constants).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.generation.decoder import clear_packed_weights, fast_linear, fast_linear_applies
from polymodal.generation.linear import KERNEL_ENV, KERNELS, KernelTuner, linear_kernel
from polymodal.generation.sampling import generate
from polymodal.plugins.igpt import IGPT, IGPTConfig
from polymodal.plugins.lm import LMConfig, LMModel
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, params=["auto", "onednn"])
def kernel(request, monkeypatch):
    """Each test with the tuned choice (``auto``) and with oneDNN's packed path fixed."""
    monkeypatch.setenv(KERNEL_ENV, request.param)
    return request.param


ATOL = 1e-5


def tiny_lm(seed: int = 0, **overrides) -> LMModel:
    """A seeded tiny GPT-2 style model (byte tokenizer) with visibly non-zero weights, in eval mode."""
    torch.manual_seed(seed)
    cfg = dict(dim=32, depth=2, heads=2, max_len=40, vocab_size=300, tokenizer="bytes", eval_samples=0)
    model = LMModel(LMConfig(**{**cfg, **overrides}))
    contracts._perturb(model, seed + 1)
    return model.eval()


def tiny_igpt(seed: int = 0) -> IGPT:
    """A seeded tiny iGPT (6×6 grey images, 16 colours) with a non-zero head, in eval mode."""
    torch.manual_seed(seed)
    model = IGPT(IGPTConfig(image_size=6, channels=1, palette_size=16, dim=32, depth=2, heads=2))
    contracts._perturb(model, seed + 1)
    model.palette_fitted.fill_(True)
    return model.eval()


def prompt(vocab: int, b: int, t: int, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))  # (B, T)


def reference_logits(model, ids: Tensor) -> list[Tensor]:
    """The last-position logits (B, V) of every prefix of ``ids`` by the plain eager forward (no cache)."""
    return [model(ids[:, : t + 1])[:, -1] for t in range(ids.shape[1])]


# -- the fast linear layers -----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 4, 33])
def test_fast_linear_agrees_with_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 3, 48, generator=g), torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    with torch.no_grad():
        assert fast_linear_applies(w, x) == torch.backends.mkldnn.is_available()
        torch.testing.assert_close(fast_linear(x, w, b), F.linear(x, w, b), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(fast_linear(x, w), F.linear(x, w), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 33])
def test_fast_linear_runs_bfloat16_weights_too_and_agrees_with_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 3, 48, generator=g), torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    with torch.no_grad():
        assert fast_linear_applies(wb, xb) == torch.backends.mkldnn.is_available()
        assert not fast_linear_applies(wb, x)  # mixed dtypes: F.linear decides (and refuses)
        got = fast_linear(xb, wb, bb)
        assert got.dtype == torch.bfloat16
        # both sum in float32 and round once to bfloat16: one bfloat16 step (2^-8 relative) apart at most
        torch.testing.assert_close(got, F.linear(xb, wb, bb), atol=1e-2, rtol=2**-7)


def test_bfloat16_cached_steps_follow_the_uncached_forward():
    model = tiny_lm(seed=3).to(torch.bfloat16)
    ids = prompt(256, 2, 12, seed=4)
    step = model.step_fn(last_only=True)
    with torch.no_grad():
        expected = reference_logits(model, ids)  # F.linear, bfloat16
        cache = model.decoder.new_cache(12)
        got = [step(ids[:, :4], cache)[:, -1]] + [step(ids[:, t : t + 1], cache)[:, -1] for t in range(4, 12)]
    for t, logits in zip(range(3, 12), got):
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), expected[t].float(), atol=4e-3, rtol=2**-7)  # logits ~0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_one_row_call_agrees_with_f_linear(dtype):
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((1, 1, 64), (200, 64), (200,)))
    tol = dict(atol=ATOL, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    with torch.no_grad():
        out = fast_linear(x, w, b)  # batch-1 decoding: oneDNN runs it as ONE_ROW_AS copies of the row
        assert out.shape == (1, 1, 200) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, w, b), **tol)


def test_packed_weights_follow_every_change_of_the_weight():
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(4, 24)
    with torch.no_grad():
        for change in (lambda w: w.mul_(-2.0), lambda w: w.copy_(torch.randn(40, 24))):
            fast_linear(x, layer.weight, layer.bias)  # packs the weight for 4 rows
            change(layer.weight)  # in place: a new version of the same storage
            torch.testing.assert_close(fast_linear(x, layer.weight, layer.bias), layer(x), atol=ATOL, rtol=1e-5)
        layer.weight = torch.nn.Parameter(torch.randn(40, 24))  # a new tensor
        torch.testing.assert_close(fast_linear(x, layer.weight, layer.bias), layer(x), atol=ATOL, rtol=1e-5)
        layer.weight.data.add_(1.0)  # .data bypasses the version counter: clearing the copies is the user's part
        clear_packed_weights()
        torch.testing.assert_close(fast_linear(x, layer.weight, layer.bias), layer(x), atol=ATOL, rtol=1e-5)


def test_the_tuner_times_whole_steps_and_keeps_the_faster_kernel(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "auto")
    for slow in KERNELS:
        tuner, seen = KernelTuner(trials=2), []
        for _ in range(10):
            with tuner.step((1,)):
                seen.append(linear_kernel())
                if seen[-1] == slow:
                    time.sleep(0.004)
        fast = next(k for k in KERNELS if k != slow)
        assert seen[:6] == ["blas", "onednn"] * 3  # alternating: a warm-up, then two timed steps each
        assert seen[6:] == [fast] * 4 and tuner.choice == {(1, torch.get_num_threads()): fast}
    assert linear_kernel() == "blas"  # outside a tuned step: BLAS (F.linear)


def test_the_kernel_variable_fixes_the_choice_and_names_bad_values(monkeypatch):
    tuner = KernelTuner()
    for fixed in KERNELS:
        monkeypatch.setenv(KERNEL_ENV, fixed)
        with tuner.step((1,)):
            assert linear_kernel() == fixed
    assert not tuner.times and not tuner.choice
    monkeypatch.setenv(KERNEL_ENV, "mkl")
    with pytest.raises(ValueError, match="POLYMODAL_LINEAR_KERNEL must be one of auto, blas, onednn; got 'mkl'"):
        linear_kernel()
    with pytest.raises(ValueError, match="got 'mkl'"), tuner.step((1,)):  # a decoding step names it too
        pass


def test_generation_tunes_the_kernel_per_batch_size(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "auto")
    model = tiny_lm(seed=2)
    for b in (1, 2):
        ids = prompt(256, b, 4, seed=b)
        cached, uncached = greedy_pair(model, ids, n=12)
        assert torch.equal(cached, uncached)
    threads = torch.get_num_threads()
    assert set(model.decoder.tuner.choice) == {(1, threads), (2, threads)}
    assert set(model.decoder.tuner.choice.values()) <= set(KERNELS)


def test_fast_linear_is_plain_f_linear_with_gradients_or_other_dtypes():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4)
    assert not fast_linear_applies(w, x)  # gradients recorded: training keeps F.linear
    assert torch.equal(fast_linear(x, w), F.linear(x, w))
    with torch.no_grad():
        wd = w.detach().double()
        assert not fast_linear_applies(wd, x.double())
        assert torch.equal(fast_linear(x.double(), wd), F.linear(x.double(), wd))


def test_training_forward_is_the_hand_written_trunk_bit_for_bit():
    model = tiny_lm().train()
    torch.manual_seed(3)
    model.drop.p = 0.0  # dropout would draw different masks in two runs; everything else must be identical
    for block in model.stack.blocks:
        block.attn.attn_dropout, block.attn.proj_drop.p, block.mlp.drop.p = 0.0, 0.0, 0.0
    ids = prompt(256, 2, 12)
    x = model.token_embed(ids) + model.pos_embed()[:, :12]  # (B, T, D)
    expected = F.linear(model.stack(x, causal=True), model.token_embed.weight)  # (B, T, V)
    assert torch.equal(model(ids), expected)


# -- cached generation equals uncached ---------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_lm_cached_step_logits_equal_the_uncached_forward(batch):
    model = tiny_lm()
    ids = prompt(256, batch, 14, seed=batch)
    step = model.step_fn(last_only=True)
    with torch.no_grad():
        expected = reference_logits(model, ids)
        cache = model.decoder.new_cache(14)
        got = [step(ids[:, :5], cache)[:, -1]]  # the prompt: its last position only
        assert step(ids[:, :5], None).shape == (batch, 1, 300)
        got += [step(ids[:, t : t + 1], cache)[:, -1] for t in range(5, 14)]
    assert cache.length == 14
    for t, logits in zip(range(4, 14), got):
        torch.testing.assert_close(logits, expected[t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("greedy", [True, False])
def test_lm_generate_ids_cached_equals_uncached(greedy):
    model = tiny_lm(seed=1)
    ids = prompt(256, 2, 6, seed=7)
    kw = dict(greedy=greedy, seed=5, top_k=None if greedy else 20, stop_at_eos=False)
    cached = model.generate_ids(ids, 20, **kw)
    uncached = model.generate_ids(ids, 20, use_cache=False, **kw)
    assert cached.shape == (2, 26) and torch.equal(cached, uncached)


def test_igpt_sampling_cached_equals_uncached_and_step_logits_agree():
    model = tiny_igpt()
    for kw in (dict(top_k=1), dict(seed=3, temperature=1.3)):
        cached = model.sample_tokens(3, **kw)
        assert torch.equal(cached, model.sample_tokens(3, use_cache=False, **kw))
    ids = model.inputs(cached)  # (3, 36) streams that start with the start token
    with torch.no_grad():
        expected = reference_logits(model, ids)
        step, cache = model.step_fn(last_only=True), model.decoder.new_cache()
        got = [step(ids[:, :1], cache)[:, -1]] + [step(ids[:, t : t + 1], cache)[:, -1] for t in range(1, 36)]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_core_generate_with_the_lm_step_fn_and_a_growing_cache():
    model = tiny_lm()
    ids = prompt(256, 2, 3)
    with torch.no_grad():
        grown = generate(model.step_fn(), ids, 25, greedy=True)  # KVCache() grows by doubling
        whole = generate(model.step_fn(), ids, 25, greedy=True, use_cache=False)
    assert torch.equal(grown, whole)


# -- nothing goes stale ----------------------------------------------------------------------------


def greedy_pair(model, ids: Tensor, n: int = 12) -> tuple[Tensor, Tensor]:
    """(cached, uncached reference) greedy ids."""
    kw = dict(greedy=True, stop_at_eos=False)
    return model.generate_ids(ids, n, **kw), model.generate_ids(ids, n, use_cache=False, **kw)


def test_generation_follows_a_training_step_and_load_state_dict():
    model = tiny_lm()
    ids = prompt(256, 2, 4, seed=2)
    before, _ = greedy_pair(model, ids)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # a big step: the greedy ids change
    loss, _ = model.loss({"ids": prompt(256, 4, 16, seed=9), "targets": prompt(256, 4, 16, seed=10)})
    loss.backward()
    opt.step()
    model.eval()
    cached, reference = greedy_pair(model, ids)
    assert torch.equal(cached, reference) and not torch.equal(cached, before)
    other = tiny_lm(seed=4)
    model.load_state_dict(other.state_dict())
    cached, reference = greedy_pair(model, ids)
    assert torch.equal(cached, reference) and torch.equal(cached, greedy_pair(other, ids)[0])


def test_a_deep_copy_decodes_with_its_own_weights():
    model = tiny_lm()
    ids = prompt(256, 1, 4)
    model.generate_ids(ids, 4, greedy=True)  # the decoder exists before the copy
    twin = copy.deepcopy(model)
    assert twin.decoder is not model.decoder and twin.decoder.stack is twin.stack
    assert twin.decoder.head_weight() is twin.token_embed.weight
    with torch.no_grad():
        model.token_embed.weight.mul_(-1.0)
    cached, reference = greedy_pair(twin, ids)
    assert torch.equal(cached, reference)
    assert not torch.equal(cached, greedy_pair(model, ids)[0])


# -- compiled static steps (slow: torch.compile) ----------------------------------------------------


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow
def test_compiled_generation_equals_eager_never_recompiles_and_follows_new_weights():
    torch._dynamo.reset()
    model = tiny_lm(dim=16, depth=1, heads=2)
    model.compile_inference = True
    ids = prompt(256, 2, 5, seed=1)
    kw = dict(greedy=True, stop_at_eos=False)
    first = model.generate_ids(ids, 20, **kw)
    graphs = compiled_graphs()
    assert graphs >= 1
    again = model.generate_ids(ids, 20, **kw)
    other = model.generate_ids(prompt(256, 2, 5, seed=2), 20, **kw)  # same shapes, other tokens
    assert compiled_graphs() == graphs  # no recompilation for a second call of the same shapes
    assert torch.equal(first, again)
    assert torch.equal(first, model.generate_ids(ids, 20, compile=False, use_cache=False, **kw))
    assert torch.equal(other, model.generate_ids(prompt(256, 2, 5, seed=2), 20, compile=False, **kw))
    with torch.no_grad():  # new weights: compiled code takes them as inputs, never as stale constants
        model.load_state_dict(tiny_lm(seed=6, dim=16, depth=1, heads=2).state_dict())
    after = model.generate_ids(ids, 20, **kw)
    assert torch.equal(after, model.generate_ids(ids, 20, compile=False, use_cache=False, **kw))
    assert not torch.equal(after, first)

    igpt = tiny_igpt()
    sampled = igpt.sample_tokens(2, top_k=1, compile=True)
    assert torch.equal(sampled, igpt.sample_tokens(2, top_k=1, use_cache=False))
