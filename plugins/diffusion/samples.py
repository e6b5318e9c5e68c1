"""Diffusion sample folders (``polymodal sample``): samples by label or prompt, guided, inpainted or outpainted, with
the denoising trajectory and the guidance trade-off beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.eval.images import make_grid, read_image, save_png, write_samples
from polymodal.io import atomic_write

from .config import SAMPLE_OPTIONS
from .evaluate import guidance_sweep


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
    evenly spaced steps); ``options`` as :data:`.config.SAMPLE_OPTIONS`."""
    from polymodal.api import load
    from polymodal.data import load_dataset

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
