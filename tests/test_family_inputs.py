"""Issue 14, the families' part: input checks and resource limits of the family plugins.

Every public entry point of DINO, iGPT, VQ-VAE, DALL·E, FROMAGe and CLIP that takes a user's
tensor, option or file answers a bad one with a clear error (a ValueError naming what was
expected and what was given; on the command line a one-line ``Error: …``, never a traceback)
before it allocates anything, and ``polymodal eval`` writes nothing into the model folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import polymodal
from polymodal.cli import main
from polymodal.eval.images import save_png
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")


def fails_cleanly(result, *needles: str) -> None:
    """A CLI result that exited with a one-line ``Error:`` naming ``needles``, and no traceback."""
    assert result.exit_code != 0, result.output
    assert "Error:" in result.output and "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception), result.exception  # a SystemExit, not a crash
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``folder`` and every path under it with its size and mtime (ns): a file written and removed again
    still changes the folder's mtime."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


# -- DINO: polymodal dino attention-maps ---------------------------------------------------------


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dino") / "m"
    contracts.build("dino-shapes", data="shapes").save(folder)
    return folder


@pytest.fixture
def image32(tmp_path) -> str:
    return str(save_png(torch.rand(3, 32, 32), tmp_path / "img.png"))


@pytest.mark.parametrize("scale", ["0", "-3"])
def test_attention_maps_scale_below_one_is_an_error(dino_folder, image32, tmp_path, scale):
    out = tmp_path / "att"
    result = CliRunner().invoke(
        main, ["dino", "attention-maps", str(dino_folder), image32, "--scale", scale, "--out", str(out)]
    )
    fails_cleanly(result, "--scale")
    assert not out.exists()


def test_attention_maps_huge_scale_is_refused_before_any_png(dino_folder, image32, tmp_path, monkeypatch):
    import polymodal.eval.images as images

    calls = []
    monkeypatch.setattr(images, "save_png", lambda image, path, scale=1: calls.append(scale) or Path(path))
    out = tmp_path / "att"
    result = CliRunner().invoke(
        main, ["dino", "attention-maps", str(dino_folder), image32, "--scale", "100000", "--out", str(out)]
    )
    fails_cleanly(result, "--scale", "100000", "pixels")
    assert calls == []  # refused before a single enlarged PNG was made


def test_write_attention_maps_checks_scale_in_python(dino_folder, tmp_path):
    from polymodal.plugins.dino.attention_maps import MAX_OUTPUT_PIXELS, attention_rows, write_attention_maps

    model = polymodal.load(dino_folder)
    images = torch.rand(2, 3, 32, 32)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="scale"):
            write_attention_maps(model, images, ["a", "b"], tmp_path / "o", scale=bad)
    with pytest.raises(ValueError, match=f"{MAX_OUTPUT_PIXELS:,}"):
        write_attention_maps(model, images, ["a", "b"], tmp_path / "o", scale=100000)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"use --scale (\d+) or less") as info:
        attention_rows(model, images, scale=100000)
    largest = int(re.search(r"use --scale (\d+) or less", str(info.value)).group(1))
    assert attention_rows(model, images, scale=2).shape[-1] == 64
    paths = write_attention_maps(model, images, ["a", "b"], tmp_path / "ok", scale=2)
    assert all(p.is_file() for p in paths)
    with pytest.raises(ValueError, match="at most"):
        write_attention_maps(model, images, ["a", "b"], tmp_path / "o", scale=largest + 1)


def test_attention_maps_negative_test_images_is_an_error(dino_folder, tmp_path):
    result = CliRunner().invoke(
        main, ["dino", "attention-maps", str(dino_folder), "--test-images", "-5", "--out", str(tmp_path / "o")]
    )
    fails_cleanly(result, "--test-images")


# -- iGPT: eval writes nothing into the model folder ---------------------------------------------


def test_igpt_eval_writes_nothing_into_the_model_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("POLYMODAL_CACHE", str(cache))
    folder = tmp_path / "igpt"
    contracts.build("igpt").save(folder)
    before = snapshot(folder)
    os.chmod(folder, 0o555)  # read-only storage (root ignores it; the snapshot below does not)
    try:
        result = CliRunner().invoke(main, ["eval", str(folder), "--json"])
    finally:
        os.chmod(folder, 0o755)
    assert result.exit_code == 0, result.output
    assert snapshot(folder) == before  # nothing written, nothing touched
    metrics = json.loads(result.output)
    plot = Path(metrics["probe_plot"])  # it says where it wrote the plot: under the cache
    assert plot.is_file() and cache.resolve() in plot.resolve().parents


def test_igpt_evaluate_keeps_an_explicit_plot_path_and_save_still_carries_the_plot(tmp_path, monkeypatch):
    from polymodal.data import load_dataset

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    model = contracts.build("igpt")
    model.save(tmp_path / "m")
    loaded = polymodal.load(tmp_path / "m")
    before = snapshot(tmp_path / "m")
    metrics = loaded.evaluate(load_dataset("digits"), plot_path=tmp_path / "plot.png")
    assert metrics["probe_plot"] == str(tmp_path / "plot.png") and (tmp_path / "plot.png").is_file()
    assert snapshot(tmp_path / "m") == before
    loaded.save(tmp_path / "again", metrics=metrics)  # a save (train's folder) still carries the plot
    assert (tmp_path / "again" / "probe_by_layer.png").is_file()


# -- VQ-VAE: forward checks its input ------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 7, 7), (2, 1, 16, 16), (2, 3, 8, 8), (1, 8, 8), (2, 1, 8, 7)],
)
def test_vqvae_forward_checks_shape_and_channels(shape):
    model = contracts.build("vqvae")  # (B, 1, 8, 8) images
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\); got") as info:
        model(torch.rand(*shape))
    assert str(tuple(shape)) in str(info.value)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model.quantize(torch.rand(*shape))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def test_vqvae_forward_rejects_integer_images():
    model = contracts.build("vqvae")
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# -- DALL·E: image and text batches agree --------------------------------------------------------


@pytest.fixture(scope="module")
def dalle():
    return contracts.build("dalle")


def test_dalle_forward_and_stream_name_both_batch_sizes(dalle):
    text, codes = dalle.example_inputs(2)
    three = torch.cat([codes, codes[:1]])  # (3, h, w)
    for call in (lambda: dalle(text, three), lambda: dalle.stream(text, three)):
        with pytest.raises(ValueError, match=r"2 text.*3 image|3 image.*2 text") as info:
            call()
        assert "batch" in str(info.value)


def test_dalle_stream_checks_the_text_shape(dalle):
    text, codes = dalle.example_inputs(2)
    with pytest.raises(ValueError, match=rf"\(B, {dalle.config.text_length}\)"):
        dalle(text[:, :-1], codes)
    with pytest.raises(ValueError, match="integer"):
        dalle(text.float(), codes)


def test_dalle_loss_names_image_and_caption_counts(dalle):
    batch = {"image": torch.rand(3, 1, 8, 8), "caption": ["the digit 1", "the digit 2"]}
    with pytest.raises(ValueError, match=r"3 image.*2 caption|2 caption.*3 image"):
        dalle.loss(batch)


def test_dalle_generate_codes_checks_the_prefix_batch(dalle):
    from polymodal.plugins.dalle.sample import generate_codes

    with pytest.raises(ValueError, match=r"prefix.*3.*2 prompt|2 prompt.*3"):
        generate_codes(dalle, ["a", "b"], prefix=torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("candidates", [0, 10**8])
def test_dalle_candidates_are_bounded_before_drawing(dalle, monkeypatch, candidates):
    import polymodal.plugins.dalle.sample as sample

    def never(*args, **kwargs):
        raise AssertionError("drew candidates")

    monkeypatch.setattr(sample, "generate_codes", never)
    with pytest.raises(ValueError, match=rf"--candidates must be an integer in \[1, {sample.MAX_CANDIDATES}\]"):
        sample.sample_images(dalle, "a", 2, rerank=contracts.build("clip"), candidates=candidates)


@pytest.mark.parametrize("cfg", [float("nan"), float("inf")])
def test_dalle_cfg_must_be_finite(dalle, cfg):
    from polymodal.plugins.dalle.sample import sample_images

    with pytest.raises(ValueError, match=r"--cfg \(cfg_scale\) must be a finite number"):
        sample_images(dalle, "a", 2, cfg_scale=cfg)


# -- FROMAGe: image and text batches agree -------------------------------------------------------


@pytest.fixture(scope="module")
def fromage():
    return contracts.build("fromage")


def test_fromage_forward_and_caption_logits_name_both_batch_sizes(fromage):
    images, ids = fromage.example_inputs(2)
    for call in (lambda: fromage(images, ids[:1]), lambda: fromage.caption_logits(images[:1], ids)):
        with pytest.raises(ValueError, match=r"image.*text|text.*image") as info:
            call()
        message = str(info.value)
        assert "1" in message and "2" in message and "batch" in message


def test_fromage_loss_names_image_and_label_counts(fromage):
    batch = fromage.example_batch(3)
    batch["label"] = batch["label"][:2]
    with pytest.raises(ValueError, match=r"3 image.*2|2.*3 image"):
        fromage.loss(batch)


@pytest.fixture(scope="module")
def fromage_folder(tmp_path_factory, fromage) -> Path:
    folder = tmp_path_factory.mktemp("fromage") / "m"
    fromage.save(folder)
    return folder


@pytest.mark.parametrize("tokens", ["0", "-1", "100000"])
def test_fromage_caption_max_tokens_out_of_range_is_an_error(fromage_folder, tmp_path, tokens):
    img = save_png(torch.rand(1, 8, 8), tmp_path / "x.png")
    result = CliRunner().invoke(main, ["fromage", "caption", str(fromage_folder), str(img), "--max-tokens", tokens])
    fails_cleanly(result, "--max-tokens", tokens)


def test_fromage_caption_checks_max_new_tokens_in_python(fromage):
    from polymodal.plugins.fromage.infer import caption

    images, _ = fromage.example_inputs(1)
    room = fromage.lm.max_len - fromage.config.prefix_tokens  # bos + prefix + all but the last new token
    for bad in (0, -1, room + 1):
        with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer in \[1, {room}\]"):
            caption(fromage, images, max_new_tokens=bad)
    assert len(caption(fromage, images, max_new_tokens=room)) == 1


def test_fromage_sample_resizes_the_default_gallery_to_the_clip(fromage_folder, tmp_path):
    model = polymodal.load(fromage_folder)
    assert model.vision.config.vision.image_size != 8  # the tiny CLIP reads 4×4, the digits are 8×8
    result = CliRunner().invoke(main, ["sample", str(fromage_folder), "-n", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "sample_001.png").is_file() and (tmp_path / "s" / "transcript.txt").is_file()


def test_fromage_generate_checks_max_new_tokens(fromage):
    from polymodal.plugins.fromage.infer import generate

    for bad in (0, -1, fromage.lm.max_len):
        with pytest.raises(ValueError, match=r"max_new_tokens must be an integer in \[1, \d+\]"):
            generate(fromage, "a seven", max_new_tokens=bad)
    assert isinstance(generate(fromage, "a seven", max_new_tokens=2)["text"], str)


@pytest.mark.parametrize("k", ["0", "-2", "100000"])
def test_fromage_retrieve_k_out_of_range_is_an_error(fromage_folder, k):
    result = CliRunner().invoke(main, ["fromage", "retrieve", str(fromage_folder), "a seven", "-k", k])
    fails_cleanly(result, "k must be in [1, ")


# -- CLIP: polymodal clip classify ----------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip") / "m"
    contracts.build("clip").save(folder)
    return folder


@pytest.mark.parametrize("template", ["a photo", "a {colour} photo", "a {label} of {kind}", "a {label"])
def test_classify_template_without_label_is_an_error_before_loading(clip_folder, tmp_path, monkeypatch, template):
    loaded = []
    monkeypatch.setattr(polymodal, "load", lambda *a, **k: loaded.append(a))
    img = save_png(torch.rand(1, 8, 8), tmp_path / "x.png")
    result = CliRunner().invoke(
        main, ["clip", "classify", str(clip_folder), str(img), "--labels", "a,b", "--template", template]
    )
    fails_cleanly(result, "--template", "{label}", template)
    assert loaded == []  # refused before any work


def test_classify_api_checks_templates(clip_folder):
    from polymodal.plugins.clip.zeroshot import classify

    model = polymodal.load(clip_folder)
    v = model.config.vision
    images = torch.rand(1, v.channels, v.image_size, v.image_size)
    with pytest.raises(ValueError, match=r"\{label\}.*'a photo'"):
        classify(model, images, ["a", "b"], ["a photo"])
    good = classify(model, images, ["a", "b"], ["a {label}", "the digit {label}."])
    assert good.shape == (1, 2)


def test_classify_reads_images_with_the_core_reader(clip_folder, tmp_path, monkeypatch):
    import polymodal.eval.images as images
    import polymodal.plugins.clip.zeroshot as zeroshot

    assert not hasattr(zeroshot, "read_image")  # one reader, in the core
    calls = []
    core = images.read_image

    def spy(path, channels, size=None):
        calls.append((str(path), channels, size))
        return core(path, channels, size)

    monkeypatch.setattr(images, "read_image", spy)
    from PIL import Image

    Image.fromarray((torch.rand(12, 10, 3) * 255).byte().numpy()).save(tmp_path / "x.png")
    result = CliRunner().invoke(
        main, ["clip", "classify", str(clip_folder), str(tmp_path / "x.png"), "--labels", "a,b"]
    )
    assert result.exit_code == 0, result.output
    v = polymodal.load(clip_folder).config.vision
    assert calls == [(str(tmp_path / "x.png"), v.channels, v.image_size)]  # resized to the tower's size×size


def test_classify_refuses_an_image_over_the_pixel_limit(clip_folder, tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray((torch.rand(12, 10, 3) * 255).byte().numpy()).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 10×12 = 120 pixels: a "bomb" at this limit
    result = CliRunner().invoke(
        main, ["clip", "classify", str(clip_folder), str(tmp_path / "bomb.png"), "--labels", "a,b"]
    )
    fails_cleanly(result, "bomb.png", "limit")
