"""Issue 14, inputs: bounded labels, split sizes, tokenizer files, sampling options, image size
limits, missing dataset fields, unloadable model folders, CUDA without CUDA and benchmark reports.
Each bad input fails early with a message naming what was expected and what was given; the
command line prints one "Error: …" line, never a traceback."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from polymodal.cli import main


def run(*args: str):
    """``polymodal ARGS`` in-process; returns the click result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *expected: str, code: int = 1) -> None:
    """A one-line ``Error: …`` with ``expected`` in it, the exit code ``code`` and no traceback."""
    out = result.output
    assert result.exit_code == code, (result.exit_code, out, result.exception)
    assert "Error:" in out and "Traceback" not in out, out
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for text in expected:
        assert text in out, (text, out)


def write_folder(root: Path, rows: list[dict], size: int = 8) -> Path:
    """A folder of ``size``×``size`` grey PNGs with ``rows`` as captions.jsonl (paths filled in)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        row = {"path": f"{i}.png", "caption": f"picture {i}", **row}
        Image.new("L", (size, size), 20 * i % 256).save(root / row["path"])
        lines.append(json.dumps(row))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width``×``height`` grey pixels (its data is a few bytes: it is never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(body)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained model folders (two steps each): ``vit`` and ``lm``."""
    from polymodal.api import train_model

    root = tmp_path_factory.mktemp("runs")
    for name in ("vit", "lm"):
        train_model(name, steps=2, out=root / name, progress=False)
    return root


# -- labels of a folder are bounded --------------------------------------------------------------


@pytest.mark.parametrize("big", [3, 1_000_000, 1_000_000_000, 10**18])
def test_a_huge_int_label_is_refused_before_anything_is_allocated(tmp_path, big):
    from polymodal.data import load_folder

    folder = write_folder(tmp_path, [{"label": 0}, {"label": 1}, {"label": big}])
    with pytest.raises(ValueError, match=rf"captions.jsonl:3: label {big} is out of range.*0 … 2"):
        load_folder(folder)


@pytest.mark.parametrize("bad", [-1, 1.0, True, None, [1], "x"])
def test_negative_non_int_and_mixed_labels_are_refused_naming_the_line(tmp_path, bad):
    from polymodal.data import load_folder

    folder = write_folder(tmp_path, [{"label": 0}, {"label": 1}, {"label": bad}])
    with pytest.raises(ValueError, match=r"captions.jsonl:3: label .* must be"):
        load_folder(folder)


def test_an_explicit_class_list_bounds_int_labels_and_names_string_labels(tmp_path):
    from polymodal.data import load_folder

    folder = write_folder(tmp_path, [{"label": 0}, {"label": 1}, {"label": 4}])
    (folder / "classes.txt").write_text("zero\none\ntwo\nthree\nfour\n")
    data = load_folder(folder)
    assert data.meta["num_classes"] == 5 and data.meta["class_names"][4] == "four"
    (folder / "classes.txt").write_text("zero\none\n")
    with pytest.raises(ValueError, match=r"label 4 is out of range.*0 … 1.*classes.txt"):
        load_folder(folder)

    named = write_folder(tmp_path / "named", [{"label": "dog"}, {"label": "cat"}, {"label": "cow"}])
    (named / "classes.txt").write_text("dog\ncat\ncow\nhen\n")
    data = load_folder(named)
    assert data.meta["class_names"] == ["dog", "cat", "cow", "hen"]  # the list's order, not sorted
    (named / "classes.txt").write_text("dog\ncat\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:3: label 'cow' is not in .*classes.txt"):
        load_folder(named)
    (named / "classes.txt").write_text("dog\ncat\ndog\n")
    with pytest.raises(ValueError, match=r"classes.txt.*'dog' twice"):
        load_folder(named)


def test_the_oversized_label_is_a_clean_cli_error(tmp_path):
    folder = write_folder(tmp_path / "data", [{"label": 0}, {"label": 1}, {"label": 1_000_000_000}])
    result = run("train", "vit", "--data", folder, "--steps", "1", "--no-progress", "--out", tmp_path / "out")
    assert_clean_error(result, "label 1000000000 is out of range")


# -- split sizes -----------------------------------------------------------------------------------


def test_a_folder_with_every_line_pinned_to_test_is_refused_naming_the_split_sizes(tmp_path):
    from polymodal.data import load_folder

    folder = write_folder(tmp_path, [{"label": i % 2, "split": "test"} for i in range(4)])
    with pytest.raises(ValueError, match=r"train split is empty.*train 0, test 4"):
        load_folder(folder)


def test_a_single_image_is_refused_unless_no_test_split_is_asked_for(tmp_path):
    from polymodal.data import load_folder

    folder = write_folder(tmp_path, [{"label": 0}])
    with pytest.raises(ValueError, match=r"test split is empty.*train 1, test 0.*test_fraction=0"):
        load_folder(folder)
    assert len(load_folder(folder, test_fraction=0).train) == 1  # asked for: no test split


@pytest.mark.parametrize("kind", ["all-test", "single"])
def test_tiny_folders_are_clean_cli_errors_not_zero_division(tmp_path, kind):
    rows = [{"label": i % 2, "split": "test"} for i in range(4)] if kind == "all-test" else [{"label": 0}]
    folder = write_folder(tmp_path / "data", rows)
    result = run("train", "vit", "--data", folder, "--steps", "1", "--no-progress", "--out", tmp_path / "out")
    assert_clean_error(result, "split is empty")


# -- missing dataset fields ------------------------------------------------------------------------


def test_a_missing_field_names_the_dataset_the_field_and_the_fields_it_has():
    from polymodal.data import MissingFieldError, load_dataset

    data = load_dataset("text")
    for get in (lambda: data.train["image"], lambda: data.train.batch([0, 1])["image"]):
        with pytest.raises(MissingFieldError) as info:
            get()
        message = str(info.value)
        assert isinstance(info.value, KeyError) and not message.startswith("'")
        assert "dataset 'text'" in message and "'image'" in message
        assert all(f in message for f in data.train.fields)


def test_a_batch_keeps_its_dataset_when_moved_to_a_device():
    from polymodal.data import MissingFieldError, load_dataset

    batch = load_dataset("digits").train.batch([0, 1]).to(torch.device("cpu"))
    assert batch["image"].shape[0] == 2
    with pytest.raises(MissingFieldError, match="dataset 'digits' has no field 'ids'"):
        batch["ids"]


def test_eval_of_an_image_model_on_text_is_a_clean_error(runs):
    assert_clean_error(run("eval", runs / "vit", "--data", "text"), "dataset 'text' has no field 'image'")


def test_train_of_an_image_model_on_text_is_a_clean_error(tmp_path):
    result = run("train", "vit", "--data", "text", "--steps", "1", "--no-progress", "--out", tmp_path / "out")
    assert_clean_error(result, "dataset 'text' has no field 'image'")


def test_a_classifier_on_a_folder_without_labels_is_a_clean_error(runs, tmp_path):
    folder = write_folder(tmp_path / "data", [{} for _ in range(4)])
    assert_clean_error(run("eval", runs / "vit", "--data", folder), "dataset 'folder' has no field 'label'")
    result = run("train", "vit", "--data", folder, "--steps", "1", "--no-progress", "--out", tmp_path / "out")
    assert_clean_error(result, "dataset 'folder' has no field 'label'", "caption")


# -- tokenizer files -------------------------------------------------------------------------------


def test_a_missing_tokenizer_file_is_named(tmp_path):
    from polymodal.data.tokenizers import BPETokenizer, load_tokenizer

    with pytest.raises(FileNotFoundError, match=r"tokenizer.json"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    config = {"type": "bpe", "specials": {"eos": "x"}, "add_bos": True, "add_eos": True}
    (tmp_path / "polymodal_tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "polymodal_tokenizer.json"])
def test_a_corrupt_tokenizer_file_is_named(tmp_path, name):
    from polymodal.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer

    BPETokenizer().save(tmp_path)
    (tmp_path / name).write_text('{"version": "1.0", "trunc')
    with pytest.raises(ValueError, match=rf"{name}.*(not valid|cannot read)"):
        load_tokenizer(tmp_path)
    if name == "polymodal_tokenizer.json":
        with pytest.raises(ValueError, match=name):
            ByteTokenizer.load(tmp_path)


def test_a_tokenizer_config_without_its_fields_is_named(tmp_path):
    from polymodal.data.tokenizers import ByteTokenizer

    (tmp_path / "polymodal_tokenizer.json").write_text(json.dumps({"type": "bytes"}))
    with pytest.raises(ValueError, match=r"polymodal_tokenizer.json.*specials"):
        ByteTokenizer.load(tmp_path)
    (tmp_path / "polymodal_tokenizer.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"polymodal_tokenizer.json.*JSON object"):
        ByteTokenizer.load(tmp_path)


# -- sampling options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
    ],
)
def test_bad_sampling_values_name_the_option(kw, name):
    from polymodal.generation.options import check_sample_values
    from polymodal.generation.sampling import sample_next

    with pytest.raises(ValueError, match=name):
        sample_next(torch.zeros(2, 5), **kw)
    with pytest.raises(ValueError, match=name):
        check_sample_values(kw)


@pytest.mark.parametrize(
    "flag, value, named",
    [
        ("--temperature", "inf", "--temperature"),
        ("--temperature", "nan", "--temperature"),
        ("--temperature", "0", "--temperature"),
        ("--top-k", "0", "--top-k"),
        ("--top-p", "inf", "--top-p"),
        ("--top-p", "0", "--top-p"),
    ],
)
def test_bad_sampling_options_are_clean_cli_errors(runs, tmp_path, flag, value, named):
    result = run("sample", runs / "lm", "-n", "1", "--out", tmp_path / "s", flag, value)
    assert_clean_error(result, named, value)
    assert not (tmp_path / "s").exists()


def test_good_sampling_options_still_sample(runs, tmp_path):
    result = run("sample", runs / "lm", "-n", "1", "--out", tmp_path / "s", "--temperature", "0.5", "--top-p", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "samples.txt").is_file()


# -- unloadable model folders and devices ----------------------------------------------------------


def test_sample_on_a_folder_without_config_json_is_a_clean_error(tmp_path):
    assert_clean_error(run("sample", tmp_path, "--out", tmp_path / "s"), "config.json")


def test_sample_on_a_corrupt_model_folder_is_a_clean_error(runs, tmp_path):
    import shutil

    bad = tmp_path / "lm"
    shutil.copytree(runs / "lm", bad)
    (bad / "config.json").write_text('{"family": "lm", "conf')
    assert_clean_error(run("sample", bad, "--out", tmp_path / "s"), "config.json")
    shutil.copy(runs / "lm" / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"\x00" * 12)
    assert_clean_error(run("sample", bad, "--out", tmp_path / "s"), "model.safetensors")


def test_sample_of_a_classifier_is_a_clean_error(runs, tmp_path):
    assert_clean_error(run("sample", runs / "vit", "--out", tmp_path / "s"), "does not generate samples")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_cuda_without_cuda_is_a_clean_error(runs, tmp_path, command):
    folder = runs / ("vit" if command == "eval" else "lm")
    extra = ["--out", tmp_path / "s"] if command == "sample" else []
    assert_clean_error(run(command, folder, "--device", "cuda", *extra), "--device cuda", "CUDA")


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_an_unknown_device_is_a_clean_error(runs, tmp_path, command):
    folder = runs / ("vit" if command == "eval" else "lm")
    extra = ["--out", tmp_path / "s"] if command == "sample" else []
    assert_clean_error(run(command, folder, "--device", "tpu", *extra), "--device", "'tpu'")


# -- images over the pixel limit -------------------------------------------------------------------


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_read_image_refuses_an_image_over_the_pixel_limit(tmp_path, side):
    from polymodal.eval.images import read_image

    bomb = png_header(tmp_path / "bomb.png", side, side)
    with pytest.raises(ValueError, match=rf"bomb.png.* is .*{side * side / 1e6:.0f} M pixels; the limit is"):
        read_image(bomb, channels=1)


def test_open_image_limit_can_be_set_and_small_images_still_read(tmp_path):
    from PIL import Image

    from polymodal.data.images import open_image
    from polymodal.eval.images import read_image

    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png", 3).shape == (3, 4, 6)
    assert read_image(tmp_path / "ok.png", 1, size=5).shape == (1, 5, 5)
    with pytest.raises(ValueError, match=r"ok.png.* is 6×4 = 24 pixels; the limit is 20"):
        open_image(tmp_path / "ok.png", max_pixels=20)
    assert open_image(tmp_path / "ok.png", max_pixels=24).size == (6, 4)


def test_a_folder_with_an_image_over_the_pixel_limit_is_refused(tmp_path):
    from polymodal.data import load_folder

    folder = write_folder(tmp_path / "data", [{"label": 0}, {"label": 1}, {"label": 1}])
    png_header(folder / "2.png", 12_000, 12_000)
    with pytest.raises(ValueError, match=r"captions.jsonl:3: .*2.png.* is 12000×12000 = .* pixels; the limit"):
        load_folder(folder)
    result = run("train", "vit", "--data", folder, "--steps", "1", "--no-progress", "--out", tmp_path / "out")
    assert_clean_error(result, "12000×12000")


# -- benchmark reports -----------------------------------------------------------------------------


def _report(tmp_path: Path) -> Path:
    path = tmp_path / "good.json"
    path.write_text(json.dumps({"suite": "attention", "machine": {"device_name": "cpu", "device": "cpu"}, "rows": []}))
    return path


@pytest.mark.parametrize("suite", ["compare", "table"])
@pytest.mark.parametrize("problem", ["missing", "not-json", "not-a-report"])
def test_bench_compare_and_table_on_a_bad_file_are_clean_errors(tmp_path, capsys, suite, problem):
    import bench

    bad = tmp_path / "bad.json"
    if problem == "not-json":
        bad.write_text("{ not json")
    elif problem == "not-a-report":
        bad.write_text("[1, 2, 3]")
    args = [suite, str(bad)] + ([str(_report(tmp_path))] if suite == "compare" else [])
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "Traceback" not in err
    if suite == "compare":  # the baseline may be the bad one too
        assert bench.main([suite, str(_report(tmp_path)), str(bad)]) == 2
        assert "bad.json" in capsys.readouterr().err


def test_bench_table_refuses_a_report_of_another_suite(tmp_path, capsys):
    import bench

    other = tmp_path / "generate.json"
    other.write_text(json.dumps({"suite": "generate", "machine": {}, "rows": [{"impl": "polymodal"}]}))
    assert bench.main(["table", str(other)]) == 2
    assert "generate.json is a 'generate' report" in capsys.readouterr().err
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"suite": "models", "machine": {}, "rows": []}))
    assert bench.main(["table", str(models), "--pivot"]) == 2
    assert "--pivot: attention only" in capsys.readouterr().err


def test_bench_through_the_cli_exits_2_with_the_file_named(tmp_path):
    result = run("bench", "table", tmp_path / "nowhere.json")
    assert result.exit_code == 2 and "nowhere.json" in result.output and "Traceback" not in result.output


# -- the judge's cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["judge.json", "judge.safetensors"])
def test_a_corrupt_cached_judge_is_trained_again_with_a_note(tmp_path, monkeypatch, capsys, damage):
    import polymodal.eval.judge as J
    from polymodal.data import Dataset, Split

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr(J, "TRAIN_STEPS", 2)
    monkeypatch.setattr(J, "_MEMORY", {})
    split = Split({"image": torch.rand(16, 1, 8, 8), "label": torch.arange(16) % 2})
    data = Dataset("toy", split, split, {"num_classes": 2})
    J.get_judge(data)
    folder = J.judge_folder(data)
    (folder / damage).write_bytes(b'{"trunc')
    monkeypatch.setattr(J, "_MEMORY", {})
    again = J.get_judge(data)
    assert again.attributes == ("label",)
    out = capsys.readouterr().err
    assert f"the cached judge in {folder} cannot be read" in out and "training it again" in out
    monkeypatch.setattr(J, "_MEMORY", {})
    monkeypatch.setattr(J, "_train", lambda *a, **k: pytest.fail("the rewritten cache must be read"))
    J.get_judge(data)


@pytest.mark.parametrize("n", ["0", "100000"])
def test_sample_count_is_bounded_before_anything_is_loaded(tmp_path, n):
    """-n sizes one batch in every family (iGPT and DALL·E allocated for -n 10**9): out of range is a usage error."""
    result = CliRunner().invoke(main, ["sample", str(tmp_path), "-n", n])
    assert result.exit_code == 2, result.output
    assert "Error: Invalid value for '-n'" in result.output and "Traceback" not in result.output
