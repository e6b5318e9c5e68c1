"""Issue 14, "Nothing lost, nothing silent": output folders, atomic swaps, the writer lock, resume checks,
evaluation failures after training, file modes and argument checks of `polymodal train` / `convert`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner

import polymodal
import polymodal.io.folders as pio
from polymodal.api import train_model
from polymodal.cli import main
from polymodal.config import apply_overrides
from polymodal.data import load_digits
from polymodal.io import atomic_write, load_model
from polymodal.train import TrainConfig, TrainingError, train

TINY = ["--set", "encoder.block.dim=32", "--set", "encoder.depth=1", "--set", "encoder.block.heads=2"]
SET = ("encoder.block.dim=32", "encoder.depth=1", "encoder.block.heads=2")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny_vit(digits, seed=0):
    spec = polymodal.registry.get("model", "vit")
    cfg = apply_overrides(spec.model_class.config_for_data(spec.config, digits), SET)
    torch.manual_seed(seed)
    return spec.model_class(cfg)


def cli(*args, cwd: Path | None = None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, [str(a) for a in args])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def train_cli(out, *extra):
    return cli("train", "vit", "--steps", "2", "--no-progress", "--out", out, *TINY, *extra)


def assert_clean_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert result.output.startswith("Error: "), result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


@pytest.fixture()
def no_training(monkeypatch):
    """Training that fails loudly: a check that must come first would otherwise be passed by."""
    import polymodal.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the output folder was checked")

    monkeypatch.setattr(api, "train", refuse)


# -- 1. an existing folder is never silently replaced ------------------------------------------


def test_train_refuses_a_folder_of_other_files_even_with_overwrite(tmp_path, no_training):
    x = tmp_path / "x"
    x.mkdir()
    (x / "t.txt").write_text("thesis")
    for extra in ((), ("--overwrite",)):
        result = train_cli(x, *extra)
        assert_clean_error(result, str(x), "t.txt", "not a polymodal model folder")
        assert (x / "t.txt").read_text() == "thesis" and sorted(p.name for p in x.iterdir()) == ["t.txt"]


def test_train_writes_into_an_empty_existing_folder(tmp_path):
    (tmp_path / "e").mkdir()
    result = train_cli(tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e" / "model.safetensors").is_file()


def test_a_model_folder_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "m"
    assert train_cli(out).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    refused = train_cli(out, "--seed", "5")
    assert_clean_error(refused, str(out), "--overwrite", "--resume")
    assert (out / "model.safetensors").read_bytes() == before
    replaced = train_cli(out, "--seed", "5", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "metrics.json").read_text())["seed"] == 5
    with pytest.raises(ValueError, match="--overwrite"):
        train_model("vit", steps=2, set_=SET, out=out, progress=False)


def test_convert_guards_dst_like_train(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    src = tmp_path / "hf"
    transformers.ViTForImageClassification(cfg).save_pretrained(src, safe_serialization=True)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.md").write_text("mine")
    assert_clean_error(cli("convert", "--from", "hf-vit", src, dst, "--overwrite"), "notes.md")
    assert sorted(p.name for p in dst.iterdir()) == ["notes.md"]
    from polymodal.plugins.vit.convert import convert_hf_vit

    with pytest.raises(ValueError, match="notes.md"):  # the Python converters too (every one uses the template)
        convert_hf_vit(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.md"]
    good = tmp_path / "pm"
    assert cli("convert", "--from", "hf-vit", src, good).exit_code == 0
    assert_clean_error(cli("convert", "--from", "hf-vit", src, good), "--overwrite")
    assert cli("convert", "--from", "hf-vit", src, good, "--overwrite").exit_code == 0
    assert polymodal.load(good).family == "vit"


# -- 2. the folder swap is atomic, recoverable, and one writer at a time -------------------------


def saved_folder(tmp_path, seed=1):
    runs = tmp_path / "runs"
    model = tiny_vit(load_digits(), seed=seed)
    model.save(runs / "m", metrics={"accuracy": 0.5})
    (runs / "m" / "checkpoint").mkdir()
    (runs / "m" / "checkpoint" / "state.safetensors").write_bytes(b"resume me")
    return runs, model


def outputs_equal(a, b):
    """The same weights (an untrained ViT's zero head would make any two outputs equal)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("exchange", [True, False])
def test_the_folder_path_always_holds_a_complete_folder(tmp_path, monkeypatch, exchange):
    runs, _ = saved_folder(tmp_path)
    real_exchange, exchanged = pio._exchange, []
    monkeypatch.setattr(
        pio, "_exchange", lambda a, b: exchanged.append(exchange and real_exchange(a, b)) or exchanged[-1]
    )
    gaps = []
    real_replace = os.replace

    def watched(src, dst):
        real_replace(src, dst)
        if not (runs / "m" / "config.json").is_file() or not (runs / "m" / "checkpoint").is_dir():
            gaps.append((Path(src).name, Path(dst).name))

    monkeypatch.setattr(pio.os, "replace", watched)
    new = tiny_vit(load_digits(), seed=2)
    new.save(runs / "m")
    if exchange and exchanged != [True]:
        pytest.skip("this system or file system has no renameat2(RENAME_EXCHANGE)")
    if exchange:  # one atomic exchange: no instant without a complete folder
        assert gaps == []
    assert outputs_equal(load_model(runs / "m"), new)
    assert (runs / "m" / "checkpoint" / "state.safetensors").read_bytes() == b"resume me"
    assert sorted(p.name for p in runs.iterdir()) == ["m"]


def kill_between_the_renames(monkeypatch):
    """The process dies right after the first rename: every later os.replace (the rollback too) "dies"."""
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] > 1:
            raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(pio, "_exchange", lambda a, b: False)
    monkeypatch.setattr(pio.os, "replace", replace)
    monkeypatch.setattr(pio.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up


def test_a_kill_between_the_renames_is_recovered_on_the_next_load(tmp_path, monkeypatch):
    runs, old = saved_folder(tmp_path)
    kill_between_the_renames(monkeypatch)
    with pytest.raises(SystemExit):
        tiny_vit(load_digits(), seed=2).save(runs / "m")
    monkeypatch.undo()
    assert not (runs / "m").exists()  # the state a killed swap leaves
    assert outputs_equal(load_model(runs / "m"), old)
    assert (runs / "m" / "checkpoint" / "state.safetensors").read_bytes() == b"resume me"
    assert not (runs / ".m.old").exists()


def test_the_next_locked_writer_removes_what_killed_swaps_left(tmp_path, monkeypatch):
    from polymodal.io.output import output_folder

    runs, old = saved_folder(tmp_path)
    kill_between_the_renames(monkeypatch)
    with pytest.raises(SystemExit):
        tiny_vit(load_digits(), seed=2).save(runs / "m")
    monkeypatch.undo()
    (runs / ".m.old" / "checkpoint").rename(runs / ".m.old" / ".checkpoint.old")  # a killed checkpoint swap too
    (runs / ".m.old" / ".checkpoint.0123456789ab.tmp").mkdir()
    assert len(list(runs.iterdir())) == 2  # .m.old and the new folder's .m.<hex>.tmp
    with output_folder(runs / "m", family="vit", resume=True):
        pass
    assert sorted(p.name for p in runs.iterdir()) == ["m"]
    assert sorted(p.name for p in (runs / "m").iterdir() if p.name.startswith(".")) == []
    assert (runs / "m" / "checkpoint" / "state.safetensors").read_bytes() == b"resume me"
    assert outputs_equal(load_model(runs / "m"), old)


def test_a_kill_after_the_exchange_leaves_the_new_folder(tmp_path, monkeypatch):
    runs, _ = saved_folder(tmp_path)

    def killed(*args, **kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(pio.shutil, "rmtree", killed)
    new = tiny_vit(load_digits(), seed=2)
    with pytest.raises(SystemExit):
        new.save(runs / "m")
    monkeypatch.undo()
    assert outputs_equal(load_model(runs / "m"), new)


def test_resume_recovers_a_checkpoint_left_by_a_killed_swap(digits, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=0, checkpoint_every=2)
    straight = train(tiny_vit(digits), digits, cfg, out=tmp_path / "a", progress=False)
    b = tmp_path / "b"
    train(tiny_vit(digits), digits, cfg, out=b, progress=False, stop_after=2)
    kill_between_the_renames(monkeypatch)
    with pytest.raises(SystemExit):  # the checkpoint of step 4 is being swapped in when the process dies
        train(tiny_vit(digits), digits, cfg, out=b, progress=False, resume=True, stop_after=2)
    monkeypatch.undo()
    assert not (b / "checkpoint").exists()
    resumed = train(tiny_vit(digits, seed=9), digits, cfg, out=b, progress=False, resume=True)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_a_second_writer_fails_at_start_naming_the_first_pid(tmp_path, no_training):
    if sys.platform == "win32":
        pytest.skip("POSIX file locks")
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from polymodal.io.output import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = train_cli(out)
        assert_clean_error(result, str(out), f"PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_excludes_a_second_writer_in_the_same_process_and_goes_when_released(tmp_path, no_training):
    if sys.platform == "win32":
        pytest.skip("POSIX file locks")
    from polymodal.io.output import output_lock

    out = tmp_path / "run"
    with output_lock(out) as lock:
        assert lock == tmp_path / ".run.lock" and lock.read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=rf"PID {os.getpid()}"):
            train_model("vit", steps=1, set_=SET, out=out, progress=False)
    assert not lock.exists()
    with output_lock(out):  # free again
        pass


# -- 3. --out is checked before the first step ----------------------------------------------------


@pytest.mark.parametrize("where", [".", "..", "file/under"])
def test_out_is_checked_before_training(tmp_path, no_training, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file").write_text("a file")
    (work / "kept.txt").write_text("kept")
    result = cli("train", "vit", "--steps", "2", "--no-progress", "--out", where, *TINY, cwd=work)
    assert_clean_error(result, where)
    assert (work / "kept.txt").read_text() == "kept"


def test_a_read_only_out_is_refused_before_training(tmp_path, no_training):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_clean_error(train_cli(ro / "m"), str(ro / "m"), "writ")
    finally:
        ro.chmod(0o755)


def test_an_unwritable_out_is_refused_before_training_even_for_root(tmp_path, no_training, monkeypatch):
    import polymodal.io.output as output

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(output.os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    assert_clean_error(train_cli(ro / "m"), str(ro / "m"), "not writable")
    assert list(ro.iterdir()) == []


# -- 4. a failed evaluation keeps the trained weights ----------------------------------------------


def test_a_failed_evaluation_keeps_the_weights_and_says_so(tmp_path, monkeypatch):
    from polymodal.plugins.vit import ViTClassifier

    def diverged(self, dataset):
        raise OverflowError("math range error")

    monkeypatch.setattr(ViTClassifier, "evaluate", diverged)
    out = tmp_path / "m"
    result = train_cli(out)
    assert_clean_error(result, "math range error", "saved", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert "math range error" in metrics["evaluation_failed"] and metrics["steps"] == 2
    assert load_model(out).family == "vit"
    assert "evaluation_failed" in (out / "README.md").read_text()


# -- 5. model folders follow the umask ------------------------------------------------------------


def test_folders_and_files_follow_the_umask(tmp_path, digits):
    old = os.umask(0o022)
    try:
        tiny_vit(digits).save(tmp_path / "m")
        atomic_write(tmp_path / "f.txt", "x")
        train(tiny_vit(digits), digits, TrainConfig(steps=1, batch_size=8), out=tmp_path / "r", progress=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "m", tmp_path / "r" / "checkpoint"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in (
        tmp_path / "m" / "model.safetensors",
        tmp_path / "f.txt",
        tmp_path / "r" / "checkpoint" / "trainer.json",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# -- 6. --resume checks what it continues --------------------------------------------------------


@pytest.fixture()
def interrupted(tmp_path, digits):
    """A train_model run of 6 steps stopped after its step-4 checkpoint."""
    out = tmp_path / "run"
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=0, checkpoint_every=4)
    train(tiny_vit(digits), digits, cfg, out=out, progress=False, stop_after=4)
    return out, cfg


def test_resume_refuses_a_changed_seed_or_trainer_field(interrupted, digits):
    out, cfg = interrupted
    with pytest.raises(TrainingError, match=r"seed") as info:
        train(tiny_vit(digits), digits, attrs.evolve(cfg, seed=7), out=out, resume=True, progress=False)
    assert "7" in str(info.value) and "0" in str(info.value)
    with pytest.raises(TrainingError, match=r"lr"):
        train(tiny_vit(digits), digits, attrs.evolve(cfg, lr=0.5), out=out, resume=True, progress=False)


def test_resume_refuses_other_data_or_model_settings(interrupted, digits):
    import dataclasses

    out, cfg = interrupted
    other = dataclasses.replace(digits, name="my-digits")
    with pytest.raises(TrainingError, match=r"data='digits'.*data='my-digits'"):
        train(tiny_vit(digits), other, cfg, out=out, resume=True, progress=False)
    spec = polymodal.registry.get("model", "vit")
    changed = apply_overrides(tiny_vit(digits).config, ("encoder.block.dropout=0.5",))
    with pytest.raises(TrainingError, match=r"model\.encoder\.block\.dropout"):
        train(spec.model_class(changed), digits, cfg, out=out, resume=True, progress=False)


def test_resume_refuses_fewer_steps_than_done_and_extends_with_more(interrupted, digits, capsys):
    out, cfg = interrupted
    with pytest.raises(TrainingError, match=r"steps.*3.*4|4.*steps.*3"):
        train(tiny_vit(digits), digits, attrs.evolve(cfg, steps=3), out=out, resume=True, progress=False)
    train(tiny_vit(digits), digits, attrs.evolve(cfg, steps=8), out=out, resume=True, progress=False)
    assert "6 to 8" in capsys.readouterr().err
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 8


def test_train_model_resume_records_the_real_run(tmp_path):
    out = tmp_path / "m"
    train_model("vit", steps=4, seed=1, set_=SET, out=out, progress=False, train_set=("checkpoint_every=2",))
    with pytest.raises(TrainingError, match="seed"):
        train_model("vit", steps=4, seed=2, set_=SET, out=out, progress=False, resume=True)
    with pytest.raises(TrainingError, match="lr"):
        train_model("vit", steps=4, seed=1, set_=SET, out=out, progress=False, resume=True, train_set=("lr=0.5",))
    _, metrics = train_model("vit", steps=6, seed=1, set_=SET, out=out, progress=False, resume=True)
    assert (metrics["steps"], metrics["seed"]) == (6, 1)
    saved = json.loads((out / "metrics.json").read_text())
    assert (saved["steps"], saved["seed"]) == (6, 1)
    assert "6 steps, seed 1" in (out / "README.md").read_text()


# -- 7. impossible numbers are refused by name ----------------------------------------------------


def test_a_negative_checkpoint_step_is_refused(interrupted, digits):
    out, cfg = interrupted
    meta = json.loads((out / "checkpoint" / "trainer.json").read_text())
    meta["step"] = -3
    (out / "checkpoint" / "trainer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"step.*-3"):
        train(tiny_vit(digits), digits, cfg, out=out, resume=True, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"), ({"steps": 0}, "steps")]
)
def test_non_positive_epochs_or_steps_are_refused(no_training, kwargs, name):
    with pytest.raises(ValueError, match=name):
        train_model("vit", set_=SET, progress=False, **kwargs)


def test_epochs_zero_on_the_command_line(tmp_path, no_training):
    assert_clean_error(cli("train", "vit", "--epochs", "0", "--out", tmp_path / "m", *TINY), "epochs")


# -- 8. an unavailable device is a clear error before any work ------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_value_error(tmp_path, digits, no_training):
    with pytest.raises(ValueError, match="CUDA"):
        train_model("vit", steps=1, set_=SET, out=tmp_path / "m", device="cuda", progress=False)
    with pytest.raises(ValueError, match="CUDA"):
        train(tiny_vit(digits), digits, TrainConfig(steps=1), device="cuda", progress=False)
    assert_clean_error(train_cli(tmp_path / "c", "--device", "cuda"), "CUDA")
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()
