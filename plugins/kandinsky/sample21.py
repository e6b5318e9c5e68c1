"""Kandinsky 2.1 sampling: text → prior → CLIP image embedding → UNet → MoVQ; variations of an image; mixing images
and texts in CLIP space (diffusers' ``KandinskyPriorPipeline.interpolate``: a weighted sum of embeddings).

    model = polymodal.load("runs/k21")
    images = generate(model, ["красный круг"] * 8, generator=torch.Generator().manual_seed(0))   # (8, 3, 32, 32)
    more = variations(model, "a.png", 8, seed=0)        # the image's CLIP embedding, text dropped, fresh noise
    mixed = mix(model, ["a.png", "a blue square"], [0.5, 0.5], 8, seed=0)

    polymodal sample runs/k21 --prompt "красный круг" -n 16 --cfg 4 --prior-cfg 2 --steps 50 [--no-threshold]
    polymodal sample runs/k21 --variations a.png -n 8
    polymodal sample runs/k21 --mix "a.png|a blue square" --weights 0.5,0.5 -n 8

Mixing: each item is an image (a tensor, a Path, or a string naming an image file) embedded by the teacher CLIP's
image tower, or a text embedded through the prior (one draw per sample); the embeddings are summed with the
weights (default: equal) and decoded with the text dropped (or ``--prompt``'s text), as variations are. On the
command line the items are one ``--mix`` value split at ``|``. The UNet's guidance contrasts the condition with
the null one training drops to (zero image embedding, dropped text); thresholding is Kandinsky 2.0's
(:func:`.sample.thresholded`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.diffusion import cfg_model, sample
from polymodal.eval.images import write_samples
from polymodal.generation.options import SampleOption, keywords
from polymodal.nn import eval_mode

from . import condition21 as c21
from .sample import make_latent_sampler, thresholded

SAMPLE_OPTIONS = (
    SampleOption("cfg_scale", "--cfg", "UNet classifier-free guidance scale (1 = none; default: the model's)."),
    SampleOption("prior_cfg_scale", "--prior-cfg", "Prior classifier-free guidance scale (default: the model's)."),
    SampleOption("steps", "--steps", "UNet sampling steps (default: the model's, 50).", type="int"),
    SampleOption("sampler", "--sampler", "UNet sampler: ddim or ddpm (default: the model's).", type="text"),
    SampleOption(
        "threshold", "--no-threshold", "Turn dynamic thresholding of the predicted x0 off.", type="switch", value=False
    ),
    SampleOption("truncate", "--truncate", "Cut prompts longer than M-CLIP's context (with a warning).", "switch"),
    SampleOption("variations", "--variations", "Variations of this image (its CLIP image embedding).", type="file"),
    SampleOption("mix", "--mix", "Mix images and texts in CLIP space: 'A.png|a blue square'.", type="text"),
    SampleOption("weights", "--weights", "Weights of the --mix items, comma-separated (default equal).", "text"),
)
"""What ``polymodal sample`` offers for a Kandinsky 2.1 folder (``Kandinsky21.sample_options``)."""

OPTIONS = keywords(SAMPLE_OPTIONS)
"""The ``sample_to_folder`` options Kandinsky 2.1 understands."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
"""A ``--mix`` string item ending so (or naming an existing file) is an image; any other is a text."""

DECODE = ("cfg_scale", "steps", "sampler", "threshold")
"""The options of :func:`decode_latents`."""


@torch.no_grad()
def decode_latents(
    model: Any, text: c21.Text, image_embed: Tensor, *, cfg_scale: float | None = None, steps: int | None = None,
    sampler: str | None = None, threshold: bool | None = None, generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Latents (B, 4, h, w) for M-CLIP ``text`` and CLIP ``image_embed`` (B, E), guided against the null
    condition (zero image embedding, dropped text)."""
    keys = ("p", "t", "m", "e")
    null = (*c21.null_text(text), torch.zeros_like(image_embed[:1]))  # (1, …) each
    scale = model.config.guidance_scale if cfg_scale is None else float(cfg_scale)

    def fn(x: Tensor, t: Tensor, k: dict) -> Tensor:
        return model.denoise(x, t, (k["p"], k["t"], k["m"]), k["e"])  # (B, 4, h, w)

    guided = cfg_model(
        fn, dict(zip(keys, (*text, image_embed), strict=True)), dict(zip(keys, null, strict=True)), scale
    )
    if model.config.thresholding if threshold is None else threshold:
        guided = thresholded(model, guided)
    u = model.config.unet
    shape = (image_embed.shape[0], u.in_channels, u.sample_size, u.sample_size)
    with eval_mode(model):
        out = sample(guided, make_latent_sampler(model, sampler, steps), shape, generator=generator,
                     device=model.device)  # fmt: skip
    return out.images  # (B, 4, h, w)


@torch.no_grad()
def prior_embeddings(
    model: Any, text: c21.Text, *, prior_cfg_scale: float | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """The prior's CLIP image embeddings (B, E) for M-CLIP ``text`` (its candidates, guidance and sampler)."""
    return model.prior.sample(*text, guidance_scale=prior_cfg_scale, generator=generator)


@torch.no_grad()
def generate(
    model: Any, prompts: Any, *, prior_cfg_scale: float | None = None, truncate: bool = False,
    generator: torch.Generator | None = None, image_embeds: Tensor | None = None, **options: Any,
) -> Tensor:  # fmt: skip
    """Images (B, 3, S, S) in [0, 1] for ``prompts``: prior → UNet (``options``: :data:`DECODE`) → MoVQ.
    ``image_embeds`` (B, E), CLIP image embeddings drawn before (diffusers' ``KandinskyPipeline`` takes the prior
    pipeline's), replaces the prior's draw: the UNet decodes them under the prompts' text."""
    text = model.encode_text(prompts, truncate=truncate)  # (B, E), (B, L, Dm), (B, L)
    if image_embeds is None:
        embeds = prior_embeddings(model, text, prior_cfg_scale=prior_cfg_scale, generator=generator)  # (B, E)
    else:
        embeds = check_embeds(model, image_embeds, len(text[0]))  # (B, E)
    return model.from_latents(decode_latents(model, text, embeds, generator=generator, **options))


def check_embeds(model: Any, embeds: Any, count: int) -> Tensor:
    """``embeds`` as a float (count, E) tensor on the model's device, else a ValueError naming expected vs given."""
    e = int(model.prior.config.embed_dim)
    if not isinstance(embeds, Tensor) or tuple(embeds.shape) != (count, e):
        got = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise ValueError(f"image_embeds must be ({count}, {e}): one CLIP image embedding per prompt; got {got}")
    return embeds.to(model.device).float()


def empty_text(model: Any, b: int) -> c21.Text:
    """The dropped text for ``b`` rows: zero pooled (b, E), one masked zero token (b, 1, Dm), mask (b, 1) False."""
    e, dm, dev = int(model.text.embed_dim), int(model.text.config.text.dim), model.device
    return (
        torch.zeros(b, e, device=dev),
        torch.zeros(b, 1, dm, device=dev),
        torch.zeros(b, 1, dtype=torch.bool, device=dev),
    )


def read_source(model: Any, image: Any, what: str = "--variations") -> Tensor:
    """A source image (a path, or a (3, S, S) / (1, 3, S, S) tensor in [0, 1]) as (1, 3, S, S) at the MoVQ's
    size; another size or channel count, or an unreadable file, is a ValueError naming expected vs given."""
    c, s = int(model.vae.config.channels), int(model.vae.config.image_size)
    if isinstance(image, (str, Path)):
        from polymodal.data.images import open_image
        from polymodal.eval.images import read_image

        pil = open_image(image, where=what)  # unreadable or missing: a ValueError naming the file
        bands = [b for b in pil.convert("RGBA" if pil.mode == "P" else pil.mode).getbands() if b != "A"]
        if (pil.width, pil.height) != (s, s) or len(bands) != c:
            raise ValueError(
                f"{what} expects a {s}×{s} image with {c} channels (the model's data); got {pil.width}×{pil.height} "
                f"with {len(bands)} channel(s) from {image}"
            )
        return read_image(image, c)[None]  # (1, C, S, S)
    got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
    if isinstance(image, Tensor) and image.dim() == 3:
        image = image[None]
    if not isinstance(image, Tensor) or image.dim() != 4 or tuple(image.shape) != (1, c, s, s):
        raise ValueError(f"{what} expects one image ({c}, {s}, {s}) (the model's data); got {got}")
    return image.float()


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return value


@torch.no_grad()
def variations(model: Any, image: Any, n: int, *, seed: int = 0, prompt: str | None = None, **options: Any) -> Tensor:
    """``n`` variations (n, 3, S, S) of ``image``: its CLIP image embedding decoded with the text dropped (or
    ``prompt``'s) and fresh noise; ``options``: :data:`DECODE`, ``truncate``."""
    n = _count(n, "n")
    embed = model.image_embeddings(read_source(model, image)).expand(n, -1)  # (n, E)
    return _decode(model, embed, seed, prompt, **options)


def _decode(model: Any, embeds: Tensor, seed: int, prompt: str | None, truncate: bool = False, **options) -> Tensor:
    """Images (B, 3, S, S) decoded from ``embeds`` (B, E) with ``prompt``'s text, or the text dropped."""
    b = embeds.shape[0]
    text = empty_text(model, b) if prompt is None else model.encode_text([prompt] * b, truncate=truncate)
    g = torch.Generator(device=model.device).manual_seed(int(seed))
    return model.from_latents(decode_latents(model, text, embeds, generator=g, **options))


def mix_items(items: Any) -> list[Any]:
    """``--mix`` as a list: a string is split at ``|``; each item a non-empty string, a Path or an image tensor."""
    items = [p.strip() for p in items.split("|")] if isinstance(items, str) else items
    if not isinstance(items, (list, tuple)) or len(items) < 1:
        raise ValueError(f"--mix expects one or more images or texts ('A.png|a blue square'); got {items!r:.80}")
    for i, item in enumerate(items):
        if not isinstance(item, (str, Path, Tensor)) or (isinstance(item, str) and not item.strip()):
            raise ValueError(f"--mix item {i + 1}: expected an image (path or tensor) or a text; got {item!r:.80}")
    return list(items)


def mix_weights(weights: Any, count: int) -> list[float]:
    """The ``--weights`` of ``count`` items as floats (default: equal); a wrong count or a value that is not a
    finite number is a ValueError naming expected vs given."""
    if weights is None:
        return [1.0 / count] * count
    values = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else weights
    if not isinstance(values, (list, tuple)) or len(values) != count:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"--weights: expected {count} numbers (one per --mix item); got {got} ({weights!r:.80})")
    out = []
    for i, v in enumerate(values):
        try:
            number = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"--weights: expected finite numbers; got {v!r:.40} at position {i + 1} ({weights!r:.80})")
        out.append(number)
    return out


def _is_image(item: Any) -> bool:
    if isinstance(item, (Tensor, Path)):
        return True
    return Path(item).suffix.lower() in IMAGE_SUFFIXES or Path(item).is_file()


@torch.no_grad()
def mix(
    model: Any, items: Any, weights: Any, n: int, *, seed: int = 0, prompt: str | None = None,
    prior_cfg_scale: float | None = None, truncate: bool = False, **options: Any,
) -> Tensor:  # fmt: skip
    """``n`` images (n, 3, S, S) from Σ w_i · z_i: z_i the CLIP image embedding of an image item, or a prior draw
    (one per sample) for a text item; decoded as :func:`variations` are."""
    n, items = _count(n, "n"), mix_items(items)
    weights = mix_weights(weights, len(items))
    g = torch.Generator(device=model.device).manual_seed(int(seed))
    total = 0
    for item, w in zip(items, weights, strict=True):
        if _is_image(item):
            z = model.image_embeddings(read_source(model, item, "--mix")).expand(n, -1)  # (n, E)
        else:
            text = model.encode_text([item] * n, truncate=truncate)
            z = prior_embeddings(model, text, prior_cfg_scale=prior_cfg_scale, generator=g)  # (n, E)
        total = total + w * z
    return _decode(model, total, seed, prompt, truncate=truncate, **options)  # type: ignore[arg-type]


def sample_to_folder(
    model: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """Write ``n`` samples (text → image, ``variations`` or ``mix``) as PNGs plus a grid; returns the paths."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"kandinsky21 sampling does not support {', '.join(unknown)}; supported: {', '.join(OPTIONS)}")
    n = _count(n, "n")
    options = {k: v for k, v in options.items() if v is not None}
    source, items, weights = options.pop("variations", None), options.pop("mix", None), options.pop("weights", None)
    if weights is not None and items is None:
        raise ValueError("--weights weighs the --mix items; got --weights without --mix")
    if items is not None:
        if source is not None:
            raise ValueError("give --mix or --variations, not both (an image can be a --mix item)")
        images = mix(model, items, weights, n, seed=seed, prompt=prompt, **options)
    elif source is not None:
        if prompt is not None:
            raise ValueError("--variations takes no --prompt (mix an image and a text: --mix 'A.png|TEXT')")
        options.pop("prior_cfg_scale", None)
        images = variations(model, source, n, seed=seed, **options)
    else:
        if prompt is None:
            raise ValueError("kandinsky21 sampling needs --prompt TEXT, --variations IMAGE or --mix 'A.png|TEXT'")
        g = torch.Generator(device=model.device).manual_seed(int(seed))
        images = generate(model, [prompt] * n, generator=g, **options)
    return write_samples(images.cpu(), out)
