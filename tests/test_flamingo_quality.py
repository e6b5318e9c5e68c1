"""Flamingo's default recipe, really trained: few-shot digit classification and readable captions."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_four_shot_accuracy_bar(trained):
    """4-shot ≥ 0.80 on the 360 test images."""
    _, metrics = trained("flamingo")
    shots = metrics["accuracy_by_shots"]
    assert set(shots) == {"0", "2", "4"}
    assert shots["4"] >= 0.80, shots
    ranked = metrics["ranked_accuracy_by_shots"]
    assert all(ranked[k] >= shots[k] for k in shots), (ranked, shots)  # saying the word implies ranking it first


def test_in_context_examples_help(trained):
    """4-shot above 0-shot: without examples the model answers in another trained "This is a …" format
    ("This is a handwritten 7."); the examples tell it the task's format."""
    _, metrics = trained("flamingo")
    shots = metrics["accuracy_by_shots"]
    assert shots["4"] > shots["0"] + 0.05, shots  # by more than 18 of the 360 images


def test_eval_json_and_caption_command(trained, tmp_path):
    """`polymodal eval DIR --json` reproduces the metrics; `polymodal flamingo caption` names the digit of a test image."""
    from click.testing import CliRunner

    from polymodal.cli import main
    from polymodal.data import DIGIT_WORDS, load_dataset
    from polymodal.eval.images import save_png

    folder, metrics = trained("flamingo")
    result = CliRunner().invoke(main, ["eval", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy_by_shots"] == metrics["accuracy_by_shots"]
    test = load_dataset("digits").test
    right = 0
    for i in range(10):
        path = save_png(test["image"][i], tmp_path / f"digit_{i}.png")
        result = CliRunner().invoke(
            main, ["flamingo", "caption", str(folder), str(path), "--shots", "4", "--seed", str(i)]
        )
        assert result.exit_code == 0, result.output
        caption = result.output.rsplit("⟶", 1)[1]
        right += DIGIT_WORDS[int(test["label"][i])] in caption.split(".")[0]
    assert right >= 7, f"only {right}/10 captions name the right digit"
