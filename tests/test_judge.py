"""The judge shared by every generative family: Fréchet distance, caching, scoring, bad input."""

from __future__ import annotations

import pytest
import torch
from scipy import linalg

import polymodal.eval.judge as J
from polymodal.data.base import Dataset, Split


def _reference_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula with scipy's general matrix square root."""
    a, b = a.double().numpy(), b.double().numpy()
    import numpy as np

    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    return float(mu @ mu + np.trace(ca + cb - 2 * root))


def test_frechet_distance_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g)
    b = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    assert J.frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-6)
    assert J.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert J.frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-9)  # only the means moved
    with pytest.raises(ValueError, match=r"\(N, F\) and \(M, F\) with N, M >= 2; got \(400, 6\) and \(3, 5\)"):
        J.frechet_distance(a, torch.randn(3, 5))


def _toy(n: int = 256) -> Dataset:
    """Two classes a CNN separates at once: bright top half vs bright bottom half (8×8 grey)."""
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 2, (n,), generator=g)
    images = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    images[label == 0, :, :4] += 0.8
    images[label == 1, :, 4:] += 0.8
    split = Split({"image": images, "label": label})
    return Dataset("toy", split, split.subset(list(range(64))), {"num_classes": 2})


def test_judge_trains_caches_and_scores(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr(J, "TRAIN_STEPS", 60)
    monkeypatch.setattr(J, "_MEMORY", {})
    data = _toy()
    with torch.no_grad():  # as from a family's evaluate: training the judge still works
        judge = J.get_judge(data)
    assert judge.attributes == ("label",) and judge.test_accuracy["label"] == 1.0
    folder = J.judge_folder(data)
    assert (folder / "judge.safetensors").is_file() and str(folder).startswith(str(tmp_path))
    monkeypatch.setattr(J, "_MEMORY", {})
    monkeypatch.setattr(J, "_train", lambda *a, **k: pytest.fail("a cached judge must not retrain"))
    again = J.get_judge(data)
    x = data.test["image"]
    assert torch.equal(again.predict(x)["label"], judge.predict(x)["label"])
    labels = data.test["label"]
    right = J.judge_samples(data, x, {"label": labels})
    wrong = J.judge_samples(data, x, {"label": 1 - labels})
    assert right["sample_accuracy"] == 1.0 and wrong["sample_accuracy"] == 0.0
    assert right["fd_judge"] == pytest.approx(0.0, abs=1e-6)  # the test images themselves
    noise = J.judge_samples(data, torch.rand(64, 1, 8, 8), {"label": labels})
    assert noise["fd_judge"] > 1.0
    with pytest.raises(ValueError, match=r"judge reads images \(N, 1, 8, 8\); got \(2, 3, 8, 8\)"):
        again.predict(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="targets must give label"):
        J.judge_samples(data, x, {"colour": labels})


def test_datasets_with_the_same_judged_images_and_labels_share_one_judge(tmp_path, monkeypatch):
    """The cache is keyed by what the judge reads (shapes-multilingual reuses shapes' judge): another name or
    another caption field shares the folder; another label or image does not."""
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    base = _toy()
    images, label = base.train["image"], base.train["label"]

    def named(name, images=images, label=label, **extra):
        split = Split({"image": images, "label": label, **extra})
        return Dataset(name, split, split.subset(list(range(64))), {"num_classes": 2})

    folder = J.judge_folder(base)
    assert J.judge_folder(named("toy-captioned", caption=["a picture"] * len(label))) == folder
    relabelled = label.clone()
    relabelled[0] = 1 - relabelled[0]
    assert J.judge_folder(named("toy", label=relabelled)) != folder
    moved = images.clone()
    moved[0, 0, 0, 0] += 0.5
    assert J.judge_folder(named("toy", images=moved)) != folder


def test_judge_needs_labels():
    split = Split({"image": torch.rand(4, 1, 8, 8)})
    with pytest.raises(ValueError, match="needs a dataset with 'image' and 'label' fields; 'bare' has image"):
        J.get_judge(Dataset("bare", split, split, {}))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_the_embedded_judges_are_accurate(name):
    from polymodal.data import load_dataset

    judge = J.get_judge(load_dataset(name))  # trained once per machine, cached by the data's hash
    assert min(judge.test_accuracy.values()) >= 0.97, judge.test_accuracy


def test_a_dataset_declares_what_its_judge_reads():
    # No dataset-name special case: any dataset may name attributes and a subset in meta["judge"].
    g = torch.Generator().manual_seed(2)
    n = 40
    split = Split(
        {
            "image": torch.rand(n, 3, 8, 8, generator=g),
            "colour": torch.randint(0, 3, (n,), generator=g),
            "count": torch.arange(n) % 2 + 1,
        }
    )
    data = Dataset("anything", split, split, {"judge": {"attributes": {"colour": 3}, "where": ["count", 1]}})
    images, targets = J._targets(data, "train")
    assert list(targets) == ["colour"] and len(images) == n // 2
    assert torch.equal(targets["colour"], split["colour"][split["count"] == 1])
    assert J._num_classes(data, "colour") == 3
    with pytest.raises(ValueError, match=r"'image' and 'label' fields; 'plain' has image"):
        J._targets(Dataset("plain", Split({"image": split["image"]}), split, {}), "train")


def test_shapes_are_judged_on_colour_and_kind_of_one_object_scenes():
    from polymodal.data import load_shapes

    shapes = load_shapes()
    images, targets = J._targets(shapes, "test")
    single = shapes.test["count"] == 1
    assert set(targets) == {"colour", "kind"} and len(images) == int(single.sum())
    assert J._num_classes(shapes, "colour") == len(shapes.meta["colours"])
    assert J._num_classes(shapes, "kind") == len(shapes.meta["kinds"])
