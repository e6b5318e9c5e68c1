"""Diffusion evaluation (the judge's Fréchet distance, DDIM, inversion, inpainting, guidance) and sample folders.

``evaluate_diffusion`` (``polymodal train``/``eval``; every draw seeded with ``eval_seed``):

* all models: ``test_loss`` (the objective on the test split, seeded t and noise);
* unconditional models on a judged dataset: ``fd_judge`` of ``eval_samples`` DDPM samples (all T
  steps) against the test split, ``fd_judge_100`` of the first 100 of them (to compare with DALL·E's
  100 evaluation samples), ``fd_train_test`` (as many train images against the test split: the data's
  own FD), ``fd_judge_ddim`` of as many DDIM samples (``eval_ddim_steps``, η = 0) and
  ``fd_ddim_ratio`` = fd_judge_ddim / fd_judge; ``inversion_mse``: DDIM inversion then reconstruction
  of ``eval_inversion`` test images, MSE in the data's [0, 1] scale; ``inpaint_accuracy``: the bottom
  half of ``eval_inpaint`` test images inpainted (RePaint, ``inpaint_steps`` DDPM steps, resampling
  ``inpaint_resample``), the share the judge reads as the original label (``inpaint_baseline_accuracy``:
  the same images with a black bottom half);
* label models: the guidance sweep over ``eval_scales`` (DDIM-``eval_ddim_steps``, ``eval_per_class``
  samples per class): ``guidance_w{w}_accuracy`` / ``guidance_w{w}_fd``, and ``sample_accuracy`` /
  ``fd_judge`` at the default ``guidance_scale``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.eval.images import make_grid, read_image, save_png, write_samples
from polymodal.io import atomic_write

JUDGED = ("digits", "shapes")


def _images(dataset: Any, split: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) images in [0, 1] and (N,) labels of a split (the first ``limit``)."""
    data = dataset.split(split)
    batch = data.batch(list(range(min(len(data), limit or len(data)))))
    return batch["image"].float(), batch["label"].long()


@torch.no_grad()
def test_loss(model: Any, dataset: Any, split: str = "test", batch_size: int = 256) -> float:
    """Mean diffusion loss over a split with seeded timesteps and noise."""
    from polymodal.diffusion.objective import diffusion_loss

    images, labels = _images(dataset, split)
    g = torch.Generator().manual_seed(model.config.eval_seed)
    total = 0.0
    model.eval()
    for start in range(0, len(images), batch_size):
        x0 = images[start : start + batch_size] * 2 - 1  # (b, C, H, W)
        y = labels[start : start + batch_size] if model.config.condition == "label" else None
        t = torch.randint(0, model.schedule.T, (len(x0),), generator=g)  # (b,)
        noise = torch.randn(x0.shape, generator=g)  # (b, C, H, W)
        loss, _ = diffusion_loss(model.schedule, lambda x, tt, y=y: model(x, tt, y), x0, noise=noise, t=t)
        total += loss.item() * len(x0)
    return total / len(images)


def _fd(judge: Any, a: Tensor, b: Tensor) -> float:
    from polymodal.eval.judge import frechet_distance

    return frechet_distance(judge.embed(a), judge.embed(b))


@torch.no_grad()
def inpaint_bottom(model: Any, images: Tensor, seed: int = 0) -> Tensor:
    """``images`` (N, C, H, W) in [0, 1] with the bottom half inpainted by RePaint; (N, C, H, W) in [0, 1]."""
    c = model.config
    mask = torch.zeros(1, 1, *images.shape[-2:], dtype=torch.bool)  # (1, 1, H, W): True = known
    mask[..., : images.shape[-2] // 2, :] = True
    g = torch.Generator().manual_seed(seed)
    out = model.sample(
        len(images),
        sampler="ddpm",
        steps=c.inpaint_steps or model.schedule.T,
        generator=g,
        known=images * 2 - 1,
        mask=mask,
        resample=c.inpaint_resample,
        jump=c.inpaint_jump,
    )
    return ((out.images + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def guidance_sweep(model: Any, dataset: Any, scales: Any, per_class: int, seed: int = 0) -> dict[str, Any]:
    """Judge accuracy and FD of ``per_class`` samples per class at each guidance scale (DDIM, η = 0)."""
    from polymodal.eval.judge import get_judge, judge_samples

    with torch.enable_grad():
        get_judge(dataset)
    labels = torch.arange(model.config.labels).repeat_interleave(per_class)  # (N,)
    rows, images = [], []
    for w in scales:
        g = torch.Generator().manual_seed(seed)
        x = model.generate(
            len(labels),
            labels=labels,
            sampler="ddim",
            steps=model.config.eval_ddim_steps,
            guidance_scale=float(w),
            generator=g,
        ).cpu()  # (N, C, H, W)
        m = judge_samples(dataset, x, {"label": labels})
        rows.append({"guidance_scale": float(w), "sample_accuracy": m["sample_accuracy"], "fd_judge": m["fd_judge"]})
        images.append(x)
    return {"rows": rows, "images": images, "labels": labels}


@torch.no_grad()
def classifier_guidance_accuracy(
    model: Any, classifier: Any, dataset: Any, scale: float, per_class: int = 10, seed: int = 0, **sampling: Any
) -> dict[str, float]:
    """Judge accuracy and FD of ``per_class`` samples per class of ``model`` guided by ``classifier``
    towards each label at ``scale`` (``sampling``: sampler, steps, eta)."""
    from polymodal.eval.judge import get_judge, judge_samples

    with torch.enable_grad():
        get_judge(dataset)
    labels = torch.arange(classifier.config.num_classes).repeat_interleave(per_class)  # (N,)
    g = torch.Generator().manual_seed(seed)
    x = model.generate(len(labels), labels=labels, classifier=classifier, guidance_scale=scale, generator=g, **sampling)
    return judge_samples(dataset, x.cpu(), {"label": labels})


@torch.no_grad()
def evaluate_diffusion(model: Any, dataset: Any, split: str = "test") -> dict[str, float]:
    """The metrics listed in the module docstring."""
    from polymodal.eval.judge import get_judge

    c = model.config
    metrics: dict[str, float] = {"test_loss": test_loss(model, dataset, split)}
    if dataset.name not in JUDGED:
        return metrics
    with torch.enable_grad():
        judge = get_judge(dataset)
    test_x, test_y = _images(dataset, split)
    if c.condition == "label":
        sweep = guidance_sweep(model, dataset, c.eval_scales, c.eval_per_class, c.eval_seed)
        for row in sweep["rows"]:
            w = f"{row['guidance_scale']:g}"
            metrics[f"guidance_w{w}_accuracy"], metrics[f"guidance_w{w}_fd"] = row["sample_accuracy"], row["fd_judge"]
        default = next((r for r in sweep["rows"] if r["guidance_scale"] == c.guidance_scale), None)
        if default is not None:
            metrics["sample_accuracy"], metrics["fd_judge"] = default["sample_accuracy"], default["fd_judge"]
        return metrics
    n = c.eval_samples
    g = torch.Generator().manual_seed(c.eval_seed)
    ddpm = model.generate(n, sampler="ddpm", steps=model.schedule.T, generator=g).cpu()  # (n, C, H, W)
    metrics["fd_judge"] = _fd(judge, ddpm, test_x)
    metrics["fd_judge_100"] = _fd(judge, ddpm[:100], test_x)
    train_x, _ = _images(dataset, "train", n)
    metrics["fd_train_test"] = _fd(judge, train_x, test_x)
    g = torch.Generator().manual_seed(c.eval_seed)
    ddim = model.generate(n, sampler="ddim", steps=c.eval_ddim_steps, generator=g).cpu()
    metrics["fd_judge_ddim"] = _fd(judge, ddim, test_x)
    metrics["fd_ddim_ratio"] = metrics["fd_judge_ddim"] / max(metrics["fd_judge"], 1e-12)
    metrics["samples"] = n
    if c.eval_inversion:
        from polymodal.diffusion.loop import invert, reconstruct

        x0 = test_x[: c.eval_inversion] * 2 - 1  # (k, C, H, W)
        from polymodal.diffusion.samplers import make_sampler

        # no clipping: a clipped x0 makes the DDIM step non-invertible (MSE 8e-3 with it, 3e-4 without)
        sampler = make_sampler(
            model.schedule, name="ddim", steps=c.eval_ddim_steps, spacing=c.spacing, clip_sample=False
        )
        fn = model.denoise_fn()
        back = reconstruct(fn, sampler, invert(fn, sampler, x0))  # (k, C, H, W)
        metrics["inversion_mse"] = (((back + 1) / 2).clamp(0, 1) - (x0 + 1) / 2).pow(2).mean().item()
    if c.eval_inpaint:
        images, labels = test_x[: c.eval_inpaint], test_y[: c.eval_inpaint]
        filled = inpaint_bottom(model, images, c.eval_seed)
        metrics["inpaint_accuracy"] = (judge.predict(filled)["label"].cpu() == labels).float().mean().item()
        blank = images.clone()
        blank[..., images.shape[-2] // 2 :, :] = 0
        metrics["inpaint_baseline_accuracy"] = (judge.predict(blank)["label"].cpu() == labels).float().mean().item()
    return metrics


# -- sample folders --------------------------------------------------------------------------------------


def label_from_prompt(model: Any, prompt: str) -> int:
    """The class a prompt names: a class name (``"seven"``) or index (``"7"``) appearing as a word, exactly one."""
    words = {w.strip(".,;:!?\"'").lower() for w in prompt.split()}
    names = model.config.class_names or tuple(str(i) for i in range(model.config.labels))
    found = {i for i, name in enumerate(names) if name.lower() in words or str(i) in words}
    if len(found) != 1:
        raise ValueError(
            f"the prompt must name exactly one class ({', '.join(names)}, or its index); got {prompt!r} "
            f"({'none' if not found else 'several: ' + ', '.join(names[i] for i in sorted(found))})"
        )
    return found.pop()


def _canvas(model: Any, inpaint: Any, mask: Any, outpaint: Any) -> tuple[Tensor | None, Tensor | None]:
    """(known (1, C, S, S) in [0, 1], mask (1, 1, S, S) bool) for --inpaint/--mask/--outpaint, or (None, None)."""
    from polymodal.diffusion.loop import outpaint_canvas

    if inpaint is None:
        if mask is not None or outpaint is not None:
            raise ValueError(f"{'--mask' if mask is not None else '--outpaint'} needs --inpaint IMAGE; got none")
        return None, None
    channels, size, _ = model.image_shape
    image = read_image(inpaint, channels)  # (C, H, W)
    if tuple(image.shape[-2:]) != (size, size):
        raise ValueError(
            f"--inpaint expects a {size}×{size} image (the model's size); got "
            f"{image.shape[-1]}×{image.shape[-2]} from {inpaint}"
        )
    if outpaint is not None:
        if mask is not None:
            raise ValueError("--outpaint makes its own mask (the border); got --mask too")
        known, keep = outpaint_canvas(image[None], int(outpaint), keep_size=True)  # (1, C, S, S), (1, 1, S, S)
        return known, keep
    if mask is None:
        raise ValueError("--inpaint needs --mask MASK (white = keep, black = generate) or --outpaint PIXELS")
    m = read_image(mask, 1)  # (1, h, w)
    if tuple(m.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(
            f"the mask's size differs from the image's: expected {image.shape[-1]}×{image.shape[-2]}, "
            f"got {m.shape[-1]}×{m.shape[-2]} from {mask}"
        )
    return image[None], (m > 0.5)[None]


def write_trajectory(frames: Tensor, out: Path) -> Path:
    """One sample's captured x_t (K, C, H, W) in [-1, 1] as one row, ``trajectory.png``."""
    row = make_grid(((frames + 1) / 2).clamp(0, 1).cpu(), nrow=len(frames))
    return save_png(row, out / "trajectory.png", scale=4)


def write_tradeoff(model: Any, dataset: Any, out: Path, seed: int) -> list[Path]:
    """``guidance_tradeoff.json`` (accuracy and FD per w) and ``.png`` (a row of samples per w)."""
    sweep = guidance_sweep(model, dataset, model.config.eval_scales, model.config.eval_per_class, seed)
    k = model.config.labels
    pick = torch.cat([x.reshape(k, -1, *x.shape[1:])[:, 0] for x in sweep["images"]])  # (W·K, C, H, W)
    text = json.dumps({"sampler": f"ddim-{model.config.eval_ddim_steps}", "rows": sweep["rows"]}, indent=2)
    json_path = atomic_write(out / "guidance_tradeoff.json", text)
    return [json_path, save_png(make_grid(pick, nrow=k), out / "guidance_tradeoff.png", scale=4)]


def sample_to_folder(
    model: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """``n`` samples as ``sample_000.png`` …, ``grid.png`` and ``trajectory.png`` (sample 0's x_t at ~10
    evenly spaced steps); ``options`` as :data:`.model.SAMPLE_OPTIONS`."""
    from polymodal.api import load
    from polymodal.data import load_dataset

    from .model import SAMPLE_OPTIONS

    known_opts = {o.keyword for o in SAMPLE_OPTIONS}
    unknown = sorted(set(options) - known_opts)
    if unknown:
        raise ValueError(
            f"diffusion sampling does not support {', '.join(unknown)}; supported: {', '.join(sorted(known_opts))}"
        )
    out = Path(out)
    label, classifier = options.pop("label", None), options.pop("classifier", None)
    if classifier is not None:
        classifier = load(classifier, device=str(model.unet.conv_in.weight.device))
    conditional = model.config.condition == "label" or classifier is not None
    if prompt is not None:
        if not conditional:
            raise ValueError(
                f"this diffusion model is unconditional: expected no prompt, got {prompt!r} "
                "(give --classifier DIR to steer it towards a label)"
            )
        if label is not None:
            raise ValueError(f"give --prompt or --label, not both; got {prompt!r} and {label}")
        label = label_from_prompt(model if model.config.labels else classifier_names(model, classifier), prompt)
    if label is not None and not conditional:
        raise ValueError(
            f"this diffusion model is unconditional: expected no --label, got {label} "
            "(give --classifier DIR for classifier guidance)"
        )
    tradeoff = options.pop("guidance_tradeoff", False)
    known, mask = _canvas(model, options.pop("inpaint", None), options.pop("mask", None), options.pop("outpaint", None))
    loop: dict[str, Any] = {}
    if known is not None:
        loop = {"known": known.expand(n, -1, -1, -1) * 2 - 1, "mask": mask}
    total = len(model.make_sampler(options.get("sampler"), options.get("steps"), options.get("eta")).timesteps)
    g = torch.Generator().manual_seed(int(seed))
    result = model.sample(
        n, labels=label, classifier=classifier, generator=g, trajectory_every=max(1, total // 10), **options, **loop
    )
    paths = write_samples(((result.images + 1) / 2).clamp(0, 1).cpu(), out)
    paths.append(write_trajectory(result.trajectory[:, 0], out))
    if tradeoff:
        if model.config.condition != "label" or not model.config.data:
            raise ValueError("--guidance-tradeoff needs a label model trained on a judged dataset (digits, shapes)")
        paths += write_tradeoff(model, load_dataset(model.config.data), out, int(seed))
    return paths


def classifier_names(model: Any, classifier: Any) -> Any:
    """A stand-in with the classifier's class names, so a prompt can name the class to guide towards."""
    from types import SimpleNamespace

    names = model.config.class_names[: classifier.config.num_classes]
    config = SimpleNamespace(class_names=names, labels=classifier.config.num_classes)
    return SimpleNamespace(config=config)
