"""The multilingual captions: hand-written tables (``polymodal.data.languages``) and the
``shapes-multilingual`` / ``digits-multilingual`` datasets built on the English ones."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from functools import cache

import pytest
import torch

from polymodal.data import digits as en_digits
from polymodal.data import languages as lang
from polymodal.data import load_dataset, load_digits, load_shapes
from polymodal.data import shapes as en_shapes
from polymodal.data.multilingual import load_digits_multilingual, load_shapes_multilingual, scene_objects
from polymodal.data.tokenizers import ByteTokenizer

SMALL = dict(train_size=400, test_size=200)
NC, NK, NP = len(en_shapes.COLOURS), len(en_shapes.KINDS), len(en_shapes.POSITIONS)
CYRILLIC, CJK, ASCII_LETTER = re.compile(r"[\u0400-\u04ff]"), re.compile(r"[\u4e00-\u9fff]"), re.compile(r"[A-Za-z]")


@cache
def shapes_ml(seed: int = 0):
    return load_shapes_multilingual(seed=seed, **SMALL)


@cache
def digits_ml(seed: int = 0):
    return load_digits_multilingual(seed=seed)


def all_fills(dataset: str, language: str, ids) -> set[str]:
    """Every one-object shapes caption / every digit caption of the template ids ``ids``."""
    if dataset == "digits":
        return {lang.digit_caption(language, t, y) for t in ids for y in range(10)}
    objects = [(c, k, p) for c in range(NC) for k in range(NK) for p in range(NP)]
    return {lang.shapes_caption(language, t, [o]) for t in ids for o in objects}


# --- the tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize("language", lang.LANGUAGES)
def test_every_word_is_translated_and_distinct(language):
    lex = lang.SHAPES[language]
    assert len(lex.colours) == NC and len(lex.kinds) == NK and len(lex.where) == NP
    assert len(lex.templates) == len(en_shapes.TRAIN_TEMPLATES) + len(en_shapes.HELDOUT_TEMPLATES)
    for forms in lex.colours:
        assert len(forms) == len(lex.genders) + len(lex.extra) and all(f.strip() for f in forms)
    assert all(gender in lex.genders for _, gender in lex.kinds)
    assert all(len(words) == len(lex.genders) for words in lex.agree.values())
    for words in ([f[0] for f in lex.colours], [n for n, _ in lex.kinds], lex.where, lang.DIGIT_WORDS[language]):
        assert len(set(words)) == len(words) and all(w.strip() for w in words)
    assert len(lang.DIGIT_WORDS[language]) == 10
    assert len(lang.DIGITS_TEMPLATES[language]) == len(en_digits.TRAIN_TEMPLATES) + len(en_digits.HELDOUT_TEMPLATES)
    if language != "en":  # really translated: no English word left but French words spelt the same
        english = [*en_shapes.COLOURS, *en_shapes.KINDS, *en_digits.DIGIT_WORDS]
        ours = [f[0] for f in lex.colours] + [n for n, _ in lex.kinds] + list(lang.DIGIT_WORDS[language])
        same = {word for word, en in zip(ours, english, strict=True) if word == en}
        assert same <= ({"magenta", "cyan", "triangle", "six"} if language == "fr" else set()), same


@pytest.mark.parametrize("dataset", ["shapes", "digits"])
@pytest.mark.parametrize("language", lang.LANGUAGES)
def test_every_template_fills_without_leftover_braces(dataset, language):
    total = len(lang.template_ids(dataset, language)) + len(lang.template_ids(dataset, language, heldout=True))
    texts = all_fills(dataset, language, range(total))
    texts |= set(lang.evaluation_prompts(dataset, language)) | set(lang.class_names(dataset, language))
    assert len(texts) > 50
    for text in texts:
        assert "{" not in text and "}" not in text and text == text.strip() and "  " not in text, text
    assert len(lang.class_names(dataset, language)) == len(lang.evaluation_prompts(dataset, language))
    per_template = [all_fills(dataset, language, [t]) for t in range(total)]
    assert sum(map(len, per_template)) == len(set().union(*per_template))  # a caption names its template


@pytest.mark.parametrize("dataset", ["shapes", "digits"])
def test_scripts_are_what_the_language_writes(dataset):
    for language in lang.LANGUAGES:
        texts = all_fills(dataset, language, range(12 if dataset == "digits" else 6))
        texts |= set(lang.evaluation_prompts(dataset, language))
        for text in texts:
            if language == "ru":  # Cyrillic, no Latin letter
                assert CYRILLIC.search(text) and not ASCII_LETTER.search(text), text
            elif language == "zh":  # CJK ideographs, no Latin letter, no spaces
                assert CJK.search(text) and not ASCII_LETTER.search(text) and " " not in text, text
            else:
                assert not CYRILLIC.search(text) and not CJK.search(text) and ASCII_LETTER.search(text), text
                assert text.isascii() or language == "fr", text


def test_grammar_agrees():
    red_circle, red_cross, green_square, green_cross = 0 * NK + 1, 0 * NK + 3, 1 * NK + 0, 1 * NK + 3
    prompts = {code: lang.evaluation_prompts("shapes", code) for code in lang.LANGUAGES}
    assert [prompts[c][red_circle] for c in lang.LANGUAGES] == [
        "a red circle",
        "красный круг",
        "un cercle rouge",
        "红色的圆形",
    ]
    assert (prompts["fr"][red_cross], prompts["fr"][green_square]) == ("une croix rouge", "un carré vert")
    assert prompts["fr"][green_cross] == "une croix verte"
    assert lang.class_names("shapes", "fr")[green_cross] == "croix verte"
    # Russian: every agreeing word follows the noun's gender (a feminine noun for the check)
    star = dataclasses.replace(lang.SHAPES["ru"], kinds=(("звезда", "f"),) * NK)
    assert star.fill("{one} {colour} {kind}, {placed} {where}, {visible}", 0, 0, 3) == (
        "одна красная звезда, расположенная слева, видна"
    )
    assert lang.SHAPES["ru"].fill(lang.SHAPES["ru"].templates[4], 2, 1, 3) == "слева находится круг синего цвета"
    scene = [(0, 1, 3), (2, 0, 4)]
    assert lang.shapes_caption("ru", 0, scene) == "красный круг слева и синий квадрат в центре"
    assert lang.shapes_caption("fr", 0, scene) == "un cercle rouge à gauche et un carré bleu au centre"
    assert lang.shapes_caption("zh", 1, scene) == "左边有一个红色的圆形，中间有一个蓝色的正方形"
    assert lang.shapes_caption("en", 0, scene) == "a red circle on the left and a blue square in the center"


@pytest.mark.parametrize("dataset", ["shapes", "digits"])
def test_heldout_pairs_are_evaluation_only_and_mixed(dataset):
    english = en_shapes if dataset == "shapes" else en_digits
    ids = {code: set(lang.template_ids(dataset, code)) for code in lang.LANGUAGES}
    held = {code: set(lang.template_ids(dataset, code, heldout=True)) for code in lang.LANGUAGES}
    for code in lang.LANGUAGES:
        assert ids[code] and held[code] and ids[code].isdisjoint(held[code])
        # no held-out caption can be written by a training template of the same language
        assert all_fills(dataset, code, ids[code]).isdisjoint(all_fills(dataset, code, held[code]))
    assert lang.template_texts(dataset, "en", heldout=True) == list(english.HELDOUT_TEMPLATES)
    assert lang.template_texts(dataset, "en") == list(english.TRAIN_TEMPLATES)
    assert set.intersection(*held.values())  # a phrasing no language trains on
    assert any(t in ids[other] for code in held for t in held[code] for other in lang.LANGUAGES)  # a known phrasing
    assert sorted(lang.heldout_pairs(dataset)) == sorted((t, c) for c in held for t in held[c])


def test_caption_for_takes_indices_or_english_names():
    by_name = lang.caption_for("shapes-multilingual", "ru", 2, colour="yellow", kind="triangle", position="top")
    assert (
        by_name == lang.caption_for("shapes", "ru", 2, colour=3, kind=2, position=1) == "один жёлтый треугольник вверху"
    )
    assert lang.caption_for("digits", "zh", 1, label=7) == "数字七"
    assert lang.caption_for("digits-multilingual", "fr", 11, label="three") == "le chiffre manuscrit trois"
    for bad in (dict(language="de"), dict(dataset="text"), dict(colour="purple"), dict(colour=6)):
        args = dict(dataset="shapes", language="en", colour=0, kind=0) | bad
        with pytest.raises(ValueError):
            lang.caption_for(args.pop("dataset"), args.pop("language"), 0, **args)


# --- the datasets -------------------------------------------------------------------------------


def test_shapes_fields_equal_the_english_dataset():
    ml, en = shapes_ml(), load_shapes(**SMALL)
    for ours, theirs in ((ml.train, en.train), (ml.test, en.test)):
        assert set(ours.fields) == set(theirs.fields) | {"language", "template"}
        for name, value in theirs.fields.items():
            if name == "caption":
                assert ours[name] != value  # replaced
            elif isinstance(value, torch.Tensor):
                assert torch.equal(ours[name], value), name
            else:
                assert ours[name] == value, name
    assert {k: ml.meta[k] for k in en.meta} == en.meta  # English keys kept as they are


def test_digits_fields_equal_the_english_dataset():
    ml, en = digits_ml(), load_digits()
    for ours, theirs in ((ml.train, en.train), (ml.test, en.test)):
        assert set(ours.fields) == {"image", "label", "caption", "language", "template"}
        assert torch.equal(ours["image"], theirs["image"]) and torch.equal(ours["label"], theirs["label"])
    assert {k: ml.meta[k] for k in en.meta} == en.meta


def test_scene_objects_are_the_english_captions_objects():
    en = load_shapes(**SMALL)
    for split in (en.train, en.test):
        objects = scene_objects(split, 32)
        assert [o[0][2] for o in objects] == split["position"].tolist()
        for caption, scene in zip(split["caption"], objects):
            parts = caption.split(" and ")
            assert len(parts) == len(scene)
            for part, (c, k, p) in zip(parts, scene):
                assert [w for w in en_shapes.WHERE.values() if w in part] == [en_shapes.WHERE[en_shapes.POSITIONS[p]]]
                assert {list(en_shapes.COLOURS)[c], en_shapes.KINDS[k]} <= set(re.findall(r"[a-z]+", part))


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_languages_are_balanced_and_batched(name):
    d = shapes_ml() if name == "shapes" else digits_ml()
    for split in (d.train, d.test):
        assert isinstance(split["language"], list) and all(isinstance(c, str) for c in split["language"])
        counts = Counter(split["language"])
        assert set(counts) == set(lang.LANGUAGES)
        assert max(counts.values()) - min(counts.values()) <= 1  # a balanced shuffle
        batch = split.batch([3, 0, 5])
        assert batch["language"] == [split["language"][i] for i in (3, 0, 5)]
        assert batch["template"].tolist() == [int(split["template"][i]) for i in (3, 0, 5)]
        assert batch["caption"] == [split["caption"][i] for i in (3, 0, 5)]


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_evaluation_only_pairs_never_reach_the_train_split(name):
    d = shapes_ml() if name == "shapes" else digits_ml()
    heldout = {(t, c) for t, c in d.meta["heldout_pairs"]}
    train_pairs = set(zip(d.train["template"].tolist(), d.train["language"]))
    test_pairs = set(zip(d.test["template"].tolist(), d.test["language"]))
    assert train_pairs.isdisjoint(heldout) and test_pairs == heldout  # the test split covers every held-out pair
    assert len(train_pairs) == sum(len(v) for v in d.meta["template_ids_by_language"].values())
    for split, expect_heldout in ((d.train, False), (d.test, True)):
        scenes = scene_objects(split, 32) if name == "shapes" else split["label"].tolist()
        for caption, code, t, scene in zip(split["caption"], split["language"], split["template"].tolist(), scenes):

            def fill(template, scene=scene, code=code):
                if name == "shapes":
                    return lang.shapes_caption(code, template, scene)
                return lang.digit_caption(code, template, scene)

            assert caption == fill(t)
            held = lang.template_ids(name, code, heldout=True)
            assert any(caption == fill(h) for h in held) == expect_heldout, caption


def test_english_captions_come_from_the_english_tables():
    d = shapes_ml()
    names = list(en_shapes.COLOURS)
    for split, templates in ((d.train, en_shapes.TRAIN_TEMPLATES), (d.test, en_shapes.HELDOUT_TEMPLATES)):
        checked = 0
        for i, (caption, code) in enumerate(zip(split["caption"], split["language"])):
            if code == "en" and int(split["count"][i]) == 1:
                c, k, p = int(split["colour"][i]), int(split["kind"][i]), int(split["position"][i])
                where = en_shapes.WHERE[en_shapes.POSITIONS[p]]
                assert caption in {t.format(colour=names[c], kind=en_shapes.KINDS[k], where=where) for t in templates}
                checked += 1
        assert checked > 10


def test_captions_are_deterministic_per_seed():
    a, b = load_shapes_multilingual(seed=0, **SMALL), shapes_ml(0)
    assert a.fingerprint() == b.fingerprint()
    c = load_digits_multilingual(seed=0)
    assert c.train["caption"] == digits_ml(0).train["caption"] and c.test["language"] == digits_ml(0).test["language"]
    other = load_digits_multilingual(seed=1)
    assert other.train["language"] != c.train["language"] and other.train["caption"] != c.train["caption"]


def test_byte_tokenizer_round_trips_every_caption():
    tok = ByteTokenizer()
    texts = [t for d in (shapes_ml(), digits_ml()) for s in (d.train, d.test) for t in s["caption"]]
    texts += [p for code in lang.LANGUAGES for ds in ("shapes", "digits") for p in lang.evaluation_prompts(ds, code)]
    assert any(CJK.search(t) for t in texts) and any(CYRILLIC.search(t) for t in texts)
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    ids, mask = tok.encode_batch(texts[:64])  # (64, L), (64, L)
    assert tok.decode_batch([row[m] for row, m in zip(ids, mask)]) == texts[:64]


def test_meta_carries_the_language_tables():
    for d, base in ((shapes_ml(), "shapes"), (digits_ml(), "digits")):
        m = d.meta
        assert m["languages"] == list(lang.LANGUAGES)
        for code in lang.LANGUAGES:
            assert m["templates_by_language"][code] == lang.template_texts(base, code)
            assert m["heldout_templates_by_language"][code] == lang.template_texts(base, code, heldout=True)
            assert m["prompts_by_language"][code] == lang.evaluation_prompts(base, code)
            assert len(m["class_names_by_language"][code]) == m["num_classes"]
        assert m["templates"] == m["templates_by_language"]["en"]
    assert shapes_ml().meta["conjunctions"] == {"en": " and ", "ru": " и ", "fr": " et ", "zh": "，"}


@pytest.mark.parametrize("name", ["shapes-multilingual", "digits-multilingual"])
def test_registered_names_load(name):
    options = dict(train_size=8, test_size=4) if name.startswith("shapes") else {}
    d = load_dataset(name, **options)
    assert d.name == name and "language" in d.train and "language" in d.test
    if options:
        assert (len(d.train), len(d.test)) == (8, 4)
    with pytest.raises(ValueError, match="takes no folder"):
        load_dataset(name, root="somewhere")
