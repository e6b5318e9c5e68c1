"""Tar shards in the WebDataset layout (what open_clip users already have), streamed with ``webdataset``.

A shard is a ``.tar`` whose members are grouped into samples by key (the file name up to its first
dot): ``KEY.png`` (or ``.jpg``, ``.webp`` …: the image), ``KEY.txt`` (the caption), optionally
``KEY.cls`` (an int class index) and ``KEY.json`` (``{"path": …, "boxes": […]}``). Nothing else in a
shard is read, and nothing is ever unpickled.

``load_dataset("shards/{00000..00009}.tar")`` (brace expansion, a glob such as ``"shards/*.tar"``, or
one ``.tar``; local files only) gives a :class:`~polymodal.data.base.Dataset` named ``"shards"``:

* ``meta`` from ``meta.json`` beside the shards (``polymodal shards`` writes it: image size, channels,
  class names, sample counts, test shards), or a ``classes.txt`` there, or else from the first
  sample (its size and mode) and one counting pass over the shards' member names;
* the train split is a :class:`ShardSplit` (streamed: ``split.loader(...)``), whose length is the sample
  count from ``meta.json`` or, without one, counted once when the dataset is opened;
* the test split is held in memory, decoded when first read: the shards of ``test=PATTERN`` when given,
  else the test shards ``meta.json`` names (``test-00000.tar`` …), else the **last** shard of the
  pattern, held out of training.

Images are prepared as the folder dataset prepares them (:func:`polymodal.data.lazy.prepare_image`:
mode, bilinear resize to the square ``image_size``, float32 in [0, 1]; boxes scaled alike), so a
folder written to shards with :func:`polymodal.cli.shards.write_shards` (``polymodal shards``) reads back the
same tensors.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from polymodal.data.base import Batch, Dataset, MissingFieldError, Split
from polymodal.data.folder import GREY_MODES, _boxes
from polymodal.data.images import pixel_limit
from polymodal.data.lazy import (
    BatchCollate,
    LazyFields,
    batch_seed,
    check_local_batch,
    prepare_image,
    seed_worker,
    stack_samples,
)
from polymodal.data.sampling import EPOCH_SEED

META = "meta.json"
CLASSES = "classes.txt"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
"""Member suffixes read as the sample's image (the first one a sample has)."""
WANTED = frozenset((*IMAGE_EXTS, "txt", "cls", "json"))
"""Every member suffix a reader opens; others (``.pyd``, ``.pickle`` …) are skipped unread."""
SHARD_NAME = re.compile(r"^(test-)?\d{5,}\.tar$")


def is_shard_pattern(name: str) -> bool:
    """Whether ``name`` names tar shards: it ends in ``.tar`` (after brace expansion or a glob)."""
    return isinstance(name, str) and (name.endswith(".tar") or name.endswith(".tar}"))


def expand_shards(pattern: str) -> list[str]:
    """The shard files ``pattern`` names, as absolute paths in the pattern's order: braces expanded
    (``{00000..00009}``), then each part globbed (``*``, ``?``, ``[…]``; sorted). A part that names no
    existing file is a ValueError naming it."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for part in braceexpand(pattern):
        if glob.has_magic(part):
            found = sorted(glob.glob(part))
            if not found:
                raise ValueError(f"shards {pattern!r}: {part!r} matches no file")
            urls += found
        elif not os.path.isfile(part):
            raise ValueError(f"shards {pattern!r}: {part!r} does not exist (expected a .tar shard)")
        else:
            urls.append(part)
    return [str(Path(u).resolve()) for u in urls]


def _suffix(fname: str) -> str:
    """A member's suffix as webdataset groups it: everything after the first dot of its base name."""
    base = fname.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower() if "." in base else ""


def wanted(fname: str) -> bool:
    """``select_files`` for webdataset: only images, captions, labels and JSON are read."""
    return _suffix(fname) in WANTED


def decode_image(data: bytes, where: str) -> Any:
    """A fully read Pillow image from bytes, refused over the pixel limit before decoding (as
    :func:`~polymodal.data.images.open_image` refuses a file)."""
    import warnings

    from PIL import Image

    limit = pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if limit is not None and img.size[0] * img.size[1] > limit:
            raise ValueError(f"{where}: image is {img.size[0]}×{img.size[1]} pixels; the limit is {limit}")
        img.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: cannot read the image ({exc})") from None
    return img


def _image_key(raw: dict[str, Any]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in raw), None)


class ShardFormat:
    """How samples are decoded: the image ``mode`` ('L' or 'RGB') and square ``image_size``, whether
    samples carry labels (``num_classes`` > 0 bounds them) and boxes."""

    def __init__(self, mode: str, image_size: int, num_classes: int, with_boxes: bool) -> None:
        self.mode, self.image_size, self.num_classes, self.with_boxes = mode, image_size, num_classes, with_boxes

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One raw webdataset sample (bytes by suffix) → its fields: image ``(C, S, S)``, caption, path,
        [label], [boxes]; a missing image or caption, or a bad label, is a ValueError naming the shard and key."""
        where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')!r}"
        ext = _image_key(raw)
        if ext is None or "txt" not in raw:
            has = sorted(k for k in raw if not k.startswith("__"))
            raise ValueError(f"{where} needs an image ({', '.join(IMAGE_EXTS[:3])} …) and a .txt caption; has {has}")
        img = decode_image(raw[ext], where)
        extra = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
        if not isinstance(extra, dict):
            raise ValueError(f"{where}: .json must hold an object; got {type(extra).__name__}")
        out: dict[str, Any] = {
            "image": torch.from_numpy(prepare_image(img, self.mode, self.image_size)),  # (C, S, S)
            "caption": raw["txt"].decode("utf-8"),
            "path": str(extra.get("path", raw["__key__"])),
        }
        if self.num_classes:
            text = raw.get("cls", b"").decode("utf-8").strip()
            if not re.fullmatch(r"\d+", text) or int(text) >= self.num_classes:
                raise ValueError(f"{where}: .cls must be a class index 0 … {self.num_classes - 1}; got {text!r}")
            out["label"] = torch.tensor(int(text), dtype=torch.long)
        if self.with_boxes:
            scale = (self.image_size / img.size[0], self.image_size / img.size[1])
            out["boxes"] = _boxes(extra["boxes"], scale, where) if "boxes" in extra else []
        return out

    def empty(self) -> dict[str, Any]:
        """The fields of no samples: ``(0, C, S, S)`` images, ``(0,)`` labels, empty lists."""
        c, s = (1 if self.mode == "L" else 3), self.image_size
        out = {"image": torch.zeros(0, c, s, s), "caption": [], "path": []}  # (0, C, S, S)
        return (
            out
            | ({"label": torch.zeros(0, dtype=torch.long)} if self.num_classes else {})
            | ({"boxes": []} if self.with_boxes else {})
        )

    def names(self) -> list[str]:
        """The fields a decoded sample has."""
        return ["image", "caption", "path"] + ["label"] * bool(self.num_classes) + ["boxes"] * self.with_boxes


def raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """The raw samples of ``urls`` in order, read with webdataset: only :data:`WANTED` members (webdataset
    before ``select_files`` reads the others' bytes too, and they are dropped here, never decoded)."""
    import inspect

    import webdataset as wds

    select = "select_files" in inspect.signature(wds.tariterators.tarfile_samples).parameters
    stage = wds.tarfile_to_samples(select_files=wanted) if select else wds.tarfile_to_samples()
    for raw in stage(iter([{"url": u} for u in urls])):
        yield {k: v for k, v in raw.items() if k.startswith("__") or k in WANTED}


class ShardStream(torch.utils.data.IterableDataset):
    """The batches one rank reads: whole shards split over ranks and DataLoader workers, a seeded
    shuffle buffer, decoded and collated in the worker.

    Global step ``s`` is read by stream slot ``s % nw`` (``nw = max(workers, 1)``) as that slot's
    ``s // nw``-th batch, so the batch of a step is a pure function of (seed, step, rank, world, workers)
    and a resumed loader (``start_step``) skips the earlier batches' raw bytes without decoding them.
    In epoch ``e`` the shards are shuffled by ``(seed, e)`` and slot ``k`` of rank ``r`` reads
    ``order[r::world][k::nw]`` (webdataset's ``split_by_node`` then ``split_by_worker``), through a
    ``bufsize`` shuffle buffer seeded by ``(seed, e, r, k)``.
    """

    def __init__(self, split: ShardSplit, b: int, seed: int, rank: int, world: int, start_step: int,
                 workers: int, collate: Callable | None) -> None:  # fmt: skip
        self.urls, self.fmt, self.bufsize = split.urls, split.fmt, split.bufsize
        self.b, self.seed, self.rank, self.world, self.start_step = b, seed, rank, world, start_step
        self.nw = max(workers, 1)
        self.collate = BatchCollate(split.source, collate, seed, rank)

    def raw(self, slot: int) -> Iterator[dict[str, Any]]:
        """Slot ``slot``'s raw samples, epoch after epoch (forever)."""
        import webdataset as wds

        epoch = 0
        while True:
            order = list(range(len(self.urls)))
            random.Random(self.seed * EPOCH_SEED + epoch).shuffle(order)
            mine = [self.urls[i] for i in order[self.rank :: self.world][slot :: self.nw]]
            rng = random.Random(batch_seed(self.seed, epoch, self.rank * self.nw + slot))
            empty = True
            for sample in wds.shuffle(self.bufsize, min(100, self.bufsize), rng=rng)(raw_samples(mine)):
                empty = False
                yield sample
            if empty:  # would loop forever
                raise ValueError(f"shards {', '.join(mine)} hold no samples (rank {self.rank}, reader {slot})")
            epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        first = self.start_step + (info.id if info is not None else 0)
        raw = self.raw(first % self.nw)
        for _ in range(first // self.nw * self.b):  # the batches of earlier steps: read, not decoded
            next(raw)
        step = first
        while True:
            samples = [self.fmt.decode(next(raw)) for _ in range(self.b)]
            yield self.collate([(step, s) for s in samples])
            step += self.nw


class ShardSplit:
    """The streamed train split of tar shards (the ``StreamingSplit`` protocol): ``len()`` samples (from
    ``meta.json`` or counted once), :meth:`loader` for training.

    For evaluation it also reads like a :class:`~polymodal.data.base.Split`, in shard order (sample ``i``
    is the ``i``-th of the train shards): ``split.batch(index)`` decodes the samples asked for, reading on
    from the last batch when ``index`` starts after it (a pass in ascending batches reads each shard once)
    and from the first shard otherwise; ``split[field]`` reads the whole split (all images decoded)."""

    def __init__(self, urls: list[str], count: int, fmt: ShardFormat, source: str, bufsize: int = 1000) -> None:
        self.urls, self.count, self.fmt, self.source, self.bufsize = urls, count, fmt, source, bufsize
        self._cursor: Iterator[dict[str, Any]] | None = None
        self._next = 0  # the index of the sample the cursor reads next

    def __len__(self) -> int:
        return self.count

    def __contains__(self, name: str) -> bool:
        return name in self.fmt.names()

    @property
    def fields(self) -> Mapping[str, Any]:
        """The split's fields by name (a field is read whole, in shard order, when its value is asked for)."""
        return LazyFields(self)

    def names(self) -> list[str]:
        """The field names of a decoded sample."""
        return self.fmt.names()

    def field(self, name: str) -> Any:
        """The whole field ``name`` (every train sample read, in shard order)."""
        return self.batch(list(range(self.count)))[name]

    def __getitem__(self, name: str) -> Any:
        if name not in self:
            raise MissingFieldError(name, self.fmt.names(), self.source)
        return self.field(name)

    def batch(self, index: Any) -> Batch:
        """The samples at ``index`` (shard order) as a :class:`Batch`; only they are decoded."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        if any(not 0 <= i < self.count for i in idx):
            raise ValueError(f"shards {self.source!r}: sample indices must be in [0, {self.count}); got {idx[:8]}")
        want, found = set(idx), {}
        if self._cursor is None or (want and min(want) < self._next):
            self._cursor, self._next = raw_samples(self.urls), 0
        while len(found) < len(want):
            raw = next(self._cursor, None)
            if raw is None:
                raise ValueError(
                    f"shards {self.source!r}: the train shards hold {self._next} samples, not {self.count}"
                )
            if self._next in want:
                found[self._next] = self.fmt.decode(raw)
            self._next += 1
        if not idx:
            return Batch(self.fmt.empty(), self.source)
        return stack_samples([found[i] for i in idx], self.source)

    def fingerprint(self) -> str:
        """A short hash of the shard paths, sizes and modification times."""
        h = hashlib.sha256()
        for url in self.urls:
            st = os.stat(url)
            h.update(f"{url}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def loader(
        self,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        workers: int = 0,
        collate: Callable | None = None,
        pin_memory: bool = False,
        prefetch: int = 2,
    ) -> Iterator[Batch]:
        """Training batches forever: for each global step from ``start_step``, ``batch_size // world``
        samples for this rank (see :class:`ShardStream` for which), decoded and collated (the family's
        ``collate(batch, step)``) in ``workers`` DataLoader processes (0: in this process). Every rank and
        worker reads whole shards, so there must be at least ``world * max(workers, 1)`` of them."""
        b = check_local_batch(batch_size, world, f"shards {self.source!r}")
        slots = world * max(int(workers), 1)
        if len(self.urls) < slots:
            raise ValueError(
                f"shards {self.source!r}: {len(self.urls)} train shards cannot be split over {world} ranks × "
                f"{max(int(workers), 1)} workers ({slots} readers, each reading whole shards); write smaller "
                f"shards (polymodal shards --size) or use fewer workers"
            )
        stream = ShardStream(self, b, seed, rank, world, start_step, int(workers), collate)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            collate_fn=_as_is,  # the stream yields whole batches (the default would turn tuples into lists)
            num_workers=int(workers),
            pin_memory=pin_memory,
            prefetch_factor=prefetch if workers > 0 else None,
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed),  # never the global generator
        )
        return iter(loader)


def _as_is(batch: Batch) -> Batch:
    """The DataLoader's ``collate_fn`` for :class:`ShardStream`, whose items are batches already."""
    return batch


class ShardTestSplit(Split):
    """An in-memory split of tar shards, decoded in order when a field or batch is first read."""

    def __init__(self, urls: list[str], fmt: ShardFormat, source: str) -> None:
        self.urls, self.fmt, self.source = urls, fmt, source
        self._fields: dict[str, Any] | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The split's fields (the shards are decoded on first access)."""
        if self._fields is None:
            samples = [self.fmt.decode(raw) for raw in raw_samples(self.urls)]
            self._fields = dict(stack_samples(samples)) if samples else self.fmt.empty()
        return self._fields


def read_meta(folder: Path) -> dict[str, Any] | None:
    """``folder/meta.json`` (what ``polymodal shards`` writes), or None without one."""
    file = folder / META
    if not file.is_file():
        return None
    meta = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def count_samples(url: str) -> tuple[int, int]:
    """``(samples, largest .cls label + 1)`` of one shard from its member names (and its small .cls
    members): a sample is a key with an image."""
    keys, top = set(), 0
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isreg():
                continue
            found = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member.name)  # webdataset's key and suffix
            if found is None:
                continue
            key, suffix = found[1], found[2].lower()
            if suffix in IMAGE_EXTS:
                keys.add(key)
            elif suffix == "cls":
                text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                top = max(top, int(text) + 1) if text.isdigit() else top
    return len(keys), top


def load_shards(
    pattern: str,
    *,
    test: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    bufsize: int = 1000,
) -> Dataset:
    """The tar shards ``pattern`` names as a :class:`Dataset` (see the module docstring).

    ``test`` is a pattern of test shards (default: ``meta.json``'s, else the pattern's last shard);
    ``image_size`` and ``channels`` override the stored ones; ``bufsize`` is the shuffle buffer (samples).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    if not isinstance(bufsize, int) or bufsize < 1:
        raise ValueError(f"bufsize must be a whole number ≥ 1; got {bufsize!r}")
    urls = expand_shards(pattern)
    folder = Path(urls[0]).parent
    meta = read_meta(folder) or {}
    listed = {str((folder / e["name"]).resolve()): e["count"] for e in meta.get("train", []) + meta.get("test", [])}
    if test is not None:
        test_urls = expand_shards(test)
    elif meta.get("test"):
        test_urls = [str((folder / e["name"]).resolve()) for e in meta["test"]]
    elif len(urls) >= 2:
        test_urls = urls[-1:]
    else:
        raise ValueError(
            f"shards {pattern!r}: one shard and no test shards; give two or more (the last is the test split), "
            f"test='PATTERN', or write them with `polymodal shards`, which writes test-*.tar and {META}"
        )
    train_urls = [u for u in urls if u not in set(test_urls)]
    if not train_urls:
        raise ValueError(f"shards {pattern!r}: every shard is a test shard; no train shards left")
    counts = {u: listed[u] for u in train_urls if u in listed}
    top = 0
    for u in train_urls:
        if u not in counts:
            counts[u], k = count_samples(u)
            top = max(top, k)
    names = meta.get("class_names")
    if names is None and (folder / CLASSES).is_file():
        names = [line.strip() for line in (folder / CLASSES).read_text(encoding="utf-8").splitlines() if line.strip()]
    if names is None:
        names = [str(i) for i in range(top)]
    first = None
    if "image_size" not in meta or "channels" not in meta:
        first = next(iter(raw_samples(train_urls[:1])), None)
        if first is None or _image_key(first) is None:
            raise ValueError(f"shards {pattern!r}: the first shard {train_urls[0]} holds no image sample")
        img = decode_image(first[_image_key(first)], f"{train_urls[0]}: sample {first['__key__']!r}")
    size = image_size or meta.get("image_size") or max(img.size)
    channels = channels or meta.get("channels") or (1 if img.mode in GREY_MODES else 3)
    with_boxes = meta.get("with_boxes", first is not None and b'"boxes"' in first.get("json", b""))
    fmt = ShardFormat("L" if channels == 1 else "RGB", int(size), len(names), bool(with_boxes))
    data_meta = {
        "num_classes": len(names),
        "class_names": list(names),
        "image_size": int(size),
        "channels": int(channels),
        "templates": [],
        "heldout_templates": [],
        "root": pattern,
        "shards": {"train": train_urls, "test": test_urls},
    }
    train = ShardSplit(train_urls, sum(counts.values()), fmt, "shards", bufsize)
    return Dataset("shards", train, ShardTestSplit(test_urls, fmt, "shards"), data_meta)
