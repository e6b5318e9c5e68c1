"""``benchmarks/ofa_ablation.py``: the table puts each task's multitask score beside its single-task one (a failed
training shows as an error, a missing one as –), and bad arguments are refused before anything trains. The
trainings themselves are the family's (tests/test_ofa.py); no number is asserted: the ablation has no bar."""

from __future__ import annotations

import ofa_ablation as ab
import pytest


def test_the_table_sets_each_task_s_scores_side_by_side():
    rows = {
        "multitask": {"metrics": {"caption_colour_kind": 0.25, "classify_accuracy": 1.0, "vqa_accuracy": 0.5}},
        "caption": {"metrics": {"caption_colour_kind": 0.75}},
        "classify": {"error": "Traceback …"},
    }
    lines = ab.table(rows).splitlines()
    assert "| caption | `caption_colour_kind` | 0.250 | 0.750 |" in lines
    assert "| classify | `classify_accuracy` | 1.000 | error |" in lines
    assert "| vqa | `vqa_accuracy` | 0.500 | – |" in lines  # not trained alone
    assert "| region | `region_accuracy` | – | – |" in lines
    assert len(lines) == 2 + sum(len(names) for names in ab.TASK_METRICS.values())


def test_an_unknown_task_or_an_existing_output_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ab.main(["--tasks", "caption,detect"])
    assert "unknown detect" in capsys.readouterr().err
    existing = tmp_path / "ablation.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        ab.main(["--out", str(existing)])
    assert "exists" in capsys.readouterr().err and existing.read_text() == "{}"
