"""Kandinsky 2.0 sampling: text (any of the four languages) → latents → the KL-VAE's decoder → images.

    model = polymodal.load("runs/k2")
    images = generate(model, ["красный круг"] * 8, generator=torch.Generator().manual_seed(0))  # (8, 3, 32, 32)
    raw = generate(model, ["un cercle rouge"], threshold=False, sampler="ddpm", steps=100)

    polymodal sample runs/k2 --prompt "красный круг" -n 16 --cfg 4 --steps 50 --sampler ddim [--no-threshold]

Classifier-free guidance contrasts the prompt with the dropped text (zero pooled features, every text token
masked: the condition training drops to). Dynamic thresholding is Imagen's on the guided prediction's x0, in
units of the latents' range R (``latent_range``, the bound every training latent keeps, as pixels keep 1):
s = the 99.5th percentile of |x0| / R per sample, at least 1; x0 ← R · clip(x0 / R, -s, s) / s; the output
is re-expressed from that x0 (as diffusers' schedulers recompute ε from the thresholded x0), so DDIM and DDPM
both step from the thresholded prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.diffusion import cfg_model, make_sampler, sample
from polymodal.diffusion.samplers import threshold as imagen_threshold
from polymodal.eval.images import write_samples
from polymodal.generation.options import SampleOption, keywords
from polymodal.nn import eval_mode

SAMPLE_OPTIONS = (
    SampleOption("cfg_scale", "--cfg", "Classifier-free guidance scale (1 = none; default: the model's)."),
    SampleOption("steps", "--steps", "Sampling steps (default: the model's, 50).", type="int"),
    SampleOption("sampler", "--sampler", "Sampler: ddim or ddpm (default: the model's).", type="text"),
    SampleOption(
        "threshold", "--no-threshold", "Turn dynamic thresholding of the predicted x0 off.", type="switch", value=False
    ),
    SampleOption("truncate", "--truncate", "Cut prompts longer than a tokenizer's context (with a warning).", "switch"),
)
"""What ``polymodal sample`` offers for a Kandinsky 2.0 folder (``Kandinsky2.sample_options``)."""

OPTIONS = keywords(SAMPLE_OPTIONS)
"""The ``sample_to_folder`` options Kandinsky 2.0 understands."""


def make_latent_sampler(
    model: Any, sampler: str | None = None, steps: int | None = None, threshold: bool | None = None
):
    """A DDIM or DDPM sampler over the model's schedule, with dynamic thresholding on or off (None: the config's)."""
    c, T = model.config, model.schedule.T
    name = c.sampler if sampler is None else sampler
    if name not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim'; got {name!r}")
    steps = c.steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1 … {T} (the trained T); got {steps!r}")
    return make_sampler(model.schedule, name=name, steps=steps, spacing="trailing", clip_sample=False)


def thresholded(model: Any, fn: Any) -> Any:
    """``fn(x_t, t)`` with its predicted x0 dynamically thresholded in units of ``model.latent_range``."""
    schedule, ratio, bound = model.schedule, model.config.threshold_ratio, float(model.latent_range)

    def out(x: Tensor, t: Tensor) -> Tensor:
        pred = fn(x, t)  # (B, 4, h, w)
        x0 = imagen_threshold(schedule.to_x0(pred, x, t) / bound, ratio, 1e6) * bound  # (B, 4, h, w)
        ab = schedule.alpha_bar(t, x)  # (B, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # (B, 4, h, w) the noise that x0 implies
        return schedule.from_eps(eps, x, t)

    return out


@torch.no_grad()
def generate_latents(
    model: Any,
    prompts: Any,
    *,
    cfg_scale: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    threshold: bool | None = None,
    truncate: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Latents (B, 4, h, w) in the diffusion space for ``prompts``, guided against the dropped text."""
    text = model.encode_text(prompts, truncate=truncate)  # 6 tensors, batch B
    null = (
        torch.zeros_like(text[0][:1]), torch.zeros_like(text[1][:1]), torch.zeros_like(text[2][:1]),
        torch.zeros_like(text[3][:1]), torch.zeros_like(text[4][:1]), torch.zeros_like(text[5][:1]),
    )  # fmt: skip  # (1, …) each: no pooled features, every token masked
    keys = ("cp", "ct", "cm", "tp", "tt", "tm")
    scale = model.config.guidance_scale if cfg_scale is None else float(cfg_scale)

    def fn(x: Tensor, t: Tensor, k: dict) -> Tensor:
        return model.denoise(x, t, tuple(k[n] for n in keys))  # (B, 4, h, w)

    guided = cfg_model(fn, dict(zip(keys, text, strict=True)), dict(zip(keys, null, strict=True)), scale)
    u = model.config.unet
    shape = (text[0].shape[0], u.in_channels, u.sample_size, u.sample_size)
    if model.config.thresholding if threshold is None else threshold:
        guided = thresholded(model, guided)
    with eval_mode(model):
        out = sample(guided, make_latent_sampler(model, sampler, steps), shape, generator=generator,
                     device=model.device)  # fmt: skip
    return out.images  # (B, 4, h, w)


def generate(model: Any, prompts: Any, **options: Any) -> Tensor:
    """Images (B, C, S, S) in [0, 1] for ``prompts``: :func:`generate_latents` decoded by the VAE."""
    return model.from_latents(generate_latents(model, prompts, **options))


def sample_to_folder(
    model: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """Write ``n`` samples of ``prompt`` as PNGs plus a grid; returns the paths. Options: :data:`OPTIONS`."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"kandinsky sampling does not support {', '.join(unknown)}; supported: {', '.join(OPTIONS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    if prompt is None:
        raise ValueError("kandinsky sampling needs --prompt TEXT (in any language)")
    options = {k: v for k, v in options.items() if v is not None}
    g = torch.Generator(device=model.device).manual_seed(int(seed))
    return write_samples(generate(model, [prompt] * n, generator=g, **options).cpu(), out)
