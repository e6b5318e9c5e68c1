"""The lecture's FID table in miniature: one table over trained generative model folders.

``polymodal eval --generative [FOLDER…]`` loads each model folder, draws ``n`` samples through its
family's hook, times them, and scores them with the shared judge (:mod:`polymodal.eval.judge`):
``sample_accuracy`` (the share the judge reads as prompted, where the family has prompts),
``fd_judge`` (Fréchet distance of judge features against the test split), samples per second and
parameters. Each dataset also gets a reference row, its train split against its test split (the
floor the samples' ``fd_judge`` is compared with).

A family joins the table through the registry: its registered model class declares the hook ::

    def generative_samples(self, dataset, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor] | None]:
        '''n samples (N, C, H, W) in [0, 1], and per judge attribute the prompted class (N,) of each
        (None for an unconditional model).'''

The table never names a family; a folder whose family declares no hook is skipped with a message.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.data import load_dataset
from polymodal.data.augment import resize
from polymodal.eval.judge import _targets, frechet_distance, get_judge
from polymodal.io.folders import load_model, model_class_for, read_json
from polymodal.registry import get_registry

HOOK = "generative_samples"
"""The method a model class declares to join the table (see the module docstring)."""

COLUMNS = ("model", "family", "data", "samples", "sample_accuracy", "fd_judge", "samples_per_s", "parameters")
"""The table's columns, in order (a row's JSON holds these and ``folder``, ``seconds``, per-attribute accuracies)."""


def generative_families() -> list[str]:
    """The registered model families whose class declares :data:`HOOK`, sorted."""
    classes = {e.obj.model_class for e in get_registry().entries("model")}
    return sorted({c.family for c in classes if callable(getattr(c, HOOK, None))})


def find_folders(root: str | Path) -> list[Path]:
    """Model folders at ``root`` or one level below it (``runs/`` after ``polymodal train``), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--from expects a folder of model folders; {root} is not a folder")
    if (root / "config.json").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def _family(folder: Path) -> str:
    header = read_json(folder / "config.json")
    if not isinstance(header, dict) or not isinstance(header.get("family"), str):
        raise ValueError(f"{folder / 'config.json'} names no 'family'; expected a polymodal model folder")
    return header["family"]


def _variant(folder: Path) -> str:
    """The variant that trained the folder (from its recorded source), else the folder's name."""
    header = read_json(folder / "config.json")
    found = re.search(r"polymodal train ([\w.-]+)", str(header.get("source", "")))
    return found.group(1) if found else folder.name


def _data_name(model: Any, folder: Path, data: str | None) -> str:
    """``data``, else the dataset the folder was trained on (``metrics.json``), else the family's default."""
    if data:
        return data
    metrics = folder / "metrics.json"
    if metrics.is_file():
        recorded = read_json(metrics)
        if isinstance(recorded, dict) and isinstance(recorded.get("data"), str):
            return recorded["data"]
    name = getattr(model, "default_data", None)
    return name or next(e.obj.data for e in get_registry().entries("model") if e.obj.model_class is type(model))


def _judged(judge: Any, images: Tensor) -> Tensor:
    """``images`` at the judge's size and channel count; a ValueError names a channel mismatch."""
    if images.dim() != 4 or images.shape[1] != judge.channels:
        raise ValueError(f"the judge reads images (N, {judge.channels}, H, W); the samples are {tuple(images.shape)}")
    return resize(images.float().clamp(0, 1), judge.image_size)  # (N, C, S, S)


def score(dataset: Any, images: Tensor, targets: dict[str, Tensor] | None) -> dict[str, float]:
    """``fd_judge`` of ``images`` (N, C, H, W) in [0, 1] against the test split, and with ``targets``
    ``sample_accuracy`` (every attribute as prompted) and ``sample_<attribute>_accuracy``."""
    judge = get_judge(dataset)
    x = _judged(judge, images)  # (N, C, S, S)
    out: dict[str, float] = {}
    if targets is not None:
        missing = [a for a in judge.attributes if a not in targets]
        if missing:
            raise ValueError(f"targets must give {', '.join(judge.attributes)}; missing {', '.join(missing)}")
        pred = judge.predict(x)
        right = torch.ones(len(x), dtype=torch.bool)  # (N,)
        for a in judge.attributes:
            hit = pred[a].cpu() == torch.as_tensor(targets[a]).cpu()  # (N,)
            if hit.shape != right.shape:
                raise ValueError(f"targets[{a!r}] must hold one class per sample ({len(x)}); got {tuple(hit.shape)}")
            out[f"sample_{a}_accuracy"] = hit.float().mean().item()
            right &= hit
        out["sample_accuracy"] = right.float().mean().item()
    test, _ = _targets(dataset, "test")  # the images judge_samples compares with (shapes: one-object scenes)
    out["fd_judge"] = frechet_distance(judge.embed(x), judge.embed(_judged(judge, test)))
    return out


def evaluate_generative(
    folder: str | Path, *, n: int = 1000, seed: int = 0, data: str | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """One row of the table for the model folder ``folder``: ``n`` samples (seeded), timed, judged.

    Raises a ValueError when the folder's family declares no :data:`HOOK` (naming the families that do).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"the generative table needs n >= 2 samples (a Fréchet distance needs two); got {n!r}")
    folder = Path(folder)
    family = _family(folder)
    if not callable(getattr(model_class_for(family), HOOK, None)):
        raise ValueError(
            f"{folder}: the {family} family declares no {HOOK}(dataset, n, seed), so it has no row "
            f"(families that do: {', '.join(generative_families()) or 'none installed'})"
        )
    model = load_model(folder, device=device).eval()
    dataset = load_dataset(_data_name(model, folder, data))
    with torch.enable_grad():  # a judge not cached yet is trained now, before the clock starts
        get_judge(dataset)
    started = time.perf_counter()
    with torch.no_grad():
        images, targets = getattr(model, HOOK)(dataset, n, seed=seed)
    seconds = time.perf_counter() - started
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) != n:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{family}.{HOOK} must return n = {n} images (N, C, H, W); got {got}")
    row: dict[str, Any] = {
        "model": _variant(folder),
        "family": family,
        "data": dataset.name,
        "samples": n,
        "sample_accuracy": None,
        "folder": str(folder),
        "seconds": seconds,
        "samples_per_s": n / max(seconds, 1e-9),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    row |= score(dataset, images.cpu(), targets)
    return row


def reference_row(data: str, *, n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The train split against the test split: ``n`` of the train images the judge learns from (a seeded
    draw; shapes: one-object scenes), judged like samples with their own attributes as the prompts."""
    dataset = load_dataset(data)
    images, attributes = _targets(dataset, "train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]  # (n,)
    images, attributes = images[pick], {a: v[pick] for a, v in attributes.items()}  # (n, C, H, W), (n,)
    row: dict[str, Any] = {
        "model": "train split (reference)",
        "family": "-",
        "data": dataset.name,
        "samples": len(images),
        "sample_accuracy": None,
        "folder": None,
        "seconds": None,
        "samples_per_s": None,
        "parameters": None,
    }
    return row | score(dataset, images, attributes)


def generative_table(
    folders: list[str | Path],
    *,
    n: int = 1000,
    seed: int = 0,
    data: str | None = None,
    device: str = "cpu",
    reference: bool = True,
    on_skip: Any = None,
) -> dict[str, Any]:
    """The table over ``folders``: ``{"rows": [...], "skipped": [{"folder", "reason"}], "samples", "seed"}``.

    A folder whose family declares no hook, or that no installed family reads, is skipped
    (``on_skip(folder, reason)`` is told, if given);
    with ``reference``, each dataset seen gets :func:`reference_row` after its models.
    """
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for folder in folders:
        try:
            family = _family(Path(folder))
            generative = callable(getattr(model_class_for(family), HOOK, None))
        except ValueError as exc:  # not a model folder, or a family no installed plugin provides (LoadError)
            family, generative, reason = None, False, str(exc)
        if not generative:
            if family is not None:
                reason = f"the {family} family declares no {HOOK}; not a generative model for this table"
            skipped.append({"folder": str(folder), "reason": reason})
            if on_skip is not None:
                on_skip(folder, reason)
            continue
        rows.append(evaluate_generative(folder, n=n, seed=seed, data=data, device=device))
    if reference:
        for name in dict.fromkeys(r["data"] for r in rows):
            rows.append(reference_row(name, n=n, seed=seed))
    return {"rows": rows, "skipped": skipped, "samples": n, "seed": seed}


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "–"
    if column == "parameters":
        return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1f}" if column == "samples_per_s" else f"{value:.3f}"
    return str(value)


def to_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown (one row per model, then the references), with the skipped folders below."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c), c) for c in COLUMNS) + " |" for row in table["rows"]]
    lines.append("")
    lines.append(
        f"{table['samples']} samples per model (seed {table['seed']}); fd_judge: Fréchet distance of the judge's "
        "features against the test split; sample_accuracy: the share the judge reads as prompted (– unconditional)."
    )
    for skip in table["skipped"]:
        lines.append(f"- skipped {skip['folder']}: {skip['reason']}")
    return "\n".join(lines) + "\n"


def check_table_out(out: str | Path) -> tuple[Path, Path]:
    """Before any work: the Markdown path ``out`` and its ``.json`` beside it may be written — each is new, or
    both hold a table this command wrote (the JSON a table with ``rows``, the Markdown starting with the table's
    header). Anything else there is a user's file: a ValueError naming it, and nothing is replaced."""
    md = Path(out)
    js = md.with_suffix(".json")
    if md.suffix == ".json":
        raise ValueError(f"--out {out}: give the Markdown path (TABLE.md); the JSON is written beside it")
    if not (md.exists() or js.exists()):
        return md, js
    try:
        ours = isinstance(json.loads(js.read_text(encoding="utf-8")).get("rows"), list)
        ours = ours and md.read_text(encoding="utf-8").startswith("| " + " | ".join(COLUMNS) + " |")
    except (OSError, ValueError, AttributeError):  # missing, unreadable, not JSON, not an object
        ours = False
    if not ours:
        raise ValueError(
            f"--out {out}: {md} or {js} exists and is not a table `polymodal eval --generative` wrote; "
            "polymodal never overwrites a file it did not write, so choose a new name"
        )
    return md, js


def write_table(table: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (Markdown) and the same name with ``.json`` (see :func:`check_table_out`); returns both."""
    from polymodal.io import atomic_write

    md, js = check_table_out(out)
    atomic_write(md, to_markdown(table))
    atomic_write(js, json.dumps(table, indent=2, sort_keys=True))
    return md, js


__all__ = [
    "COLUMNS",
    "HOOK",
    "check_table_out",
    "evaluate_generative",
    "find_folders",
    "generative_families",
    "generative_table",
    "reference_row",
    "score",
    "to_markdown",
    "write_table",
]
