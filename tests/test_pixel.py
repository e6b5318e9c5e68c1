"""PIXEL: rendering, span masking, perturbations, the model's two phases, evaluation keys, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal
import polymodal.data
from polymodal.cli import main
from polymodal.config import evolve
from polymodal.data import DIGIT_WORDS
from polymodal.plugins.pixel import PixelMAEConfig, PixelModel
from polymodal.plugins.pixel.masking import (
    DIGIT_LOOKALIKES,
    LETTER_LOOKALIKES,
    LOOKALIKES,
    batch_span_masks,
    perturb,
    perturb_word,
    span_mask,
)
from polymodal.plugins.pixel.render import missing_glyphs, render, valid_from_images
from polymodal.testing import contracts

P, N = 12, 24


# -- rendering -----------------------------------------------------------------------------------


def test_render_one_row_of_patches_with_text_eos_and_padding():
    r = render(["She bought seven cups.", "a five"], patch=P, max_patches=N)
    assert r.images.shape == (2, 1, P, N * P)
    assert r.images.min() >= 0 and r.images.max() <= 1
    patches = r.images.reshape(2, P, N, P).permute(0, 2, 1, 3)  # (B, N, p, p)
    for row in range(2):
        t = int(r.num_text[row])
        assert 1 < t < N - 1
        assert torch.equal(r.text[row], torch.arange(N) < t)
        assert torch.equal(r.valid[row], torch.arange(N) <= t)
        assert (patches[row, t] == 0).all()  # the black end-of-sequence patch
        assert (patches[row, t + 1 :] == 1).all()  # white padding
        assert (patches[row, :t].amin(dim=(1, 2)) < 0.5).sum() >= t - 1  # ink in (nearly) every text patch
    assert r.num_text[0] > r.num_text[1]
    assert torch.equal(valid_from_images(r.images, P), r.valid)


def test_text_too_long_is_a_value_error_unless_truncated():
    long = "one two three four five six seven eight nine zero " * 2
    with pytest.raises(ValueError) as info:
        render([long], patch=P, max_patches=N)
    assert f"max_patches={N}" in str(info.value) and "truncate=True" in str(info.value)
    r = render([long], patch=P, max_patches=N, truncate=True)
    assert int(r.num_text[0]) == N - 1 and r.valid.all()
    assert (r.images[0, 0, :, (N - 1) * P :] == 0).all()


def test_glyphs_the_font_lacks_are_refused():
    assert missing_glyphs("s3ven eiqht tvvo", 10) == []
    assert missing_glyphs("s\u0435ven", 10) == ["\u0435"]  # Cyrillic e: the bundled font has no Cyrillic
    with pytest.raises(ValueError, match="cannot draw"):
        render(["s\u0435ven"], patch=P, max_patches=N)


def test_every_lookalike_is_drawn_and_differs_from_the_original():
    for plain, other in LOOKALIKES.items():
        assert missing_glyphs(other, 10) == []
        a, b = render([plain], patch=P, max_patches=4).images, render([other], patch=P, max_patches=4).images
        assert not torch.equal(a, b), plain


# -- span masking (property tests) -----------------------------------------------------------------


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    out, start = [], None
    for i, m in enumerate(mask.tolist() + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - start))
            start = None
    return out


@settings(max_examples=200, deadline=None)
@given(num_text=st.integers(1, N - 1), seed=st.integers(0, 10**6), max_span=st.integers(1, 6))
def test_span_masks_lie_on_text_in_short_spans_of_about_a_quarter(num_text, seed, max_span):
    mask = span_mask(num_text, N, ratio=0.25, max_span=max_span, rng=random.Random(seed))
    assert mask.shape == (N,) and mask.dtype == torch.bool
    assert not mask[num_text:].any()  # never padding, never the end-of-sequence patch
    assert mask[:num_text].any()  # the first span is on text
    target = min(max(1, round(0.25 * num_text)), max(num_text - 1, 1))
    assert int(mask.sum()) == target
    assert all(length <= max_span for _, length in runs(mask))


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, N - 1), min_size=1, max_size=6), seed=st.integers(0, 10**6))
def test_the_first_masked_patch_of_every_row_is_a_text_patch(counts, seed):
    masks = batch_span_masks(torch.tensor(counts), N, rng=random.Random(seed))
    for row, t in enumerate(counts):
        first = int(masks[row].float().argmax())
        assert masks[row, first] and first < t


def test_span_masking_bad_arguments():
    with pytest.raises(ValueError, match=r"num_text must be in \[1, 24\]"):
        span_mask(0, N)
    with pytest.raises(ValueError, match="ratio"):
        span_mask(5, N, ratio=1.5)


# -- perturbations -----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(digit=st.integers(0, 9), seed=st.integers(0, 10**6))
def test_perturb_changes_only_the_digit_word(digit, seed):
    text = f"She bought {DIGIT_WORDS[digit]} cups at the market."
    out = perturb(text, DIGIT_WORDS, substitutions=2, rng=random.Random(seed))
    words, changed = text.split(" "), out.split(" ")
    assert [w for i, w in enumerate(words) if i != 2] == [w for i, w in enumerate(changed) if i != 2]
    assert changed[2] != words[2] and changed[2] not in DIGIT_WORDS
    assert sum(a != b for a, b in zip(words[2], changed[2])) >= 1


def test_perturb_word_uses_the_table():
    assert perturb_word("seven", substitutions=5, rng=random.Random(0)) == "53u3n"
    assert perturb_word("xyz", rng=random.Random(0)) == "xy2"
    assert perturb_word("three", table=LETTER_LOOKALIKES) == "three"  # nothing to replace: unchanged
    assert perturb_word("eight", substitutions=9, table=LETTER_LOOKALIKES) == "elqht"
    assert set(perturb_word("zero", substitutions=9, table=DIGIT_LOOKALIKES)) == {"2", "3", "r", "0"}


# -- the model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return contracts.build("pixel")


@pytest.mark.parametrize("name", ["pixel-mae", "pixel"])
def test_contracts(name):
    contracts.check_all_model_contracts(name)


def test_forward_uses_only_non_padding_patches(tiny):
    tiny.eval()
    r = tiny.render(["This is a seven.", "a two"])
    logits = tiny(r.images)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, tiny(r.images, r.valid), atol=0, rtol=0)
    noisy = r.images.clone()
    t = int(r.num_text[1])
    noisy[1, :, :, (t + 1) * P :] = torch.rand(1, P, (N - t - 1) * P) * 0.5 + 0.5  # paint over the padding
    torch.testing.assert_close(tiny(noisy, r.valid), logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    """A tiny pixel-mae, trained for two steps and saved."""
    from polymodal.train import TrainConfig, train

    model = contracts.build("pixel-mae", perturb=False)
    train(
        model, polymodal.data.load_dataset("text"), TrainConfig(steps=2, batch_size=8, warmup_steps=0), progress=False
    )
    folder = tmp_path_factory.mktemp("pixel-mae")
    model.save(folder)
    return folder, model


def test_finetuning_starts_from_the_frozen_mae_encoder(mae_folder):
    folder, pre = mae_folder
    tiny_cfg = contracts.tiny("pixel").config
    model = PixelModel(evolve(tiny_cfg, mae=str(folder))).train()  # a string for a part field is its path
    assert not model.mae.training  # frozen parts stay in eval mode
    for (k, a), (_, b) in zip(model.encoder.state_dict().items(), pre.mae.encoder.state_dict().items()):
        assert torch.equal(a, b), k
    batch = {"text": ["This is a seven.", "a two", "the digit nine"], "label": torch.tensor([7, 2, 9])}
    loss, metrics = model.loss(batch)
    assert {"pixel_ce", "token_ce", "accuracy", "token_accuracy"} <= set(metrics)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.mae.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert model.token_head.weight.grad is not None and model.head.weight.grad is not None
    assert model.config_dict()["mae"]["path"] == ""  # the folder carries the MAE itself (mae/)


def test_a_mae_folder_of_another_architecture_is_refused(mae_folder):
    folder, _ = mae_folder
    with pytest.raises(ValueError, match="config equals `pretrain`"):
        PixelModel(evolve(contracts.tiny("pixel").config, mae=str(folder), pretrain=PixelMAEConfig()))


def test_token_baseline_reads_bytes(tiny):
    ids, real = tiny.token_ids(["a five", "s3ven"])
    assert ids.shape == (2, 7) and real.sum() == 7 + 6  # bytes + eos
    assert tiny.token_logits(["a five", "s3ven"]).shape == (2, 10)


def test_sampling_writes_rendering_mask_and_reconstruction(tiny, tmp_path):
    """A picture of the rendered sentence, its span mask and the MAE's reconstruction."""
    paths = tiny.sample_to_folder(tmp_path, n=2, prompt="This is a seven.", seed=1)
    assert [p.name for p in paths] == ["sample_000.png", "grid.png"]
    with pytest.raises(ValueError, match="no options"):
        tiny.sample_to_folder(tmp_path, temperature=1.0)


def test_bad_strip_shape_names_expected_and_given(tiny):
    with pytest.raises(ValueError) as info:
        tiny(torch.rand(2, 1, 12, 100))
    assert f"(B, 1, {P}, {N * P})" in str(info.value) and "(2, 1, 12, 100)" in str(info.value)


def test_train_then_eval_on_the_command_line(tmp_path):
    small = ["--set", "mae.encoder.block.dim=16", "--set", "mae.encoder.depth=1", "--set", "mae.decoder_dim=16"]
    runner = CliRunner()
    result = runner.invoke(
        main, ["train", "pixel-mae", "--steps", "3", *small, "--out", str(tmp_path / "mae"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    pretrain = [a.replace("mae.", "pretrain.mae.") for a in small]
    result = runner.invoke(
        main,
        [
            "train",
            "pixel",
            "--steps",
            "3",
            "--set",
            f"mae={tmp_path / 'mae'}",
            *pretrain,
            "--out",
            str(tmp_path / "pixel"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["eval", str(tmp_path / "pixel"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{") :])
    for key in (
        "accuracy_clean",
        "accuracy_perturbed",
        "token_accuracy_clean",
        "token_accuracy_perturbed",
        "masked_loss",
        "mean_baseline_loss",
    ):
        assert 0 <= metrics[key] < 10, key
    model = polymodal.load(tmp_path / "pixel")
    assert model.config.mae.path == "" and model.config.pretrain.mae.encoder.dim == 16
    assert (tmp_path / "pixel" / "mae" / "config.json").is_file()  # the pre-trained MAE, saved once as a part
    mae = polymodal.load(tmp_path / "mae")
    for (k, a), (_, b) in zip(model.mae.state_dict().items(), mae.mae.state_dict().items()):
        assert torch.equal(a, b), k  # the frozen MAE travelled inside the pixel folder unchanged
