"""The lazy folder dataset and the sampling order: the same batches as the eager folder, bit for bit,
split over ranks, decoded in DataLoader workers, with resident memory that does not grow with the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data import load_dataset, load_folder
from polymodal.data.base import Split
from polymodal.data.lazy import LazyFolderSplit, PackedStrings
from polymodal.data.sampling import global_batches, local_indices


def _reference_batches(n, batch_size, seed, start_step=0):
    """``polymodal.train.trainer.batches`` as it was before the sampling order moved to the data layer."""
    per_epoch = max(n // batch_size, 1)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield order[offset * batch_size : (offset + 1) * batch_size]
        step += 1


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("n,batch_size,seed,start", [(40, 8, 0, 0), (37, 5, 3, 11), (10, 16, 1, 2), (100, 7, 42, 0)])
def test_global_batches_equal_the_trainers_order(n, batch_size, seed, start):
    from polymodal.train.trainer import batches

    want = _take(_reference_batches(n, batch_size, seed, start), 30)
    for got in (_take(global_batches(n, batch_size, seed, start), 30), _take(batches(n, batch_size, seed, start), 30)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_local_indices_split_the_global_batch_over_ranks():
    index = next(global_batches(50, 12, 0))
    for world in (1, 2, 3, 4, 6):
        parts = [local_indices(index, r, world) for r in range(world)]
        assert all(len(p) == 12 // world for p in parts)
        assert torch.equal(torch.cat(parts), index)
    with pytest.raises(ValueError, match="12 samples does not split over 5 ranks"):
        local_indices(index, 0, 5)
    with pytest.raises(ValueError, match="rank must be in"):
        local_indices(index, 2, 2)


def _folder(root, n, *, grey=False, boxes=False, vary=False, size=8, seed=0):
    """A captions.jsonl folder of ``n`` random PNGs (labels c0…c2; sizes size…size+2 when ``vary``)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        s = size + (i % 3 if vary else 0)
        pixels = rng.integers(0, 256, (s, s) if grey else (s, s, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        row = {"path": f"img/{i}.png", "caption": f"image {i}", "label": f"c{i % 3}"}
        if boxes:
            row["boxes"] = [[1, 2, 5, 6, "tag"]]
        if i == 0:
            row["split"] = "test"
        lines.append(json.dumps(row))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _assert_same_batch(got, want):
    assert list(got) == list(want)
    for name in want:
        if isinstance(want[name], torch.Tensor):
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
        else:
            assert got[name] == want[name], name


@pytest.mark.parametrize("kind", ["rgb-boxes-mixed-sizes", "grey"])
def test_lazy_folder_gives_the_eager_batches_bit_for_bit_over_ranks_and_workers(tmp_path, kind):
    root = _folder(tmp_path, 45, grey=kind == "grey", boxes=kind != "grey", vary=kind != "grey")
    eager, lazy = load_folder(root, seed=1), load_folder(root, seed=1, lazy=True)
    assert isinstance(lazy.train, LazyFolderSplit) and isinstance(eager.train, Split)
    assert lazy.meta == eager.meta and len(lazy.train) == len(eager.train) == 35
    for start, workers in ((0, 0), (0, 2), (5, 1)):
        order = global_batches(len(eager.train), 8, 7, start)
        ranks = [lazy.train.loader(batch_size=8, seed=7, rank=r, world=2, start_step=start, workers=workers)
                 for r in range(2)]  # fmt: skip
        for _ in range(7):  # past the end of the first epoch (4 batches of 8)
            want = eager.train.batch(next(order))
            parts = [next(it) for it in ranks]
            assert all(len(p["caption"]) == 4 for p in parts)
            joined = {k: torch.cat([p[k] for p in parts]) if isinstance(want[k], torch.Tensor)
                      else parts[0][k] + parts[1][k] for k in want}  # fmt: skip
            _assert_same_batch(joined, want)


def test_lazy_split_keeps_the_split_interface(tmp_path):
    root = _folder(tmp_path, 30, boxes=True)
    eager, lazy = load_folder(root), load_folder(root, lazy=True)
    for name in ("train", "test"):
        e, z = eager.split(name), lazy.split(name)
        assert len(z) == len(e) and list(z.fields) == list(e.fields)
        assert "label" in z and "boxes" in z and "mask" not in z
        for field in e.fields:
            want = e[field]
            assert torch.equal(z[field], want) if isinstance(want, torch.Tensor) else z[field] == want
        _assert_same_batch(z.batch([2, 0, 1]), e.batch([2, 0, 1]))
        _assert_same_batch(z.subset([1, 2]).batch([0, 1]), e.subset([1, 2]).batch([0, 1]))
        with pytest.raises(KeyError, match="has no field 'mask'"):
            z["mask"]
    assert lazy.test._images is not None and lazy.train._images is None  # only the test split keeps its pixels
    assert lazy.fingerprint() == load_folder(root, lazy=True).fingerprint()


def test_folders_above_the_threshold_load_lazily(tmp_path, monkeypatch):
    root = _folder(tmp_path, 12)
    monkeypatch.setenv("POLYMODAL_LAZY_ABOVE", "11")
    assert isinstance(load_dataset(str(root)).train, LazyFolderSplit)
    assert isinstance(load_dataset(f"folder:{root}").train, LazyFolderSplit)
    assert not isinstance(load_dataset(str(root), lazy=False).train, LazyFolderSplit)
    monkeypatch.setenv("POLYMODAL_LAZY_ABOVE", "12")
    assert not isinstance(load_dataset(str(root)).train, LazyFolderSplit)
    monkeypatch.delenv("POLYMODAL_LAZY_ABOVE")
    assert not isinstance(load_dataset(str(root)).train, LazyFolderSplit)  # default 2,000
    assert isinstance(load_folder(root, lazy=True).train, LazyFolderSplit)
    monkeypatch.setenv("POLYMODAL_LAZY_ABOVE", "many")
    with pytest.raises(ValueError, match="POLYMODAL_LAZY_ABOVE must be a whole number"):
        load_folder(root)


def test_lazy_folder_refuses_bad_images_at_open_time_naming_the_line(tmp_path):
    root = _folder(tmp_path, 5)
    (root / "img" / "3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"captions.jsonl:4: cannot read image '3.png'"):
        load_folder(root, lazy=True)
    (root / "img" / "3.png").unlink()
    with pytest.raises(ValueError, match=r"captions.jsonl:4: image 'img/3.png' does not exist"):
        load_folder(root, lazy=True)


def test_lazy_loader_refuses_a_batch_that_does_not_split(tmp_path):
    lazy = load_folder(_folder(tmp_path, 20), lazy=True)
    with pytest.raises(ValueError, match="batch_size 9 must be a positive multiple of the world size 2"):
        lazy.train.loader(batch_size=9, seed=0, world=2)


class _Tag:
    """A family collate: records the step, the process and a random draw (picklable, as the trainer needs)."""

    def __call__(self, batch, step):
        batch["step"] = step
        batch["pid"] = os.getpid()
        batch["draw"] = torch.rand(2)
        return batch


def test_collate_runs_in_the_workers_with_the_step_and_worker_independent_randomness(tmp_path):
    lazy = load_folder(_folder(tmp_path, 30), lazy=True)
    runs = {}
    for workers in (0, 1, 2):
        torch.manual_seed(123)
        before = torch.get_rng_state()
        it = lazy.train.loader(batch_size=4, seed=2, start_step=3, workers=workers, collate=_Tag())
        got = _take(it, 5)
        assert [b["step"] for b in got] == [3, 4, 5, 6, 7]
        assert all((b["pid"] == os.getpid()) == (workers == 0) for b in got)
        if workers:  # the training process's generator is untouched: workers draw from their own
            assert torch.equal(torch.get_rng_state(), before)
        runs[workers] = torch.stack([b["draw"] for b in got])
    assert torch.equal(runs[1], runs[2])  # a batch's draws depend on (seed, step, rank), not on the workers
    assert not torch.equal(runs[1][0], runs[1][1])


def test_workers_zero_draws_like_the_in_memory_path(tmp_path):
    """With workers=0 the collate runs in the training process, drawing from the global generator in
    the same order as the in-memory path does; the loader itself draws nothing from it."""
    eager, lazy = load_folder(_folder(tmp_path, 30)), load_folder(_folder(tmp_path, 30), lazy=True)
    torch.manual_seed(5)
    it = lazy.train.loader(batch_size=4, seed=0, collate=_Tag())
    got = [next(it)["draw"] for _ in range(3)]
    torch.manual_seed(5)
    order = global_batches(len(eager.train), 4, 0)
    want = [_Tag()(eager.train.batch(next(order)), s)["draw"] for s in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_packed_strings_round_trip():
    items = ["", "a", "ünïcode ✓", "x" * 1000, "line\nbreak"]
    packed = PackedStrings(items)
    assert len(packed) == 5 and packed.tolist() == items and packed[2] == items[2]


_MEASURE = """
import json, sys, time
from polymodal.data import load_dataset

def rss():  # resident memory of this process, kB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))

def anonymous(pid):  # anonymous pages a worker maps (its heap, and what it shares with its parent), kB
    return next(int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup") if l.startswith("Anonymous:"))

def private(pid):  # pages a worker owns (what forking it and its own work added), kB
    return sum(int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup") if l.startswith("Private_"))

root, kind, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = rss()
t0 = time.perf_counter()
data = load_dataset(root, image_size=32, lazy=kind == "lazy")
out = {"open_s": time.perf_counter() - t0, "open_mb": (rss() - start) / 1e3, "lazy": type(data.train).__name__}
if kind == "lazy":
    it = data.train.loader(batch_size=64, seed=0, workers=workers)
    epoch = len(data.train) // 64
    for _ in range(epoch):  # one epoch, then measure the next three
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    # A worker's growth is its anonymous memory's: what it allocates. Not its Private_ total, which also rises
    # when the training process copies a page they shared on write (that is the training process's growth,
    # growth_mb), nor its resident set, which rises when it first runs a page of a shared library's code.
    # Growth is the smallest reading after each of the next three epochs less the reading before them: a leak
    # is in every reading, while the allocator's high-water mark jumps now and then by ~20 MB and falls back.
    base, wbase, t0 = rss(), [anonymous(p) for p in pids], time.perf_counter()
    seen, readings = 0, []
    for _ in range(3):
        seen += sum(len(next(it)["caption"]) for _ in range(epoch))
        readings.append((rss(), [anonymous(p) for p in pids]))
    out |= {"samples": seen, "stream_s": (time.perf_counter() - t0) / 3,
            "growth_mb": (min(r for r, _ in readings) - base) / 1e3,
            "worker_mb": [private(p) / 1e3 for p in pids],
            "worker_growth_mb": [(min(w[i] for _, w in readings) - k) / 1e3 for i, k in enumerate(wbase)]}
out["rss_mb"] = rss() / 1e3
print(json.dumps(out))
"""


def _measure(root, kind, workers=0):
    """Run :data:`_MEASURE` in a fresh process (its memory is the run's alone) and return its numbers."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(root), kind, str(workers)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads /proc (Linux)")
def test_lazy_folder_memory_does_not_grow_with_the_folder(tmp_path):
    """20,000 8×8 PNGs read at 32×32: the eager folder holds 20,000 × 3×32×32 float32 = 245.8 MB of images
    (and its process grows by more); the lazy one opens with a few MB of metadata and streams epoch after
    epoch without growing, in the training process and in its DataLoader workers. Each run is a fresh process."""
    n = 20_000
    root = tmp_path / "big"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"path": f"img/{i}.png", "caption": f"picture number {i}", "label": i % 10}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    images_mb = n * 3 * 32 * 32 * 4 / 1e6
    eager = _measure(root, "eager")
    lazy = {w: _measure(root, "lazy", w) for w in (0, 2)}
    print(f"\neager: {eager}\nlazy, workers=0: {lazy[0]}\nlazy, workers=2: {lazy[2]}")
    assert eager["lazy"] == "Split" and eager["open_mb"] > images_mb
    for w, run in lazy.items():
        assert run["lazy"] == "LazyFolderSplit" and run["samples"] == 3 * 16_000  # three epochs of 16,000
        assert run["open_mb"] < 0.2 * images_mb, run  # metadata, no pixels
        assert run["growth_mb"] < 0.05 * images_mb, run  # streaming an epoch: flat
        assert run["rss_mb"] < eager["rss_mb"] - images_mb, run
        assert len(run["worker_mb"]) == w
        # A worker owns the pages of the training process it wrote to (copy-on-write) and its own: 16-65 MB
        # seen here, less than the eager images, and flat from one epoch to the next.
        assert all(m < 0.5 * images_mb for m in run["worker_mb"]), run
        assert all(g < 0.05 * images_mb for g in run["worker_growth_mb"]), run


@pytest.mark.parametrize(
    "name,overrides,workers",
    [
        ("vit", {"encoder.depth": 1}, 0),
        ("vit", {"encoder.depth": 1}, 2),
        ("clip", {"vision.depth": 1, "text.depth": 1}, 0),
    ],
)
def test_training_on_a_lazy_folder_reaches_the_eager_weights(tmp_path, monkeypatch, name, overrides, workers):
    """The trainer streams a lazy folder through its loader (CLIP's collate in the loader): the same
    weights, bit for bit, as training on the same folder loaded eagerly."""
    import polymodal

    root = _folder(tmp_path, 30)
    weights = []
    for above in ("100000", "0"):
        monkeypatch.setenv("POLYMODAL_LAZY_ABOVE", above)
        assert isinstance(load_dataset(str(root)).train, LazyFolderSplit) == (above == "0")
        model, _ = polymodal.train(
            name, data=str(root), steps=3, progress=False, train_set={"batch_size": 8, "workers": workers}, **overrides
        )
        weights.append(model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


_TWO_RANKS = """
import datetime, json, os, sys
import torch, torch.distributed as dist
import polymodal
from polymodal.data import load_dataset

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
root, result = sys.argv[1], sys.argv[2]
weights, lazy = [], []
for above, workers in (("100000", 0), ("0", 1)):
    os.environ["POLYMODAL_LAZY_ABOVE"] = above
    lazy.append(type(load_dataset(root).train).__name__)
    model, _ = polymodal.train("vit", data=root, steps=3, progress=False,
                               train_set={"batch_size": 8, "workers": workers}, **{"encoder.depth": 1})
    weights.append(model.state_dict())
same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
if dist.get_rank() == 0:
    json.dump({"same": same, "splits": lazy, "world": dist.get_world_size()}, open(result, "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_train_the_same_on_a_lazy_folder_as_on_the_eager_one(tmp_path):
    """Under torchrun (2 gloo ranks), each rank's loader reads its half of every global batch: a lazy
    folder read in a worker process trains to exactly the weights the in-memory folder gives."""
    import socket
    import subprocess
    import sys

    root = _folder(tmp_path / "data", 30)
    script, result = tmp_path / "two.py", tmp_path / "result.json"
    script.write_text(_TWO_RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", POLYMODAL_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(script), str(root), str(result)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got == {"same": True, "splits": ["Split", "LazyFolderSplit"], "world": 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_the_batches(tmp_path):
    lazy = load_folder(_folder(tmp_path, 20), lazy=True)
    for workers in (0, 2):
        batch = next(lazy.train.loader(batch_size=4, seed=0, workers=workers, pin_memory=True))
        assert batch["image"].is_pinned() and batch["label"].is_pinned() and type(batch).__name__ == "Batch"
