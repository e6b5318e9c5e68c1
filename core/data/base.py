"""In-memory datasets: a :class:`Split` holds tensors and lists of equal length by field name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class MissingFieldError(KeyError):
    """A field a model reads is not in the dataset: names the dataset, the field and the fields it has.

    A ``KeyError`` (``args[0]`` is the field) whose ``str()`` is the whole message, not the quoted key,
    so ``Error: dataset 'text' has no field 'image'; …`` reaches the command line.
    """

    def __init__(self, field: str, fields: list[str], source: str = "") -> None:
        super().__init__(field)
        self.field, self.fields, self.source = field, list(fields), source

    def __str__(self) -> str:
        where = f"dataset {self.source!r}" if self.source else "the dataset"
        return (
            f"{where} has no field {self.field!r}; its fields: {', '.join(self.fields) or 'none'} "
            f"(is it the data this model is made for?)"
        )


class Batch(dict):
    """A batch of samples by field name (a ``dict``); a missing field raises :class:`MissingFieldError`.

    ``index`` (B,) holds the rows of the in-memory split the samples came from (:meth:`Split.batch`), or None
    where that is unknown (streamed data): a model may key per-sample caches of frozen features by it, and must
    still check that the rows it looks up are the batch's.
    """

    def __init__(self, fields: dict[str, Any], source: str = "", index: Tensor | None = None) -> None:
        super().__init__(fields)
        self.source = source
        self.index = index

    def __missing__(self, name: str) -> Any:
        raise MissingFieldError(name, list(self), self.source)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A new batch with every tensor on ``device`` (lists unchanged), from the same dataset."""
        index = self.index
        return Batch(
            {k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in self.items()},
            self.source,
            None if index is None else index.to(device, non_blocking=non_blocking),
        )


class Split:
    """One split of a dataset: named fields, each a tensor (first dim = sample) or a list.

    ``source`` names the dataset in errors (a :class:`Dataset` sets it on its splits).
    """

    def __init__(self, fields: dict[str, Any], source: str = "") -> None:
        lengths = {k: len(v) for k, v in fields.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"every field of a split must have the same length; got {lengths}")
        self.fields = dict(fields)
        self.source = source

    def __len__(self) -> int:
        return len(next(iter(self.fields.values()))) if self.fields else 0

    def __getitem__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise MissingFieldError(name, list(self.fields), self.source) from None

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def batch(self, index: Tensor | list[int]) -> Batch:
        """The samples at ``index`` as a :class:`Batch` of batched tensors and lists."""
        index = torch.as_tensor(index, dtype=torch.long)
        out: dict[str, Any] = {}
        for k, v in self.fields.items():
            out[k] = v[index] if isinstance(v, Tensor) else [v[i] for i in index.tolist()]
        return Batch(out, self.source, index)

    def subset(self, index: Tensor | list[int]) -> Split:
        """A new split with only the samples at ``index``."""
        return Split(self.batch(index), self.source)

    def fingerprint(self) -> str:
        """A short hash of the split's contents (for caches keyed by data)."""
        h = hashlib.sha256()
        for k in sorted(self.fields):
            v = self.fields[k]
            h.update(k.encode())
            if isinstance(v, Tensor):
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(v).encode())
        return h.hexdigest()[:16]


@dataclass
class Dataset:
    """A named dataset with a train and a test split and what models need to know about it.

    ``meta`` carries family-relevant facts: ``num_classes``, ``class_names``,
    ``image_size``, ``channels``, caption ``templates`` and ``heldout_templates``.
    """

    name: str
    train: Split
    test: Split
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in (self.train, self.test):
            if isinstance(part, Split) and not part.source:
                part.source = self.name

    def split(self, name: str) -> Split:
        """``"train"`` or ``"test"``."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {name!r}")
        return self.train if name == "train" else self.test

    def fingerprint(self) -> str:
        """A short hash of both splits."""
        return hashlib.sha256((self.train.fingerprint() + self.test.fingerprint()).encode()).hexdigest()[:16]
