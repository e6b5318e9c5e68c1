"""In-memory datasets: a :class:`Split` holds tensors and lists of equal length by field name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class Split:
    """One split of a dataset: named fields, each a tensor (first dim = sample) or a list."""

    def __init__(self, fields: dict[str, Any]) -> None:
        lengths = {k: len(v) for k, v in fields.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"every field of a split must have the same length; got {lengths}")
        self.fields = dict(fields)

    def __len__(self) -> int:
        return len(next(iter(self.fields.values()))) if self.fields else 0

    def __getitem__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise KeyError(f"split has no field {name!r}; fields: {', '.join(self.fields)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def batch(self, index: Tensor | list[int]) -> dict[str, Any]:
        """The samples at ``index`` as a dict of batched tensors and lists."""
        index = torch.as_tensor(index, dtype=torch.long)
        out: dict[str, Any] = {}
        for k, v in self.fields.items():
            out[k] = v[index] if isinstance(v, Tensor) else [v[i] for i in index.tolist()]
        return out

    def subset(self, index: Tensor | list[int]) -> Split:
        """A new split with only the samples at ``index``."""
        return Split(self.batch(index))

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

    def split(self, name: str) -> Split:
        """``"train"`` or ``"test"``."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {name!r}")
        return self.train if name == "train" else self.test

    def fingerprint(self) -> str:
        """A short hash of both splits."""
        return hashlib.sha256((self.train.fingerprint() + self.test.fingerprint()).encode()).hexdigest()[:16]
