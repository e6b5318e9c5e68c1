"""Sparse image attention patterns (DALL·E / RuDolph) and their per-layer schedule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.attention import causal_mask, image_pattern_mask, pattern_schedule


def _written_out(pattern: str, h: int, w: int, prefix: int, suffix: int, kernel: int) -> torch.Tensor:
    """The same mask, one pair at a time, from the definitions in the docstring."""
    n = prefix + h * w + suffix
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            qi, kj = i - prefix, j - prefix
            both_image = 0 <= qi < h * w and 0 <= kj < h * w
            if not both_image or pattern == "full":
                out[i, j] = True
            elif pattern == "row":
                out[i, j] = qi // w == kj // w
            elif pattern == "column":
                out[i, j] = qi % w == kj % w
            else:
                out[i, j] = abs(qi // w - kj // w) <= kernel // 2 and abs(qi % w - kj % w) <= kernel // 2
    return out


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(["full", "row", "column", "conv"]),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    prefix=st.integers(0, 4),
    suffix=st.integers(0, 4),
    kernel=st.sampled_from([1, 3, 5]),
)
def test_pattern_matches_its_definition(pattern, h, w, prefix, suffix, kernel):
    got = image_pattern_mask(pattern, (h, w), prefix=prefix, suffix=suffix, kernel=kernel)
    assert torch.equal(got, _written_out(pattern, h, w, prefix, suffix, kernel))
    n = prefix + h * w + suffix
    assert not (got & ~causal_mask(n, n)).any()  # never sees the future
    assert got.diagonal().all()  # every token sees itself: no empty rows


def test_row_pattern_cuts_earlier_rows_but_keeps_the_text():
    m = image_pattern_mask("row", (2, 2), prefix=2)  # text t0 t1, image a b / c d
    c = 2 + 2  # first token of the second image row
    assert m[c, :2].all()  # sees the text
    assert not m[c, 2:4].any()  # not the first image row
    assert image_pattern_mask("full", (2, 2), prefix=2)[c, 2:4].all()


def test_schedule_and_bad_patterns():
    assert pattern_schedule(5) == ["row", "column", "row", "row", "conv"]
    assert pattern_schedule(4, ("row", "column", "conv")) == ["row", "column", "conv", "conv"]
    assert pattern_schedule(2, ("full",), last=None) == ["full", "full"]
    with pytest.raises(ValueError, match="one of full, row, column, conv; got 'diagonal'"):
        image_pattern_mask("diagonal", (2, 2))
    with pytest.raises(ValueError, match="odd kernel"):
        image_pattern_mask("conv", (2, 2), kernel=2)
    with pytest.raises(ValueError, match="got 'strided'"):
        pattern_schedule(3, ("row", "strided"))
