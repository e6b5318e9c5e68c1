"""RuDolph's bars on the digits, measured by training the default recipe (``polymodal train rudolph``)."""

from __future__ import annotations

import pytest

from polymodal.io.samples import MANIFEST

pytestmark = pytest.mark.slow


def test_rudolph_meets_the_digits_bars(trained):
    _, metrics = trained("rudolph")
    assert metrics["caption_accuracy"] >= 0.90, metrics
    assert metrics["zero_shot_accuracy"] >= 0.90, metrics
    assert metrics["sample_accuracy"] >= 0.75, metrics


def test_trained_rudolph_samples_and_captions_from_its_folder(trained, tmp_path):
    from click.testing import CliRunner

    from polymodal.api import load
    from polymodal.cli import main
    from polymodal.data import load_dataset
    from polymodal.plugins.rudolph.text import caption_label

    folder, _ = trained("rudolph")
    result = CliRunner().invoke(
        main,
        [
            "sample",
            str(folder),
            "--prompt",
            "the digit three",
            "-n",
            "4",
            "--seed",
            "0",
            "--candidates",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != MANIFEST) == ["grid.png"] + [
        f"sample_{i:03d}.png" for i in range(4)
    ]
    model = load(folder)
    test = load_dataset("digits").test
    captions = model.caption(test["image"][:20])
    hits = sum(caption_label(c) == int(y) for c, y in zip(captions, test["label"][:20]))
    assert hits >= 15, list(zip(captions, test["label"][:20].tolist()))
