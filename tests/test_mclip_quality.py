"""M-CLIP quality bars, measured by training the default ``mclip-shapes`` recipe for real (issue 20's text tower).

The session fixture trains the teacher ``clip-shapes`` once and hands it over (``--set teacher=DIR``). Every
bar is on the test split's evaluation-only template × language pairs, which training never draws. Measured
on one thread (the README's numbers): cosine to the teacher 0.75 en, 0.86 ru, 0.83 fr, 0.95 zh (0.99 on the
training phrasings in every language); zero-shot kind 0.99–1.00 against the teacher's 1.00; colour 0.79–0.84
(teacher on the same template ids in English: 0.95, and 0.71 on English's own evaluation-only templates).
"""

from __future__ import annotations

import pytest
import torch

import polymodal
from polymodal.data import languages as lang
from polymodal.data import load_dataset

pytestmark = pytest.mark.slow

CHANCE_COLOUR = 1 / 6
"""Six colours."""


@pytest.fixture(scope="module")
def mclip(trained):
    return trained("mclip-shapes")


def test_the_student_lands_in_the_teachers_text_space_in_every_language(mclip):
    _, metrics = mclip
    for code in lang.LANGUAGES:
        # the training phrasings, on test scenes it never read: near-identical embeddings
        assert metrics[f"cosine_train_templates_{code}"] >= 0.95, (code, metrics)
        # the evaluation-only phrasings (a template never trained in any language among them)
        assert metrics[f"cosine_{code}"] >= 0.45, (code, metrics)
    assert metrics["cosine"] >= 0.70, metrics  # the four languages' mean
    # MSE in the teacher's unnormalised space (norms ≈ 11): far below the teacher embeddings' own spread
    assert metrics["mse"] <= 1.2, metrics


def test_zero_shot_through_the_teachers_image_tower_in_every_language(mclip):
    _, metrics = mclip
    for code in lang.LANGUAGES:
        assert metrics[f"kind_accuracy_{code}"] >= metrics[f"teacher_kind_accuracy_{code}"] - 0.05, (code, metrics)
        # Kandinsky's colour rides on this: measured 0.79-0.84 (0.55-0.70 before relative positions and the CJK split)
        assert metrics[f"colour_accuracy_{code}"] >= 4.2 * CHANCE_COLOUR, (code, metrics)
    # English reads exactly the teacher's English: no worse than the teacher on those templates (measured 0.13 above)
    assert metrics["colour_accuracy_en"] >= metrics["teacher_colour_accuracy_en"], metrics


def test_the_folder_reproduces_its_metrics_and_serves_the_prior_interface(mclip):
    folder, metrics = mclip
    model = polymodal.load(folder).eval()
    again = model.evaluate(load_dataset("shapes-multilingual"))
    for key in ("cosine_ru", "mse_zh", "colour_accuracy_fr", "kind_accuracy_en"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
    prompts = [
        "красный круг в центре",
        "a red circle in the center",
        "un cercle rouge au centre",
        "一个红色的圆形在中间",
    ]
    with torch.no_grad():
        embed, tokens, mask = model.encode_text_and_tokens(model.tokenize(prompts))
        english = model.teacher.encode_text(model.teacher.tokenize(["a red circle in the center"]))  # (1, E)
    assert embed.shape == (4, model.teacher.config.embed_dim) and tokens.shape[:2] == mask.shape
    cosines = torch.nn.functional.cosine_similarity(embed, english, dim=-1)
    assert (cosines >= 0.9).all(), cosines  # every translation lands on the English embedding (measured ≥ 0.99)
