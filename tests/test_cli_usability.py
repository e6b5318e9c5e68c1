"""The command line's rough edges for a new user (issue 15): `bench --help`, `--threads`, a samples
folder per model and run, example images from the embedded data, help texts, `.gitignore`, the
README's install note."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from polymodal.cli import COMPUTING, THREADS, main
from polymodal.io.samples import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


@pytest.fixture()
def threads():
    """Restore torch's thread count after a test that sets it."""
    prior = torch.get_num_threads()
    yield
    torch.set_num_threads(prior)


@pytest.fixture(scope="module")
def vqvae(tmp_path_factory):
    """An untrained VQ-VAE model folder: it samples (test images and reconstructions) without training."""
    from polymodal.plugins.vqvae import VARIANTS

    folder = tmp_path_factory.mktemp("models") / "my-vqvae"
    VARIANTS["vqvae"].build().save(folder)
    return folder


def _computing_commands() -> dict[str, list[str]]:
    """Every command that computes, as the words a user types: the built-in ones and each plugin's."""
    from polymodal.registry import get_registry

    ctx = click.Context(main)
    families = {e.plugin for e in get_registry().entries("command")}
    found = {}
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        if name in COMPUTING:
            found[name] = [name]
        elif name in families:
            for sub in command.list_commands(ctx):
                found[f"{name} {sub}"] = [name, sub]
    return found


# -- bench --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_lists_the_suites_and_how_to_get_their_help(flag):
    result = CliRunner().invoke(main, ["bench", flag])
    assert result.exit_code == 0, result.output
    for suite in ("attention", "models", "compare", "table"):
        assert re.search(rf"^\s+{suite}\s+\S", result.output, re.M), suite
    assert "polymodal bench SUITE --help" in result.output


def test_a_suite_s_help_still_reaches_the_suite():
    result = CliRunner().invoke(main, ["bench", "compare", "--help"])
    assert result.exit_code == 0 and "usage: polymodal bench compare" in result.output
    assert "--threshold" in result.output


def test_bench_script_help_lists_the_suites(capsys):
    import bench

    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(suite in out for suite in bench.SUITES) and "--help" in out
    assert bench.main([]) == 2


# -- --threads ---------------------------------------------------------------------------------------


def test_every_command_that_computes_has_threads():
    commands = _computing_commands()
    builtin = {"train", "eval", "sample", "convert"}
    plugins = {"clip classify", "flamingo caption", "fromage caption", "fromage retrieve", "dino attention-maps"}
    assert builtin | plugins <= set(commands)
    ctx = click.Context(main)
    for words in commands.values():
        command = main
        for word in words:
            command = command.get_command(ctx, word)
        assert THREADS in command.params, words
        assert sum("--threads" in getattr(p, "opts", ()) for p in command.params) == 1, words
    for name in ("plugins", "list", "info"):  # nothing to compute
        assert THREADS not in main.get_command(ctx, name).params


@pytest.mark.parametrize("words", sorted(_computing_commands().values()))
def test_threads_sets_torch_s_thread_count(words, threads):
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, [*words, "--threads", "3", "--help"])
    assert result.exit_code == 0, result.output
    assert "--threads N" in result.output and "POLYMODAL_THREADS" in result.output
    assert torch.get_num_threads() == 3


def test_threads_on_a_real_run_and_from_the_environment(vqvae, tmp_path, threads):
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, ["sample", str(vqvae), "-n", "1", "--out", str(tmp_path / "a"), "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2
    runner = CliRunner(env={"POLYMODAL_THREADS": "3"})
    result = runner.invoke(main, ["sample", str(vqvae), "-n", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 3


def test_bad_threads_is_a_usage_error(vqvae, threads):
    result = CliRunner().invoke(main, ["sample", str(vqvae), "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.output and "0" in result.output


# -- sample folders ----------------------------------------------------------------------------------


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_sample_defaults_to_a_folder_per_model_and_replaces_only_its_previous_run(vqvae, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = CliRunner().invoke(main, ["sample", str(vqvae), "-n", "8"])
    assert first.exit_code == 0, first.output
    out = tmp_path / "samples" / "my-vqvae"  # samples/<model folder name>
    assert {f"sample_{i:03d}.png" for i in range(8)} | {"grid.png"} <= _files(out)
    (out / "notes.txt").write_text("mine")
    second = CliRunner().invoke(main, ["sample", str(vqvae), "-n", "4"])
    assert second.exit_code == 0, second.output
    printed = {Path(line).relative_to(Path("samples") / "my-vqvae").as_posix() for line in second.output.split()}
    assert {f"sample_{i:03d}.png" for i in range(4)} | {"grid.png"} <= printed
    assert _files(out) == printed | {"notes.txt", MANIFEST}  # exactly the 4 (+ grid), and the user's file
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == sorted(printed)
    assert not list((tmp_path / "samples").glob(".*.tmp"))  # no staging folder left


def test_sample_refuses_a_folder_of_other_files(vqvae, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"not a sample")
    result = CliRunner().invoke(main, ["sample", str(vqvae), "-n", "2", "--out", str(out)])
    assert result.exit_code != 0 and result.output.startswith("Error:")
    assert "holiday.png" in result.output and "did not write" in result.output
    assert _files(out) == {"holiday.png"} and (out / "holiday.png").read_bytes() == b"not a sample"


def test_sample_never_replaces_a_file_no_run_wrote(vqvae, tmp_path):
    out = tmp_path / "s"
    assert CliRunner().invoke(main, ["sample", str(vqvae), "-n", "1", "--out", str(out)]).exit_code == 0
    before = _files(out)
    (out / "sample_002.png").write_bytes(b"the user's")  # a name the next, larger run writes
    result = CliRunner().invoke(main, ["sample", str(vqvae), "-n", "3", "--out", str(out)])
    assert result.exit_code != 0 and "sample_002.png" in result.output
    assert (out / "sample_002.png").read_bytes() == b"the user's"
    assert _files(out) == before | {"sample_002.png"}  # the previous run's samples are still there too


def test_sample_refuses_a_manifest_pointing_outside(vqvae, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    (out / MANIFEST).write_text(json.dumps({"files": ["../precious.txt"]}))
    result = CliRunner().invoke(main, ["sample", str(vqvae), "-n", "1", "--out", str(out)])
    assert result.exit_code != 0 and "not a file inside the folder" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_a_samples_folder_s_sub_folders_follow_the_runs(tmp_path):
    from polymodal.io.samples import write_samples_folder

    def fill(names):
        def write(folder):
            for name in names:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(name)
            return [folder / name for name in names]

        return write

    out = tmp_path / "s"
    paths = write_samples_folder(out, fill(["a.png", "examples/a_0.png", "examples/a_1.png"]))
    assert paths == [out / "a.png", out / "examples" / "a_0.png", out / "examples" / "a_1.png"]
    (out / "mine.txt").write_text("keep")
    write_samples_folder(out, fill(["transcript.txt"]))
    assert _files(out) == {"transcript.txt", "mine.txt", MANIFEST} and not (out / "examples").exists()


# -- data export -------------------------------------------------------------------------------------


def test_data_export_writes_pngs_and_a_dataset_folder(tmp_path):
    from polymodal.data import load_digits, load_folder

    out = tmp_path / "examples"
    result = CliRunner().invoke(main, ["data", "export", "digits", "--n", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = [f"digits_{i:03d}.png" for i in range(5)]
    assert _files(out) == {*names, "captions.jsonl", "classes.txt"}
    test = load_digits().test
    folder = load_folder(out, test_fraction=0.2)
    both = {p: i for i, p in enumerate(folder.train["path"] + folder.test["path"])}
    images = torch.cat([folder.train["image"], folder.test["image"]])
    labels = torch.cat([folder.train["label"], folder.test["label"]])
    for i, name in enumerate(names):  # the first five test images, with their labels and captions
        assert torch.allclose(images[both[name]], test["image"][i], atol=1 / 255)
        assert int(labels[both[name]]) == int(test["label"][i])
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [line["caption"] for line in lines] == test["caption"][:5]


def test_data_export_never_overwrites(tmp_path):
    (tmp_path / "digits_003.png").write_bytes(b"mine")
    result = CliRunner().invoke(main, ["data", "export", "digits", "--n", "5", "--out", str(tmp_path)])
    assert result.exit_code != 0 and result.output.startswith("Error:") and "digits_003.png" in result.output
    assert _files(tmp_path) == {"digits_003.png"} and (tmp_path / "digits_003.png").read_bytes() == b"mine"


def test_data_export_train_split_of_shapes_and_a_dataset_without_images(tmp_path):
    from polymodal.data import load_folder

    out = tmp_path / "shapes"
    result = CliRunner().invoke(main, ["data", "export", "shapes", "-n", "3", "--split", "train", "--out", str(out)])
    assert result.exit_code == 0, result.output
    folder = load_folder(out)
    assert len(folder.train) + len(folder.test) == 3 and folder.meta["channels"] == 3
    result = CliRunner().invoke(main, ["data", "export", "text", "--out", str(tmp_path / "t")])
    assert result.exit_code != 0 and "has no images" in result.output
    assert not (tmp_path / "t").exists()


# -- help texts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [[], ["fromage"], ["data"]])
def test_help_shows_each_command_s_whole_first_paragraph(group):
    result = CliRunner().invoke(main, [*group, "--help"], terminal_width=80)
    assert result.exit_code == 0
    listing = " ".join(result.output.partition("Commands:")[2].split())
    assert "..." not in listing
    ctx = click.Context(main)
    parent = main
    for word in group:
        parent = parent.get_command(ctx, word)
    for name in parent.list_commands(ctx):
        command = parent.get_command(ctx, name)
        if not command.hidden:
            first = " ".join((command.short_help or command.help or "").partition("\n\n")[0].split())
            assert f"{name} {first}" in listing, name


def test_plugins_says_component_or_components(monkeypatch):
    from polymodal.registry.loader import PluginRecord

    records = [PluginRecord("one", "x", "loaded", registered=1), PluginRecord("two", "y", "loaded", registered=2)]
    monkeypatch.setattr("polymodal.cli.plugin_records", lambda: records)
    out = CliRunner().invoke(main, ["plugins"]).output
    assert "(1 component)" in out and "(2 components)" in out and "(1 components)" not in out


# -- the README and the repository -------------------------------------------------------------------


def _readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]


@pytest.mark.skipif(not (ROOT / ".gitignore").is_file(), reason="a source checkout only")
def test_the_readme_s_output_folders_are_ignored_by_git():
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    outs = {m for line in _readme_commands() for m in re.findall(r"--out ([\w./-]+)", line) if not m.isupper()}
    assert outs, "the README names output folders"
    outs |= {"runs", "samples"}  # the defaults of train --out and sample --out
    for out in outs:
        assert out.split("/")[0] in ignored, out


def test_the_readme_s_example_images_come_from_data_export():
    commands = "\n".join(_readme_commands())
    assert not re.search(r"(^|[\s/])(my_)?digit\.png", commands), "an image the README never says how to make"
    text = README.read_text(encoding="utf-8")
    export = text.index("polymodal data export digits")
    for use in re.finditer(r"examples/digits_\d{3}\.png", text):
        assert use.start() > export, "an example image is used before the command that writes it"


def test_the_readme_says_how_to_install_the_cpu_build_and_when_to_use_threads():
    text = README.read_text(encoding="utf-8")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    assert "pip install -e . && polymodal train vit" in text
    assert 'pip install -e ".[test]" && python -m pytest -n 2' in text
    assert "python -m pytest -n 2 " in (README.parent / ".ci" / "run").read_text()  # CI runs the README's command
    assert "--threads 1" in text and "POLYMODAL_THREADS" in text
