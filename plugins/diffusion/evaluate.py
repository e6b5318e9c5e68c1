"""Diffusion evaluation (the judge's Fréchet distance, DDIM, inversion, inpainting, guidance); sample folders are
:mod:`.samples`.

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

from typing import Any

import torch
from torch import Tensor

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
