"""Saying what happens: cache messages and `polymodal cache`, failed plugins on unknown names,
overrides named by the keys the user typed, the progress bar's variant name, `--no-checkpoint`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner

import polymodal.api
import polymodal.eval.judge as J
from polymodal.cli import main
from polymodal.config import OverrideError, apply_overrides
from polymodal.data import load_dataset
from polymodal.io.cache import cache_entries, clear_cache, default_part_folder, select_entries
from polymodal.models.parts import PartConfig, load_part
from polymodal.registry import RegistryError, get_registry, hookimpl
from polymodal.registry.loader import register_plugin, unregister_plugin
from polymodal.registry.table import Registry
from polymodal.testing import contracts
from polymodal.train import TrainConfig

TINY = "vit-msgtest"  # a registered tiny ViT: its name is not its family's


@pytest.fixture
def tiny_variant(one_thread):
    """Register the tiny ViT under a variant name of its own for one test."""
    get_registry().add("model", TINY, contracts.tiny("vit"), plugin="test-messages")
    yield TINY
    get_registry().remove("model", TINY)


# -- an unknown name names the plugins that did not load ------------------------------------------


class _BrokenPlugin:
    """A plugin whose registration fails, as one with a missing dependency does."""

    @hookimpl
    def register_models(self, register):
        raise ImportError("No module named 'fancy_backend'")


def test_an_unknown_name_names_the_plugins_that_failed_and_points_to_polymodal_plugins(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYMODAL_STRICT_PLUGINS", "0")
    record = register_plugin(_BrokenPlugin(), "fancy")
    try:
        assert record.status == "failed"
        for kind in ("model", "dataset", "converter"):
            with pytest.raises(RegistryError) as info:
                get_registry().get(kind, "fancy-model")
            message = str(info.value)
            assert f"unknown {kind} 'fancy-model'" in message
            assert "'fancy' (ImportError: No module named 'fancy_backend'" in message
            assert "`polymodal plugins`" in message
        result = CliRunner().invoke(main, ["train", "fancy-model", "--out", str(tmp_path / "o")])
        assert result.exit_code != 0 and result.output.startswith("Error: unknown model 'fancy-model'")
        assert "'fancy' (ImportError" in result.output and "polymodal plugins" in result.output
    finally:
        unregister_plugin("fancy")
    with pytest.raises(RegistryError) as info:
        get_registry().get("model", "fancy-model")
    assert "fancy_backend" not in str(info.value) and "polymodal plugins" not in str(info.value)


def test_the_registry_cuts_a_long_plugin_error_to_one_short_line():
    registry = Registry(unavailable={"big": "RuntimeError: " + "x" * 500 + "\nsecond line", "off": "disabled"})
    with pytest.raises(RegistryError) as info:
        registry.get("model", "nothing")
    message = str(info.value)
    assert "second line" not in message and "x" * 200 not in message and "…" in message
    assert "'off' (disabled)" in message and "\n" not in message


# -- overrides are named by the key the user typed -----------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["encoder.block.heads=5"], "--set encoder.block.heads=5: encoder.block.heads must divide dim; got dim="),
        (
            ["encoder.heads=5"],
            "--set encoder.heads=5: unknown field 'encoder.heads'; did you mean 'encoder.block.heads'?",
        ),
        (["heads=5"], "--set heads=5: unknown field 'heads'; did you mean 'encoder.block.heads'?"),
        (["encoder.depth=0"], "--set encoder.depth=0: encoder.depth must be in [1, 1024], got 0"),
        (["pool=max"], "--set pool=max: pool must be one of 'cls', 'mean'; got 'max'"),
        (['encoder={"block": {"heads": 5}}'], '--set encoder={"block": {"heads": 5}}: encoder.block.heads must divide'),
        (["encoder=null"], "--set encoder=null: encoder is a nested"),
        (["num_classes.x=1"], "--set num_classes.x=1: 'num_classes' is not a nested config (nested configs: encoder)"),
    ],
)
def test_an_override_error_names_the_key_as_typed_not_a_config_class(pairs, expected):
    cfg = get_registry().get("model", "vit").config
    with pytest.raises(OverrideError) as info:
        apply_overrides(cfg, pairs)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "BlockConfig." not in message and "ViTEncoderConfig." not in message and "ViTConfig" not in message


def test_two_encoders_of_one_class_are_told_apart_and_the_flag_is_the_one_used():
    cfg = get_registry().get("model", "clip").config
    with pytest.raises(OverrideError, match=r"^--set text\.block\.heads=7: text\.block\.heads must divide dim"):
        apply_overrides(cfg, ["text.block.heads=7"])
    with pytest.raises(OverrideError, match="did you mean 'vision.block.heads', 'text.block.heads'"):
        apply_overrides(cfg, ["heads=7"])
    with pytest.raises(OverrideError, match=r"^--train-set grad_clip=NaN: grad_clip must be a finite number"):
        apply_overrides(TrainConfig(), ["grad_clip=NaN"], flag="--train-set")
    with pytest.raises(ValueError, match=r"^--set expects key=value, got 'oops'"):
        apply_overrides(cfg, ["oops"])


def test_the_cli_reports_the_override_the_user_typed(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "vit", "--set", "encoder.block.heads=5", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0
    assert result.output.startswith("Error: --set encoder.block.heads=5: encoder.block.heads must divide dim")
    result = runner.invoke(main, ["train", "vit", "--train-set", "lr=-1", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and result.output.startswith("Error: --train-set lr=-1: lr must be")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- the progress bar names the variant ----------------------------------------------------------


def test_the_progress_bar_names_the_variant_not_the_family(tiny_variant, tmp_path, capsys):
    polymodal.api.train_model(tiny_variant, steps=1, progress=True)
    err = capsys.readouterr().err
    assert f"train {tiny_variant}" in err


# -- --no-checkpoint ------------------------------------------------------------------------------


def test_no_checkpoint_leaves_a_folder_without_the_optimiser_state(tiny_variant, tmp_path, monkeypatch):
    import polymodal.train.trainer as trainer

    saved = []
    real = trainer._save_checkpoint
    monkeypatch.setattr(trainer, "_save_checkpoint", lambda out, *a, **k: (saved.append(a[2]), real(out, *a, **k)))
    runner = CliRunner()
    keep, lean = tmp_path / "keep", tmp_path / "lean"
    common = ["--steps", "3", "--train-set", "checkpoint_every=1", "--no-progress"]
    assert runner.invoke(main, ["train", tiny_variant, *common, "--out", str(keep)]).exit_code == 0
    saved.clear()
    result = runner.invoke(main, ["train", tiny_variant, *common, "--out", str(lean), "--no-checkpoint"])
    assert result.exit_code == 0, result.output
    assert saved == [1, 2, 3]  # the run still checkpointed while it trained
    assert (keep / "checkpoint" / "optimizer.safetensors").is_file()
    assert sorted(os.listdir(lean)) == sorted(n for n in os.listdir(keep) if n != "checkpoint")
    model = polymodal.api.load(lean)
    for k, v in polymodal.api.load(keep).state_dict().items():
        assert torch.equal(model.state_dict()[k], v)  # the same run, the same weights
    result = runner.invoke(main, ["train", tiny_variant, "--steps", "4", "--out", str(lean), "--resume"])
    assert result.exit_code != 0 and "--resume needs a checkpoint" in result.output
    help_text = runner.invoke(main, ["train", "--help"]).output
    assert "--no-checkpoint" in help_text and "--resume cannot" in help_text.replace("\n", " ").replace("  ", " ")


def test_keep_checkpoint_false_in_python(tiny_variant, tmp_path):
    polymodal.api.train_model(tiny_variant, steps=1, out=tmp_path / "m", progress=False, keep_checkpoint=False)
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m" / "checkpoint").exists()
    assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".")]


# -- the cache says what it does -----------------------------------------------------------------


def test_prepare_parts_says_what_it_trains_and_reuses_and_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    tiny = load_part(PartConfig(path="", variant="vit", tiny=True))
    calls = []

    def fake_train_model(name, *, data=None, out=None, **kw):
        calls.append(kw)
        tiny.save(out)
        return tiny, {}

    monkeypatch.setattr(polymodal.api, "train_model", fake_train_model)
    cfg = attrs.evolve(contracts.tiny("imagebind").config, clip=PartConfig(variant="vit"))
    folder = default_part_folder("vit", "digits")
    polymodal.api.prepare_parts(cfg, progress=False)
    first = capsys.readouterr()
    assert f"training the default part `clip` (vit on digits) once into {folder}" in first.err
    assert "training" not in first.out  # stdout stays the command's own
    assert calls[0]["keep_checkpoint"] is False  # a cached part is never resumed: no optimiser state kept
    polymodal.api.prepare_parts(cfg, progress=False)
    assert f"using the cached default part `clip` (vit trained on digits) from {folder}" in capsys.readouterr().err
    assert len(calls) == 1


def test_the_judge_says_it_is_trained_then_reused_and_where(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr(J, "TRAIN_STEPS", 2)
    monkeypatch.setattr(J, "_MEMORY", {})
    digits = load_dataset("digits")
    J.get_judge(digits)
    folder = J.judge_folder(digits)
    assert f"polymodal: training the judge of digits (once, about a minute) into {folder}" in capsys.readouterr().err
    monkeypatch.setattr(J, "_MEMORY", {})
    J.get_judge(digits)
    assert f"polymodal: using the cached judge of digits from {folder}" in capsys.readouterr().err


# -- polymodal cache list | clear -----------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache root holding a part, a judge, a hub conversion and things polymodal never wrote."""
    root = tmp_path / "cache"
    monkeypatch.setenv("POLYMODAL_CACHE", str(root))
    tiny = load_part(PartConfig(path="", variant="vit", tiny=True))
    tiny.save(root / "parts" / "vit-digits")
    tiny.save(root / "hub" / "org--name" / "0123abcd")
    judge = root / "judge" / "digits-0123456789abcdef"
    judge.mkdir(parents=True)
    (judge / "judge.json").write_text(json.dumps({"version": "judge/1"}))
    (judge / "judge.safetensors").write_bytes(b"x" * 100)
    (root / "notes.txt").write_text("mine")
    (root / "parts" / "mine").mkdir()
    (root / "parts" / "mine" / "data.csv").write_text("1,2")
    outside = tmp_path / "outside-model"
    tiny.save(outside)
    (root / "parts" / "linked").symlink_to(outside, target_is_directory=True)
    return root, outside


def _everything(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_cache_list_shows_what_polymodal_wrote_with_sizes_and_folders(cache):
    root, _ = cache
    entries = cache_entries()
    assert [(e.kind, e.name) for e in entries] == [
        ("hub", "hub/org--name/0123abcd"),
        ("judge", "judge/digits-0123456789abcdef"),
        ("part", "parts/vit-digits"),
    ]
    judge = entries[1]
    assert judge.size == len(json.dumps({"version": "judge/1"})) + 100 and judge.path == root / judge.name
    result = CliRunner().invoke(main, ["cache", "list"])
    assert result.exit_code == 0
    for e in entries:
        assert e.name in result.output and str(e.path) in result.output
    assert "notes.txt" not in result.output and "mine" not in result.output and "linked" not in result.output
    assert "3 entries" in result.output and str(root) in result.output


def test_cache_clear_asks_first_and_removes_only_polymodal_entries(cache):
    root, outside = cache
    runner = CliRunner()
    before = _everything(root)
    result = runner.invoke(main, ["cache", "clear"], input="n\n")
    assert result.exit_code != 0 and "Remove 3 entries" in result.output
    assert _everything(root) == before
    result = runner.invoke(main, ["cache", "clear", "judge/digits-0123456789abcdef", "--yes"])
    assert result.exit_code == 0 and "removed judge/digits-0123456789abcdef" in result.output
    assert [e.name for e in cache_entries()] == ["hub/org--name/0123abcd", "parts/vit-digits"]
    result = runner.invoke(main, ["cache", "clear"], input="y\n")
    assert result.exit_code == 0, result.output
    assert cache_entries() == []
    left = _everything(root)
    assert {"notes.txt", "parts/mine/data.csv", "parts/linked"} <= left
    assert not [n for n in left if "vit-digits" in n or "0123abcd" in n or "digits-0123" in n]
    assert (outside / "model.safetensors").is_file()  # a link is never followed
    assert "nothing cached" in runner.invoke(main, ["cache", "list"]).output


def test_cache_clear_by_short_name_or_kind_and_an_unknown_name(cache):
    root, _ = cache
    assert [e.name for e in select_entries(["vit-digits"])] == ["parts/vit-digits"]
    assert [e.name for e in select_entries(["hub"])] == ["hub/org--name/0123abcd"]
    result = CliRunner().invoke(main, ["cache", "clear", "vit-digitz", "--yes"])
    assert result.exit_code != 0 and result.output.startswith("Error: no cache entry 'vit-digitz'")
    assert "parts/vit-digits" in result.output and len(cache_entries()) == 3
    assert [e.name for e in clear_cache(["parts"])] == ["parts/vit-digits"]
    assert (root / "parts" / "mine" / "data.csv").is_file()
