"""Location tokens (``polymodal.data.boxes``): quantisation round trip, IoU, and bad boxes named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.data.boxes import bins_to_box, box_iou, box_to_bins, check_boxes


@st.composite
def boxes(draw, size=32):
    x0 = draw(st.integers(0, size - 1))
    y0 = draw(st.integers(0, size - 1))
    return [x0, y0, draw(st.integers(x0 + 1, size)), draw(st.integers(y0 + 1, size))]


@settings(max_examples=50, deadline=None)
@given(box=boxes(), bins=st.sampled_from([9, 17, 33, 100]))
def test_round_trip_is_within_half_a_bin(box, bins):
    ids = box_to_bins(torch.tensor([box]), 32, bins)
    assert ids.dtype == torch.long and int(ids.min()) >= 0 and int(ids.max()) < bins
    back = bins_to_box(ids, 32, bins)
    assert (back - torch.tensor([box]).float()).abs().max() <= 32 / (bins - 1) / 2 + 1e-5
    if bins == 33:  # one bin per pixel: exact
        assert torch.equal(ids, torch.tensor([box]))


@settings(max_examples=50, deadline=None)
@given(a=boxes(), b=boxes())
def test_iou_is_symmetric_bounded_and_one_on_itself(a, b):
    a, b = torch.tensor([a]), torch.tensor([b])
    iou = box_iou(a, b)
    assert 0 <= float(iou) <= 1 and float(iou) == pytest.approx(float(box_iou(b, a)))
    assert float(box_iou(a, a)) == 1.0


def test_iou_values():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[5, 0, 15, 10], [20, 20, 30, 30]])
    assert box_iou(a, b).tolist() == pytest.approx([50 / 150, 0.0])


@pytest.mark.parametrize(
    ("box", "match"),
    [([[-1, 0, 4, 4]], r"box 0: expected 0 <= x0 < x1 <= 32 .* got \(-1.0, 0.0, 4.0, 4.0\)"),
     ([[5, 0, 4, 4]], r"got \(5.0, 0.0, 4.0, 4.0\)"), ([[0, 0, 33, 4]], "x1 <= 32"), ([[1, 2, 3]], r"\(N, 4\)")],
)  # fmt: skip
def test_bad_boxes_name_expected_and_given(box, match):
    with pytest.raises(ValueError, match=match):
        check_boxes(torch.tensor(box), 32)


def test_bad_bins_are_refused():
    with pytest.raises(ValueError, match="bins must be >= 2"):
        box_to_bins(torch.tensor([[0, 0, 4, 4]]), 32, 1)
    with pytest.raises(ValueError, match=r"in \[0, 33\)"):
        bins_to_box(torch.tensor([[0, 0, 40, 4]]), 32, 33)
