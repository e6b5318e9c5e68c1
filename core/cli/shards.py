"""``polymodal shards FOLDER OUT --size N``: a folder dataset written as WebDataset tar shards
(:func:`write_shards`; :mod:`polymodal.data.shards` reads them)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import click

from polymodal.cli import _fail, main
from polymodal.data.shards import META, SHARD_NAME

FORMATS = {"png": "png", "jpeg": "jpg", "mpo": "jpg", "webp": "webp", "bmp": "bmp", "gif": "gif", "tiff": "tif",
           "ppm": "ppm"}  # fmt: skip
"""Pillow format → the member suffix :func:`write_shards` gives an image (its bytes are copied unchanged)."""


def _check_out(out: Path, overwrite: bool) -> list[Path]:
    """The earlier shard files in ``out`` that ``overwrite`` replaces; refuses a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; give a new or empty folder")
    old = sorted(out.iterdir()) if out.is_dir() else []
    other = [f.name for f in old if not (SHARD_NAME.match(f.name) or f.name == META or f.name.endswith(".tmp"))]
    if other:
        raise ValueError(f"OUT {out} holds other files ({', '.join(other[:3])}); give a new or empty folder")
    if old and not overwrite:
        raise ValueError(f"OUT {out} already holds shards ({len(old)} files); pass --overwrite to replace them")
    return old


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of ``(name, bytes)`` members written atomically (a hidden temp file renamed into place),
    reproducibly (mtime 0, no owner)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(
    folder: str | Path,
    out: str | Path,
    size: int = 1000,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    channels: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the folder dataset ``folder`` (a ``captions.jsonl`` folder) as tar shards in ``out``.

    The train split (as ``load_folder(folder, seed=seed, test_fraction=test_fraction)`` splits it) goes to
    ``00000.tar``, ``00001.tar`` … and the test split to ``test-00000.tar`` …, ``size`` samples per shard,
    each sample ``KEY.<image suffix>`` (the file's own bytes), ``KEY.txt``, ``KEY.cls`` (with labels) and
    ``KEY.json`` (``path`` and the line's ``boxes``), ``KEY`` the line's number. Each shard is written to a
    temp file and renamed; ``meta.json`` (image size, channels, class names, counts) last. ``out`` must
    be new or empty, or hold only an earlier ``write_shards`` output and ``overwrite``. Returns the meta.
    """
    from PIL import Image

    from polymodal.data.folder import CAPTIONS, _read_lines, load_folder

    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size (samples per shard) must be a whole number ≥ 1; got {size!r}")
    root, out = Path(folder).resolve(), Path(out).resolve()
    old = _check_out(out, overwrite)
    data = load_folder(root, seed=seed, test_fraction=test_fraction, image_size=image_size, channels=channels,
                       lazy=True)  # fmt: skip
    rows = _read_lines(root / CAPTIONS)
    out.mkdir(parents=True, exist_ok=True)
    for f in old:
        f.unlink()
    written: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for name in ("train", "test"):
        reader, index = data.split(name).reader, data.meta["indices"][name]
        for start in range(0, len(index), size):
            members = []
            for j in range(start, min(start + size, len(index))):
                row, path = rows[index[j]][1], root / reader.paths[j]
                with Image.open(path) as img:
                    kind = (img.format or "").lower()
                if kind not in FORMATS:
                    raise ValueError(f"{path}: cannot store a {kind or 'unknown'} image in a shard ({sorted(FORMATS)})")
                key = f"{index[j]:08d}"
                members.append((f"{key}.{FORMATS[kind]}", path.read_bytes()))
                members.append((f"{key}.txt", row["caption"].encode("utf-8")))
                if reader.labels is not None:
                    members.append((f"{key}.cls", str(int(reader.labels[j])).encode()))
                extra = {"path": row["path"]} | ({"boxes": row["boxes"]} if "boxes" in row else {})
                members.append((f"{key}.json", json.dumps(extra).encode("utf-8")))
            shard = f"{'test-' if name == 'test' else ''}{len(written[name]):05d}.tar"
            _write_tar(out / shard, members)
            written[name].append({"name": shard, "count": len(members) // (3 + (reader.labels is not None))})
    meta = {
        "format": "polymodal-shards",
        "version": 1,
        "source": str(root),
        "image_size": data.meta["image_size"],
        "channels": data.meta["channels"],
        "class_names": data.meta["class_names"],
        "with_boxes": any("boxes" in row for _, row in rows),
        "seed": seed,
        "test_fraction": test_fraction,
        **written,
    }
    tmp = out / f".{META}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, out / META)
    return meta


@main.command("shards")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=True))
@click.option("--size", type=click.IntRange(min=1), default=1000, show_default=True, help="Samples per shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/test split (as --data FOLDER).")
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of the unpinned lines that go to the test shards (as the folder dataset splits them).",
)
@click.option("--image-size", type=click.IntRange(min=1), help="Square size to read images at (default: the folder's).")
@click.option("--overwrite", is_flag=True, help="Replace the shards of an earlier `polymodal shards` run in OUT.")
def shards(folder, out, size, seed, test_fraction, image_size, overwrite) -> None:
    """Write FOLDER (images with a captions.jsonl) as tar shards in OUT, SIZE samples each.

    The train split goes to OUT/00000.tar, 00001.tar …, the test split to OUT/test-00000.tar …: each
    sample is KEY.png (or .jpg …: the image file's own bytes), KEY.txt (its caption), KEY.cls (its
    class index, with labels) and KEY.json (its path and boxes), the WebDataset layout open_clip reads.
    OUT/meta.json records the image size, channels, class names and counts. Each shard is written to
    a temp file and renamed. OUT must be new or empty (or, with --overwrite, an earlier run's shards).
    Train on them with `polymodal train MODEL --data "OUT/{00000..000NN}.tar"`.
    """
    try:
        meta = write_shards(
            folder, out, size, seed=seed, test_fraction=test_fraction, image_size=image_size, overwrite=overwrite
        )
    except (ValueError, OSError) as exc:
        _fail(exc)
    train, test = meta["train"], meta["test"]
    last = f"{len(train) - 1:05d}"
    click.echo(
        f"wrote {sum(e['count'] for e in train)} train samples in {len(train)} shards and "
        f"{sum(e['count'] for e in test)} test samples in {len(test)} shards to {out}"
    )
    pattern = f"{out}/{{00000..{last}}}.tar" if len(train) > 1 else f"{out}/00000.tar"
    click.echo(f'train on them with: polymodal train MODEL --data "{pattern}"')
