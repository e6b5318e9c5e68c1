"""Model folders (polymodal.io): round trip, metadata, model card, strict loading, atomic writes, no pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import polymodal
import polymodal.io.folders as pio
from polymodal import hookimpl
from polymodal.config import config, field
from polymodal.io import LoadError, atomic_write, load_model, load_state_strict, save_model
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.plugins.vit import ViTClassifier
from polymodal.registry.loader import register_plugin, unregister_plugin

TINY = ViTEncoderConfig(image_size=8, patch_size=4, channels=1, depth=2, block=BlockConfig(dim=16, heads=2))


def tiny_vit(seed: int = 0) -> ViTClassifier:
    """A tiny ViT with every weight random (the head is zero-initialised otherwise)."""
    model = polymodal.create("vit", encoder=TINY, num_classes=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- round trip and contents ----------------------------------------------------------------------


def test_save_then_load_gives_identical_state_and_outputs(tmp_path):
    model = tiny_vit()
    folder = model.save(tmp_path / "m")
    assert folder == tmp_path / "m"
    loaded = polymodal.load(folder)
    assert type(loaded) is ViTClassifier and not loaded.training
    assert loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert list(want) == list(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_config_json_names_family_and_config(tmp_path):
    model = tiny_vit()
    model.save(tmp_path / "m", source="unit test")
    header = json.loads((tmp_path / "m" / "config.json").read_text())
    assert header["family"] == "vit"
    assert header["format"] == pio.FORMAT
    assert header["config"] == model.config_dict()
    assert header["config"]["encoder"]["block"]["dim"] == 16
    assert header["source"] == "unit test"
    assert ViTClassifier.config_from_dict(header["config"]) == model.config


def test_safetensors_metadata_names_the_family(tmp_path):
    tiny_vit().save(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["family"] == "vit" and meta["format"] == pio.FORMAT
    assert "head.weight" in keys and "encoder.cls_token" in keys


def test_readme_card_mentions_metrics_when_given(tmp_path):
    model = tiny_vit()
    model.save(tmp_path / "plain")
    plain = (tmp_path / "plain" / "README.md").read_text()
    assert "vit" in plain and "ViTClassifier" in plain and "patch 4" in plain
    assert "Metrics" not in plain and not (tmp_path / "plain" / "metrics.json").exists()

    metrics = {"accuracy": 0.91234, "loss": 0.25, "samples": 360, "data": "digits"}
    model.save(tmp_path / "scored", metrics=metrics, card="Trained for a unit test.", source="pytest")
    card = (tmp_path / "scored" / "README.md").read_text()
    assert "## Metrics" in card
    assert "| accuracy | 0.9123 |" in card and "| samples | 360 |" in card and "| data | digits |" in card
    assert "Trained for a unit test." in card and "Source: pytest" in card
    assert json.loads((tmp_path / "scored" / "metrics.json").read_text()) == metrics


# -- strict loading ------------------------------------------------------------------------------


def test_missing_unexpected_and_mis_shaped_keys_fail_together_grouped_by_prefix(tmp_path):
    tiny_vit().save(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(str(path))
    del state["encoder.blocks.blocks.0.mlp.fc1.weight"]
    del state["encoder.blocks.blocks.1.attn.qkv.bias"]
    del state["head.bias"]
    state["extra.adapter.weight"] = torch.zeros(2)
    state["extra.adapter.bias"] = torch.zeros(2)
    state["decoder.proj.weight"] = torch.zeros(2)
    state["encoder.pos_embed.weight"] = torch.zeros(1, 10, 16)
    save_file(state, str(path), metadata={"family": "vit", "format": pio.FORMAT})

    with pytest.raises(LoadError) as info:
        load_model(tmp_path / "m")
    msg = str(info.value)
    assert str(path) in msg
    missing = msg.index("missing keys")
    unexpected = msg.index("unexpected keys")
    shapes = msg.index("shape mismatches")
    assert missing < unexpected < shapes
    # grouped by prefix, with counts
    assert "encoder.blocks: 2 (encoder.blocks.blocks.0.mlp.fc1.weight, encoder.blocks.blocks.1.attn.qkv.bias)" in msg
    assert "head.bias: 1 (head.bias)" in msg
    assert "extra.adapter: 2 (extra.adapter.bias, extra.adapter.weight)" in msg
    assert "decoder.proj: 1" in msg
    assert "encoder.pos_embed.weight (1, 10, 16) vs model (1, 5, 16)" in msg


def test_strict_loading_abbreviates_long_groups():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    state = {f"extra.layer.{i}": torch.zeros(1) for i in range(5)} | model.state_dict()
    with pytest.raises(LoadError, match=r"extra\.layer: 5 \(extra\.layer\.0, extra\.layer\.1, extra\.layer\.2, …\)"):
        load_state_strict(model, state, "somewhere")


def test_strict_loading_accepts_an_exact_state():
    model = nn.Linear(3, 2)
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    load_state_strict(model, state, "here")
    assert torch.equal(model.weight, torch.ones(2, 3))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "huge-header", "bad-header-json"])
def test_corrupt_safetensors_is_a_load_error_naming_the_file(tmp_path, damage):
    tiny_vit().save(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")  # safetensors: 8-byte header length, JSON header, tensor bytes
    broken = {
        "truncate": data[: len(data) - 100],
        "garbage": os.urandom(len(data)),
        "empty": b"",
        "huge-header": (10**12).to_bytes(8, "little") + data[8:],
        "bad-header-json": data[:8] + b"{" * n + data[8 + n :],
    }[damage]
    path.write_bytes(broken)
    with pytest.raises(LoadError) as info:
        load_model(tmp_path / "m")
    assert str(path) in str(info.value)


def test_missing_safetensors_is_named(tmp_path):
    tiny_vit().save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="model.safetensors"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b'{"family": "vit"}', b"\xff\xfe\x00garbage"])
def test_malformed_config_json_is_named(tmp_path, data):
    tiny_vit().save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_bytes(data)
    with pytest.raises(LoadError) as info:
        load_model(tmp_path / "m")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda c: c["encoder"].update(depth=0), "depth"),
        (lambda c: c.update(bogus=1), "bogus"),
        (lambda c: c.update(pool="max"), "pool"),
    ],
)
def test_invalid_config_values_name_the_file_and_field(tmp_path, edit, needle):
    tiny_vit().save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    header = json.loads(path.read_text())
    edit(header["config"])
    path.write_text(json.dumps(header))
    with pytest.raises(LoadError) as info:
        load_model(tmp_path / "m")
    assert str(path) in str(info.value) and needle in str(info.value)


def test_unknown_family_lists_installed_families(tmp_path):
    tiny_vit().save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    header = json.loads(path.read_text())
    header["family"] = "no-such-family"
    path.write_text(json.dumps(header))
    with pytest.raises(LoadError) as info:
        load_model(tmp_path / "m")
    msg = str(info.value)
    assert "'no-such-family'" in msg and "installed:" in msg and "vit" in msg.split("installed:")[1]


def test_not_a_folder(tmp_path):
    with pytest.raises(LoadError, match="not a model folder"):
        load_model(tmp_path / "nothing-here")


# -- atomic replacement ---------------------------------------------------------------------------


class ExtrasFail(ViTClassifier):
    """A ViT whose extra files fail to write halfway."""

    def save_extras(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text("{half")
        raise OSError("disk full while writing tokenizer.json")


@pytest.fixture()
def saved(tmp_path):
    """A folder runs/m holding a first model (with metrics and a checkpoint), and its file snapshot."""
    runs = tmp_path / "runs"
    model = tiny_vit(seed=1)
    model.save(runs / "m", metrics={"accuracy": 0.5})
    (runs / "m" / "checkpoint").mkdir()
    (runs / "m" / "checkpoint" / "state.safetensors").write_bytes(b"resume me")
    return runs, model, snapshot(runs / "m")


def assert_intact(runs: Path, model: nn.Module, before: dict[str, bytes]) -> None:
    assert sorted(p.name for p in runs.iterdir()) == ["m"], "temporary folders were left behind"
    assert snapshot(runs / "m") == before
    loaded = polymodal.load(runs / "m")
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


def test_failing_save_state_leaves_the_previous_folder(saved, monkeypatch):
    runs, model, before = saved

    def half_then_fail(path, tensors, metadata):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pio, "save_state", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tiny_vit(seed=2).save(runs / "m", metrics={"accuracy": 0.9})
    monkeypatch.undo()
    assert_intact(runs, model, before)


def test_failing_save_extras_leaves_the_previous_folder(saved):
    runs, model, before = saved
    bad = ExtrasFail(tiny_vit(seed=3).config)
    with pytest.raises(OSError, match="tokenizer.json"):
        bad.save(runs / "m")
    assert_intact(runs, model, before)


def test_interrupt_leaves_the_previous_folder(saved, monkeypatch):
    runs, model, before = saved

    def interrupted(path, tensors, metadata):
        raise KeyboardInterrupt

    monkeypatch.setattr(pio, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_vit(seed=2).save(runs / "m")
    monkeypatch.undo()
    assert_intact(runs, model, before)


@pytest.mark.parametrize("failing_step", ["old-aside", "new-in"])
def test_failing_swap_keeps_the_previous_folder_and_its_checkpoint(saved, monkeypatch, failing_step):
    runs, model, before = saved
    real_replace = os.replace

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        if failing_step == "old-aside" and dst.name == ".m.old":
            raise OSError("rename refused")
        if failing_step == "new-in" and dst == runs / "m" and src.name != ".m.old":  # the new folder, not the rollback
            raise OSError("rename refused")
        return real_replace(src, dst)

    monkeypatch.setattr(pio, "_exchange", lambda a, b: False)  # the two-rename swap (no renameat2)
    monkeypatch.setattr(pio.os, "replace", replace)
    with pytest.raises(OSError, match="rename refused"):
        tiny_vit(seed=2).save(runs / "m")
    monkeypatch.undo()
    assert_intact(runs, model, before)


def test_checkpoint_survives_a_re_save_and_stale_files_go(saved):
    runs, _, before = saved
    new = tiny_vit(seed=4)
    new.save(runs / "m")  # no metrics this time
    after = snapshot(runs / "m")
    assert after["checkpoint/state.safetensors"] == b"resume me"
    assert "metrics.json" not in after  # the folder is replaced, not merged
    assert after["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in runs.iterdir()) == ["m"]
    with torch.no_grad():
        assert torch.equal(polymodal.load(runs / "m")(images()), new(images()))


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, '{"a": 1}')

    def boom(path: Path) -> None:
        path.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, boom)
    assert target.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    atomic_write(target, b"bytes")
    assert target.read_bytes() == b"bytes"


# -- no pickle -------------------------------------------------------------------------------------


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = tiny_vit()
    model.save(tmp_path / "m")

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a model folder must not unpickle")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = polymodal.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["POLYMODAL_TEST_MARKER"]),))


def test_a_pickle_posing_as_safetensors_is_rejected_not_run(tmp_path, monkeypatch):
    tiny_vit().save(tmp_path / "m")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("POLYMODAL_TEST_MARKER", str(marker))
    path = tmp_path / "m" / "model.safetensors"
    torch.save({"head.weight": _Payload()}, path)
    with pytest.raises(LoadError, match="model.safetensors"):
        load_model(tmp_path / "m")
    assert not marker.exists()


# -- tied weights and extras (a family registered around the test) -------------------------------


@config
class ToyConfig:
    """A tiny tied-embedding language model."""

    vocab: int = field(11, "Vocabulary size.")
    dim: int = field(8, "Width.")


class TiedToy(PolymodalModel):
    """Token ids → logits with the output projection tied to the embedding."""

    family = "tiedtoy"
    config_class = ToyConfig

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.out.weight = self.embed.weight
        self.words = [f"w{i}" for i in range(cfg.vocab)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))

    def save_extras(self, directory: Path) -> None:
        (directory / "vocab.json").write_text(json.dumps(self.words))

    def load_extras(self, directory: Path) -> None:
        self.words = json.loads((directory / "vocab.json").read_text())


class ToyPlugin:
    @hookimpl
    def register_models(self, register):
        register("tiedtoy", ModelSpec(TiedToy, ToyConfig(), doc="tied toy for io tests"))


@pytest.fixture()
def toy_family():
    register_plugin(ToyPlugin(), "io-test-toy")
    yield
    unregister_plugin("io-test-toy")


def test_tied_weights_and_extras_round_trip(tmp_path, toy_family):
    model = polymodal.create("tiedtoy")
    model.words = [w.upper() for w in model.words]
    save_model(model, tmp_path / "toy")
    assert (tmp_path / "toy" / "vocab.json").is_file()
    loaded = polymodal.load(tmp_path / "toy")
    assert loaded.words == model.words
    assert loaded.out.weight is loaded.embed.weight  # still tied after loading
    ids = torch.arange(11)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_metrics_are_written_as_plain_numbers(tmp_path):
    """Losses hand back device scalars; metrics.json and the card get numbers (nested ones too), and a
    tensor that is not one number is an error naming its shape."""
    import json

    import torch

    from polymodal.io.folders import plain_metrics

    metrics = {"accuracy": torch.tensor(0.75), "codes": torch.tensor(12), "nested": {"loss": torch.tensor([2.5])}}
    plain = plain_metrics(metrics)
    assert plain == {"accuracy": 0.75, "codes": 12, "nested": {"loss": 2.5}}
    assert isinstance(plain["codes"], int) and isinstance(plain["accuracy"], float)
    json.dumps(plain)  # what write_model and write_metrics do with it
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        plain_metrics({"bad": torch.zeros(2)})
