"""SR3 quality bars, measured by training the default recipe (slow).

``trained("sr3")`` runs exactly ``polymodal train sr3``: the embedded shapes, 16×16 (area) → 32×32,
evaluated on the test split by PSNR next to bicubic and by the shapes judge on both.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_sr3_beats_bicubic_by_1_5_db(trained):
    """Issue bar: PSNR on the test split ≥ bicubic + 1.5 dB."""
    _, metrics = trained("sr3")
    assert metrics["samples"] >= 500
    assert metrics["psnr"] >= metrics["psnr_bicubic"] + 1.5, metrics


def test_judge_reads_sr_at_least_as_well_as_bicubic(trained):
    """Issue bar: the judge's colour and kind accuracy on SR outputs ≥ on bicubic (one-object test scenes)."""
    _, metrics = trained("sr3")
    assert metrics["sr_colour_accuracy"] >= metrics["bicubic_colour_accuracy"], metrics
    assert metrics["sr_kind_accuracy"] >= metrics["bicubic_kind_accuracy"], metrics


def test_sr3_folder_upscales_files_from_the_command_line(trained, tmp_path):
    """``polymodal sample runs/sr3 --upscale IMAGE`` on a test image's 16×16 version writes an SR at least as close."""
    from click.testing import CliRunner

    import polymodal
    from polymodal.cli import main
    from polymodal.data import load_dataset
    from polymodal.eval.images import read_image, save_png
    from polymodal.plugins.diffusion.sr3_sample import psnr

    folder, _ = trained("sr3")
    model = polymodal.load(folder)
    truth = load_dataset("shapes").test.batch(list(range(4)))["image"]
    low = model.degrade(truth)
    for i in range(4):
        save_png(low[i], tmp_path / f"low{i}.png")
    args = ["sample", str(folder), "--out", str(tmp_path / "s")]
    for i in range(4):
        args += ["--upscale", str(tmp_path / f"low{i}.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    sr = [read_image(tmp_path / "s" / f"low{i}_sr.png", 3) for i in range(4)]
    bicubic = [read_image(tmp_path / "s" / f"low{i}_bicubic.png", 3) for i in range(4)]
    import torch

    assert float(psnr(torch.stack(sr), truth).mean()) > float(psnr(torch.stack(bicubic), truth).mean()) + 1.5
