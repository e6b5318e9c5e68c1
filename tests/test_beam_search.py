"""Beam search and trie-constrained decoding in the core (``polymodal.generation.beam``, ``.constraints``).

Random tiny decoders (the core ``CausalDecoder`` over a random stack, as in tests/test_decoder.py): one beam is
greedy decoding; a returned score is the teacher-forced log-probability of the returned tokens; with a trie of
candidates and at least as many beams as candidates the answer is the most probable candidate (found by scoring
every candidate by teacher forcing); the cached path equals the uncached one; bad arguments name what was expected.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decoder import VOCAB, TinyLM, count_kv, cross_step

from polymodal.generation.beam import beam_search
from polymodal.generation.constraints import TokenTrie
from polymodal.generation.sampling import generate

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EOS = 1


def _model(seed: int) -> TinyLM:
    return TinyLM(dim=16, heads=2, depth=2, max_len=32, seed=seed)


def _sequence_logprob(model: TinyLM, prompt: torch.Tensor, tokens: list[int]) -> float:
    """Summed log-probability of ``tokens`` after ``prompt`` (1, T), teacher-forced through the whole stack."""
    ids = torch.cat([prompt, torch.tensor([tokens])], dim=1)  # (1, T + n)
    logp = model.reference(ids).log_softmax(-1)[0]  # (T + n, V)
    t = prompt.shape[1]
    return sum(float(logp[t - 1 + i, tok]) for i, tok in enumerate(tokens))


@SETTINGS
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 3), length=st.integers(1, 5))
def test_one_beam_is_greedy_decoding(seed, batch, length):
    model = _model(seed)
    prompt = torch.randint(2, VOCAB, (batch, 3), generator=torch.Generator().manual_seed(seed))
    greedy = generate(model.decoder.step_fn(), prompt, length, greedy=True, eos_id=EOS)
    ids, _ = beam_search(model.decoder.step_fn(), prompt, length, beams=1, eos_id=EOS)
    assert torch.equal(ids, greedy)


@SETTINGS
@given(seed=st.integers(0, 10_000), beams=st.integers(1, 6), length=st.integers(1, 5))
def test_the_score_is_the_teacher_forced_log_probability_and_cached_equals_uncached(seed, beams, length):
    model = _model(seed)
    prompt = torch.randint(2, VOCAB, (2, 4), generator=torch.Generator().manual_seed(seed))
    ids, scores = beam_search(model.decoder.step_fn(), prompt, length, beams=beams, eos_id=EOS, length_penalty=0)
    plain, plain_scores = beam_search(
        model.decoder.step_fn(), prompt, length, beams=beams, eos_id=EOS, length_penalty=0, use_cache=False
    )
    assert torch.equal(ids, plain) and torch.allclose(scores, plain_scores, atol=1e-4)
    for row in range(2):
        tokens = ids[row, 4:].tolist()
        if EOS in tokens:
            tokens = tokens[: tokens.index(EOS) + 1]  # after eos: padding, not scored
        assert scores[row].item() == pytest.approx(_sequence_logprob(model, prompt[row : row + 1], tokens), abs=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(1, 6), penalty=st.sampled_from([0.0, 1.0]))
def test_with_a_trie_and_enough_beams_the_answer_is_the_most_probable_candidate(seed, count, penalty):
    g = torch.Generator().manual_seed(seed)
    model = _model(seed)
    candidates = {tuple(torch.randint(2, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
                  for _ in range(count)}  # fmt: skip
    prompt = torch.randint(2, VOCAB, (1, 3), generator=g)
    trie = TokenTrie(candidates, eos_id=EOS)
    ids, score = beam_search(
        model.decoder.step_fn(), prompt, 4, beams=len(candidates), eos_id=EOS,
        allowed=trie.mask_fn(3, VOCAB), length_penalty=penalty,
    )  # fmt: skip

    def value(c):
        return _sequence_logprob(model, prompt, [*c, EOS]) / (len(c) + 1) ** penalty

    best = max(candidates, key=value)
    answer = ids[0, 3:].tolist()
    assert tuple(answer[: answer.index(EOS)]) == best
    assert score.item() == pytest.approx(value(best), abs=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), beams=st.integers(2, 5), length=st.integers(2, 5))
def test_beams_over_a_cross_attention_context_project_it_once_and_equal_the_uncached_search(seed, beams, length):
    """An encoder-decoder's search (OFA): the context repeated per hypothesis; its keys and values are projected
    once per layer for the whole search, and the cached search equals the one without any cache."""
    g = torch.Generator().manual_seed(seed)
    model = TinyLM(dim=16, heads=2, depth=2, max_len=32, cross=True, seed=seed % 1000)
    context = torch.randn(2, 3, 12, generator=g).repeat_interleave(beams, dim=0)  # (B·K, M, 12)
    prompt = torch.randint(2, VOCAB, (2, 3), generator=g)
    calls = count_kv(model)
    ids, scores = beam_search(cross_step(model, context), prompt, length, beams=beams, eos_id=EOS)
    assert calls[0] == len(model.stack.blocks)  # once per layer, not per step
    plain, plain_scores = beam_search(
        cross_step(model, context), prompt, length, beams=beams, eos_id=EOS, use_cache=False
    )
    assert torch.equal(ids, plain) and torch.allclose(scores, plain_scores, atol=1e-4)


def test_a_trie_constrains_greedy_generation_to_the_candidates():
    model = _model(3)
    candidates = [[5, 9], [5, 7, 2], [8]]
    trie = TokenTrie(candidates, eos_id=EOS)
    prompt = torch.randint(2, VOCAB, (4, 3), generator=torch.Generator().manual_seed(1))
    ids = generate(model.decoder.step_fn(), prompt, 5, greedy=True, eos_id=EOS, allowed=trie.mask_fn(3, VOCAB))
    for row in ids[:, 3:].tolist():
        assert row[: row.index(EOS)] in candidates and set(row[row.index(EOS) :]) == {EOS}


def test_trie_masks():
    trie = TokenTrie([[5, 9], [5, 7, 2], [5]], eos_id=EOS)
    assert trie.allowed([]) == [5]
    assert trie.allowed([5]) == [EOS, 7, 9]  # [5] is a whole candidate too
    assert trie.allowed([5, 9]) == [EOS] and trie.allowed([5, 9, EOS, EOS]) == [EOS]
    assert trie.allowed([6]) == [] and trie.allowed([5, 9, EOS, 3]) == []
    mask = trie.mask(torch.tensor([[0, 5], [0, 6]]), start=1, vocab_size=10)
    assert mask[0].nonzero().flatten().tolist() == [EOS, 7, 9] and not mask[1].any()


@pytest.mark.parametrize(
    ("candidates", "match"),
    [([], "at least one candidate"), ([[3, EOS]], "without the end-of-text id 1"), ([[]], "non-empty"),
     ([[-2]], "ids >= 0")],
)  # fmt: skip
def test_bad_candidates_name_expected_and_given(candidates, match):
    with pytest.raises(ValueError, match=match):
        TokenTrie(candidates, eos_id=EOS)


def test_bad_beam_arguments_name_expected_and_given():
    model = _model(0)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="beams must be an integer >= 1, got 0"):
        beam_search(model.decoder.step_fn(), prompt, 3, beams=0, eos_id=EOS)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        beam_search(model.decoder.step_fn(), prompt, 0, beams=2, eos_id=EOS)
    with pytest.raises(ValueError, match=r"eos_id and pad_id must be token ids < the vocabulary size 23; got 23"):
        beam_search(model.decoder.step_fn(), prompt, 3, beams=2, eos_id=VOCAB)
    with pytest.raises(ValueError, match=r"prompt_ids must be \(B, T\)"):
        beam_search(model.decoder.step_fn(), torch.zeros(3, dtype=torch.long), 3, beams=2, eos_id=EOS)
