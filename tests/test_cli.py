"""The command line, as a user types it (click's runner, in process)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from polymodal.cli import main

TINY = ["--set", "encoder.block.dim=32", "--set", "encoder.depth=2", "--set", "encoder.block.heads=2"]


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


@pytest.mark.parametrize(
    "old,new", [(["classify"], ["clip", "classify"]), (["attention-maps"], ["dino", "attention-maps"])]
)
def test_old_top_level_command_names_still_work_with_a_deprecation_note(old, new):
    result = CliRunner().invoke(main, [*old, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        f"`polymodal {old[0]}` is deprecated and goes in the next release; use `polymodal {' '.join(new)}`"
    )
    assert "--help" in result.stdout and result.stdout == CliRunner().invoke(main, [*new, "--help"]).stdout.replace(
        f"main {' '.join(new)}", f"main {old[0]}"
    )


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


# -- sampling options, declared by each family ------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Untrained iGPT and VQ-VAE folders (``--help`` and option parsing need no training)."""
    from polymodal.plugins.igpt import VARIANTS as IGPT
    from polymodal.plugins.vqvae import VARIANTS as VQVAE

    root = tmp_path_factory.mktemp("folders")
    for name, spec in (("igpt", IGPT["igpt"]), ("vqvae", VQVAE["vqvae"])):
        spec.build().save(root / name)
    return root


def test_sample_help_lists_the_options_of_the_folder_s_family(run, folders):
    igpt = run("sample", str(folders / "igpt"), "--help").output
    for flag in ("--complete", "--temperature", "--top-k", "--top-p", "--no-cache", "--prompt", "--seed"):
        assert flag in igpt
    assert "--cfg" not in igpt and "--rerank" not in igpt and "--candidates" not in igpt
    vqvae = run("sample", str(folders / "vqvae"), "--help").output
    assert "--out" in vqvae and "--temperature" not in vqvae and "--complete" not in vqvae
    everything = run("sample", "--help").output  # no folder: every family's options
    for flag in ("--cfg", "--rerank", "--candidates", "--complete", "--no-cache"):
        assert flag in everything


def test_sample_refuses_an_option_the_family_does_not_declare(folders):
    result = CliRunner().invoke(main, ["sample", str(folders / "igpt"), "--cfg", "2"])
    assert result.exit_code == 2
    assert "the 'igpt' family does not support --cfg (cfg_scale)" in result.output
    assert "--complete, --temperature, --top-k, --top-p, --no-cache" in result.output
    result = CliRunner().invoke(main, ["sample", str(folders / "igpt"), "--colour", "red"])
    assert result.exit_code == 2 and "No such option '--colour'" in result.output


def test_sample_passes_exactly_the_declared_options_that_were_given(folders, tmp_path, monkeypatch):
    from polymodal.generation.options import SampleOption
    from polymodal.plugins.vqvae import VQVAE

    calls = []

    def record(self, out, n=8, prompt=None, seed=0, **options):
        calls.append((n, prompt, seed, options))
        return []

    monkeypatch.setattr(
        VQVAE,
        "sample_options",
        (
            SampleOption("strength", "--strength", "How strong."),
            SampleOption("fast", "--fast", "Go fast.", type="switch", value="yes"),
        ),
        raising=False,
    )
    monkeypatch.setattr(VQVAE, "sample_to_folder", record)
    assert "--strength" in CliRunner().invoke(main, ["sample", str(folders / "vqvae"), "--help"]).output
    result = CliRunner().invoke(main, ["sample", str(folders / "vqvae"), "-n", "3", "--strength", "0.5", "--fast"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["sample", str(folders / "vqvae"), "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert calls == [(3, None, 0, {"strength": 0.5, "fast": "yes"}), (8, None, 4, {})]


def test_sample_option_declarations_are_checked():
    from polymodal.generation.options import SampleOption

    with pytest.raises(ValueError, match="flag must look like '--name'; got 'cfg'"):
        SampleOption("cfg_scale", "cfg", "Guidance.")
    with pytest.raises(ValueError, match="type must be one of .*; got 'image'"):
        SampleOption("complete", "--complete", "An image.", type="image")
    with pytest.raises(ValueError, match="keyword must be a Python identifier; got 'top-k'"):
        SampleOption("top-k", "--top-k", "k.")


def test_every_documented_sample_command_uses_options_its_family_declares():
    import re
    from pathlib import Path

    import polymodal
    from polymodal.generation.options import sample_options

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = re.findall(r"^polymodal sample runs/([\w.-]+)(.*)$", readme, flags=re.MULTILINE)
    assert len(lines) >= 8
    for variant, rest in lines:
        cls = polymodal.registry.get("model", variant).model_class
        allowed = {"-n", "--prompt", "--seed", "--out", "--dtype", "--compile", "--device"} | {
            o.flag for o in sample_options(cls)
        }
        used = set(re.findall(r"(?<![\w-])(-n|--[a-z][\w-]*)", rest.split("#")[0]))
        assert used <= allowed, f"README: `polymodal sample runs/{variant}` uses {sorted(used - allowed)}"
