"""A folder dataset that decodes its images on demand: resident memory does not grow with the folder.

:func:`polymodal.data.folder.load_lazy_folder` (what ``load_folder(..., lazy=True)`` returns, and what a folder of more than
``POLYMODAL_LAZY_ABOVE`` images loads as) reads ``captions.jsonl`` and only the *header* of every
image (size and mode: no pixel is decoded), so it knows ``image_size``, ``channels`` and the splits
exactly as the eager folder does. Each split is a :class:`LazyFolderSplit`: its captions, paths and
labels are kept packed (one bytes buffer each, so DataLoader workers forked from the trainer do not
copy them page by page); an image is decoded with the eager folder's own preparation
(:func:`prepare_image`, which :func:`polymodal.data.folder.load_folder` uses too) when a batch asks for it.

For training, :meth:`LazyFolderSplit.loader` is a ``torch.utils.data.DataLoader`` over a batch
sampler that yields this rank's part of every global batch of
:func:`polymodal.data.sampling.global_batches` from ``start_step``: the same samples, in the same
order and bit for bit the same tensors as the eager split's ``batch`` gives, decoded and collated in
``workers`` worker processes (pinned memory, prefetch, persistent workers).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polymodal.data.base import Batch, Split
from polymodal.data.images import open_image
from polymodal.data.sampling import global_batches, local_indices


class PackedStrings:
    """A list of strings held as one UTF-8 buffer and offsets (two numpy arrays, no Python objects per
    item), so forked DataLoader workers share it instead of copying it as reference counts change."""

    def __init__(self, items: list[str]) -> None:
        encoded = [s.encode("utf-8") for s in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)  # (N + 1,)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)  # (total bytes,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def tolist(self) -> list[str]:
        """Every string, as a list."""
        return [self[i] for i in range(len(self))]


def prepare_image(img: Any, mode: str, image_size: int) -> np.ndarray:
    """A Pillow image as the folder dataset holds it: converted to ``mode`` ('L' or 'RGB'), resized
    (bilinear) to ``image_size`` square when it is not already, float32 in [0, 1], ``(C, S, S)`` C-contiguous
    (a strided channels-last view would be stacked as one, and a convolution may round differently on it)."""
    from PIL import Image

    img = img.convert(mode)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (S, S) or (S, S, 3)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))  # (C, S, S)


class FolderReader(torch.utils.data.Dataset):
    """The samples of one split of a folder, decoded on demand (a map-style torch ``Dataset``).

    ``reader.sample(i)`` is one sample's fields; ``reader[(step, i)]`` is ``(step, sample)``, the key a
    :class:`RankBatchSampler` yields so the collate function knows the global step.
    """

    def __init__(
        self,
        root: Path,
        paths: list[str],
        captions: list[str],
        labels: list[int] | None,
        boxes: list[list[tuple]] | None,
        mode: str,
        image_size: int,
    ) -> None:
        self.root = str(root)
        self.paths, self.captions = PackedStrings(paths), PackedStrings(captions)
        self.labels = torch.tensor(labels, dtype=torch.long) if labels is not None else None  # (N,)
        self.boxes, self.mode, self.image_size = boxes, mode, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Tensor:
        """Sample ``i``'s image, ``(C, S, S)`` float32 in [0, 1], prepared exactly as the eager folder does."""
        rel = self.paths[i]
        img = open_image(Path(self.root) / rel, where=f"{Path(self.root).name}/captions.jsonl ({rel})")
        return torch.from_numpy(prepare_image(img, self.mode, self.image_size))  # (C, S, S)

    def sample(self, i: int, image: Tensor | None = None) -> dict[str, Any]:
        """Sample ``i``'s fields in the eager split's order: image, caption, path, [label], [boxes]."""
        out: dict[str, Any] = {
            "image": self.image(i) if image is None else image,
            "caption": self.captions[i],
            "path": self.paths[i],
        }
        if self.labels is not None:
            out["label"] = self.labels[i]
        if self.boxes is not None:
            out["boxes"] = self.boxes[i]
        return out

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, dict[str, Any]]:
        step, i = key
        return step, self.sample(i)


def stack_samples(samples: list[dict[str, Any]], source: str = "") -> Batch:
    """Samples (dicts of one sample's fields) as a :class:`Batch`: tensors stacked on a new first
    dimension, everything else as a list."""
    out: dict[str, Any] = {}
    for name, first in samples[0].items():
        values = [s[name] for s in samples]
        out[name] = torch.stack(values) if isinstance(first, Tensor) else values  # (B, ...)
    return Batch(out, source)


def batch_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global generator while a worker collates global step ``step`` for ``rank``:
    the randomness of a family's collate then depends on neither the number of workers nor which of
    them took the batch (so a resumed run draws the same numbers)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class BatchCollate:
    """The DataLoader's ``collate_fn``: ``[(step, sample), ...]`` → a :class:`Batch`, then the family's
    ``collate(batch, step)``. In a worker, torch's global generator is first seeded by :func:`batch_seed`;
    in the training process (``workers=0``) it is left alone, so random draws come in the same order as
    on the in-memory path."""

    def __init__(self, source: str, collate: Callable | None, seed: int, rank: int) -> None:
        self.source, self.collate, self.seed, self.rank = source, collate, seed, rank

    def __call__(self, items: list[tuple[int, dict[str, Any]]]) -> Batch:
        step = items[0][0]
        batch = stack_samples([sample for _, sample in items], self.source)
        if self.collate is None:
            return batch
        if torch.utils.data.get_worker_info() is not None:
            torch.manual_seed(batch_seed(self.seed, step, self.rank))
        return self.collate(batch, step)


class RankBatchSampler:
    """Batch sampler: for each global step from ``start_step``, this rank's indices of the global batch of
    :func:`~polymodal.data.sampling.global_batches`, as ``(step, index)`` keys (forever)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, start_step: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start_step = rank, world, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        steps = global_batches(self.n, self.batch_size, self.seed, self.start_step)
        for step, index in enumerate(steps, self.start_step):
            yield [(step, i) for i in local_indices(index, self.rank, self.world).tolist()]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's and numpy's generators from the seed torch gave this worker, and
    freeze the objects the worker inherited out of its garbage collector (``gc.freeze``), so collecting
    does not write to, and so copy, every page of the forked training process."""
    import gc

    gc.freeze()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def check_local_batch(batch_size: int, world: int, what: str) -> int:
    """``batch_size // world``, or a ValueError naming both when the global batch does not split evenly."""
    if batch_size < 1 or world < 1 or batch_size % world:
        raise ValueError(
            f"{what}: the global batch_size {batch_size} must be a positive multiple of the world size {world}"
        )
    return batch_size // world


class LazyFolderSplit(Split):
    """One split of a lazy folder: :class:`~polymodal.data.base.Split`'s interface, images decoded on demand.

    ``split.batch(index)`` decodes only those samples; ``split["caption"]`` (and path, label, boxes) come
    from memory; ``split["image"]`` decodes the whole split, and keeps it when ``keep_images`` (the test
    split, which evaluation reads repeatedly) but not for the train split. :meth:`loader` streams training
    batches.
    """

    def __init__(self, reader: FolderReader, source: str = "", keep_images: bool = False) -> None:
        self.reader, self.source, self.keep_images = reader, source, keep_images
        self._images: Tensor | None = None

    @property
    def fields(self) -> Mapping[str, Any]:
        """The split's fields by name; ``"image"`` is decoded when read."""
        return LazyFields(self)

    def names(self) -> list[str]:
        """The field names, in the eager split's order."""
        extra = (["label"] if self.reader.labels is not None else []) + (["boxes"] if self.reader.boxes else [])
        return ["image", "caption", "path", *extra]

    def field(self, name: str) -> Any:
        """The whole field ``name`` (KeyError when the split has none)."""
        r = self.reader
        if name == "image":
            if self._images is not None:
                return self._images
            images = torch.stack([r.image(i) for i in range(len(r))])  # (N, C, S, S)
            if self.keep_images:
                self._images = images
            return images
        if name == "label" and r.labels is not None:
            return r.labels
        if name == "boxes" and r.boxes is not None:
            return r.boxes
        if name in ("caption", "path"):
            return (r.captions if name == "caption" else r.paths).tolist()
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.reader)

    def batch(self, index: Tensor | list[int]) -> Batch:
        """The samples at ``index`` as a :class:`Batch` (only their images are decoded)."""
        index = torch.as_tensor(index, dtype=torch.long).tolist()
        images = self._images
        return stack_samples([self.reader.sample(i, None if images is None else images[i]) for i in index], self.source)

    def fingerprint(self) -> str:
        """A short hash of the split's captions, paths, labels, boxes, preparation and each file's size
        and modification time (no pixel is decoded)."""
        h, r = hashlib.sha256(), self.reader
        h.update(repr((r.mode, r.image_size, r.boxes)).encode())
        for packed in (r.paths, r.captions):
            h.update(packed.buffer.tobytes() + packed.offsets.tobytes())
        if r.labels is not None:
            h.update(r.labels.numpy().tobytes())
        for i in range(len(r)):
            st = os.stat(Path(r.root) / r.paths[i])
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
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
        """Training batches forever: for each global step from ``start_step``, this rank's
        ``batch_size // world`` samples of the global batch (``min(batch_size, len(self))`` when the split
        is smaller, as the in-memory trainer does), collated into a :class:`Batch` and passed through the
        family's ``collate(batch, step)``, in ``workers`` DataLoader processes (0: in this process),
        each keeping ``prefetch`` batches ready, with pinned memory when ``pin_memory``."""
        size = min(batch_size, len(self))
        check_local_batch(size, world, f"folder {self.source or ''}".strip())
        workers = int(workers)
        loader = torch.utils.data.DataLoader(
            self.reader,
            batch_sampler=RankBatchSampler(len(self), size, seed, rank, world, start_step),
            collate_fn=BatchCollate(self.source, collate, seed, rank),
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch if workers > 0 else None,
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed),  # never the global generator: it stays as it was
        )
        return iter(loader)


class LazyFields(Mapping):
    """The mapping behind a lazy split's ``fields`` (``split.names()`` without decoding, ``split.field(name)``
    on access): :attr:`LazyFolderSplit.fields`, :attr:`polymodal.data.shards.ShardSplit.fields`."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __getitem__(self, name: str) -> Any:
        return self.split.field(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.split.names())

    def __len__(self) -> int:
        return len(self.split.names())

    def __contains__(self, name: object) -> bool:
        return name in self.split.names()


__all__ = [
    "BatchCollate",
    "FolderReader",
    "LazyFields",
    "LazyFolderSplit",
    "PackedStrings",
    "RankBatchSampler",
    "batch_seed",
    "check_local_batch",
    "prepare_image",
    "seed_worker",
    "stack_samples",
]
