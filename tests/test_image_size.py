"""A user's own images at their own size: the folder dataset keeps the images' size, the classifier
families adapt their input size and patch grid to it (printed), and an explicit size wins."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import polymodal
from polymodal.cli import main
from polymodal.data import load_folder
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.nn.grid import fit_encoder, patch_size_for

TINY = ["--set", "encoder.block.dim=16", "--set", "encoder.depth=1", "--set", "encoder.block.heads=2", "--no-progress"]
LINE = (
    "vit: images are 28×28×1; image_size 28, patch 7 → 4×4 patches (set --set encoder.image_size=8 to resize instead)"
)


def write_folder(root, sizes, grey=True):
    """PNGs of the given (width, height) sizes with two string labels and a captions.jsonl."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "caption": f"picture {i}", "label": "odd" if i % 2 else "even"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train(folder, out, *extra):
    result = CliRunner().invoke(
        main,
        ["train", "vit", "--data", str(folder), "--steps", "2", "--out", str(out), *TINY, *extra],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return result.output, polymodal.load(out)


def test_vit_trains_at_the_images_own_size(tmp_path):
    folder = write_folder(tmp_path / "mnist", [(28, 28)] * 8)
    output, model = train(folder, tmp_path / "run")
    assert LINE in output.splitlines()
    e = model.config.encoder
    assert (e.image_size, e.patch_size, e.channels) == (28, 7, 1) and model.config.num_classes == 2
    assert model.encoder.example_inputs(2)[0].shape == (2, 1, 28, 28)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 2)
    assert model.encoder(torch.rand(3, 1, 28, 28)).shape == (3, 1 + 4 * 4, 16)  # [CLS] + a 4×4 grid


def test_an_explicit_image_size_wins(tmp_path):
    folder = write_folder(tmp_path / "mnist", [(28, 28)] * 8)
    output, model = train(folder, tmp_path / "run8", "--set", "encoder.image_size=8")
    assert "vit: images are 28×28×1; resized to encoder.image_size as set" in output
    assert LINE not in output
    assert (model.config.encoder.image_size, model.config.encoder.patch_size) == (8, 2)  # the variant's patch
    assert model.encoder.example_inputs(1)[0].shape == (1, 1, 8, 8)
    output, model = train(folder, tmp_path / "run4", "--set", "encoder.patch_size=4")
    assert "vit: images are 28×28×1; image_size 28, encoder.patch_size as set" in output
    assert (model.config.encoder.image_size, model.config.encoder.patch_size) == (28, 4)


def test_registered_data_at_the_variants_size_changes_nothing():
    digits = polymodal.data.load_digits()
    shapes = polymodal.data.load_dataset("shapes")
    for name, data in [
        ("vit", digits),
        ("clip", digits),
        ("clip-shapes", shapes),
        ("dino", digits),
        ("dino-shapes", shapes),
    ]:
        spec = polymodal.api.spec(name)
        cfg = spec.config_for(data)
        before = getattr(spec.config, "encoder", None) or spec.config.vision
        after = getattr(cfg, "encoder", None) or cfg.vision
        assert (after.image_size, after.patch_size) == (before.image_size, before.patch_size), name


def test_clip_and_dino_adapt_too(tmp_path, capsys):
    folder = write_folder(tmp_path, [(28, 28)] * 4, grey=False)
    data = load_folder(folder)
    clip = polymodal.api.spec("clip").config_for(data)
    assert (clip.vision.image_size, clip.vision.patch_size, clip.vision.channels) == (28, 7, 3)
    dino = polymodal.api.spec("dino").config_for(data)
    assert (dino.encoder.image_size, dino.encoder.patch_size, dino.local_size) == (28, 7, 14)  # local crops: half
    out = capsys.readouterr().out
    assert "clip: images are 28×28×3; image_size 28, patch 7 → 4×4 patches (set --set vision.image_size=8" in out
    assert (
        "dino: images are 28×28×3; image_size 28, patch 7 → 4×4 patches (set --set encoder.image_size=8 to "
        "resize instead); local crops 14×14" in out
    )
    kept = polymodal.api.spec("clip").config_for(data, ("vision.image_size=8",))
    assert (kept.vision.image_size, kept.vision.patch_size) == (8, 2)


@pytest.mark.parametrize(
    "size, grid, patch", [(28, 4, 7), (32, 4, 8), (32, 8, 4), (224, 14, 16), (28, 14, 2), (12, 4, 3), (8, 4, 2)]
)
def test_patch_size_keeps_about_the_variants_grid(size, grid, patch):
    assert patch_size_for(size, grid) == patch and size % patch == 0


def test_no_dividing_patch_size_is_an_error_that_suggests_a_size():
    with pytest.raises(
        ValueError,
        match=r"image size 29 into 2–8 patches.*encoder\.image_size=28 \(patch 7\).*"
        r"encoder\.image_size=30",
    ):
        patch_size_for(29, 4)
    with pytest.raises(ValueError, match="no patch size divides image size 29"):
        fit_encoder(ViTEncoderConfig(), {"image_size": 29, "channels": 1}, family="vit")


def test_a_folder_of_mixed_sizes_is_brought_to_the_most_common_one_with_a_note(tmp_path, capsys):
    folder = write_folder(tmp_path, [(28, 28), (28, 28), (20, 20), (28, 28), (32, 16)])
    data = load_folder(folder, test_fraction=0)
    assert data.meta["image_size"] == 28 and data.train["image"].shape == (5, 1, 28, 28)
    out = capsys.readouterr().out
    assert (
        "images have 3 sizes (28×28 ×3, 20×20 ×1, 32×16 ×1); the 2 not 28×28 (e.g. '2.png') are resized to 28×28" in out
    )
    same = write_folder(tmp_path / "same", [(28, 28)] * 3)
    assert load_folder(same).meta["image_size"] == 28 and capsys.readouterr().out == ""  # nothing to say


def test_non_square_images_are_stretched_with_a_note(tmp_path, capsys):
    folder = write_folder(tmp_path, [(24, 12)] * 3)
    data = load_folder(folder, test_fraction=0)
    assert data.train["image"].shape == (3, 1, 24, 24)
    assert "images are 24×12 (width×height); stretched to 24×24" in capsys.readouterr().out


def test_families_bound_to_a_frozen_part_say_the_images_are_resized(tmp_path, capsys):
    data = load_folder(write_folder(tmp_path, [(28, 28)] * 4))
    parts = {
        "dalle": ("VQ-VAE tokenizer", "tokenizer", "vqvae"),
        "rudolph": ("VQ-VAE tokenizer", "tokenizer", "vqvae"),
        "imagebind": ("CLIP image tower", "clip", "clip"),
        "flamingo": ("CLIP vision tower", "vision", "clip"),
        "fromage": ("CLIP vision tower", "vision", "clip"),
    }
    for name, (part, key, variant) in parts.items():
        cfg = polymodal.api.spec(name).config_for(data)
        assert getattr(cfg, "data", "") != "folder", name  # an 'auto' part cannot train on a folder by name
        out = capsys.readouterr().out
        assert (
            f"{name}: images are 28×28×1; the frozen {part} reads them resized to its own image size "
            f"(--set {key}=DIR takes one trained on these images: polymodal train {variant} --data {tmp_path} "
            f"--out DIR)"
        ) in out, name
    igpt = polymodal.api.spec("igpt").config_for(data)
    assert igpt.image_size == 8  # one token per pixel: the variant's sequence length stays
    assert (
        "igpt: images are 28×28×1; resized to image_size 8 (64 pixel tokens; --set image_size=28 trains on all "
        "784)" in capsys.readouterr().out
    )
    vq = polymodal.api.spec("vqvae").config_for(data)
    assert vq.image_size == 28 and "vqvae: images are 28×28×1; image_size 28 → 14×14 codes" in capsys.readouterr().out


def test_rudolph_trains_on_a_folder_resized_to_its_tokenizer(tmp_path):
    folder = write_folder(tmp_path / "data", [(28, 28)] * 8)
    result = CliRunner().invoke(
        main,
        [
            "train",
            "rudolph",
            "--data",
            str(folder),
            "--steps",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "tokenizer=",
            "--set",
            "depth=2",
            "--set",
            "dim=32",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "caption_nll" in result.output
