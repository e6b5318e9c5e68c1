"""The generative table (``polymodal eval --generative``): a row per generative model folder, families
joining through their registered class's hook, others skipped with a message; Markdown + JSON."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import polymodal
import polymodal.eval.judge as J
from polymodal import hookimpl
from polymodal.cli import main
from polymodal.config import config, field
from polymodal.data import load_digits
from polymodal.eval import generative as gen
from polymodal.models import ModelSpec, PolymodalModel, TrainConfig
from polymodal.registry.loader import register_plugin, unregister_plugin


@config
class MeansConfig:
    """Per-class mean images: the smallest model that can be sampled from."""

    classes: int = field(10, "Classes (1: unconditional).")
    channels: int = field(1, "Image channels.")
    size: int = field(8, "Image side.")


class ClassMeans(PolymodalModel):
    """Learns the mean image of each class; samples it with a little seeded noise (a generative toy)."""

    family = "gen-toy-means"
    config_class = MeansConfig

    def __init__(self, cfg: MeansConfig) -> None:
        super().__init__(cfg)
        self.means = nn.Parameter(torch.full((cfg.classes, cfg.channels, cfg.size, cfg.size), 0.5))

    def _index(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self.config.classes > 1 else torch.zeros_like(labels)

    def loss(self, batch):
        loss = F.mse_loss(self.means[self._index(batch["label"])], batch["image"])
        return loss, {}

    def evaluate(self, dataset, split="test"):
        data = dataset.split(split)
        with torch.no_grad():
            return {"mse": F.mse_loss(self.means[self._index(data["label"])], data["image"]).item()}

    def generative_samples(self, dataset, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % max(self.config.classes, 10)  # (n,)
        noise = torch.randn(n, *self.means.shape[1:], generator=g) * 0.05  # (n, C, S, S)
        images = (self.means[self._index(labels)] + noise).clamp(0, 1)  # (n, C, S, S)
        return images, ({"label": labels} if self.config.classes > 1 else None)


class NotGenerative(ClassMeans):
    """The same model without the hook: no row."""

    family = "gen-toy-plain"
    generative_samples = None


class Plugin:
    @hookimpl
    def register_models(self, register):
        recipe = TrainConfig(steps=30, batch_size=64, lr=0.05, warmup_steps=0)
        register("gen-toy-cond", ModelSpec(ClassMeans, MeansConfig(), data="digits", train=recipe))
        register("gen-toy-uncond", ModelSpec(ClassMeans, MeansConfig(classes=1), data="digits", train=recipe))
        register("gen-toy-plain", ModelSpec(NotGenerative, MeansConfig(), data="digits", train=recipe))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    """Three trained toy folders in one runs/ folder, a quick judge in a private cache."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("gen")
    mp.setenv("POLYMODAL_CACHE", str(root / "cache"))
    mp.setattr(J, "TRAIN_STEPS", 150)
    mp.setattr(J, "_MEMORY", {})
    register_plugin(Plugin(), "generative-table-test")
    runs = root / "runs"
    for name in ("gen-toy-cond", "gen-toy-uncond", "gen-toy-plain"):
        polymodal.train(name, out=runs / name, progress=False)
    yield runs
    unregister_plugin("generative-table-test")
    mp.undo()


def test_the_hook_declares_membership(folders):
    families = gen.generative_families()
    assert "gen-toy-means" in families and "gen-toy-plain" not in families and "vit" not in families


def test_a_row_per_generative_folder_with_every_column(folders):
    table = gen.generative_table(gen.find_folders(folders), n=64, seed=3)
    rows = {r["model"]: r for r in table["rows"]}
    assert list(rows) == ["gen-toy-cond", "gen-toy-uncond", "train split (reference)"]
    for row in table["rows"]:
        assert set(gen.COLUMNS) <= set(row)
        assert row["data"] == "digits" and row["samples"] == 64 and row["fd_judge"] >= 0
    cond, uncond, ref = rows["gen-toy-cond"], rows["gen-toy-uncond"], rows["train split (reference)"]
    assert cond["family"] == uncond["family"] == "gen-toy-means"
    assert cond["parameters"] == 10 * 64 and uncond["parameters"] == 64
    assert cond["samples_per_s"] > 0 and cond["samples_per_s"] == pytest.approx(64 / cond["seconds"])
    assert uncond["sample_accuracy"] is None and 0.0 <= cond["sample_accuracy"] <= 1.0
    # the class means are recognisable digits, the one overall mean is not like the test split
    assert cond["sample_accuracy"] > 0.5 and cond["fd_judge"] < uncond["fd_judge"]
    assert ref["sample_accuracy"] > cond["sample_accuracy"] - 0.5 and ref["fd_judge"] < uncond["fd_judge"]
    assert [s["folder"] for s in table["skipped"]] == [str(folders / "gen-toy-plain")]
    assert "gen-toy-plain family declares no generative_samples" in table["skipped"][0]["reason"]


def test_the_row_is_the_judge_applied_to_the_family_samples(folders):
    row = gen.evaluate_generative(folders / "gen-toy-cond", n=40, seed=5)
    model = polymodal.load(folders / "gen-toy-cond")
    data = load_digits()
    images, targets = model.generative_samples(data, 40, seed=5)
    judge = J.get_judge(data)
    want = J.judge_samples(data, images.detach(), targets)
    assert row["sample_accuracy"] == pytest.approx(want["sample_accuracy"], abs=0)
    assert row["fd_judge"] == pytest.approx(want["fd_judge"], rel=1e-9)
    assert judge.image_size == 8


def test_a_folder_without_the_hook_is_refused_by_name(folders):
    with pytest.raises(ValueError, match="gen-toy-plain family declares no generative_samples.*gen-toy-means"):
        gen.evaluate_generative(folders / "gen-toy-plain", n=8)
    with pytest.raises(ValueError, match="n >= 2 samples.*got 1"):
        gen.evaluate_generative(folders / "gen-toy-cond", n=1)


def test_the_command_prints_markdown_writes_json_and_names_skips(folders, tmp_path):
    out = tmp_path / "table.md"
    result = CliRunner().invoke(
        main, ["eval", "--generative", "--from", str(folders), "--samples", "16", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    header = "| " + " | ".join(gen.COLUMNS) + " |"
    assert header in result.stdout and "| gen-toy-cond | gen-toy-means | digits | 16 |" in result.stdout
    assert f"skipped {folders / 'gen-toy-plain'}" in result.stderr
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["gen-toy-cond", "gen-toy-uncond", "train split (reference)"]
    assert out.read_text().startswith(header)
    listed = CliRunner().invoke(
        main, ["eval", "--generative", str(folders / "gen-toy-uncond"), "--samples", "8", "--json", "--no-reference"]
    )
    assert listed.exit_code == 0, listed.output
    only = json.loads(listed.stdout)
    assert [r["model"] for r in only["rows"]] == ["gen-toy-uncond"] and only["samples"] == 8


def test_the_table_never_replaces_a_users_file(folders, tmp_path):
    args = ["eval", "--generative", "--from", str(folders), "--samples", "8", "--no-reference"]
    for name, content in (("notes.md", "my notes"), ("both.md", "| model |")):
        (tmp_path / name).write_text(content)  # a user's Markdown, or one beside a user's JSON
    (tmp_path / "both.json").write_text('{"mine": 1}')
    (tmp_path / "data.json").write_text("[1, 2]")  # only the JSON beside a new Markdown name exists
    for out in ("notes.md", "both.md", "data.md", "table.json"):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / out)])
        assert result.exit_code != 0, (out, result.output)
        assert "skipped" not in result.stderr  # refused before any folder was read
    assert (tmp_path / "notes.md").read_text() == "my notes" and (tmp_path / "both.json").read_text() == '{"mine": 1}'
    assert (tmp_path / "data.json").read_text() == "[1, 2]" and not (tmp_path / "data.md").exists()
    assert "never overwrites" in result.output or "Markdown path" in result.output
    for _ in range(2):  # a table the command wrote is replaced by the next run
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "table.md")])
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "table.json").read_text())["samples"] == 8


def test_plain_eval_still_takes_one_folder(folders):
    result = CliRunner().invoke(main, ["eval", str(folders / "gen-toy-cond"), "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"mse"}
    two = CliRunner().invoke(main, ["eval", str(folders / "gen-toy-cond"), str(folders / "gen-toy-uncond")])
    assert two.exit_code != 0 and "one DIRECTORY (or --generative for several); got 2" in two.output
    empty = CliRunner().invoke(main, ["eval", "--generative", "--from", str(folders / "gen-toy-cond" / "checkpoint")])
    assert empty.exit_code != 0 and "no model folders" in empty.output


def test_a_folder_no_installed_family_reads_is_skipped_not_fatal(folders, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "config.json").write_text(json.dumps({"family": "no-such-family", "config": {}}))
    table = gen.generative_table([stranger, folders / "gen-toy-uncond"], n=8, reference=False)
    assert [r["model"] for r in table["rows"]] == ["gen-toy-uncond"]
    (skip,) = table["skipped"]
    assert skip["folder"] == str(stranger) and "no-such-family" in skip["reason"]
