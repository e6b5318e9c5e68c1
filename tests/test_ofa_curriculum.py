"""``benchmarks/ofa_curriculum.py``: a variant's mixture holds only its tasks at their recipe weights, the
captioning-first variant trains captions alone first, and bad arguments are refused before anything trains. The
trainings themselves are the family's (tests/test_ofa.py); no number is asserted: the script has no bar."""

from __future__ import annotations

import ofa_curriculum as cur
import pytest

from polymodal.plugins.ofa import SHAPES
from polymodal.plugins.ofa.config import TASKS


def test_a_variant_s_mixture_keeps_only_its_tasks_at_the_recipe_s_weights():
    config = cur.only(SHAPES.config, cur.ONLY["caption+vqa"])
    weights = dict(zip(TASKS, config.weights(), strict=True))
    assert {t for t, w in weights.items() if w} == {"caption", "vqa"}
    assert weights["caption"] == SHAPES.config.caption_weight and weights["vqa"] == SHAPES.config.vqa_weight
    assert cur.FIRST["caption-first"] == ("caption",) and set(cur.VARIANTS) >= {"mixture", "equal-norm"}


def test_an_unknown_variant_is_refused_before_training(capsys, monkeypatch):
    monkeypatch.setattr(cur, "fresh_model", lambda *a: pytest.fail("trained before checking its arguments"))
    with pytest.raises(SystemExit):
        cur.main(["--variants", "mixture,caption-last"])
    assert "caption-last" in capsys.readouterr().err


def test_stages_name_their_tasks_and_steps_and_a_bad_stage_is_refused(capsys, monkeypatch):
    assert cur.parse_stages("caption:1000/caption+text_to_image:500/all:1500") == [
        (("caption",), 1000),
        (("caption", "text_to_image"), 500),
        (None, 1500),
    ]
    assert cur.variant_stages("caption-first", 1000) == [(("caption",), 500), (None, 500)]
    assert cur.variant_stages("caption+vqa", 1000) == [(("caption", "vqa"), 1000)]
    for bad in ("caption", "caption:0", "caption+painting:10", "all:-5"):
        with pytest.raises(ValueError, match="TASK\\+TASK:STEPS"):
            cur.parse_stages(bad)
    monkeypatch.setattr(cur, "fresh_model", lambda *a: pytest.fail("trained before checking its arguments"))
    with pytest.raises(SystemExit):
        cur.main(["--variants", "caption:100/painting:100"])
    assert "painting" in capsys.readouterr().err
