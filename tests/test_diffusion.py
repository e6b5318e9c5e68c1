"""The diffusion family on tiny models (fast): shapes, conditioning, guidance, samplers, bad input, sample folders."""

from __future__ import annotations

import attrs
import pytest
import torch

from polymodal.api import spec
from polymodal.data import load_dataset
from polymodal.eval.images import read_image, save_png
from polymodal.plugins.diffusion.classifier import NoisyClassifier
from polymodal.plugins.diffusion.samples import label_from_prompt, sample_to_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def tiny(name: str, digits, **changes):
    """A fresh tiny model of variant ``name`` adapted to the digits."""
    s = spec(name)
    cfg = s.model_class.tiny_config(s.make_config(digits))
    return s.model_class(attrs.evolve(cfg, **changes) if changes else cfg).eval()


def test_config_follows_the_data(digits):
    ddpm, cfg = tiny("ddpm", digits), tiny("ddpm-cfg", digits)
    assert ddpm.image_shape == (1, 8, 8) and ddpm.config.unet.num_classes == 0
    assert cfg.config.unet.num_classes == 11 and cfg.config.labels == 10 and cfg.config.null_label == 10
    assert cfg.config.class_names[3] == "three"


def test_loss_trains_and_drops_labels(digits):
    model = tiny("ddpm-cfg", digits).train()
    batch = digits.split("train").batch(list(range(16)))
    seen = []
    model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    torch.manual_seed(1)
    loss, metrics = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    labels = seen[0]
    dropped = labels == 10
    assert torch.equal(labels[~dropped], batch["label"][~dropped])  # kept labels unchanged, the rest null


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 7), ("ddim", 5), ("ddim", None)])
def test_generate_in_unit_range_and_schedule_kept(digits, sampler, steps):
    model = tiny("ddpm", digits)
    before = model.schedule.alphas_cumprod.clone()
    out = model.generate(3, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 8, 8) and out.min() >= 0 and out.max() <= 1
    assert model.schedule.T == 100 and torch.equal(model.schedule.alphas_cumprod, before)
    visited = model.make_sampler(sampler, steps).timesteps
    assert len(visited) == (steps or (100 if sampler == "ddpm" else 50))


def test_generation_is_seeded(digits):
    model = tiny("ddpm", digits)
    a = model.generate(2, sampler="ddim", steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(2, sampler="ddim", steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    c = model.generate(2, sampler="ddim", steps=4, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_classifier_free_guidance_combines_both_outputs(digits):
    model = tiny("ddpm-cfg", digits)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 70, 99])
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full((4,), 10))
        assert torch.allclose(model.denoise_fn(y, 1.0)(x, t), cond)
        assert torch.allclose(model.denoise_fn(y, 0.0)(x, t), uncond, atol=1e-6)
        guided = model.denoise_fn(y, 3.0)(x, t)
        assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
        assert torch.allclose(model.denoise_fn()(x, t), uncond)  # no label: the null label


def test_classifier_guidance_moves_samples(digits):
    model, clf = tiny("ddpm", digits), tiny("ddpm-classifier", digits)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = model.generate(2, sampler="ddim", steps=4, generator=g())
    guided = model.generate(2, labels=7, classifier=clf, guidance_scale=50.0, sampler="ddim", steps=4, generator=g())
    zero = model.generate(2, labels=7, classifier=clf, guidance_scale=0.0, sampler="ddim", steps=4, generator=g())
    assert torch.equal(plain, zero) and not torch.allclose(plain, guided)
    assert clf(torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 9])).shape == (3, 10)


def test_classifier_trains(digits):
    clf = tiny("ddpm-classifier", digits).train()
    loss, metrics = clf.loss(digits.split("train").batch(list(range(8))))
    loss.backward()
    assert torch.isfinite(loss) and 0 <= metrics["accuracy"] <= 1


def test_bad_input_names_expected_and_given(digits, tmp_path):
    ddpm, cfg = tiny("ddpm", digits), tiny("ddpm-cfg", digits)
    no_dropout = tiny("ddpm-cfg", digits, cond_dropout=0.0, unet=attrs.evolve(cfg.config.unet, num_classes=10))
    with pytest.raises(ValueError, match="unconditional.*expected no prompt, got 'the digit 3'"):
        sample_to_folder(ddpm, tmp_path / "a", n=1, prompt="the digit 3")
    with pytest.raises(ValueError, match="unconditional.*expected no --label, got 3"):
        sample_to_folder(ddpm, tmp_path / "a", n=1, label=3)
    for steps in (0, -1, 101):
        with pytest.raises(
            ValueError, match=r"steps must be an integer in 1 … 100 \(the trained T\); got " + str(steps)
        ):
            ddpm.generate(1, steps=steps)
    with pytest.raises(ValueError, match="sampler must be one of ddpm, ddim; got 'euler'"):
        ddpm.generate(1, sampler="euler")
    with pytest.raises(ValueError, match="condition dropout.*cond_dropout=0.0"):
        no_dropout.generate(1, labels=3, guidance_scale=3.0)
    with pytest.raises(ValueError, match="unconditional.*guidance_scale=2.0"):
        ddpm.generate(1, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\); got values in \[10, 10\]"):
        cfg.generate(1, labels=10)
    small = NoisyClassifier(
        attrs.evolve(
            tiny("ddpm-classifier", digits).config,
            unet=attrs.evolve(tiny("ddpm-classifier", digits).config.unet, sample_size=16),
        )
    )
    with pytest.raises(ValueError, match="expected 8×8×1 .*got a classifier of 16×16×1"):
        ddpm.generate(1, labels=1, classifier=small)
    image, mask = tmp_path / "img.png", tmp_path / "mask.png"
    save_png(torch.rand(1, 8, 8), image)
    save_png(torch.ones(1, 6, 8), mask)
    with pytest.raises(ValueError, match="mask's size differs from the image's: expected 8×8, got 8×6"):
        sample_to_folder(ddpm, tmp_path / "b", n=1, inpaint=str(image), mask=str(mask), steps=3)
    assert label_from_prompt(cfg, "the digit 3") == 3 and label_from_prompt(cfg, "a seven") == 7
    with pytest.raises(ValueError, match="exactly one class"):
        label_from_prompt(cfg, "a 3 or a 4")


def test_sample_folder_has_grid_and_trajectory(digits, tmp_path):
    model = tiny("ddpm-cfg", digits)
    paths = sample_to_folder(model, tmp_path, n=4, prompt="the digit 3", steps=20, guidance_scale=2.0)
    names = {p.name for p in paths}
    assert {"sample_000.png", "sample_003.png", "grid.png", "trajectory.png"} <= names
    strip = read_image(tmp_path / "trajectory.png", 1)
    assert strip.shape[-1] > 5 * strip.shape[-2]  # one row of ~10 frames


def test_inpainting_keeps_the_known_pixels(digits, tmp_path):
    model = tiny("ddpm", digits)
    image = digits.split("test").batch([0])["image"][0]  # (1, 8, 8)
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1  # keep the top half
    save_png(image, tmp_path / "img.png")
    save_png(mask, tmp_path / "mask.png")
    sample_to_folder(
        model, tmp_path / "s", n=2, inpaint=str(tmp_path / "img.png"), mask=str(tmp_path / "mask.png"), steps=10
    )
    out = read_image(tmp_path / "s" / "sample_001.png", 1)
    original = read_image(tmp_path / "img.png", 1)
    assert torch.allclose(out[:, :4], original[:, :4], atol=1 / 255 + 1e-6)
    sample_to_folder(model, tmp_path / "o", n=1, inpaint=str(tmp_path / "img.png"), outpaint=2, steps=10)
    assert (tmp_path / "o" / "grid.png").is_file()


def test_saved_folder_samples_from_the_command_line(digits, tmp_path):
    from click.testing import CliRunner

    from polymodal.cli import main

    model = tiny("ddpm", digits)
    model.save(tmp_path / "m")
    result = CliRunner().invoke(
        main,
        ["sample", str(tmp_path / "m"), "-n", "2", "--sampler", "ddim", "--steps", "5", "--out", str(tmp_path / "s")],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "trajectory.png").is_file()
    bad = CliRunner().invoke(main, ["sample", str(tmp_path / "m"), "--steps", "0", "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0 and "steps must be an integer in 1 … 100" in bad.output
