"""Kandinsky 2.1 quality (issue 20), measured by training the default recipe for real (slow).

``trained("kandinsky21")`` runs exactly ``polymodal train kandinsky21`` with the MoVQ and M-CLIP parts from the
session's cache (its prior and UNet train together in the composite); a separate file from 2.0's so that the two
variants train on different pytest-xdist workers at once. Guards and xfailed issue bars as in
``tests/test_kandinsky2_quality.py``.
"""

from __future__ import annotations

import pytest
from test_kandinsky2_quality import _per_language

pytestmark = pytest.mark.slow


def test_kandinsky21_prior_maps_every_language_onto_the_image_embeddings(trained):
    """Guard: the prior's draws for each language's prompts lie at cosine ≥ 0.90 to the prompted scenes'
    mean CLIP image embedding (measured 0.97-0.99), and the decoded samples are well above chance (chance 1/6 and
    1/4; measured colour 0.89 / kind 0.88 on the AMD EPYC Zen 4, seed 0, 0.93 / 0.71 seed 1; before the unplaced
    captions 0.79 / 0.83 on the Zen 3, 0.82 / 0.67 on the Zen 4)."""
    _, m = trained("kandinsky21")
    assert min(_per_language(m, "prior_cosine").values()) >= 0.90, _per_language(m, "prior_cosine")
    assert m["colour_accuracy"] >= 0.50 and m["kind_accuracy"] >= 0.60, m


@pytest.mark.xfail(
    strict=True,
    reason="issue 20's 2.1 bars are not met since 2.0 trains 3,000 steps: 2.1's FD (2,582 / 2,443, seeds 0 / 1, AMD "
    "EPYC Zen 4) is far above 2.0's (949 / 912); seed 0 met the colour and kind bars, seed 1 misses kind (0.71)",
)
def test_issue_bar_kandinsky21_beats_kandinsky2(trained):
    """Issue bars: 2.1's judge FD below 2.0's on the same prompts; colour ≥ 0.85 and kind ≥ 0.75 per language."""
    _, m20 = trained("kandinsky2")
    _, m21 = trained("kandinsky21")
    assert m21["fd_judge"] < m20["fd_judge"], (m21["fd_judge"], m20["fd_judge"])
    assert min(_per_language(m21, "colour_accuracy").values()) >= 0.85, m21
    assert min(_per_language(m21, "kind_accuracy").values()) >= 0.75, m21


def test_both_variants_join_the_generative_table(trained):
    """``polymodal eval --generative`` has a row for each variant (shapes, 24 samples)."""
    from polymodal.eval.generative import evaluate_generative, generative_families

    assert {"kandinsky", "kandinsky21"} <= set(generative_families())  # 2.0's family is "kandinsky"
    for name in ("kandinsky2", "kandinsky21"):
        folder, _ = trained(name)
        row = evaluate_generative(folder, n=24)
        assert row["model"] == name and row["samples"] == 24 and row["fd_judge"] > 0, row
