"""The judge: one independent image classifier per dataset that scores every generative family.

A small CNN (deliberately not one of the transformer families it judges) is trained on the
dataset's training split and cached by what it reads (:func:`judge_folder`), so DALL·E, RuDolph and
diffusion samples are scored by the same function and their numbers sit in one table.

Attributes judged: what the dataset declares in ``meta["judge"]`` (shapes: ``colour`` and ``kind``,
trained and tested on one-object scenes, where the attribute is unambiguous), else ``label``.
:func:`judge_samples` reports the share of samples the judge reads as the prompted
attributes and ``fd_judge``, the Fréchet distance between the judge's penultimate features
of the samples and of the test images (FID's recipe with a judge trained on the same data).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from polymodal.data.augment import random_translate
from polymodal.io import atomic_write
from polymodal.io.cache import announce, cache_root, entry_lock
from polymodal.nn import eval_mode

VERSION = "judge/1"
"""Bumped when the judge's architecture or recipe changes (part of the cache key)."""


def _targets(dataset: Any, split: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Images (N, C, H, W) and the attributes the judge learns on ``split``.

    A dataset says what its judge reads through ``meta["judge"]``: ``{"attributes": {name: classes},
    "where": (field, value)}`` (shapes: colour and kind, on one-object scenes). Without it the judge
    reads ``label``.
    """
    data = dataset.split(split)
    spec = dataset.meta.get("judge") or {}
    attributes = list(spec.get("attributes") or ["label"])
    missing = [f for f in ["image", *attributes] if f not in data]
    if missing:
        raise ValueError(
            f"the judge needs a dataset with 'image' and {', '.join(map(repr, attributes))} fields; "
            f"{dataset.name!r} has {', '.join(data.fields)}"
        )
    keep = torch.ones(len(data), dtype=torch.bool)  # (N,)
    if spec.get("where"):
        field, value = spec["where"]
        keep = data[field] == value  # (N,) e.g. one-object scenes, where colour and kind are the scene's
    return data["image"][keep], {a: data[a][keep] for a in attributes}


def _num_classes(dataset: Any, attribute: str) -> int:
    """Classes of ``attribute``: from ``meta["judge"]``, else ``meta["num_classes"]`` or the largest label + 1."""
    declared = (dataset.meta.get("judge") or {}).get("attributes") or {}
    if attribute in declared:
        return int(declared[attribute])
    return int(dataset.meta.get("num_classes") or int(dataset.train[attribute].max()) + 1)


class Judge(nn.Module):
    """A CNN with one linear head per attribute; ``features`` are the pooled penultimate activations."""

    def __init__(self, channels: int, image_size: int, classes: dict[str, int], width: int = 64) -> None:
        super().__init__()
        self.channels, self.image_size, self.classes = channels, image_size, dict(classes)
        self.attributes: tuple[str, ...] = tuple(classes)
        down = 2 if image_size > 8 else 1  # 32×32 scenes: halve twice, so the judge trains in seconds
        self.body = nn.Sequential(
            nn.Conv2d(channels, width // 2, 3, padding=1, stride=down),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, stride=down),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(4 * width, n) for a, n in classes.items()})
        self.test_accuracy: dict[str, float] = {}

    def _check(self, images: Tensor) -> None:
        """Raise a ValueError unless ``images`` is (N, C, S, S) at the judged size."""
        want = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"the judge reads images (N, {want[0]}, {want[1]}, {want[2]}); got {got}")

    def features(self, images: Tensor) -> Tensor:
        """(N, F) features: average- and max-pooled last conv activations."""
        self._check(images)
        h = self.body(images.float())  # (N, 2W, S', S')
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # (N, 4W)

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        """Per attribute, logits (N, classes)."""
        f = self.features(images)  # (N, F)
        return {a: head(f) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Per attribute, the predicted class (N,) of each image in [0, 1]."""
        with eval_mode(self):
            return {
                a: torch.cat([self.logits(chunk)[a].argmax(-1) for chunk in images.split(512)]) for a in self.attributes
            }

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """(N, F) features in eval mode, batched."""
        self.eval()
        return torch.cat([self.features(chunk) for chunk in images.split(512)])


TRAIN_STEPS = 1500
"""Optimiser steps of the judge's recipe (batch 128, AdamW, one-cycle lr 2e-3, ±S/16 pixel shifts)."""


def _train(dataset: Any, steps: int | None = None, batch_size: int = 128, seed: int = 0) -> Judge:
    """Fit a judge on the training split (deterministic for a given seed)."""
    steps = steps or TRAIN_STEPS
    images, targets = _targets(dataset, "train")
    classes = {a: _num_classes(dataset, a) for a in targets}
    with torch.random.fork_rng(), torch.enable_grad():  # callers' evaluate runs under no_grad
        torch.manual_seed(seed)
        judge = Judge(images.shape[1], images.shape[-1], classes)
        opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
        shift = max(1, images.shape[-1] // 16)
        for _ in range(steps):
            idx = torch.randint(len(images), (batch_size,))
            x = random_translate(images[idx], shift)  # (B, C, S, S) small shifts: robust to placement
            logits = judge.logits(x)
            loss = sum(F.cross_entropy(logits[a], targets[a][idx]) for a in targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    test_images, test_targets = _targets(dataset, "test")
    pred = judge.predict(test_images)
    judge.test_accuracy = {a: (pred[a] == test_targets[a]).float().mean().item() for a in test_targets}
    return judge.eval()


_MEMORY: dict[str, Judge] = {}


def judge_folder(dataset: Any) -> Path:
    """Where the judge of ``dataset`` is cached: ``$POLYMODAL_CACHE/judge/<attributes>-<hash>``, the hash of the
    recipe and of exactly what the judge learns from and is tested on (both splits' judged images and their
    attribute targets, the classes), so datasets that share those share one judge — ``shapes`` and
    ``shapes-multilingual`` hold the same scenes under other captions — and any change to them trains anew."""
    key = hashlib.sha256(f"{VERSION}:{TRAIN_STEPS}".encode())
    for split in ("train", "test"):
        images, targets = _targets(dataset, split)
        key.update(images.detach().cpu().contiguous().numpy().tobytes())
        for attribute in sorted(targets):
            key.update(attribute.encode())
            key.update(targets[attribute].detach().cpu().contiguous().numpy().tobytes())
    classes = {a: _num_classes(dataset, a) for a in sorted(targets)}
    key.update(f"{tuple(images.shape[1:])}:{json.dumps(classes)}".encode())
    return cache_root() / "judge" / f"{'-'.join(classes)}-{key.hexdigest()[:16]}"


def _read_cached(meta_path: Path, weights_path: Path) -> Judge | None:
    """The cached judge, or None (with a printed note naming the file) when the cache cannot be read:
    the judge is derived data, so a truncated or foreign cache entry is trained again, never trusted."""
    try:
        meta = json.loads(meta_path.read_text())
        judge = Judge(meta["channels"], meta["image_size"], meta["classes"])
        judge.load_state_dict(load_file(weights_path), strict=True)
        judge.test_accuracy = dict(meta["test_accuracy"])
    except Exception as exc:  # bad JSON, missing keys, a corrupt or mismatched safetensors file
        announce(
            f"the cached judge in {meta_path.parent} cannot be read ({type(exc).__name__}: {exc}); training it again"
        )
        return None
    return judge.eval()


def get_judge(dataset: Any) -> Judge:
    """The judge of ``dataset``: from memory, from the cache folder, or trained now (≈ a minute) and cached;
    reading or training it says so on stderr, with the folder (:func:`~polymodal.io.cache.announce`)."""
    folder = judge_folder(dataset)
    if str(folder) in _MEMORY:
        return _MEMORY[str(folder)]
    with entry_lock(folder):  # another process training this judge: wait for it, then read its file
        meta_path, weights_path = folder / "judge.json", folder / "judge.safetensors"
        judge = _read_cached(meta_path, weights_path) if meta_path.is_file() and weights_path.is_file() else None
        if judge is not None:
            announce(f"using the cached judge of {dataset.name} from {folder}")
        else:
            announce(f"training the judge of {dataset.name} (once, about a minute) into {folder}")
            judge = _train(dataset)
            atomic_write(
                weights_path,
                lambda tmp: save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(tmp)),
            )
            atomic_write(
                meta_path,
                json.dumps(
                    {
                        "version": VERSION,
                        "channels": judge.channels,
                        "image_size": judge.image_size,
                        "classes": judge.classes,
                        "test_accuracy": judge.test_accuracy,
                    },
                    indent=2,
                ),
            )
    _MEMORY[str(folder)] = judge
    return judge


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a`` (N, F) and ``b`` (M, F).

    ``|μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)``, in float64 with symmetric
    eigen-decompositions (no complex square roots).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"frechet_distance needs features (N, F) and (M, F) with N, M >= 2; "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)  # (F,)
    cov_a, cov_b = torch.cov(a.t()), torch.cov(b.t())  # (F, F)

    def sqrtm(m: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh((m + m.t()) / 2)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.t()

    root_a = sqrtm(cov_a)
    cross = sqrtm(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(value.clamp(min=0))


def judge_samples(dataset: Any, images: Tensor, targets: dict[str, Tensor]) -> dict[str, float]:
    """Score generated ``images`` (N, C, H, W) in [0, 1] against the prompted ``targets``.

    Returns ``sample_accuracy`` (every attribute right), ``sample_<attribute>_accuracy``
    and ``fd_judge`` (against the test split's judged images).
    """
    judge = get_judge(dataset)
    missing = [a for a in judge.attributes if a not in targets]
    if missing:
        raise ValueError(
            f"targets must give {', '.join(judge.attributes)} for {dataset.name}; missing {', '.join(missing)}"
        )
    pred = judge.predict(images)
    right = torch.ones(len(images), dtype=torch.bool)
    out: dict[str, float] = {}
    for a in judge.attributes:
        hit = pred[a] == torch.as_tensor(targets[a]).to(pred[a].device)  # (N,)
        out[f"sample_{a}_accuracy"] = hit.float().mean().item()
        right &= hit.cpu()
    out["sample_accuracy"] = right.float().mean().item()
    test_images, _ = _targets(dataset, "test")
    out["fd_judge"] = frechet_distance(judge.embed(images), judge.embed(test_images))
    return out


__all__ = ["Judge", "VERSION", "frechet_distance", "get_judge", "judge_folder", "judge_samples"]
