"""``polymodal bench diffusion``: tiny smoke runs through the command line (outputs checked before
timing, the row schema, the ratio, the profile's shares, a mismatch left untimed). No speed is asserted."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import bench_diffusion as bd
from polymodal.cli import main

pytest.importorskip("diffusers")

QUICK = ["bench", "diffusion", "--quick", "--threads", "1", "--rounds", "1", "--round-s", "0"]


def test_forward_and_ddim_are_checked_then_timed_with_a_profile(tmp_path):
    out = tmp_path / "d.json"
    result = CliRunner().invoke(main, [*QUICK, "--batch", "2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.read_text())
    assert rep["suite"] == "diffusion" and rep["machine"]["threads"] == 1 and rep["steps"] == 2
    rows = {r["task"]: r for r in rep["rows"]}
    assert set(rows) == {"unet-forward", "ddim-2"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["parity_rel_diff"] <= bd.PARITY_RTOL
        assert row["polymodal_ms"] > 0 and row["diffusers_ms"] > 0
        assert row["ratio"] == pytest.approx(row["diffusers_ms"] / row["polymodal_ms"], rel=1e-2)
        assert row["polymodal_per_s"] == pytest.approx(2 / (row["polymodal_ms"] / 1e3), rel=1e-2)
    for side in ("polymodal", "diffusers"):
        shares = rep["profile"][side]
        assert set(shares) == {"attention", "convolution", "linear", "normalisation", "other"}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
        assert shares["convolution"] > 0 and shares["attention"] > 0
    assert "ratio = diffusers time / polymodal time" in result.output and "op time of one forward" in result.output


def test_mismatched_outputs_are_not_timed(tmp_path, monkeypatch):
    build = bd.build

    def broken(quick, folder, seed=0):
        theirs, ours, cfg = build(quick, folder, seed)
        with torch.no_grad():
            ours.conv_out.bias.add_(0.5)  # a wrong weight
        return theirs, ours, cfg

    monkeypatch.setattr(bd, "build", broken)
    out = tmp_path / "d.json"
    result = CliRunner().invoke(main, [*QUICK, "--steps", "2", "--no-profile", "--out", str(out)])
    assert result.exit_code == 1
    rows = json.loads(out.read_text())["rows"]
    assert [r["task"] for r in rows] == ["unet-forward", "ddim-2"]
    for row in rows:
        assert row["status"] == "mismatch" and "outputs differ" in row["reason"] and row["polymodal_ms"] is None


def test_bad_options_are_usage_errors():
    result = CliRunner().invoke(main, [*QUICK, "--tasks", "ddpm"])
    assert result.exit_code == 2 and "unknown task ddpm; choose from unet-forward, ddim" in result.output
    result = CliRunner().invoke(main, [*QUICK, "--steps", "0"])
    assert result.exit_code == 2 and "--batch and --steps must be ≥ 1" in result.output
