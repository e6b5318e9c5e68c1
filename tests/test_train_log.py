"""Issue 17, the training log: ``train_log.jsonl`` (appended, flushed, cut back on resume), the optional
TensorBoard writer (a clear error without tensorboard; a stub writer receives every scalar), ``loss.png``
(a valid PNG of the right size that follows the data, log scale for wide ranges) and the progress-bar
metrics a family chooses."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.train.log import (
    LOG_FILE,
    PLOT_FILE,
    PLOT_SIZE,
    TrainLog,
    TrainLogError,
    draw_loss_png,
    progress_metrics,
    progress_postfix,
    read_log,
    wants_log_scale,
)

BLUE = (31, 119, 180)


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]


def test_log_writes_one_flushed_json_line_per_step_and_reads_tensors(tmp_path):
    log = TrainLog(tmp_path, enabled=True, every=2)
    log.log(2, {"loss": torch.tensor(2.5), "lr": 1e-3, "samples_s": 100.0, "accuracy": torch.tensor([0.25])})
    # flushed: another reader sees the line while the log is still open
    assert _lines(tmp_path) == [{"step": 2, "loss": 2.5, "lr": 1e-3, "samples_s": 100.0, "accuracy": 0.25}]
    log.log(4, {"loss": float("nan"), "lr": 5e-4})
    log.log(4, {"eval/accuracy": 0.5, "eval/loss": 1.0})
    log.close()
    rows = _lines(tmp_path)
    assert rows[1] == {"step": 4, "loss": None, "lr": 5e-4}  # non-finite: null (strict JSON)
    assert rows[2] == {"step": 4, "eval/accuracy": 0.5, "eval/loss": 1.0}
    assert [log.due(s, 5) for s in range(1, 6)] == [False, True, False, True, True]


def test_log_refuses_what_is_not_a_number(tmp_path):
    with TrainLog(tmp_path, enabled=True) as log:
        with pytest.raises(ValueError, match="'accuracy'.*one-element tensor.*\\(3,\\)"):
            log.log(1, {"accuracy": torch.ones(3)})
        with pytest.raises(ValueError, match="'name'.*a number.*str"):
            log.log(1, {"name": "x"})
    with pytest.raises(ValueError, match="every must be a whole number >= 1, got 0"):
        TrainLog(tmp_path, enabled=True, every=0)


def test_disabled_log_writes_nothing(tmp_path):
    log = TrainLog(tmp_path / "rank1", enabled=False, tensorboard=True)  # not even the tensorboard check
    assert log.log(1, {"loss": 1.0}) == {"step": 1, "loss": 1.0}
    log.close()
    assert not (tmp_path / "rank1").exists()
    TrainLog(None, enabled=True).close()  # no folder: nothing to write


def test_resume_keeps_rows_up_to_the_resumed_step_then_appends(tmp_path):
    with TrainLog(tmp_path, enabled=True, every=1) as log:
        for step in range(1, 8):
            log.log(step, {"loss": 1.0 / step})
    with (tmp_path / LOG_FILE).open("a") as f:
        f.write('{"step": 8, "lo')  # a run killed in the middle of a line
    assert [r["step"] for r in read_log(tmp_path / LOG_FILE)] == list(range(1, 8))
    with TrainLog(tmp_path, enabled=True, every=1, resume_from=5) as log:  # the checkpoint was at step 5
        log.log(6, {"loss": 0.5})
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert _lines(tmp_path)[-1]["loss"] == 0.5
    with TrainLog(tmp_path, enabled=True) as log:  # a fresh run (--overwrite) starts a new log
        log.log(1, {"loss": 3.0})
    assert _lines(tmp_path) == [{"step": 1, "loss": 3.0}]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(
        TrainLogError, match=r"tensorboard=true needs the tensorboard package \(pip install tensorboard\)"
    ):
        TrainLog(tmp_path / "out", enabled=True, tensorboard=True)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_tensorboard_writer_gets_every_scalar(tmp_path, monkeypatch):
    made = []

    class StubWriter:
        def __init__(self, log_dir, **kwargs):
            self.log_dir, self.kwargs, self.scalars, self.closed = log_dir, kwargs, [], False
            made.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=StubWriter))
    with TrainLog(tmp_path, enabled=True, tensorboard=True) as log:
        log.log(10, {"loss": torch.tensor(1.5), "lr": 0.01, "eval/accuracy": 0.75, "bad": float("inf")})
    with TrainLog(tmp_path, enabled=True, tensorboard=True, resume_from=10):
        pass
    first, resumed = made
    assert first.log_dir == str(tmp_path / "tensorboard") and first.kwargs == {}
    assert sorted(first.scalars) == [("eval/accuracy", 0.75, 10), ("loss", 1.5, 10), ("lr", 0.01, 10)]  # inf left out
    assert first.closed
    assert resumed.kwargs == {"purge_step": 11}  # events after the checkpoint's step are dropped


def test_loss_png_is_a_valid_png_of_the_right_size_that_follows_the_data(tmp_path):
    falling = [{"step": s, "loss": 2.0 - s / 100} for s in range(1, 101)]
    rising = [{"step": s, "loss": 1.0 + s / 100} for s in range(1, 101)]
    draw_loss_png(falling, tmp_path / "a.png")
    draw_loss_png(rising, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "a.png") as image:
        image.verify()
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.format == "PNG" and a.size == PLOT_SIZE
        ya, yb = _line_heights(a), _line_heights(b)
    assert a.tobytes() != b.tobytes()
    # the train line goes down (higher y in pixels) for a falling loss, up for a rising one
    assert ya[-1] - ya[0] > 200 and yb[0] - yb[-1] > 200
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


def _line_heights(image: Image.Image) -> list[float]:
    """The mean y of the train-coloured pixels in each column that has some (left to right)."""
    rgb = torch.from_numpy(np.array(image.convert("RGB"))).int()  # (H, W, 3)
    hit = (rgb - torch.tensor(BLUE)).abs().sum(-1) < 40  # (H, W)
    hit[:40] = False  # the legend
    ys = torch.arange(image.size[1], dtype=torch.float32)[:, None].expand_as(hit)  # (H, W)
    cols = hit.any(0).nonzero().flatten()
    return [float(ys[:, c][hit[:, c]].mean()) for c in cols]


def test_loss_png_uses_a_log_scale_for_a_wide_range(tmp_path):
    rows = [{"step": s, "loss": 100 * 0.9**s} for s in range(0, 101)]  # 100 → 0.003: an exponential decay
    assert wants_log_scale(r["loss"] for r in rows) and not wants_log_scale([2.0, 1.0, 0.5])
    assert not wants_log_scale([1.0, 0.0, 500.0])  # a zero cannot go on a log axis
    draw_loss_png(rows, tmp_path / "auto.png")
    draw_loss_png(rows, tmp_path / "log.png", log_scale=True)
    draw_loss_png(rows, tmp_path / "linear.png", log_scale=False)
    assert (tmp_path / "auto.png").read_bytes() == (tmp_path / "log.png").read_bytes()
    with Image.open(tmp_path / "log.png") as log, Image.open(tmp_path / "linear.png") as linear:
        on_log, on_linear = _line_heights(log), _line_heights(linear)
    # on a log axis an exponential decay is a straight line: its middle is halfway between its ends
    mid = len(on_log) // 2
    assert abs(on_log[mid] - (on_log[0] + on_log[-1]) / 2) < 6
    assert on_linear[mid] - (on_linear[0] + on_linear[-1]) / 2 > 100  # linear: it hugs the bottom
    with pytest.raises(ValueError, match="log-scale loss plot needs positive losses; the smallest is -1.0"):
        draw_loss_png([{"step": 1, "loss": -1.0}, {"step": 2, "loss": 1.0}], tmp_path / "x.png", log_scale=True)


def test_close_draws_loss_png_with_eval_points_and_every_row_of_a_resumed_run(tmp_path):
    with TrainLog(tmp_path, enabled=True) as log:
        for step in range(1, 11):
            log.log(step, {"loss": math.exp(-step / 4)})
    with TrainLog(tmp_path, enabled=True, resume_from=10) as log:
        for step in range(11, 21):
            log.log(step, {"loss": math.exp(-step / 4)})
        log.log(20, {"eval/loss": 0.5})
    draw_loss_png(read_log(tmp_path / LOG_FILE), tmp_path / "again.png")
    assert (tmp_path / PLOT_FILE).read_bytes() == (tmp_path / "again.png").read_bytes()
    with Image.open(tmp_path / PLOT_FILE) as image:
        rgb = torch.from_numpy(np.array(image.convert("RGB"))).int()
    red = ((rgb - torch.tensor((214, 39, 40))).abs().sum(-1) < 40)[40:]  # below the legend: the eval point
    assert red.any()
    with pytest.raises(ValueError, match="rows with a finite 'loss'; got 1 row"):
        draw_loss_png([{"step": 1, "eval/loss": 1.0}], tmp_path / "none.png")


def test_close_without_losses_draws_nothing(tmp_path):
    with TrainLog(tmp_path, enabled=True) as log:
        log.log(5, {"eval/accuracy": 0.5})
    assert not (tmp_path / PLOT_FILE).exists()


def test_progress_metrics_are_a_family_choice():
    class Plain:
        pass

    class Dino:
        progress_metrics: ClassVar[tuple[str, ...]] = ("teacher_entropy",)

    class Broken:
        progress_metrics = "teacher_entropy"

    assert progress_metrics(Plain()) == () and progress_metrics(Dino()) == ("teacher_entropy",)
    with pytest.raises(ValueError, match="Broken.progress_metrics must be a tuple of metric names"):
        progress_metrics(Broken())
    row = {"step": 3, "loss": torch.tensor(1.23456), "samples_s": 812.4, "teacher_entropy": 3.14159, "lr": 0.1}
    assert progress_postfix(row, progress_metrics(Dino())) == {
        "loss": "1.2346",
        "samples_s": "812",
        "teacher_entropy": "3.142",
    }
    assert progress_postfix({"loss": 2.0}, ("missing",)) == {"loss": "2.0000"}


# -- through the trainer -------------------------------------------------------------------------------------


def _tiny_vit(digits):
    from polymodal.config import apply_overrides
    from polymodal.registry import get_registry

    spec = get_registry().get("model", "vit")
    tiny = ["encoder.block.dim=32", "encoder.depth=2", "encoder.block.heads=2", "encoder.block.mlp_ratio=2.0"]
    torch.manual_seed(0)
    return spec.model_class(apply_overrides(spec.model_class.config_for_data(spec.config, digits), tiny))


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_logs_every_step_once_across_an_interrupted_and_resumed_run(tmp_path):
    from polymodal.data import load_digits
    from polymodal.train import TrainConfig, train

    digits = load_digits()
    cfg = TrainConfig(steps=6, batch_size=16, warmup_steps=2, checkpoint_every=2, log_every=1)
    train(_tiny_vit(digits), digits, cfg, out=tmp_path / "straight", progress=False)

    def die(step, metrics):
        if step == 4:  # after steps 1-3 are logged, before step 4's checkpoint: the last one is step 2's
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tiny_vit(digits), digits, cfg, out=tmp_path / "cut", progress=False, on_step=die)
    assert [r["step"] for r in read_log(tmp_path / "cut" / LOG_FILE)] == [1, 2, 3]
    train(_tiny_vit(digits), digits, cfg, out=tmp_path / "cut", progress=False, resume=True)
    straight, resumed = read_log(tmp_path / "straight" / LOG_FILE), read_log(tmp_path / "cut" / LOG_FILE)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # step 3 logged once, by the resumed run
    for a, b in zip(straight, resumed, strict=True):
        assert {"loss", "lr", "samples_s", "accuracy"} <= a.keys() and a.keys() == b.keys()
        assert (a["loss"], a["lr"], a["accuracy"]) == (b["loss"], b["lr"], b["accuracy"])  # exact resume
    with Image.open(tmp_path / "cut" / PLOT_FILE) as image:
        assert image.size == PLOT_SIZE
