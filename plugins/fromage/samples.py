"""FROMAGe sample folders: a prompt's continuation and its nearest gallery images, or captioned test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.data.augment import resize
from polymodal.io.folders import atomic_write

from .infer import caption, generate

SAMPLE_OPTIONS = ("temperature", "top_k", "top_p", "use_cache", "gallery", "images", "max_new_tokens")
"""The ``sample_to_folder`` options FROMAGe understands (``gallery``, ``images``, ``max_new_tokens`` from Python only)."""


def load_gallery(model: Any, gallery: Any) -> tuple[Tensor, list[str]]:
    """Gallery images (N, C, S, S) at the CLIP tower's size and a name per image: a tensor, a folder of
    images, or the model's test split (resized like a folder's images)."""
    from polymodal.data import load_dataset
    from polymodal.eval.images import read_image

    v = model.vision.config.vision
    if gallery is None:
        split = load_dataset(model.config.data).test
        names = [f"test[{i}] (label {y})" for i, y in enumerate(split["label"].tolist())]
        return resize(split["image"].float(), v.image_size), names
    if isinstance(gallery, Tensor):
        return model.check_images(gallery), [f"gallery[{i}]" for i in range(len(gallery))]
    folder = Path(gallery)
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if folder.is_dir()
        else []
    )
    if not files:
        raise ValueError(
            f"gallery must be an image tensor (N, {v.channels}, {v.image_size}, {v.image_size}) or a folder "
            f"of .png/.jpg images; {str(gallery)!r} has none"
        )
    return torch.stack([read_image(p, v.channels, v.image_size) for p in files]), [p.name for p in files]


def sample_to_folder(
    model: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """With a prompt: its continuation and the ``n`` nearest gallery images; without: ``n`` captioned test images.

    The prompt may hold ``<image>`` tokens filled from ``images`` (N, C, S, S); ``gallery`` is an
    image tensor or folder (default: the test split of the model's data).
    Writes ``sample_000.png`` … (the gallery images at the CLIP's input size), ``grid.png`` and
    ``transcript.txt`` (the prompt, the generated text, [RET] and each image's file, source and
    score, or each caption).
    """
    bad = sorted(set(options) - set(SAMPLE_OPTIONS))
    if bad:
        raise ValueError(
            f"fromage does not support {', '.join(bad)}; it supports {', '.join(SAMPLE_OPTIONS)} "
            "(caption your own images with `polymodal fromage caption`)"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    gen = {k: options[k] for k in ("temperature", "top_k", "top_p", "use_cache", "max_new_tokens") if k in options}
    images, names = load_gallery(model, options.get("gallery"))
    out = Path(out)
    if prompt is not None:
        result = generate(
            model, prompt, images=options.get("images"), gallery=images, k=min(n, len(images)), seed=seed, **gen
        )
        return retrieval_to_folder(out, prompt, result, images, names)
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    caps = caption(model, images[picked], seed=seed, **gen)
    lines = ["captions:"] + [
        f"  sample_{i:03d}.png  {names[j]}: {c}" for i, (j, c) in enumerate(zip(picked.tolist(), caps))
    ]
    return _write(out, images[picked], lines)


def retrieval_to_folder(
    out: str | Path, prompt: str, result: dict[str, Any], gallery: Tensor, names: list[str]
) -> list[Path]:
    """Write one :func:`~.infer.generate` ``result`` for ``prompt``: its retrieved ``gallery`` images (N, C, S, S)
    as ``sample_000.png`` …, ``grid.png`` and ``transcript.txt`` (the prompt, the generated text, [RET] and each
    image's file, source name and cosine). ``polymodal fromage retrieve --out`` writes what it printed this way."""
    picked = result["retrieved"]
    lines = [
        f"prompt: {prompt}",
        f"generated: {result['text']}",
        f"[RET]: {'emitted' if result['emitted_ret'] else 'not emitted; appended for retrieval'}",
        "retrieved:",
    ]
    lines += [
        f"  sample_{i:03d}.png  {names[j]}  cosine {s:.3f}"
        for i, (j, s) in enumerate(zip(picked.tolist(), result["scores"].tolist()))
    ]
    return _write(Path(out), gallery[picked], lines)


def _write(out: Path, images: Tensor, lines: list[str]) -> list[Path]:
    """``images`` as ``sample_000.png`` … and a grid, and ``lines`` as ``transcript.txt``, in ``out``."""
    from polymodal.eval.images import write_samples

    paths = write_samples(images, out)
    transcript = atomic_write(out / "transcript.txt", "\n".join(lines) + "\n")
    return [*paths, transcript]


__all__ = ["SAMPLE_OPTIONS", "load_gallery", "retrieval_to_folder", "sample_to_folder"]
