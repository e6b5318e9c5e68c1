"""The embedded datasets: digits, shapes, and a folder with captions.jsonl."""

from __future__ import annotations

import json
import re
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.data import load_dataset, load_digits, load_folder, load_shapes
from polymodal.data.digits import DIGIT_WORDS
from polymodal.data.shapes import COLOURS, KINDS, POSITIONS, WHERE


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


# --- digits -----------------------------------------------------------------------------


@cache
def digits():
    return load_digits()


def test_digits_split_sizes_and_indices():
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = digits()
    assert (len(d.train), len(d.test)) == (1437, 360)
    labels = sk_digits().target
    train_idx, test_idx = train_test_split(range(1797), test_size=0.2, stratify=labels, random_state=0)
    assert list(d.meta["indices"]["train"]) == list(train_idx)
    assert list(d.meta["indices"]["test"]) == list(test_idx)
    assert d.train["label"].tolist() == labels[train_idx].tolist()
    assert d.test["label"].tolist() == labels[test_idx].tolist()
    assert set(train_idx).isdisjoint(test_idx)


def test_a_batch_names_the_split_rows_it_holds_and_keeps_them_on_a_device_move():
    d = digits()
    batch = d.train.batch([7, 2, 7])
    assert batch.index.tolist() == [7, 2, 7]
    assert torch.equal(batch["image"], d.train["image"][[7, 2, 7]])
    moved = batch.to("cpu")
    assert moved.index.tolist() == [7, 2, 7] and moved.source == batch.source
    assert d.train.subset([1, 2]).batch([1]).index.tolist() == [1]  # the rows of the split it is taken from


def test_digits_pixels_and_meta():
    d = digits()
    for split in (d.train, d.test):
        img = split["image"]
        assert img.shape[1:] == (1, 8, 8) and img.dtype == torch.float32
        assert img.min() >= 0 and img.max() <= 1 and img.max() == 1
    assert d.meta["num_classes"] == 10 and d.meta["channels"] == 1 and d.meta["image_size"] == 8
    assert set(d.meta["templates"]).isdisjoint(d.meta["heldout_templates"])


def _matches(caption: str, templates: list[str], label: int) -> bool:
    return any(caption == t.format(numeral=str(label), word=DIGIT_WORDS[label]) for t in templates)


def test_digits_captions_use_the_right_templates_and_digit():
    d = digits()
    for split, templates, other in (
        (d.train, "templates", "heldout_templates"),
        (d.test, "heldout_templates", "templates"),
    ):
        for caption, label in zip(split["caption"], split["label"].tolist()):
            assert _matches(caption, d.meta[templates], label), caption
            assert not _matches(caption, d.meta[other], label), caption
            assert {str(label), DIGIT_WORDS[label]} & words(caption)


def test_digits_refuses_a_root():
    with pytest.raises(ValueError, match="takes no folder"):
        load_digits(root="somewhere")


# --- shapes -----------------------------------------------------------------------------

SMALL = dict(train_size=48, test_size=16)


@cache
def shapes(seed: int = 0, image_size: int = 32):
    return load_shapes(seed=seed, image_size=image_size, **SMALL)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_shapes_deterministic_per_seed(seed):
    a, b = load_shapes(seed=seed, **SMALL), load_shapes(seed=seed, **SMALL)
    assert a.fingerprint() == b.fingerprint()
    c = load_shapes(seed=seed + 1, **SMALL)
    assert not torch.equal(a.train["image"], c.train["image"])
    assert not torch.equal(a.train["image"][:16], a.test["image"])  # disjoint streams


def test_shapes_sizes_and_meta():
    d = load_shapes(seed=3, image_size=24, train_size=20, test_size=7)
    assert (len(d.train), len(d.test)) == (20, 7)
    assert d.train["image"].shape == (20, 3, 24, 24) and d.train["image"].dtype == torch.float32
    assert d.train["masks"].shape == (20, 24, 24) and d.train["masks"].dtype == torch.bool
    m = d.meta
    assert m["num_classes"] == len(m["class_names"]) == len(COLOURS) * len(KINDS)
    assert m["channels"] == 3 and m["image_size"] == 24
    assert set(m["templates"]).isdisjoint(m["heldout_templates"])
    for bad in (dict(image_size=8), dict(train_size=0), dict(root="x")):
        with pytest.raises(ValueError):
            load_shapes(**bad)


def test_shapes_default_generation_is_fast():
    import time

    start = time.perf_counter()
    d = load_shapes()
    assert (len(d.train), len(d.test)) == (2000, 500)
    assert time.perf_counter() - start < 5


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([16, 32, 40]))
def test_shapes_fields_are_consistent(seed, size):
    d = shapes(seed, size)
    nk = len(KINDS)
    colours, kinds = list(COLOURS), list(KINDS)
    for split in (d.train, d.test):
        img, masks = split["image"], split["masks"]
        assert img.min() >= 0 and img.max() <= 1
        assert torch.equal(img.amax(1) > 0, masks)  # black background, objects lit
        assert torch.equal(split["label"], split["colour"] * nk + split["kind"])
        for i in range(len(split)):
            boxes, count = split["boxes"][i], int(split["count"][i])
            assert len(boxes) == count in (1, 2)
            assert (boxes[0][4], boxes[0][5]) == (int(split["colour"][i]), int(split["kind"][i]))
            drawn = torch.zeros(size, size, dtype=torch.bool)
            for x0, y0, x1, y1, c, _kind in boxes:
                assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
                inside = masks[i, y0:y1, x0:x1]
                # tight: every edge row and column of the box has object pixels
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                pixels = img[i, :, y0:y1, x0:x1][:, inside]  # (3, P)
                assert torch.equal(pixels, torch.tensor(COLOURS[colours[c]])[:, None].expand_as(pixels))
                assert not (drawn[y0:y1, x0:x1] & inside).any()  # no overlap
                drawn[y0:y1, x0:x1] |= inside
            assert torch.equal(drawn, masks[i])  # boxes cover the whole mask
            if count == 2:
                assert boxes[0][4:] != boxes[1][4:]
            caption = split["caption"][i]
            for _, _, _, _, c, k in boxes:
                assert {colours[c], kinds[k]} <= words(caption)
            qa = dict(split["qa"][i])
            assert qa["how many objects are there?"] == str(count)
            assert [a for q, a in split["qa"][i] if q.startswith("is there")].count("yes") == count
            where0 = WHERE[POSITIONS[int(split["position"][i])]]
            c0, k0 = colours[boxes[0][4]], kinds[boxes[0][5]]
            assert where0 in caption
            assert qa[f"what colour is the {k0} {where0}?"] == c0
            assert qa[f"what shape is {where0}?"] == k0
            assert qa[f"where is the {c0} {k0}?"] == POSITIONS[int(split["position"][i])]
            assert qa[f"is there a {c0} {k0}?"] == "yes"


def test_shapes_captions_use_train_and_heldout_templates():
    d = shapes()

    def pattern(template):
        return (
            re.escape(template)
            .replace(r"\{colour\}", r"\w+")
            .replace(r"\{kind\}", r"\w+")
            .replace(r"\{where\}", r"(?:in|at|on) the [a-z ]+?")
        )

    for split, key in ((d.train, "templates"), (d.test, "heldout_templates")):
        alternatives = "|".join(pattern(t) for t in d.meta[key])
        one = f"(?:{alternatives})"
        for caption in split["caption"]:
            assert re.fullmatch(f"{one}(?: and {one})?", caption), caption


def test_shapes_registered():
    d = load_dataset("shapes", train_size=4, test_size=2)
    assert d.name == "shapes" and len(d.train) == 4


# --- folder -----------------------------------------------------------------------------


def _write_folder(root, rows, sizes=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for row in rows:
        path = root / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = (sizes or {}).get(row["path"], (12, 12))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n=6, labels=True):
    return [
        {"path": f"img/{i}.png", "caption": f"picture {i}", **({"label": "cat" if i % 2 else "dog"} if labels else {})}
        for i in range(n)
    ]


def test_folder_loads_with_string_labels(tmp_path):
    _write_folder(tmp_path, _rows())
    d = load_folder(tmp_path, seed=0)
    assert len(d.train) + len(d.test) == 6 and len(d.test) == 1
    assert d.meta["class_names"] == ["cat", "dog"] and d.meta["num_classes"] == 2
    assert d.meta["image_size"] == 12 and d.meta["channels"] == 3
    for split in (d.train, d.test):
        assert split["image"].shape[1:] == (3, 12, 12) and split["image"].dtype == torch.float32
        assert 0 <= split["image"].min() and split["image"].max() <= 1
        for path, caption, label in zip(split["path"], split["caption"], split["label"].tolist()):
            i = int(path.split("/")[1].split(".")[0])
            assert caption == f"picture {i}" and label == (0 if i % 2 else 1)
    assert load_folder(tmp_path, seed=0).fingerprint() == d.fingerprint()
    assert sorted(d.train["path"] + d.test["path"]) == sorted(r["path"] for r in _rows())
    other = [load_folder(tmp_path, seed=s).test["path"] for s in range(8)]
    assert len(set(map(tuple, other))) > 1  # the seed picks the split


def test_folder_pixels_match_the_file(tmp_path):
    from PIL import Image

    _write_folder(tmp_path, _rows(2, labels=False))
    d = load_folder(tmp_path, test_fraction=0)
    assert len(d.test) == 0 and "label" not in d.train and d.meta["num_classes"] == 0
    for img, path in zip(d.train["image"], d.train["path"]):
        expected = np.asarray(Image.open(tmp_path / path).convert("RGB"), dtype=np.float32) / 255
        np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), expected)


def test_folder_int_labels_split_field_resize_grey_and_boxes(tmp_path):
    rows = [
        {
            "path": f"{i}.png",
            "caption": f"c{i}",
            "label": i % 3,
            "split": "test" if i < 2 else "train",
            "boxes": [[0, 0, 20, 10, 7]],
        }
        for i in range(5)
    ]
    _write_folder(tmp_path, rows, sizes={"0.png": (20, 10)})
    d = load_folder(tmp_path, channels=1)
    assert sorted(d.test["path"]) == ["0.png", "1.png"] and len(d.train) == 3
    assert d.meta["num_classes"] == 3 and d.meta["image_size"] == 12  # the most common size
    assert d.train["image"].shape[1:] == (1, 12, 12) and d.test["image"].shape[1:] == (1, 12, 12)
    box = d.test["boxes"][d.test["path"].index("0.png")][0]
    assert box == (0, 0, 12, 12, 7)  # scaled with the 20×10 image to 12×12
    d8 = load_folder(tmp_path, image_size=8)
    assert d8.train["image"].shape[1:] == (3, 8, 8)


def test_load_dataset_dispatches_a_directory(tmp_path):
    _write_folder(tmp_path, _rows(4))
    d = load_dataset(str(tmp_path), seed=1)
    assert d.name == "folder" and len(d.train) + len(d.test) == 4


@pytest.mark.parametrize(
    "case",
    [
        "no_captions",
        "bad_json",
        "not_object",
        "no_path",
        "no_caption",
        "missing_file",
        "unreadable",
        "escapes",
        "absolute",
        "mixed_labels",
        "bad_label",
        "bad_split",
        "bad_boxes",
    ],
)
def test_folder_bad_input_names_file_and_line(tmp_path, case):
    root = tmp_path / "data"
    root.mkdir()
    _write_folder(root, _rows(3))
    (tmp_path / "outside.png").write_bytes((root / "img/0.png").read_bytes())
    lines = (root / "captions.jsonl").read_text().splitlines()
    bad = {
        "bad_json": '{"path": "img/1.png", "caption": ',
        "not_object": '["img/1.png", "x"]',
        "no_path": '{"caption": "x", "label": "cat"}',
        "no_caption": '{"path": "img/1.png", "label": "cat"}',
        "missing_file": '{"path": "img/nope.png", "caption": "x", "label": "cat"}',
        "unreadable": '{"path": "broken.png", "caption": "x", "label": "cat"}',
        "escapes": '{"path": "../outside.png", "caption": "x", "label": "cat"}',
        "absolute": json.dumps({"path": str(tmp_path / "outside.png"), "caption": "x", "label": "cat"}),
        "mixed_labels": '{"path": "img/1.png", "caption": "x"}',
        "bad_label": '{"path": "img/1.png", "caption": "x", "label": 1.5}',
        "bad_split": '{"path": "img/1.png", "caption": "x", "label": "cat", "split": "val"}',
        "bad_boxes": '{"path": "img/1.png", "caption": "x", "label": "cat", "boxes": [[1, 2]]}',
    }
    (root / "broken.png").write_bytes(b"not an image at all")
    if case == "no_captions":
        (root / "captions.jsonl").unlink()
        with pytest.raises(ValueError, match="captions.jsonl"):
            load_folder(root)
        return
    if case == "bad_label":  # int labels elsewhere, so the float is what is wrong
        lines = [json.dumps({**json.loads(x), "label": 0}) for x in lines]
    lines[1] = bad[case]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"captions\.jsonl:2\b"):
        load_folder(root)


def test_folder_needs_a_root_and_valid_options(tmp_path):
    with pytest.raises(ValueError, match="needs root"):
        load_folder()
    _write_folder(tmp_path, _rows(2))
    for bad in (dict(channels=2), dict(test_fraction=1.0), dict(image_size=0)):
        with pytest.raises(ValueError):
            load_folder(tmp_path, **bad)
    (tmp_path / "captions.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no entries"):
        load_folder(tmp_path)


# --- text -------------------------------------------------------------------------------


def test_text_sentences_name_exactly_their_digit():
    from polymodal.data.text import corpus

    d = load_dataset("text")
    assert len(d.train) + len(d.test) == len(corpus())
    for split in (d.train, d.test):
        assert split["label"].dtype == torch.long
        for sentence, label in zip(split["text"], split["label"].tolist()):
            named = words(sentence) & set(DIGIT_WORDS)
            assert named == {DIGIT_WORDS[label]}, sentence
            assert not re.search(r"\d", sentence), sentence


def test_text_split_is_by_wording_and_fixed():
    def wording(s: str) -> str:
        return re.sub(r"\b({})\b".format("|".join(DIGIT_WORDS)), "#", s)

    a, b = load_dataset("text"), load_dataset("text", seed=1)
    train, test = {wording(s) for s in a.train["text"]}, {wording(s) for s in a.test["text"]}
    assert train.isdisjoint(test) and len(test) > 0
    assert sorted(a.test["text"]) == sorted(b.test["text"])
    assert a.train["text"] != b.train["text"]  # seed shuffles only the order
    assert torch.bincount(a.test["label"], minlength=10).min() > 0


def test_text_rejects_a_folder():
    with pytest.raises(ValueError, match="takes no folder"):
        load_dataset("text", root="/tmp")
