"""DALL·E quality bars, measured by training the default recipes (slow).

``trained("dalle")`` runs exactly ``polymodal train dalle`` with ``--set tokenizer=`` the folder of
``trained("vqvae")`` (``dalle-shapes``: of ``trained("vqvae-shapes")``), as the spec's
``pretrained_parts=(("tokenizer", variant),)`` asks; the judge (polymodal.eval.judge) reads the samples.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_digits_samples_show_the_prompted_digit(trained):
    """Issue bar: for "the digit 0" … "the digit 9" the judge reads ≥ 80% of samples as the prompted digit."""
    _, metrics = trained("dalle")
    assert metrics["samples"] >= 100
    assert metrics["sample_accuracy"] >= 0.80, metrics


def test_shapes_samples_match_colour_and_kind(trained):
    """Issue bar: colour and kind of one-object samples match the prompt ≥ 70% by the judge."""
    _, metrics = trained("dalle-shapes")
    assert metrics["samples"] >= 72
    assert metrics["sample_colour_accuracy"] >= 0.70, metrics
    assert metrics["sample_kind_accuracy"] >= 0.70, metrics


def test_image_tokens_beat_a_uniform_code_distribution(trained):
    """Test digits' codes (captions from the training templates) cost well under the 6 bits of a uniform 64-code guess."""
    _, metrics = trained("dalle")
    assert metrics["test_bits_per_image_token_train_templates"] < 0.7 * 6.0, metrics
