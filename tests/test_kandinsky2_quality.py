"""Kandinsky 2.0 quality (issue 20), measured by training the default recipe for real (slow).

``trained("kandinsky2")`` runs exactly ``polymodal train kandinsky2`` with the KL-VAE, M-CLIP and T5 parts
from the session's cache (the same folders the KL-VAE, M-CLIP and T5 bars train); the tests read the
evaluation in its metrics.json: per language, two
samples per colour × kind judged at 32×32 for the short prompt ("a red circle", "红色的圆形") with dynamic
thresholding on and off, and for captions in the language's evaluation-only templates.

Two kinds of test. The *guards* hold what the families reach today, with margin (they fail when a change
breaks the conditioning: chance is 1/6 for colour, 1/4 for kind). The *issue's bars* are asserted as they are
written: 2.0's kind bar is met and asserted plainly; the bars not met yet are marked ``xfail(strict=True)``
(README, "Kandinsky 2.0" / "2.1"), and the day a change meets one its test passes, which fails the run until the
mark is removed.
"""

from __future__ import annotations

import pytest

from polymodal.data.languages import LANGUAGES

pytestmark = pytest.mark.slow


def _per_language(metrics: dict, name: str) -> dict[str, float]:
    return {code: round(metrics[f"{name}_{code}"], 3) for code in LANGUAGES}


def test_issue_bar_kandinsky2_kind_in_every_language_and_phrasing(trained):
    """Issue bar (its kind half): kind ≥ 0.70 in each language, for the short prompts and the evaluation-only
    phrasings (measured 0.83-0.92 and 0.96-1.00 with the latent-diffusion betas; 0.69-0.94 before them); the same
    guard with thresholding off; colour well above chance (≥ 0.45 short, ≥ 0.35 evaluation-only, chance 1/6)."""
    _, m = trained("kandinsky2")
    for name in ("kind_accuracy", "kind_accuracy_nothreshold", "heldout_kind_accuracy"):
        assert min(_per_language(m, name).values()) >= 0.70, (name, _per_language(m, name))
    assert min(_per_language(m, "colour_accuracy").values()) >= 0.45, _per_language(m, "colour_accuracy")
    assert min(_per_language(m, "heldout_colour_accuracy").values()) >= 0.35, m


def test_kandinsky2_thresholding_is_reported_beside_the_plain_sampler(trained):
    """Both samplers' accuracies are in the metrics and thresholding does not cost colour on average."""
    _, m = trained("kandinsky2")
    assert m["samples"] == 2 * 24 * len(LANGUAGES)
    assert m["colour_accuracy"] >= m["colour_accuracy_nothreshold"] - 0.05, m


@pytest.mark.xfail(strict=True, reason="issue 20's 2.0 colour bar is not met: 0.73-0.79 short, 0.58-0.77 held out")
def test_issue_bar_kandinsky2_colour_in_every_language(trained):
    """Issue bar (its colour half): colour ≥ 0.80 in each language, evaluation-only pairs included."""
    _, m = trained("kandinsky2")
    for prefix in ("", "heldout_"):
        assert min(_per_language(m, f"{prefix}colour_accuracy").values()) >= 0.80, m
