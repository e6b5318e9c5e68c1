"""benchmarks/ofa_binding.py: its scenes ask about the object in the box, and a smoke run prints the table."""

from __future__ import annotations

import ofa_binding as binding
import torch


def test_the_answer_is_the_colour_of_the_patch_the_box_starts_in():
    grid, boxes, colours = binding.scenes(200, 0.5, torch.Generator().manual_seed(0))
    place = boxes[:, 1] // 8 * binding.GRID + boxes[:, 0] // 8  # the patch holding the box's top-left corner
    assert torch.equal(grid.gather(1, place[:, None])[:, 0], colours) and bool((colours > 0).all())
    objects = (grid > 0).sum(1)
    assert set(objects.tolist()) == {1, 2} and 0.3 < (objects == 1).float().mean() < 0.7
    assert bool((boxes[:, 2] > boxes[:, 0]).all()) and int(boxes.max()) < binding.BINS


def test_a_smoke_run_prints_each_variant_s_accuracy(capsys):
    binding.main(["--steps", "2", "--every", "2", "--variants", ",".join(binding.VARIANTS)])
    out = capsys.readouterr().out
    assert all(f"| {v} | " in out for v in binding.VARIANTS) and "two_object_accuracy" in out
