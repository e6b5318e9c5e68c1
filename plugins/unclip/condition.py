"""What unCLIP reads from its frozen CLIP, and the captions it trains and evaluates on.

The prior and the decoder are conditioned on CLIP's *unnormalised* embeddings and on the text tower's
per-token features (the final-normed hidden states, as diffusers' unCLIP pipelines pass
``text_encoder(...).last_hidden_state``) with a mask that is True up to and including the end-of-text
token, read with the embedding in one pass (the CLIP's ``encode_text_and_tokens``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.data import shapes as shapes_data
from polymodal.data.digits import DIGIT_WORDS


def fit_length(tokens: Tensor, mask: Tensor, length: int | None, what: str) -> tuple[Tensor, Tensor]:
    """Token features (B, L, Dt) and mask (B, L) padded (masked out) or cut to ``length`` positions.

    Only padding is ever cut: a text whose real tokens do not fit is a ValueError naming both lengths.
    """
    if length is None or tokens.shape[1] == length:
        return tokens, mask
    if tokens.shape[1] > length:
        used = int(mask.sum(1).max()) if mask.numel() else 0
        if used > length:
            raise ValueError(f"the text has {used} tokens; the {what} reads at most {length} (its text_len)")
        return tokens[:, :length], mask[:, :length]
    extra = length - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)  # (B, length, Dt), (B, length)


def check_prompts(prompts: Any) -> list[str]:
    """``prompts`` as a non-empty list of non-empty strings, else a ValueError naming what was given."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"expected a non-empty prompt (a string or a list of them); got {prompts!r}")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"expected a non-empty prompt string; got {p!r}")
    return list(prompts)


def _cell(box: Any, size: int) -> int:
    """The 3 × 3 grid cell of a box's centre."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    col = min(int((x0 + x1) / 2 * 3 // size), 2)
    row = min(int((y0 + y1) / 2 * 3 // size), 2)
    return row * 3 + col


def fill_object(template: str, colour: int, kind: int, cell: int) -> str:
    """A shapes template filled for one object (colour, kind and cell indices)."""
    return template.format(
        colour=tuple(shapes_data.COLOURS)[colour],
        kind=shapes_data.KINDS[kind],
        where=shapes_data.WHERE[shapes_data.POSITIONS[cell]],
    )


def fill_label(template: str, label: int, class_names: tuple[str, ...]) -> str:
    """A label template: ``{numeral}`` is the class index, ``{word}`` / ``{label}`` its name."""
    name = class_names[label] if label < len(class_names) else str(label)
    return template.format_map({"numeral": str(label), "word": name, "label": name})


def resample_captions(config: Any, batch: Any) -> list[str]:
    """A fresh caption per image from a random training template (torch's RNG); the batch's own without templates.

    Shapes (``boxes``): every object fills the template, joined with " and "; labelled data (``label`` and
    class names): the label fills it.
    """
    templates, n = config.templates, len(batch["image"])
    if not templates or not config.resample_captions:
        return list(batch["caption"])
    choice = torch.randint(len(templates), (n,)).tolist()
    fields = batch.fields if hasattr(batch, "fields") else tuple(batch)
    if "boxes" in fields and config.data == "shapes":
        size = batch["image"].shape[-1]
        return [
            " and ".join(fill_object(templates[j], int(b[4]), int(b[5]), _cell(b, size)) for b in batch["boxes"][i])
            for i, j in enumerate(choice)
        ]
    if "label" in fields and config.class_names:
        labels = batch["label"].tolist()
        return [fill_label(templates[j], labels[i], config.class_names) for i, j in enumerate(choice)]
    return list(batch["caption"])


def eval_prompts(data: str, per_class: int) -> tuple[list[str], dict[str, Tensor]]:
    """Prompts and the attributes the judge should read from their samples (grouped by class, ``per_class`` each).

    Digits: ``"the digit 0"`` … ``"the digit 9"`` (DALL·E's evaluation prompts), target ``label``. Shapes:
    one object, ``"a {colour} {kind} {where}"`` for every colour × kind with the cell cycling, targets
    ``colour`` and ``kind``.
    """
    if data == "shapes":
        prompts, colours, kinds = [], [], []
        nc, nk, ncell = len(shapes_data.COLOURS), len(shapes_data.KINDS), len(shapes_data.POSITIONS)
        template = shapes_data.TRAIN_TEMPLATES[0]
        for c in range(nc):
            for k in range(nk):
                for r in range(per_class):
                    prompts.append(fill_object(template, c, k, (c * nk + k + 3 * r) % ncell))
                    colours.append(c)
                    kinds.append(k)
        return prompts, {"colour": torch.tensor(colours), "kind": torch.tensor(kinds)}
    if data != "digits":
        raise ValueError(f"unCLIP's evaluation prompts are for digits and shapes; got {data!r}")
    labels = [d for d in range(len(DIGIT_WORDS)) for _ in range(per_class)]
    return [f"the digit {d}" for d in labels], {"label": torch.tensor(labels)}


def to_channels(images: Tensor, channels: int) -> Tensor:
    """(B, C, H, W) as (B, channels, H, W): grey repeated to RGB, RGB to grey by Pillow's luma weights."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1)  # (B, channels, H, W)
    if channels == 1:
        w = torch.tensor((0.299, 0.587, 0.114), device=images.device, dtype=images.dtype)[:c]
        return (images[:, :3] * w.view(1, -1, 1, 1)).sum(1, keepdim=True)  # (B, 1, H, W)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def resize_to(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) at (B, C, size, size): area average when shrinking by a whole factor, else bilinear."""
    h = images.shape[-1]
    if h == size:
        return images
    if h > size and h % size == 0:
        return F.interpolate(images, size=size, mode="area")  # what SR3 degrades its inputs with
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of directions, linear of norms: (E,), (E,), (K,) → (K, E).

    The unit vectors of ``a`` and ``b`` are slerped (DALL·E 2 §3.2: z_θ = slerp(z_a, z_b, θ)); the result is
    rescaled by the linearly interpolated norms, so the decoder sees embeddings of the size it was trained on.
    """
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    t = t.to(a.dtype)[:, None]  # (K, 1)
    if float(omega) < 1e-4:  # (nearly) parallel: linear interpolation is exact enough
        unit = F.normalize((1 - t) * ua + t * ub, dim=-1)
    else:
        unit = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)  # (K, E)
    return unit * ((1 - t) * na + t * nb)  # (K, E)
