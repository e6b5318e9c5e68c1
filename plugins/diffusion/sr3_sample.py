"""SR3 sampling, evaluation and the cascade.

    sr = polymodal.load("runs/sr3")
    high = sr.upscale(low)                                   # (B, 3, 16, 16) → (B, 3, 32, 32) in [0, 1]
    low, bicubic, high = cascade("runs/base16", sr, n=8)     # any generative folder's samples, upscaled

``polymodal sample runs/sr3 --upscale a.png --upscale b.png`` writes ``a_sr.png`` beside ``a_bicubic.png``;
``--base DIR`` upscales DIR's samples (a cascade, as unCLIP and Imagen compose a base and upsamplers);
with neither, ``n`` test images are written as bicubic | SR | truth triples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.diffusion.loop import sample
from polymodal.nn import eval_mode

OPTIONS = ("upscale", "base", "steps")


def _device(model: Any) -> torch.device:
    return model.unet.conv_in.weight.device


@torch.no_grad()
def upscale(
    model: Any,
    low: Tensor,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    **sampler: Any,
) -> Tensor:
    """Low-res (B, C, low, low) in [0, 1] → SR (B, C, S, S) in [0, 1], sampled from the model's sampler
    (``sampler`` overrides its config: ``name``, ``eta`` …) in batches of ``batch_size``."""
    low_up = model.upsample(low.to(_device(model)))  # (B, C, S, S); checks the size and channels
    c, s = model.config.channels, model.config.image_size
    out = []
    with eval_mode(model):
        for start in range(0, len(low_up), batch_size):
            cond = low_up[start : start + batch_size]  # (b, C, S, S)
            result = sample(
                model.denoise_fn(cond),
                model.make_sampler(steps, **sampler),
                (len(cond), c, s, s),
                generator=generator,
                device=cond.device,
            )
            out.append(((result.images + 1) / 2).clamp(0, 1))  # (b, C, S, S)
    return torch.cat(out)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR (N,) in dB of images in [0, 1] (peak 1); identical images give +inf."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)  # (N,)
    return 10 * torch.log10(1 / mse)


def _judged(dataset: Any, images: Tensor, subset: dict[str, Tensor], prefix: str) -> dict[str, float]:
    """The judge's attribute accuracies (and fd_judge) on ``images`` of the scenes it is trained on."""
    from polymodal.eval.judge import judge_samples

    spec = dataset.meta.get("judge") or {}
    attributes = list(spec.get("attributes") or ["label"])
    keep = torch.ones(len(images), dtype=torch.bool)  # (N,)
    if spec.get("where"):
        name, value = spec["where"]
        if name not in subset:
            return {}
        keep = subset[name] == value  # (N,) e.g. one-object scenes
    if not bool(keep.any()) or any(a not in subset for a in attributes):
        return {}
    scores = judge_samples(dataset, images[keep], {a: subset[a][keep] for a in attributes})
    out = {f"{prefix}{k.removeprefix('sample_')}": v for k, v in scores.items() if k != "sample_accuracy"}
    out[f"{prefix}accuracy"] = scores["sample_accuracy"]
    return out


@torch.no_grad()
def evaluate(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """On the first ``eval_size`` images of ``split``: ``psnr`` (SR vs truth, mean per-image dB),
    ``psnr_bicubic`` and ``psnr_gain``; the judge's ``sr_<attr>_accuracy`` and ``bicubic_<attr>_accuracy``
    (shapes: colour and kind, on one-object scenes), ``fd_judge`` of both; ``seconds_per_image``."""
    import time

    from polymodal.eval.judge import get_judge

    data = dataset.split(split)
    n = len(data) if model.config.eval_size == 0 else min(len(data), model.config.eval_size)
    subset = data.batch(list(range(n)))
    truth = subset["image"].float()  # (N, C, S, S)
    low = model.degrade(truth.to(_device(model)))  # (N, C, low, low)
    bicubic = model.upsample(low).cpu()  # (N, C, S, S)
    g = torch.Generator(device=_device(model)).manual_seed(model.config.eval_seed)
    start = time.perf_counter()
    sr = model.upscale(low, generator=g).cpu()  # (N, C, S, S)
    seconds = time.perf_counter() - start
    metrics = {
        "psnr": float(psnr(sr, truth).mean()),
        "psnr_bicubic": float(psnr(bicubic, truth).mean()),
        "seconds_per_image": seconds / n,
        "samples": n,
    }
    metrics["psnr_gain"] = metrics["psnr"] - metrics["psnr_bicubic"]
    fields = {k: subset[k] for k in subset if isinstance(subset[k], Tensor) and subset[k].dim() == 1}
    if dataset.name in ("digits", "shapes") or dataset.meta.get("judge"):
        with torch.enable_grad():  # a judge not cached yet is trained now, inside evaluate's no_grad
            get_judge(dataset)
        metrics.update(_judged(dataset, sr, fields, "sr_"))
        metrics.update(_judged(dataset, bicubic, fields, "bicubic_"))
        metrics.update(_judged(dataset, truth, fields, "truth_"))
    return metrics


def _read_low(model: Any, path: str | Path) -> Tensor:
    """(C, low, low) in [0, 1] from an image file, refusing another size or channel count (expected vs given)."""
    import numpy as np

    from polymodal.data.images import open_image

    c, low = model.config.channels, model.config.low_size
    img = open_image(path)
    bands = len(img.getbands())
    if bands != c or (c == 3 and img.mode not in ("RGB",)) or (c == 1 and img.mode not in ("L",)):
        raise ValueError(
            f"sr3 upscales {'RGB' if c == 3 else 'greyscale'} images ({c} channel(s)); got mode {img.mode} "
            f"({bands} channel(s)) from {path}"
        )
    if img.size != (low, low):
        raise ValueError(f"sr3 upscales {low}×{low} images; got {img.size[0]}×{img.size[1]} from {path}")
    array = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 255.0
    return array[None] if c == 1 else array.permute(2, 0, 1)  # (C, low, low)


def _load(model_or_folder: Any) -> Any:
    if isinstance(model_or_folder, (str, Path)):
        from polymodal.api import load

        return load(model_or_folder)
    return model_or_folder


@torch.no_grad()
def cascade(
    base: Any, sr: Any, n: int = 8, *, seed: int = 0, steps: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """A base generator's ``n`` samples upscaled by ``sr``: ``(low, bicubic, high)`` in [0, 1].

    ``base`` and ``sr`` are models or folders (loaded with :func:`polymodal.load`, whatever their family):
    ``base`` must offer ``generate(n, generator=...)`` → (n, C, low, low) in [0, 1] at the SR model's
    input size and channels, as unCLIP and Imagen chain a base model and upsamplers.
    """
    base, sr = _load(base), _load(sr)
    if not hasattr(sr, "upscale"):
        raise ValueError(f"the cascade's upsampler must be an sr3 model; got the {getattr(sr, 'family', '?')!r} family")
    if not callable(getattr(base, "generate", None)):
        raise ValueError(
            f"the cascade's base must generate images (a generate(n, generator=...) method); the "
            f"{getattr(base, 'family', type(base).__name__)!r} family has none"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    low = base.generate(n, generator=g).float()  # (n, C, low, low)
    c, size = sr.config.channels, sr.config.low_size
    if low.dim() != 4 or tuple(low.shape[1:]) != (c, size, size):
        raise ValueError(
            f"the base model generates images of shape {tuple(low.shape[1:])}; the sr3 model upscales "
            f"({c}, {size}, {size})"
        )
    g = torch.Generator(device=_device(sr)).manual_seed(int(seed))
    high = sr.upscale(low.clamp(0, 1), steps=steps, generator=g)  # (n, C, S, S)
    return low.cpu(), sr.upsample(low.to(_device(sr)).clamp(0, 1)).cpu(), high.cpu()


def sample_to_folder(
    model: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """Write upscaled PNGs (see the module doc); returns every path written, ``grid.png`` last."""
    from polymodal.data import load_dataset
    from polymodal.eval.images import write_samples

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"sr3 sampling does not support {', '.join(unknown)}; supported: {', '.join(OPTIONS)}")
    if prompt is not None:
        raise ValueError(f"sr3 upscales images and takes no prompt; got {prompt!r} (use --upscale IMAGE)")
    files, base, steps = options.get("upscale"), options.get("base"), options.get("steps")
    if isinstance(files, (str, Path)):
        files = [files]
    if files and base is not None:
        raise ValueError("give either upscale (image files) or base (a generative folder), not both")
    g = torch.Generator(device=_device(model)).manual_seed(int(seed))
    if files:
        stems = [Path(f).stem for f in files]
        if len(set(stems)) != len(stems):
            raise ValueError(f"the upscaled images need distinct file names; got {', '.join(map(str, files))}")
        low = torch.stack([_read_low(model, f) for f in files])  # (B, C, low, low)
        high = model.upscale(low, steps=steps, generator=g).cpu()  # (B, C, S, S)
        bicubic = model.upsample(low.to(_device(model))).cpu()
        images = torch.stack([bicubic, high], 1).flatten(0, 1)  # (2B, C, S, S) bicubic, SR, …
        names = [f"{s}_{kind}" for s in stems for kind in ("bicubic", "sr")]
        return write_samples(images, out, names=names)
    if base is not None:
        low, bicubic, high = cascade(base, model, n, seed=seed, steps=steps)
        images = torch.stack([bicubic, high], 1).flatten(0, 1)  # (2n, C, S, S)
        names = [f"sample_{i:03d}_{kind}" for i in range(n) for kind in ("bicubic", "sr")]
        return write_samples(images, out, names=names)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    test = load_dataset(model.config.data).test
    truth = test.batch(list(range(min(n, len(test)))))["image"].float()  # (n, C, S, S)
    low = model.degrade(truth.to(_device(model)))
    high = model.upscale(low, steps=steps, generator=g).cpu()
    rows = torch.cat([model.upsample(low).cpu(), high, truth], dim=3)  # (n, C, S, 3S) bicubic | SR | truth
    return write_samples(rows, out)


__all__ = ["OPTIONS", "cascade", "evaluate", "psnr", "sample_to_folder", "upscale"]
