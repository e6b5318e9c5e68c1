"""Kandinsky 2.0 quality (issue 20), measured by training the default recipe for real (slow).

``trained("kandinsky2")`` runs exactly ``polymodal train kandinsky2`` with the KL-VAE, M-CLIP and T5 parts
from the session's cache (the same folders the KL-VAE, M-CLIP and T5 bars train); the tests read the
evaluation in its metrics.json: per language, two
samples per colour × kind judged at 32×32 for the short prompt ("a red circle", "红色的圆形") with dynamic
thresholding on and off, and for captions in the language's evaluation-only templates.

Two kinds of test. The *guards* hold what the families reach today, with margin (they fail when a change
breaks the conditioning: chance is 1/6 for colour, 1/4 for kind). The *issue's bars* are asserted as they are
written: the bars not met yet are marked ``xfail(strict=True)`` (README, "Kandinsky 2.0" / "2.1"), and the day a
change meets one its test passes, which fails the run until the mark is removed.
"""

from __future__ import annotations

import pytest

from polymodal.data.languages import LANGUAGES

pytestmark = pytest.mark.slow


def _per_language(metrics: dict, name: str) -> dict[str, float]:
    return {code: round(metrics[f"{name}_{code}"], 3) for code in LANGUAGES}


def test_kandinsky2_draws_the_prompted_colour_and_kind_well_above_chance(trained):
    """Guard (chance: colour 1/6, kind 1/4): kind ≥ 0.65 on average over the languages' short prompts, thresholding
    on and off, and ≥ 0.80 in every language for the evaluation-only phrasings; colour ≥ 0.40 (short) and ≥ 0.35
    (evaluation-only) in every language. The 3,000-step recipe on the AMD EPYC Zen 4 (AVX-512), seeds 0 / 1: short
    kind 0.95 / 0.97 on average, held-out kind ≥ 0.92 / 0.94, short colour ≥ 0.90 / 0.94, held-out colour ≥ 0.58 /
    0.63 (the 2,000-step recipe before it: 0.81 / 0.88, ≥ 0.83 / 0.85, ≥ 0.67 / 0.69, ≥ 0.58 / 0.60)."""
    _, m = trained("kandinsky2")
    for name in ("kind_accuracy", "kind_accuracy_nothreshold"):
        assert m[name] >= 0.65, (name, _per_language(m, name))
    assert min(_per_language(m, "heldout_kind_accuracy").values()) >= 0.80, _per_language(m, "heldout_kind_accuracy")
    assert min(_per_language(m, "colour_accuracy").values()) >= 0.40, _per_language(m, "colour_accuracy")
    assert min(_per_language(m, "heldout_colour_accuracy").values()) >= 0.35, m


def test_issue_bar_kandinsky2_kind_in_every_language_and_phrasing(trained):
    """Issue bar (its kind half): kind ≥ 0.70 in each language, for the short prompts and the evaluation-only
    phrasings, thresholding on and off. The 3,000-step recipe on the AMD EPYC Zen 4, seeds 0 / 1 (the evaluation's
    48 samples per language and phrasing): ≥ 0.92 / 0.96 short, ≥ 0.92 / 0.94 evaluation-only in every language."""
    _, m = trained("kandinsky2")
    for name in ("kind_accuracy", "kind_accuracy_nothreshold", "heldout_kind_accuracy"):
        assert min(_per_language(m, name).values()) >= 0.70, (name, _per_language(m, name))


def test_kandinsky2_thresholding_is_reported_beside_the_plain_sampler(trained):
    """Both samplers' accuracies are in the metrics and thresholding does not cost colour on average."""
    _, m = trained("kandinsky2")
    assert m["samples"] == 2 * 24 * len(LANGUAGES)
    assert m["colour_accuracy"] >= m["colour_accuracy_nothreshold"] - 0.05, m


def test_issue_bar_kandinsky2_colour_in_every_language(trained):
    """Issue bar (its colour half, the short prompts): colour ≥ 0.80 in each language. The 3,000-step recipe on the
    AMD EPYC Zen 4 (en / ru / fr / zh): 0.90 / 0.92 / 0.96 / 0.96 with seed 0, 0.94 / 0.98 / 0.96 / 0.96 with seed 1."""
    _, m = trained("kandinsky2")
    assert min(_per_language(m, "colour_accuracy").values()) >= 0.80, _per_language(m, "colour_accuracy")


@pytest.mark.xfail(
    strict=True,
    reason="issue 20's 2.0 colour bar on the evaluation-only phrasings is not met: Russian 0.58 / 0.63 (seeds 0 / 1; "
    "the others 0.71-0.88), where template 4 puts the colour after the noun in a genitive form no training caption has",
)
def test_issue_bar_kandinsky2_colour_on_the_evaluation_only_phrasings(trained):
    """Issue bar (its colour half, the evaluation-only template × language pairs): colour ≥ 0.80 in each language."""
    _, m = trained("kandinsky2")
    assert min(_per_language(m, "heldout_colour_accuracy").values()) >= 0.80, m
