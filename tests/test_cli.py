"""The command line, as a user types it (click's runner, in process)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from polymodal.cli import main

TINY = ["--set", "encoder.dim=32", "--set", "encoder.depth=2", "--set", "encoder.heads=2"]


@pytest.fixture()
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_plugins_lists_core_and_vit(run):
    out = run("plugins").output
    assert "core" in out and "vit" in out and "loaded" in out


def test_list_and_info(run):
    assert "vit-b16" in run("list", "model").output
    info = run("info", "vit").output
    assert "encoder.patch_size" in info and "train.lr" in info and "default data: digits" in info


def test_unknown_model_suggests_close_names(run):
    result = CliRunner().invoke(main, ["train", "vti", "--steps", "1"])
    assert result.exit_code != 0
    assert "unknown model 'vti'" in result.output and "'vit'" in result.output


def test_unknown_list_kind_is_a_clear_error():
    result = CliRunner().invoke(main, ["list", "widgets"])
    assert result.exit_code != 0 and "unknown registry kind 'widgets'" in result.output


def test_train_eval_round_trip(run, tmp_path):
    out = tmp_path / "vit"
    result = run("train", "vit", "--steps", "15", "--seed", "3", "--out", str(out), "--no-progress", *TINY)
    assert "accuracy:" in result.output and f"saved model folder: {out}" in result.output
    for name in ("config.json", "model.safetensors", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    evaluated = json.loads(run("eval", str(out), "--json").output)
    assert evaluated["accuracy"] == pytest.approx(saved["accuracy"])
    assert saved["steps"] == 15 and saved["seed"] == 3


def test_train_rejects_bad_override():
    result = CliRunner().invoke(main, ["train", "vit", "--steps", "1", "--set", "encoder.depth=0"])
    assert result.exit_code != 0 and "depth must be in [1, 1024], got 0" in result.output


def test_steps_and_epochs_are_exclusive():
    result = CliRunner().invoke(main, ["train", "vit", "--steps", "1", "--epochs", "1"])
    assert result.exit_code != 0 and "not both" in result.output


def test_sample_refuses_a_classifier(run, tmp_path):
    out = tmp_path / "vit"
    run("train", "vit", "--steps", "2", "--out", str(out), "--no-progress", *TINY)
    result = CliRunner().invoke(main, ["sample", str(out)])
    assert result.exit_code != 0 and "does not generate samples" in result.output


# -- plugin commands, grouped by family ----------------------------------------------------------

def test_plugin_commands_are_grouped_by_family(run):
    top = run("--help").output
    assert "clip" in top and "dino" in top
    for old in ("classify", "attention-maps", "fromage-caption"):  # hidden: listed under their family only
        assert f"\n  {old} " not in top
    assert "classify" in run("clip", "--help").output
    dino = run("dino", "attention-maps", "--help")
    assert dino.exit_code == 0 and "Usage: main dino attention-maps" in dino.output
    assert "deprecated" not in dino.stderr


@pytest.mark.parametrize("old,new", [(["classify"], ["clip", "classify"]),
                                     (["attention-maps"], ["dino", "attention-maps"])])
def test_old_top_level_command_names_still_work_with_a_deprecation_note(old, new):
    result = CliRunner().invoke(main, [*old, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (f"`polymodal {old[0]}` is deprecated and goes in the next release; "
                                     f"use `polymodal {' '.join(new)}`")
    assert "--help" in result.stdout and result.stdout == CliRunner().invoke(main, [*new, "--help"]).stdout.replace(
        f"main {' '.join(new)}", f"main {old[0]}")


def test_a_registered_command_runs_under_its_plugin_and_under_its_old_name():
    import click

    from polymodal import hookimpl
    from polymodal.registry.loader import register_plugin, unregister_plugin

    class Greeter:
        @hookimpl
        def register_commands(self, register):
            @click.command("hello")
            @click.argument("who")
            def hello(who):
                """Say hello."""
                click.echo(f"hello {who}")

            register("greeter-hello", hello)

    register_plugin(Greeter(), "greeter")
    try:
        grouped = CliRunner().invoke(main, ["greeter", "hello", "you"])
        assert grouped.exit_code == 0 and grouped.stdout == "hello you\n" and grouped.stderr == ""
        old = CliRunner().invoke(main, ["greeter-hello", "you"])
        assert old.exit_code == 0 and old.stdout == "hello you\n"
        assert "use `polymodal greeter hello`" in old.stderr
        assert "greeter" in CliRunner().invoke(main, ["--help"]).stdout
    finally:
        unregister_plugin("greeter")
    assert CliRunner().invoke(main, ["greeter", "hello", "you"]).exit_code != 0
