"""The M-CLIP family (``mclip-shapes``, ``mclip``): a multilingual student text tower matched to a frozen CLIP.

Unit tests on tiny configs (a fresh tiny teacher): the tokenizer encodes any UTF-8 text and refuses to cut
one silently, training draws only training (template, language) pairs and pairs each student caption with
the English of the same template and scene, the teacher stays frozen, the text interface unCLIP's prior
uses, bad input refused naming expected vs given, save → load, and the model contracts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import polymodal
from polymodal.api import spec
from polymodal.data import languages as lang
from polymodal.data import load_dataset
from polymodal.models.interfaces import TextEncoder, TextTokenEncoder, require
from polymodal.plugins.mclip import MCLIP
from polymodal.plugins.mclip import captions as cap
from polymodal.testing import components, contracts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes-multilingual")


def _model(name: str = "mclip-shapes") -> MCLIP:
    return contracts.build(name, perturb=False).eval()


# --------------------------------------------------------------------------- the tokenizer
@pytest.mark.parametrize(
    "text",
    ["красный круг в центре", "红色的圆形在中间", "une croix verte à gauche", "Ελληνικά 🙂 العربية ॐ", "a\tb\n"],
)
def test_the_tokenizer_encodes_any_utf8_text(text):
    model = _model()
    ids = model.tokenize([text])  # (1, L)
    assert ids[0, 0] == 0 and ids[0, -1] == 1  # bos … eos
    assert model.tokenizer.decode(ids[0]) == text  # byte-level: nothing is lost
    emb = model.encode_text(ids)
    assert emb.shape == (1, model.embed_dim) and torch.isfinite(emb).all()


def test_the_tokenizer_learnt_the_captions_of_every_language():
    tok = cap.caption_tokenizer("shapes", 1024)
    for code in lang.LANGUAGES:  # a caption of the training tables takes far fewer tokens than its bytes
        text = cap.caption("shapes", code, lang.template_ids("shapes", code)[0], [(0, 1, 4)])
        n = len(tok.encode(text, add_bos=False, add_eos=False))
        if code == "zh":  # each ideograph is its own word: one token per character, none falls back to bytes
            assert n == len(text), (code, text, n)
        else:
            assert n * 3 < len(text.encode()), (code, text)


def test_a_text_longer_than_the_context_is_refused_unless_truncated():
    model = _model()
    limit = model.config.text.context_length
    text = "красный круг " * 40
    with pytest.raises(ValueError, match=rf"text encodes to \d+ tokens, longer than the limit of {limit}"):
        model.tokenize([text])
    ids = model.tokenize([text, "a"], truncate=True)
    assert ids.shape == (2, limit) and ids[0, -1] == 1  # cut, the end-of-text kept


# --------------------------------------------------------------------------- the training draws
def test_training_draws_only_training_pairs_and_every_one_of_them():
    for tables in ("shapes", "digits"):
        held = set(lang.heldout_pairs(tables))
        train = set(cap.training_pairs(tables))
        assert held and train and not held & train
        drawn = set(cap.draw_pairs(tables, 20000, torch.Generator().manual_seed(0)))
        assert drawn == train  # never an evaluation-only pair, and each training pair turns up


def test_training_captions_pair_each_translation_with_its_english(shapes):
    batch = shapes.train.batch(list(range(64)))
    student, english, pairs = cap.training_captions("shapes", batch, 32, torch.Generator().manual_seed(1))
    objects = cap.scenes("shapes", batch, 32)
    assert {code for _, code in pairs} == set(lang.LANGUAGES)
    for s, e, (t, code), obj in zip(student, english, pairs, objects):
        assert s == lang.shapes_caption(code, t, obj) and e == lang.shapes_caption("en", t, obj)
    # the batch's own captions are the dataset's (the scene's objects read back from its boxes)
    for text, code, t, obj in zip(batch["caption"], batch["language"], batch["template"].tolist(), objects):
        assert text == lang.shapes_caption(code, t, obj)
    digits = load_dataset("digits-multilingual").train.batch([0, 1, 2])
    student, english, pairs = cap.training_captions("digits", digits, 8)
    for s, e, (t, code), y in zip(student, english, pairs, digits["label"].tolist()):
        assert s == lang.digit_caption(code, t, y) and e == lang.digit_caption("en", t, y)


def test_the_training_loss_reads_drawn_pairs_and_matches_the_teachers_english(shapes, monkeypatch):
    model = _model()
    for module in model.modules():  # no dropout, so the recomputation below draws the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    seen = []
    original = cap.training_captions

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(cap, "training_captions", spy)
    batch = shapes.train.batch(list(range(32)))
    model.train()
    for _ in range(5):
        loss, metrics = model.loss(batch)
    assert len(seen) == 5 and not {p for _, _, pairs in seen for p in pairs} & set(lang.heldout_pairs("shapes"))
    student, english, _ = seen[-1]
    with torch.no_grad():
        target = model.teacher.encode_text(model.teacher.tokenize(english, truncate=True))  # the English CLIP
        pred = model.encode_text(model.tokenize(student, truncate=True))
    torch.testing.assert_close(loss, F.mse_loss(pred, target))
    model.eval()  # evaluation reads the batch's own captions
    loss, _ = model.loss(batch)
    english = [
        lang.shapes_caption("en", t, o) for t, o in zip(batch["template"].tolist(), cap.scenes("shapes", batch, 32))
    ]
    with torch.no_grad():
        target = model.teacher.encode_text(model.teacher.tokenize(english, truncate=True))
        pred = model.encode_text(model.tokenize(list(batch["caption"]), truncate=True))
    torch.testing.assert_close(loss, F.mse_loss(pred, target))


def test_the_teacher_is_frozen_and_the_student_trains(shapes):
    model = _model()
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training  # dropout off: the targets are the teacher's eval embeddings
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = shapes.train.batch(list(range(16)))
    for _ in range(3):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher.items())
    assert any(not torch.equal(v, model.encoder.state_dict()[k]) for k, v in student.items())


# --------------------------------------------------------------------------- the interface unCLIP uses
def test_the_text_interface_of_a_clip():
    model = _model()
    require(model, (TextEncoder, TextTokenEncoder), what="a Kandinsky text encoder")
    ids = model.tokenize(["красный круг", "a red circle in the center", "红色的圆形"])  # (3, L)
    embed, tokens, mask = model.encode_text_and_tokens(ids)
    b, length = ids.shape
    assert embed.shape == (b, model.teacher.config.embed_dim) == (b, model.embed_dim)
    assert tokens.shape == (b, length, model.config.text.dim) and mask.shape == (b, length)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [int((row != 2).sum()) for row in ids]
    torch.testing.assert_close(model.encode_text(ids), embed)
    mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # the mean over real tokens
    torch.testing.assert_close(embed, model.head(mean))
    for i in range(b):  # padding changes nothing: alone (no padding) it is the same text
        alone = model.tokenize([["красный круг", "a red circle in the center", "红色的圆形"][i]])
        torch.testing.assert_close(model.encode_text(alone)[0], embed[i], atol=1e-5, rtol=1e-5)


def test_the_student_is_bidirectional():
    model = _model()
    ids = model.tokenize(["a red circle", "a red square"])
    _, tokens, _ = model.encode_text_and_tokens(ids)
    assert not torch.allclose(tokens[0, 1], tokens[1, 1])  # the first word sees the last one


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_expected_and_given(shapes):
    model = _model()
    with pytest.raises(ValueError, match=r"expected integer token ids; got dtype torch.float32"):
        model.encode_text(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"expected at most 64 tokens \(the context length\); got 70"):
        model.encode_text(torch.ones(1, 70, dtype=torch.long))
    vocab = model.config.text.vocab_size
    with pytest.raises(ValueError, match=rf"expected token ids in \[0, {vocab}\) .* got ids from 0 to 5000"):
        model.encode_text(torch.tensor([[0, 5000, 1]]))
    with pytest.raises(ValueError, match=r"expected an end-of-text token \(id 1\) in every row; rows \[1\]"):
        model.encode_text(torch.tensor([[0, 5, 1], [0, 5, 6]]))
    with pytest.raises(ValueError, match=r"expected a text or a non-empty list of texts; got \[\]"):
        model.tokenize([])
    with pytest.raises(ValueError, match=r"expected texts \(str\); got int"):
        model.tokenize(["a", 3])
    variant = spec("mclip-shapes")
    with pytest.raises(ValueError, match=r"expected shapes-multilingual or digits-multilingual; got 'shapes'"):
        MCLIP.config_for_data(variant.config, load_dataset("shapes"))
    with pytest.raises(ValueError, match=r"causal=False; got causal=True"):
        polymodal.plugins.mclip.MCLIPConfig(text=variant.config.text.__class__(causal=True))


def test_an_auto_teacher_trains_on_the_english_dataset(shapes):
    variant = spec("mclip-shapes")
    config = MCLIP.config_for_data(variant.config, shapes)
    assert (config.teacher.variant, config.teacher.data, config.tables, config.data) == (
        "clip-shapes",
        "shapes",
        "shapes",
        "shapes-multilingual",
    )
    digits = MCLIP.config_for_data(spec("mclip").config, load_dataset("digits-multilingual"))
    assert (digits.teacher.variant, digits.teacher.data, digits.tables, digits.image_size) == (
        "clip",
        "digits",
        "digits",
        8,
    )


# --------------------------------------------------------------------------- folders and contracts
def test_save_load_round_trip(tmp_path):
    model = _model()
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "teacher" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    loaded = polymodal.load(tmp_path / "m").eval()
    ids = model.tokenize(["красный круг", "un cercle rouge"])
    assert torch.equal(loaded.tokenize(["красный круг", "un cercle rouge"]), ids)
    with torch.no_grad():
        for a, b in zip(model(ids), loaded(ids)):
            assert torch.equal(a, b)
        assert torch.equal(
            model.teacher.encode_text(model.teacher.tokenize("a red circle")),
            loaded.teacher.encode_text(loaded.teacher.tokenize("a red circle")),
        )


def test_evaluate_reports_every_language_next_to_the_teacher(shapes):
    metrics = _model().evaluate(shapes)
    for code in lang.LANGUAGES:
        for key in ("cosine", "mse", "cosine_train_templates", "colour_accuracy", "kind_accuracy"):
            assert f"{key}_{code}" in metrics
        assert {f"teacher_colour_accuracy_{code}", f"teacher_kind_accuracy_{code}"} <= set(metrics)
        assert -1 <= metrics[f"cosine_{code}"] <= 1 and metrics[f"mse_{code}"] > 0
    # the English student reads exactly the teacher's captions: a perfect student would score the teacher's
    assert metrics["zero_shot_images"] == int((shapes.test["count"] == 1).sum())


@pytest.mark.parametrize("name", ["mclip-shapes", "mclip"])
@pytest.mark.parametrize("check", contracts.MODEL_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_model_contracts(name, check):
    check(name)


@pytest.mark.parametrize("name", ["mclip-shapes", "mclip"])
def test_composite_contracts(name):
    contracts.check_part_folders(name)
    contracts.check_nondefault_parts(name)
    components.check_implements(name)


def test_polymodal_train_runs_and_saves(tmp_path):
    from polymodal.api import train_model

    tiny = ("teacher.path=", "teacher.tiny=true", "text.depth=1", "text.block.dim=16", "text.block.heads=2")
    model, metrics = train_model("mclip-shapes", set_=tiny, steps=3, out=tmp_path / "m", progress=False)
    assert {"cosine_ru", "mse_zh", "colour_accuracy_fr", "teacher_kind_accuracy_en"} <= set(metrics)
    loaded = polymodal.load(tmp_path / "m").eval()
    ids = loaded.tokenize(["зелёный квадрат"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(ids), model.eval().encode_text(ids), atol=0, rtol=0)
