"""SR3 super-resolution (fast): config checks, the noise-level conditioning, upscaling, files, the cascade, the CLI."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import polymodal
from polymodal.cli import main
from polymodal.data.base import Dataset, Split
from polymodal.nn import UNetConfig
from polymodal.plugins.diffusion.sr3 import SR3Config, SR3Model, cascade
from polymodal.plugins.diffusion.sr3_sample import psnr
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sr():
    torch.manual_seed(0)
    return contracts.build("sr3")  # tiny: UNet (8, 16), 2 sampling steps


def _png(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def test_config_refuses_inconsistent_channels_and_sizes():
    with pytest.raises(ValueError, match=r"in_channels must be 2 × out_channels = 6.*got 3"):
        SR3Config(unet=UNetConfig(in_channels=3, out_channels=3, sample_size=32))
    with pytest.raises(ValueError, match=r"low_size must be below unet.sample_size=32; got 32"):
        SR3Config(low_size=32)


def test_degrade_and_upsample_shapes_and_errors(sr):
    x = torch.rand(3, 3, 32, 32)
    low = sr.degrade(x)
    assert low.shape == (3, 3, 16, 16)
    # area downsampling is the 2×2 box mean
    assert torch.allclose(low[0, 0, 0, 0], x[0, 0, :2, :2].mean(), atol=1e-6)
    up = sr.upsample(low)
    assert up.shape == (3, 3, 32, 32) and 0 <= float(up.min()) and float(up.max()) <= 1
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\).*got \(3, 3, 8, 8\)"):
        sr.upsample(torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*got \(2, 1, 32, 32\)"):
        sr.degrade(torch.rand(2, 1, 32, 32))


def test_denoise_fn_feeds_the_continuous_noise_level(sr):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    low_up = torch.rand(2, 3, 32, 32, generator=g)
    t = torch.tensor([0, 731])
    level = sr.schedule.alphas_cumprod[t].sqrt()
    with torch.no_grad():
        got = sr.denoise_fn(low_up)(x, t)
        want = sr.unet(torch.cat([x, low_up * 2 - 1], 1), level * sr.config.noise_scale)
        other = sr.unet(torch.cat([x, low_up * 2 - 1], 1), level.flip(0) * sr.config.noise_scale)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, other)  # the level matters


def test_training_draws_gamma_between_grid_neighbours(sr, monkeypatch):
    seen = []
    original = SR3Model.forward

    def spy(self, x_t, low_up, noise_level):
        seen.append(noise_level.detach().clone())
        return original(self, x_t, low_up, noise_level)

    monkeypatch.setattr(SR3Model, "forward", spy)
    torch.manual_seed(3)
    batch = {"image": torch.rand(64, 3, 32, 32)}
    loss, metrics = sr.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and 0 < metrics["noise_level"] < 1
    levels = seen[0].double()
    assert levels.shape == (64,)
    # continuous: the drawn levels are (almost surely) not on the integer grid sqrt(ᾱ_t)
    grid = sr.schedule.alphas_cumprod.double().sqrt()
    assert (levels[:, None] - grid[None]).abs().min(1).values.max() > 0
    assert float(levels.min()) >= float(grid[-1]) - 1e-6 and float(levels.max()) <= 1.0


def test_upscale_is_deterministic_with_ddim_and_checks_steps(sr):
    low = torch.rand(3, 3, 16, 16)
    a = sr.upscale(low, generator=torch.Generator().manual_seed(0))
    b = sr.upscale(low, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 32, 32) and 0 <= float(a.min()) and float(a.max()) <= 1
    torch.testing.assert_close(a, b)
    T = sr.schedule.T
    for bad in (0, -1, T + 1):
        with pytest.raises(ValueError, match=rf"steps must be an integer in \[1, {T}\].*got {bad}"):
            sr.upscale(low, steps=bad)
    c = sr.upscale(low, steps=3, name="ddpm", generator=torch.Generator().manual_seed(0))
    assert c.shape == a.shape
    assert sr.schedule.T == T and sr.config.sampler.steps == 2  # steps never change the stored schedule


def test_psnr_matches_its_definition():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))


def test_evaluate_reports_psnr_against_bicubic(sr):
    g = torch.Generator().manual_seed(0)
    split = Split({"image": torch.rand(10, 3, 32, 32, generator=g), "label": torch.zeros(10, dtype=torch.long)})
    ds = Dataset("toy", split, split, {"channels": 3, "image_size": 32})
    m = sr.evaluate(ds)
    assert m["samples"] == 8  # the tiny config's eval_size
    assert m["psnr_gain"] == pytest.approx(m["psnr"] - m["psnr_bicubic"])
    assert 0 < m["psnr_bicubic"] < 60 and np.isfinite(m["psnr"])


def test_upscale_files_write_sr_beside_bicubic(sr, tmp_path):
    a, b = _png(tmp_path / "a.png", 16), _png(tmp_path / "b.png", 16, seed=1)
    paths = sr.sample_to_folder(tmp_path / "out", upscale=[a, b], seed=0)
    names = sorted(p.name for p in paths)
    assert names == ["a_bicubic.png", "a_sr.png", "b_bicubic.png", "b_sr.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "a_sr.png").size == (32, 32)


def test_upscale_refuses_wrong_size_channels_and_prompts(sr, tmp_path):
    with pytest.raises(ValueError, match=r"16×16 images; got 32×32"):
        sr.sample_to_folder(tmp_path / "o", upscale=[_png(tmp_path / "big.png", 32)])
    with pytest.raises(ValueError, match=r"RGB images \(3 channel\(s\)\); got mode L \(1 channel\(s\)\)"):
        sr.sample_to_folder(tmp_path / "o", upscale=[_png(tmp_path / "grey.png", 16, mode="L")])
    with pytest.raises(ValueError, match="takes no prompt"):
        sr.sample_to_folder(tmp_path / "o", prompt="a red square")
    with pytest.raises(ValueError, match="does not support temperature"):
        sr.sample_to_folder(tmp_path / "o", temperature=1.0)


def test_sample_without_files_writes_test_triples(sr, tmp_path):
    paths = sr.sample_to_folder(tmp_path / "o", n=2)
    assert [p.name for p in paths] == ["sample_000.png", "sample_001.png", "grid.png"]
    assert Image.open(paths[0]).size == (96, 32)  # bicubic | SR | truth


class _Base:
    family = "fake"

    def __init__(self, shape):
        self.shape = shape

    def generate(self, n, generator=None):
        return torch.rand(n, *self.shape, generator=generator)


def test_cascade_upscales_a_base_models_samples(sr):
    low, bicubic, high = cascade(_Base((3, 16, 16)), sr, 3, seed=0)
    assert low.shape == (3, 3, 16, 16) and bicubic.shape == high.shape == (3, 3, 32, 32)
    low2, _, high2 = cascade(_Base((3, 16, 16)), sr, 3, seed=0)
    torch.testing.assert_close(high, high2)
    with pytest.raises(ValueError, match=r"generates images of shape \(1, 8, 8\).*upscales \(3, 16, 16\)"):
        cascade(_Base((1, 8, 8)), sr, 2)
    with pytest.raises(ValueError, match="must generate images"):
        cascade(sr, sr, 2)  # an sr3 model generates nothing on its own
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        cascade(_Base((3, 16, 16)), sr, 0)


def _tiny_base():
    if ("model", "ddpm") not in polymodal.registry.get_registry():
        pytest.skip("the ddpm variant is not registered")
    unet = {"in_channels": 3, "out_channels": 3, "sample_size": 16, "channels": (8, 16), "norm_groups": 4}
    return polymodal.create("ddpm", unet={**unet, "attention_head_dim": 8}, steps=2)


def test_cascade_composes_folders_through_the_registry(sr, tmp_path):
    base = _tiny_base()  # an untrained ddpm at 3×16×16: the plumbing, not the quality
    base.save(tmp_path / "base")
    sr.save(tmp_path / "sr")
    low, bicubic, high = cascade(str(tmp_path / "base"), str(tmp_path / "sr"), 2, seed=0)
    assert low.shape == (2, 3, 16, 16) and high.shape == (2, 3, 32, 32)


def test_cli_upscale_and_base(sr, tmp_path):
    folder = tmp_path / "sr"
    sr.save(folder)
    a, b = _png(tmp_path / "a.png", 16), _png(tmp_path / "b.png", 16, seed=1)
    runner = CliRunner()
    args = ["sample", str(folder), "--upscale", str(a), "--upscale", str(b), "--out", str(tmp_path / "s")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "s").glob("*.png")} == {
        "a_bicubic.png",
        "a_sr.png",
        "b_bicubic.png",
        "b_sr.png",
        "grid.png",
    }
    bad = runner.invoke(main, ["sample", str(folder), "--upscale", str(_png(tmp_path / "c.png", 8))])
    assert bad.exit_code != 0 and "16×16" in bad.output
    base = _tiny_base()
    base.save(tmp_path / "base")
    args = ["sample", str(folder), "--base", str(tmp_path / "base"), "-n", "2", "--steps", "1"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "sample_001_sr.png").exists()


def test_config_for_data_keeps_the_factor():
    from polymodal.data import load_dataset

    cfg = SR3Model.config_for_data(SR3Config(), load_dataset("digits"))
    assert (cfg.unet.in_channels, cfg.unet.out_channels, cfg.unet.sample_size, cfg.low_size) == (2, 1, 8, 4)
    kept = SR3Model.config_for_data(attrs.evolve(SR3Config(), low_size=8), load_dataset("shapes"), fixed={"low_size"})
    assert kept.low_size == 8
