"""SR3 super-resolution (Saharia et al., 2021, "Image Super-Resolution via Iterative Refinement").

A conditional diffusion model over the core parts: the low-resolution image, bicubically upsampled
to the output size, is concatenated channel-wise with ``x_t`` (the UNet reads ``2·C`` channels and
writes ``C``), and the UNet is conditioned on the *continuous* noise level ``sqrt(γ)`` instead of
an integer timestep: training draws ``t`` uniformly, then ``γ ~ U(ᾱ_t, ᾱ_{t-1})`` (``ᾱ_{-1} = 1``),
so the model learns every noise level of the grid and any subset of it can be sampled (the core
DDPM / DDIM samplers over the same schedule; the UNet gets ``noise_scale · sqrt(ᾱ_t)``).

Variant ``sr3``: the embedded 32×32 RGB shapes, 16×16 → 32×32. :mod:`.sr3_sample` holds sampling
(``polymodal sample runs/sr3 --upscale IMAGE``), the cascade and the evaluation.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.config import config, field, in_range, one_of
from polymodal.diffusion.samplers import SamplerConfig, make_sampler
from polymodal.diffusion.schedule import NoiseSchedule, ScheduleConfig
from polymodal.generation.options import SampleOption
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.nn import UNet, UNetConfig
from polymodal.train import TrainConfig

from . import sr3_sample


@config
class SR3Config:
    """SR3: a UNet over ``[x_t, upsampled low-res]``, conditioned on the continuous noise level."""

    unet: UNetConfig = field(
        UNetConfig(
            in_channels=6,
            out_channels=3,
            sample_size=32,
            channels=(16, 32, 32),
            layers_per_block=1,
            attention_levels=(False, False, True),
            attention_head_dim=8,
            norm_groups=8,
        ),
        "The denoiser: in_channels = 2 × out_channels (x_t and the upsampled low-res image), sample_size = "
        "the high-resolution side.",
    )
    schedule: ScheduleConfig = field(
        ScheduleConfig(prediction="sample"),
        "The noise-level grid γ is drawn from in training and the samplers visit; prediction 'sample' (x0): "
        "with few training steps it learns the conditional mean directly, which PSNR rewards.",
    )
    sampler: SamplerConfig = field(
        SamplerConfig(name="ddim", steps=10, spacing="trailing"),
        "Default sampler for upscaling and evaluation (steps never change the stored schedule).",
    )
    low_size: int = field(16, "Side of the low-resolution input.", check=in_range(2, 4096, integer=True))
    downsample: str = field(
        "area",
        "How training and evaluation make the low-res input: 'area' (box average) or 'bicubic' (antialiased).",
        check=one_of("area", "bicubic"),
    )
    noise_scale: float = field(
        1000.0,
        "The UNet's time input is noise_scale · sqrt(γ) (SR3's noise-level conditioning).",
        check=in_range(1e-3, 1e6),
    )
    data: str = field("shapes", "The dataset trained on; evaluation and sampling draw its test images.")
    eval_size: int = field(
        500, "Test images that evaluate super-resolves (0: the whole split).", check=in_range(0, 10**7, integer=True)
    )
    eval_seed: int = field(0, "Seed of the evaluation's sampling noise.", check=in_range(0, 2**31, integer=True))

    def __attrs_post_init__(self) -> None:
        u = self.unet
        if u.in_channels != 2 * u.out_channels:
            raise ValueError(
                f"SR3Config.unet.in_channels must be 2 × out_channels = {2 * u.out_channels} (x_t and the upsampled "
                f"low-res image); got {u.in_channels}"
            )
        if not self.low_size < u.sample_size:
            raise ValueError(f"SR3Config.low_size must be below unet.sample_size={u.sample_size}; got {self.low_size}")

    @property
    def image_size(self) -> int:
        """The high-resolution side (``unet.sample_size``)."""
        return self.unet.sample_size

    @property
    def channels(self) -> int:
        """Image channels (``unet.out_channels``)."""
        return self.unet.out_channels


class SR3Model(PolymodalModel):
    """``forward(x_t (B, C, S, S), low_up (B, C, S, S) in [0, 1], noise_level (B,) = sqrt(γ))`` → the prediction."""

    family = "sr3"
    config_class = SR3Config
    sample_options = (
        SampleOption(
            "upscale", "--upscale", "Low-resolution image file(s) to upscale (repeat the flag).", type="files"
        ),
        SampleOption(
            "base", "--base", "A generative model folder whose samples are upscaled (cascade).", type="folder"
        ),
        SampleOption("steps", "--steps", "Sampling steps (default: the model's sampler.steps).", type="int"),
    )

    def __init__(self, config: SR3Config) -> None:
        super().__init__(config)
        self.unet = UNet(config.unet)
        self.schedule = NoiseSchedule(config.schedule)

    @classmethod
    def config_for_data(cls, config: SR3Config, dataset: Any, fixed: Collection[str] = ()) -> SR3Config:
        """The dataset's channels and image size (low_size keeps the variant's factor), unless set."""
        meta = dataset.meta
        c, s = meta.get("channels", config.channels), meta.get("image_size", config.image_size)
        unet = config.unet
        if "unet.out_channels" not in fixed and "unet.in_channels" not in fixed:
            unet = attrs.evolve(unet, in_channels=2 * c, out_channels=c)
        if "unet.sample_size" not in fixed:
            unet = attrs.evolve(unet, sample_size=s)
        low = (
            config.low_size if "low_size" in fixed else max(2, unet.sample_size * config.low_size // config.image_size)
        )
        return attrs.evolve(config, unet=unet, low_size=low, data=dataset.name)

    @classmethod
    def tiny_config(cls, config: SR3Config) -> SR3Config:
        """The same architecture at toy size (contract tests)."""
        unet = attrs.evolve(
            config.unet, channels=(8, 16), attention_levels=(False, True), attention_head_dim=8, norm_groups=4
        )
        return attrs.evolve(config, unet=unet, sampler=attrs.evolve(config.sampler, steps=2), eval_size=8)

    # -- the degradation and the denoiser -----------------------------------------------------------
    def degrade(self, images: Tensor) -> Tensor:
        """High-res images (B, C, S, S) in [0, 1] → the low-res input (B, C, low, low)."""
        s, low = self.config.image_size, self.config.low_size
        if images.dim() != 4 or images.shape[1] != self.config.channels or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"sr3 degrades (B, {self.config.channels}, {s}, {s}) images; got {tuple(images.shape)}")
        if self.config.downsample == "area":
            return F.interpolate(images.float(), size=low, mode="area")  # (B, C, low, low)
        return F.interpolate(images.float(), size=low, mode="bicubic", antialias=True).clamp(0, 1)

    def upsample(self, low: Tensor) -> Tensor:
        """Low-res (B, C, low, low) in [0, 1] → bicubic (B, C, S, S) in [0, 1] (the conditioning and the baseline)."""
        c, low_size = self.config.channels, self.config.low_size
        if low.dim() != 4 or low.shape[1] != c or tuple(low.shape[-2:]) != (low_size, low_size):
            raise ValueError(
                f"sr3 upscales (B, {c}, {low_size}, {low_size}) low-resolution images; got {tuple(low.shape)}"
            )
        up = F.interpolate(low.float(), size=self.config.image_size, mode="bicubic", align_corners=False)
        return up.clamp(0, 1)  # (B, C, S, S)

    def forward(self, x_t: Tensor, low_up: Tensor, noise_level: Tensor) -> Tensor:
        """The UNet on ``[x_t, 2·low_up − 1]`` (B, 2C, S, S) at time ``noise_scale · noise_level`` (B,)."""
        x = torch.cat([x_t, low_up.to(x_t.dtype) * 2 - 1], dim=1)  # (B, 2C, S, S)
        return self.unet(x, noise_level.to(x_t.dtype) * self.config.noise_scale)  # (B, C, S, S)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """MSE on the schedule's target at a noise level γ drawn between two neighbouring grid points."""
        images = batch["image"].to(self.unet.conv_in.weight.device).float()  # (B, C, S, S) in [0, 1]
        low_up = self.upsample(self.degrade(images))  # (B, C, S, S)
        x0 = images * 2 - 1
        b, dev = len(x0), x0.device
        ab = self.schedule.alphas_cumprod.to(device=dev, dtype=torch.float64)  # (T,)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])  # (T,)
        t = torch.randint(0, self.schedule.T, (b,), device=dev)  # (B,)
        u = torch.rand(b, device=dev, dtype=torch.float64)  # (B,)
        gamma = ab[t] + (ab_prev[t] - ab[t]) * u  # (B,) γ ~ U(ᾱ_t, ᾱ_{t-1})
        a = gamma.sqrt().to(x0.dtype).view(b, 1, 1, 1)  # (B, 1, 1, 1)
        s = (1 - gamma).sqrt().to(x0.dtype).view(b, 1, 1, 1)
        noise = torch.randn_like(x0)  # (B, C, S, S)
        x_t = a * x0 + s * noise  # (B, C, S, S)
        pred = self.schedule.prediction
        target = noise if pred == "epsilon" else x0 if pred == "sample" else a * noise - s * x0
        loss = F.mse_loss(self(x_t, low_up, gamma.sqrt().float()), target)
        return loss, {"noise_level": gamma.sqrt().mean().detach()}  # 0-dim: no host sync

    def denoise_fn(self, low_up: Tensor):
        """``model_fn(x_t, t)`` for the core samplers: the UNet at the noise level ``sqrt(ᾱ_t)``."""
        ab = self.schedule.alphas_cumprod

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            level = ab.to(x_t.device)[t.to(x_t.device)].sqrt()  # (B,)
            return self(x_t, low_up, level)

        return model_fn

    def make_sampler(self, steps: int | None = None, **overrides: Any):
        """The configured sampler over this model's schedule (``steps`` in [1, T]; the schedule is never changed)."""
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.schedule.T:
                raise ValueError(f"steps must be an integer in [1, {self.schedule.T}] (the trained T); got {steps!r}")
            overrides["steps"] = steps
        return make_sampler(self.schedule, self.config.sampler, **overrides)

    @torch.no_grad()
    def upscale(
        self, low: Tensor, *, steps: int | None = None, generator: torch.Generator | None = None, **sampler: Any
    ) -> Tensor:
        """Low-res images (B, C, low, low) in [0, 1] → super-resolved (B, C, S, S) in [0, 1]."""
        return sr3_sample.upscale(self, low, steps=steps, generator=generator, **sampler)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """PSNR of SR vs bicubic against the truth; the judge's accuracy on both (see :mod:`.sr3_sample`)."""
        return sr3_sample.evaluate(self, dataset, split)

    def sample_to_folder(self, out: Any, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any):
        """Upscale ``upscale`` files, a ``base`` model's samples, or ``n`` test images (bicubic | SR | truth)."""
        return sr3_sample.sample_to_folder(self, out, n, prompt, seed, **options)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Random ``x_t``, a random upsampled low-res image and noise levels in (0, 1]."""
        c, s = self.config.channels, self.config.image_size
        x = torch.randn(batch_size, c, s, s, generator=generator)  # (B, C, S, S)
        low_up = torch.rand(batch_size, c, s, s, generator=generator)  # (B, C, S, S)
        return x, low_up, torch.rand(batch_size, generator=generator).clamp(min=0.01)

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        c, u = self.config, self.config.unet
        return [
            f"SR3: {c.low_size}×{c.low_size} → {c.image_size}×{c.image_size}×{c.channels} ({c.downsample} "
            f"downsampling, bicubic upsampling concatenated with x_t); UNet widths {u.channels}, "
            f"{u.layers_per_block} block(s) per level; {c.schedule.kind} γ grid of T={c.schedule.timesteps}, "
            f"predicts {c.schedule.prediction}; samples with {c.sampler.name} ({c.sampler.steps or 'all'} steps).",
            "",
        ]


SR3 = ModelSpec(
    SR3Model,
    SR3Config(),
    data="shapes",
    train=TrainConfig(steps=500, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.0, checkpoint_every=0),
    doc="SR3 on the embedded shapes: 16×16 → 32×32, bicubic input concatenated with x_t, continuous noise level.",
)

VARIANTS = {"sr3": SR3}
cascade = sr3_sample.cascade

__all__ = ["SR3Config", "SR3Model", "VARIANTS", "cascade"]
