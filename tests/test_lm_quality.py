"""Language-model quality bars, measured by training the default recipe (``polymodal train lm``).

Bars: test NLL at most half the unigram baseline (bits per token, held-out wordings); at the digit
slot of a held-out sentence ("I counted ___ apples") at least 0.9 of the next-word probability on
the ten digit words, spread over them (entropy ≥ 2.8 bits of the uniform 3.32: no collapsed prior);
and at least 0.8 of unconditional samples are exactly sentences of the embedded corpora.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_test_nll_is_at_most_half_the_unigram_baseline(trained):
    _, metrics = trained("lm")
    nll, unigram = metrics["test_nll_bits_per_token"], metrics["unigram_bits_per_token"]
    assert unigram > 4.0  # a real baseline over a few hundred BPE tokens
    assert nll <= 0.5 * unigram, (nll, unigram)
    assert metrics["test_perplexity"] == pytest.approx(2**nll, rel=1e-6)


def test_digit_words_fill_the_digit_slot(trained):
    _, metrics = trained("lm")
    assert metrics["digit_slot_mass"] >= 0.9, metrics
    assert metrics["digit_slot_entropy_bits"] >= 2.8, metrics


def test_samples_are_corpus_sentences(trained):
    _, metrics = trained("lm")
    assert metrics["sample_valid_rate"] >= 0.8, metrics["sample_examples"]


def test_trained_folder_generates_readable_text(trained, tmp_path):
    import polymodal
    from polymodal.data import DIGIT_WORDS

    folder, _ = trained("lm")
    model = polymodal.load(folder)
    word = model.generate_text("This is a", 3, greedy=True).strip().rstrip(".")
    assert word in DIGIT_WORDS, word
    paths = model.sample_to_folder(tmp_path / "s", n=4, prompt="The number is", seed=0)
    lines = paths[0].read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("The number is ") for line in lines)
