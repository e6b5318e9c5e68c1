"""Tar shards (WebDataset layout): `polymodal shards` writes a folder as shards that read back the same
samples; the streamed train split is split over ranks and workers, seeded, resumable; never unpickles."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from polymodal.cli import main
from polymodal.cli.shards import write_shards
from polymodal.data import load_dataset, load_folder
from polymodal.data.shards import ShardSplit, load_shards


def _folder(root, n=45, boxes=True):
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        s = 8 + i % 3  # three sizes: resized to the most common, as the folder does
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        row = {"path": f"img/{i}.png", "caption": f"image {i}", "label": f"c{i % 3}"}
        if boxes and i % 2:
            row["boxes"] = [[1, 2, 5, 6, "tag"]]
        lines.append(json.dumps(row))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def shards(tmp_path):
    """A 45-image folder (36 train, 9 test) written as shards of 4: 9 train shards, 3 test shards."""
    folder = _folder(tmp_path / "folder")
    meta = write_shards(folder, tmp_path / "shards", 4)
    return folder, tmp_path / "shards", meta


def _by_path(batches):
    out = {}
    for b in batches:
        for j, path in enumerate(b["path"]):
            out[path] = {k: (v[j] if isinstance(v, (torch.Tensor, list)) else v) for k, v in b.items()}
    return out


def _same_sample(got, want):
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


def test_folder_to_shards_round_trip_gives_the_same_samples(shards):
    folder, out, meta = shards
    assert [e["count"] for e in meta["train"]] == [4] * 9 and [e["count"] for e in meta["test"]] == [4, 4, 1]
    eager = load_folder(folder)
    data = load_dataset(f"{out}/{{00000..00008}}.tar")
    assert data.name == "shards" and isinstance(data.train, ShardSplit) and len(data.train) == 36
    for key in ("image_size", "channels", "num_classes", "class_names"):
        assert data.meta[key] == eager.meta[key], key
    assert list(data.test.fields) == list(eager.test.fields)
    for name in eager.test.fields:  # the test split, in the folder's order
        want, got = eager.test[name], data.test[name]
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want, name
    # one epoch of the train split (36 = 9 batches of 4): every train sample once, the same tensors
    got = _by_path(next(it) for it in [data.train.loader(batch_size=4, seed=0)] for _ in range(9))
    want = _by_path([eager.train.batch(list(range(len(eager.train))))])
    assert sorted(got) == sorted(want)
    for path in want:
        _same_sample(got[path], want[path])


def test_two_ranks_with_two_workers_read_disjoint_samples_covering_the_epoch(shards):
    folder, out, _ = shards
    data = load_dataset(f"{out}/*[0-9].tar")  # a glob: the 9 train shards (test-*.tar are meta.json's test)
    assert len(data.train) == 36 and len(data.test) == 9
    train_paths = set(load_folder(folder).train["path"])
    # Epoch 0: rank r reads shards order[r::2] (5 and 4 of the 9), its worker w order[r::2][w::2]: rank 0's
    # workers 3 and 2 shards, rank 1's 2 and 2. Global batch 8 = 4 per rank; the DataLoader alternates the
    # workers, so rank 0's epoch is its first 5 batches (3 + 2), rank 1's its first 4 (2 + 2).
    for workers, steps in ((2, (5, 4)), (0, (5, 4))):
        seen = []
        for rank in range(2):
            it = data.train.loader(batch_size=8, seed=3, rank=rank, world=2, workers=workers)
            batches = [next(it) for _ in range(steps[rank])]
            assert all(len(b["path"]) == 4 for b in batches)
            seen += [p for b in batches for p in b["path"]]
        assert len(seen) == 36 and set(seen) == train_paths, workers  # disjoint, and the whole epoch


def test_the_stream_is_seeded_and_resumes_at_a_step(shards):
    _, out, _ = shards
    data = load_shards(f"{out}/{{00000..00008}}.tar")
    for workers in (0, 2):
        full = data.train.loader(batch_size=6, seed=1, workers=workers)
        paths = [next(full)["path"] for _ in range(9)]  # past one epoch (36 / 6 = 6 steps)
        again = data.train.loader(batch_size=6, seed=1, workers=workers)
        assert [next(again)["path"] for _ in range(9)] == paths
        resumed = data.train.loader(batch_size=6, seed=1, workers=workers, start_step=4)
        assert [next(resumed)["path"] for _ in range(5)] == paths[4:]
    other = data.train.loader(batch_size=6, seed=2)
    assert [next(other)["path"] for _ in range(3)] != paths[:3]


class _Step:
    def __call__(self, batch, step):
        batch["step"] = step
        batch["pid"] = os.getpid()
        return batch


def test_collate_runs_in_the_workers(shards):
    data = load_shards(f"{shards[1]}/{{00000..00008}}.tar")
    it = data.train.loader(batch_size=4, seed=0, workers=2, start_step=5, collate=_Step())
    got = [next(it) for _ in range(4)]
    assert [b["step"] for b in got] == [5, 6, 7, 8] and all(b["pid"] != os.getpid() for b in got)


def test_streamed_split_reads_in_shard_order_for_evaluation_and_refuses_bad_batches(shards):
    folder, out, _ = shards
    data, eager = load_shards(f"{out}/{{00000..00008}}.tar"), load_folder(folder)
    assert "label" in data.train and "boxes" in data.train and "mask" not in data.train
    assert list(data.train.fields) == list(eager.train.fields)
    # shard order is the folder's train order: ascending batches stream, other indices re-read from the start
    for index in ([0, 1, 2, 3, 4], [5, 6, 7, 8], list(range(9, 36)), [30, 2, 5], [], [7]):
        _same_batch = data.train.batch(index), eager.train.batch(index)
        for name in eager.train.fields:
            got, want = _same_batch[0][name], _same_batch[1][name]
            assert torch.equal(got, want) if isinstance(want, torch.Tensor) else list(got) == list(want), name
    assert torch.equal(data.train["label"], eager.train["label"])
    with pytest.raises(ValueError, match=r"sample indices must be in \[0, 36\)"):
        data.train.batch([36])
    with pytest.raises(KeyError, match="has no field 'mask'"):
        data.train["mask"]
    with pytest.raises(ValueError, match="global batch_size 6 must be a positive multiple of the world size 4"):
        data.train.loader(batch_size=6, seed=0, world=4)
    with pytest.raises(ValueError, match="9 train shards cannot be split over 4 ranks × 3 workers"):
        data.train.loader(batch_size=8, seed=0, world=4, workers=3)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def _jpeg(rng, size=12):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_open_clip_style_shards_without_meta_json(tmp_path):
    """jpg + txt + cls per sample, no meta.json: size from the first image, labels and counts from one pass
    over the member names, the last shard held out as the test split; .pyd members are never unpickled."""
    rng, marker = np.random.default_rng(1), tmp_path / "unpickled"
    for s in range(3):
        members = []
        for k in range(5):
            key = f"s{s}k{k}"
            members += [(f"{key}.jpg", _jpeg(rng)), (f"{key}.txt", f"photo {s} {k}".encode()),
                        (f"{key}.cls", str((s + k) % 4).encode()), (f"{key}.pyd", pickle.dumps(_Evil(str(marker))))]  # fmt: skip
        _tar(tmp_path / f"part-{s}.tar", members)
    data = load_dataset(str(tmp_path / "part-{0..2}.tar"))
    assert (len(data.train), len(data.test)) == (10, 5)
    assert data.meta["image_size"] == 12 and data.meta["channels"] == 3 and data.meta["num_classes"] == 4
    assert data.test["caption"] == [f"photo 2 {k}" for k in range(5)]
    assert data.test["label"].tolist() == [(2 + k) % 4 for k in range(5)]
    assert data.test["image"].shape == (5, 3, 12, 12)
    batch = next(data.train.loader(batch_size=4, seed=0))
    assert set(batch) == {"image", "caption", "path", "label"} and batch["image"].shape == (4, 3, 12, 12)
    assert not marker.exists()


def test_bad_shards_are_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    _tar(tmp_path / "a.tar", [("x.jpg", _jpeg(rng)), ("x.txt", b"a caption")])
    with pytest.raises(ValueError, match="one shard and no test shards"):
        load_dataset(str(tmp_path / "a.tar"))
    with pytest.raises(ValueError, match="'.*missing.tar' does not exist"):
        load_dataset(str(tmp_path / "{a,missing}.tar"))
    with pytest.raises(ValueError, match="matches no file"):
        load_dataset(str(tmp_path / "nothing-*.tar"))
    _tar(tmp_path / "b.tar", [("y.jpg", _jpeg(rng)), ("z.jpg", _jpeg(rng)), ("z.txt", b"z")])
    data = load_dataset(str(tmp_path / "{b,a}.tar"))  # b trains, a is the test shard
    with pytest.raises(ValueError, match=r"b.tar: sample 'y' needs an image .* and a .txt caption; has \['jpg'\]"):
        next(data.train.loader(batch_size=1, seed=0))


def test_polymodal_shards_command_writes_shards_and_train_reads_them(tmp_path):
    folder = _folder(tmp_path / "folder", n=20, boxes=False)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["shards", str(folder), str(out), "--size", "8"])
    assert result.exit_code == 0, result.output
    assert "wrote 16 train samples in 2 shards and 4 test samples in 1 shards" in result.output
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "meta.json", "test-00000.tar"]
    again = runner.invoke(main, ["shards", str(folder), str(out), "--size", "8"])
    assert again.exit_code != 0 and "already holds shards" in again.output
    assert runner.invoke(main, ["shards", str(folder), str(out), "--size", "4", "--overwrite"]).exit_code == 0
    assert sorted(os.listdir(out))[:4] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused = runner.invoke(main, ["shards", str(folder), str(tmp_path / "other"), "--overwrite"])
    assert refused.exit_code != 0 and "holds other files (notes.txt)" in refused.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    run = tmp_path / "run"
    trained = runner.invoke(
        main,
        [
            "train",
            "vit",
            "--data",
            f"{out}/{{00000..00003}}.tar",
            "--steps",
            "3",
            "--out",
            str(run),
            "--no-progress",
            "--set",
            "encoder.depth=1",
        ],  # fmt: skip
    )
    assert trained.exit_code == 0, trained.output
    assert "data: shards" in trained.output and "samples: 4" in trained.output
    assert (run / "model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_streamed_batches(shards):
    data = load_shards(f"{shards[1]}/{{00000..00008}}.tar")
    batch = next(data.train.loader(batch_size=4, seed=0, workers=2, pin_memory=True))
    assert batch["image"].is_pinned() and type(batch).__name__ == "Batch"
