"""The training log: ``train_log.jsonl``, an optional TensorBoard writer and ``loss.png``, in the model folder.

One JSON object per logged step, appended and flushed as it comes (so a killed run keeps what it logged)::

    {"step": 10, "loss": 2.31, "lr": 0.0001, "samples_s": 812.5, "accuracy": 0.12}
    {"step": 100, "eval/accuracy": 0.71, "eval/loss": 0.93}

Training rows hold ``step``, ``loss``, ``lr``, ``samples_s`` (throughput) and the family's step metrics
(DINO's teacher entropy …); evaluation rows (``--eval-every``) hold ``eval/``-prefixed keys. At the end
:meth:`TrainLog.close` draws ``loss.png`` (Pillow; no matplotlib) from every row, those of a resumed run's
earlier part included. Only rank 0 writes: every other rank builds its log with ``enabled=False``, which
does nothing. A family chooses which of its metrics the progress bar shows with a class attribute
``progress_metrics: ClassVar[tuple[str, ...]]`` (see :func:`progress_metrics`).
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from polymodal.io.folders import RUN_FILES, atomic_write

LOG_FILE = "train_log.jsonl"
"""The log's file name in the model folder."""
PLOT_FILE = "loss.png"
"""The loss plot's file name in the model folder."""
TENSORBOARD_DIR = "tensorboard"
"""The TensorBoard event folder in the model folder."""

NEEDS_TENSORBOARD = (
    "tensorboard=true needs the tensorboard package (pip install tensorboard), which is not installed; "
    "install it or train without it (train_log.jsonl and loss.png are written either way)"
)
"""The message of the :class:`TrainLogError` raised when TensorBoard is asked for but missing."""


class TrainLogError(RuntimeError):
    """The training log cannot be written as asked (TensorBoard asked for but not installed)."""


def _number(key: str, value: Any) -> int | float | None:
    """``value`` as a JSON number (a 0-dim or one-element tensor read once; non-finite becomes None)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"log record {key!r}: expected a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        value = value.detach().float().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"log record {key!r}: expected a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``train_log.jsonl`` (``[]`` when there is none); a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def progress_metrics(model: Any) -> tuple[str, ...]:
    """The family metrics the progress bar shows: ``model.progress_metrics`` (a class attribute, a tuple of
    names the family's ``loss`` returns, e.g. ``("teacher_entropy",)``), or ``()`` when it has none.
    Pass the model itself, not a DDP/FSDP/compile wrapper."""
    names = getattr(model, "progress_metrics", ())
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{type(model).__name__}.progress_metrics must be a tuple of metric names, got {names!r}")
    return tuple(names)


def progress_postfix(record: Mapping[str, Any], names: Iterable[str] = ()) -> dict[str, str]:
    """The progress bar's postfix for a logged ``record``: ``loss``, ``samples_s`` and the metrics ``names``
    it holds (numbers formatted, in that order): ``bar.set_postfix(progress_postfix(row, progress_metrics(m)))``."""
    out: dict[str, str] = {}
    for key in ("loss", "samples_s", *names):
        if key in record and key not in out:
            value = _number(key, record[key])
            if value is None:
                out[key] = "nan"
            elif key == "samples_s":
                out[key] = f"{value:.0f}"
            else:
                out[key] = f"{value:.4f}" if key == "loss" else f"{value:.4g}"
    return out


class TrainLog:
    """``OUT/train_log.jsonl``, optional TensorBoard events under ``OUT/tensorboard``, ``OUT/loss.png`` at the end.

    ``enabled=False`` (every rank but 0, or no ``out``) makes every method do nothing. ``every`` is how
    often the trainer logs (:meth:`due`). A fresh run (``resume_from=None``) starts a new log; a resumed
    one keeps the rows with ``step <= resume_from`` (what the checkpoint had seen) and appends after them,
    and TensorBoard purges its later events the same way. ``tensorboard=True`` without the tensorboard
    package raises a :class:`TrainLogError` saying ``pip install tensorboard``, before anything is written.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        out: str | Path | None,
        *,
        enabled: bool,
        tensorboard: bool = False,
        every: int = 10,
        resume_from: int | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"TrainLog every must be a whole number >= 1, got {every!r}")
        if resume_from is not None and (
            isinstance(resume_from, bool) or not isinstance(resume_from, int) or resume_from < 0
        ):
            raise ValueError(f"TrainLog resume_from must be None or a step >= 0, got {resume_from!r}")
        self.enabled = bool(enabled) and out is not None
        self.every = every
        self.out = Path(out) if out is not None else None
        self.rows: list[dict[str, Any]] = []
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        writer_class = _summary_writer() if tensorboard else None  # fails before any file is touched
        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOG_FILE
        if resume_from is not None:
            self.rows = [r for r in read_log(path) if r["step"] <= resume_from]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        if not (path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text):
            atomic_write(path, text)  # the kept rows (or nothing), whole, before appending
        self._file = path.open("a", encoding="utf-8")
        if writer_class is not None:
            board = self.out / TENSORBOARD_DIR
            if resume_from is None:
                shutil.rmtree(board, ignore_errors=True)
            kwargs = {"purge_step": resume_from + 1} if resume_from is not None else {}
            self._writer = writer_class(log_dir=str(board), **kwargs)

    def due(self, step: int, end: int) -> bool:
        """Whether the trainer logs after optimiser step ``step`` (1-based) of a run ending at ``end``."""
        return step % self.every == 0 or step == end

    def log(self, step: int, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``{"step": step, **record}`` as one flushed JSON line (tensors read once, here; non-finite
        values written as null) and to TensorBoard; returns the row as written. A disabled log returns
        ``{"step": step, **record}`` as given, reading no tensor (no device sync on the other ranks)."""
        if not self.enabled:
            return {"step": int(step), **{k: v for k, v in record.items() if k != "step"}}
        row: dict[str, Any] = {"step": int(step)}
        for key, value in record.items():
            if key != "step":
                row[str(key)] = _number(str(key), value)
        assert self._file is not None
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        self.rows.append(row)
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self._writer.add_scalar(key, value, row["step"])
            self._writer.flush()
        return row

    def close(self) -> None:
        """Close the log and the TensorBoard writer, and draw ``loss.png`` when some row holds a loss."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if any(isinstance(r.get("loss"), (int, float)) for r in self.rows):
            assert self.out is not None
            draw_loss_png(self.rows, self.out / PLOT_FILE)

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a :class:`TrainLogError` saying how to install it."""
    try:
        return importlib.import_module("torch.utils.tensorboard").SummaryWriter
    except ImportError as exc:
        raise TrainLogError(NEEDS_TENSORBOARD) from exc


# -- loss.png ------------------------------------------------------------------------------------------------

PLOT_SIZE = (640, 400)
"""(width, height) in pixels of ``loss.png``."""
_MARGIN = (72, 34, 20, 44)  # left, top, right, bottom
_TRAIN, _EVAL, _AXIS, _GRID, _TEXT = (31, 119, 180), (214, 39, 40), (0, 0, 0), (225, 225, 225), (40, 40, 40)


def wants_log_scale(values: Iterable[float]) -> bool:
    """Whether a loss curve reads better on a log scale: every value positive and max / min >= 50."""
    values = [v for v in values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 50


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi], about ``count`` of them."""
    raw = (hi - lo) / max(count, 1)
    scale = 10 ** math.floor(math.log10(raw))
    step = next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    """A short tick label (``0.25``, ``1e-03``, ``12000``)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-2:
        return f"{value:.0e}"
    return f"{value:.4g}"


def _series(rows: Iterable[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """``(step, value)`` of the rows holding a finite number under ``key``, in step order."""
    points = [
        (float(r["step"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return sorted(points)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def draw_loss_png(
    rows: Iterable[Mapping[str, Any]],
    path: str | Path,
    *,
    log_scale: bool | None = None,
    size: tuple[int, int] = PLOT_SIZE,
) -> None:
    """Draw the ``loss`` of the log ``rows`` against their ``step`` (and ``eval/loss`` as red dots where
    logged) into the PNG ``path``, atomically (a temporary file renamed into place).

    Axes with round ticks and step labels; ``log_scale`` None chooses a log axis when the losses span a
    wide range (:func:`wants_log_scale`). Rows without a finite ``loss`` are left out; none at all is a
    ValueError.
    """
    from PIL import Image, ImageDraw

    rows = list(rows)
    train, held = _series(rows, "loss"), _series(rows, "eval/loss")
    if not train:
        raise ValueError(f"draw_loss_png expects rows with a finite 'loss'; got {len(rows)} row(s) without one")
    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"draw_loss_png size must be at least (200, 150) pixels, got {size!r}")
    values = [v for _, v in train + held]
    if log_scale is None:
        log_scale = wants_log_scale(values)
    if log_scale and min(values) <= 0:
        raise ValueError(f"a log-scale loss plot needs positive losses; the smallest is {min(values)!r}")
    fy = math.log10 if log_scale else float
    steps = [s for s, _ in train + held]
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = fy(min(values)), fy(max(values))
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_lo) * 0.05, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    left, top, right, bottom = _MARGIN
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # the plot area in pixels

    def px(step: float, value: float) -> tuple[float, float]:
        return (
            x0 + (step - x_lo) / (x_hi - x_lo) * (x1 - x0),
            y1 - (fy(value) - y_lo) / (y_hi - y_lo) * (y1 - y0),
        )

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)
    if log_scale:
        decades = range(math.ceil(y_lo), math.floor(y_hi) + 1)
        y_ticks = [10.0**d for d in decades] if len(decades) >= 2 else [10**t for t in _nice_ticks(y_lo, y_hi)]
    else:
        y_ticks = _nice_ticks(y_lo, y_hi)
    for tick in y_ticks:
        _, y = px(x_lo, tick)
        if y0 <= y <= y1:
            draw.line([(x0, y), (x1, y)], fill=_GRID)
            draw.line([(x0 - 4, y), (x0, y)], fill=_AXIS)
            draw.text((x0 - 7, y), _label(tick), fill=_TEXT, font=small, anchor="rm")
    for tick in _nice_ticks(x_lo, x_hi):
        x = x0 + (tick - x_lo) / (x_hi - x_lo) * (x1 - x0)
        if x0 <= x <= x1 and float(tick).is_integer():
            draw.line([(x, y1), (x, y1 + 4)], fill=_AXIS)
            draw.text((x, y1 + 7), str(int(tick)), fill=_TEXT, font=small, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=_AXIS)
    draw.text(((x0 + x1) / 2, height - 6), "step", fill=_TEXT, font=font, anchor="ms")
    title = "training loss" + (" (log scale)" if log_scale else "")
    draw.text((x0, y0 - 8), title, fill=_TEXT, font=font, anchor="ls")
    line = [px(s, v) for s, v in train]
    if len(line) > 1:
        draw.line(line, fill=_TRAIN, width=2, joint="curve")
    for x, y in line if len(line) == 1 else ():
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_TRAIN)
    for x, y in (px(s, v) for s, v in held):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_EVAL)
    legend = [("train", _TRAIN)] + ([("eval", _EVAL)] if held else [])
    lx = x1
    for name, colour in reversed(legend):
        lx -= draw.textlength(name, font=small) + 4
        draw.text((lx, y0 - 8), name, fill=colour, font=small, anchor="ls")
        lx -= 18
        draw.line([(lx, y0 - 12), (lx + 14, y0 - 12)], fill=colour, width=2)
        lx -= 10
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


__all__ = [
    "LOG_FILE",
    "PLOT_FILE",
    "RUN_FILES",
    "TENSORBOARD_DIR",
    "TrainLog",
    "TrainLogError",
    "draw_loss_png",
    "progress_metrics",
    "progress_postfix",
    "read_log",
    "wants_log_scale",
]
