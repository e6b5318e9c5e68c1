"""unCLIP sampling: text → image, image variations, interpolations and text diffs (DALL·E 2 §3).

    model = polymodal.load("runs/unclip")
    images = generate(model, ["the digit 3"] * 8, generator=torch.Generator().manual_seed(0))   # (8, 1, 8, 8)
    more = variations(model, image, 8, seed=0)              # the CLIP image embedding of `image`, fresh noise
    strip = interpolate(model, a, b, 8, seed=0)             # slerp between two images' embeddings, fixed noise
    strip = text_diff(model, image, "the digit 1", "the digit 7", 8)   # toward normalised(text_b − text_a)

    polymodal sample runs/unclip --prompt "the digit 3" -n 16 --out s
    polymodal sample runs/unclip --variations digit.png -n 8
    polymodal sample runs/unclip --interpolate a.png b.png --steps 8
    polymodal sample runs/unclip --variations digit.png --prompt "the digit 1" --diff-to "the digit 7" -n 8

Text → image: the prompt's CLIP text embedding and token features → the prior (``candidates`` draws, the
one with the highest cosine to the text kept; guidance ``--prior-cfg``) → the decoder (guidance ``--cfg``,
``--steps``, ``--sampler``) → the upsampler of a cascade. Variations, interpolations and text diffs condition
the decoder on an image embedding alone (the text dropped, as in training and in diffusers' variation and
interpolation pipelines). With ``--interpolate`` (as diffusers' ``UnCLIPImageInterpolationPipeline``'s
``steps``) ``--steps`` is the number of frames of the strip (default ``-n``), and every frame uses the same
decoder noise, so the strip changes only with the embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.eval.images import make_grid, save_png, write_samples
from polymodal.generation.options import SampleOption, keywords

from . import condition as cond

SAMPLE_OPTIONS = (
    SampleOption("cfg_scale", "--cfg", "Decoder classifier-free guidance scale (1 = none; default: the decoder's)."),
    SampleOption("prior_cfg_scale", "--prior-cfg", "Prior classifier-free guidance scale (default: the prior's)."),
    SampleOption(
        "steps", "--steps", "Decoder sampling steps; with --interpolate, the strip's frames (default -n).", type="int"
    ),
    SampleOption("sampler", "--sampler", "Decoder sampler: ddim or ddpm (default: the decoder's).", type="text"),
    SampleOption("candidates", "--candidates", "Prior samples per image; the closest to the text is kept.", type="int"),
    SampleOption("variations", "--variations", "Variations of this image (its CLIP image embedding).", type="file"),
    SampleOption(
        "interpolate", "--interpolate", "Interpolate two images: --interpolate A.png B.png (a strip PNG).", type="pair"
    ),
    SampleOption(
        "diff_to", "--diff-to", "Text diff: move --variations IMAGE (described by --prompt) toward this.", type="text"
    ),
    SampleOption("truncate", "--truncate", "Cut prompts longer than CLIP's context (else an error).", type="switch"),
)
"""What ``polymodal sample`` offers for an unCLIP folder (``UnCLIP.sample_options``)."""

OPTIONS = keywords(SAMPLE_OPTIONS)
"""The ``sample_to_folder`` options unCLIP understands."""


def _generator(model: Any, seed: int) -> torch.Generator:
    return torch.Generator(device=model.device).manual_seed(int(seed))


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return value


def text_as_image_embed(model: Any, text_embed: Tensor) -> Tensor:
    """The CLIP text embedding fed to the decoder in place of an image embedding (the paper's ablation): rescaled
    to the training image embeddings' mean norm with ``config.ablation_norm`` (unit vectors on both sides in
    the paper), else as it is (B, E)."""
    if not model.config.ablation_norm:
        return text_embed
    norm = (model.prior.clip_mean.pow(2).sum() + model.prior.clip_std.pow(2).sum()).sqrt()  # E|x|² = |μ|² + Σσ²
    return F.normalize(text_embed, dim=-1) * norm  # (B, E)


@torch.no_grad()
def generate(
    model: Any,
    prompts: Any,
    *,
    generator: torch.Generator | None = None,
    cfg_scale: float | None = None,
    prior_cfg_scale: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    candidates: int | None = None,
    truncate: bool = False,
    embedding: str = "prior",
) -> Tensor:
    """Images (B, C, S, S) in [0, 1] for ``prompts``: prior → decoder → upsampler.

    ``embedding="text"`` skips the prior and feeds the decoder the CLIP text embedding (:func:`text_as_image_embed`),
    the ablation of the paper's §5.1. Unset options take the parts' config defaults.
    """
    if embedding not in ("prior", "text"):
        raise ValueError(f"embedding must be 'prior' or 'text'; got {embedding!r}")
    cfg_scale = model.config.guidance_scale if cfg_scale is None else cfg_scale
    prior_cfg_scale = model.config.prior_guidance_scale if prior_cfg_scale is None else prior_cfg_scale
    text_embed, tokens, mask = model.encode_prompts(prompts, truncate=truncate)  # (B, E), (B, L, Dt), (B, L)
    if embedding == "prior":
        image_embed = model.prior.sample(
            text_embed, tokens, mask, guidance_scale=prior_cfg_scale, candidates=candidates, generator=generator
        )  # (B, E)
    else:
        image_embed = text_as_image_embed(model, text_embed)
    images = model.decoder.sample(
        image_embed, text_embed, tokens, mask, guidance_scale=cfg_scale, steps=steps, sampler=sampler,
        generator=generator,
    )  # fmt: skip
    return model.upscale(images, generator=generator)  # (B, C, S, S)


def read_source(model: Any, image: Any, what: str = "--variations") -> Tensor:
    """A source image (a path or a (C, H, W) / (1, C, H, W) tensor in [0, 1]) as (1, C, S, S); its size and
    channels must be the data's (a ValueError names expected vs given)."""
    c, s = model.config.channels, model.config.image_size
    if isinstance(image, (str, Path)):
        from polymodal.data.images import open_image

        pil = open_image(image)
        bands = [b for b in pil.convert("RGBA" if pil.mode == "P" else pil.mode).getbands() if b != "A"]
        if (pil.width, pil.height) != (s, s) or len(bands) != c:
            raise ValueError(
                f"{what} expects a {s}×{s} image with {c} channel(s) (the model's data); got {pil.width}×{pil.height} "
                f"with {len(bands)} channel(s) from {image}"
            )
        from polymodal.eval.images import read_image

        return read_image(image, c)[None]  # (1, C, S, S)
    got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
    if isinstance(image, Tensor) and image.dim() == 3:
        image = image[None]
    if not isinstance(image, Tensor) or image.dim() != 4 or tuple(image.shape[1:]) != (c, s, s) or len(image) != 1:
        raise ValueError(f"{what} expects one image ({c}, {s}, {s}) (the model's data); got {got}")
    return image.float()


def _decode(model: Any, embeds: Tensor, generator: torch.Generator | None, **options: Any) -> Tensor:
    """Decoder on image embeddings alone (B, E) → upsampler: (B, C, S, S); guidance defaults to the config's."""
    if options.get("guidance_scale") is None:
        options["guidance_scale"] = model.config.guidance_scale
    return model.upscale(model.decoder.sample(embeds, generator=generator, **options), generator=generator)


def _decode_embeddings(model: Any, embeds: Tensor, seed: int, fixed_noise: bool, **options: Any) -> Tensor:
    """Decoder (image embedding only) → upsampler, each row its own fresh noise, or all rows the same noise."""
    if not fixed_noise:
        return _decode(model, embeds, _generator(model, seed), **options)
    frames = []
    for row in embeds:  # one at a time, each with the same generator state: the same x_T and step noise
        frames.append(_decode(model, row[None], _generator(model, seed), **options))
    return torch.cat(frames)  # (K, C, S, S)


@torch.no_grad()
def variations_of(model: Any, images: Tensor, *, generator: torch.Generator | None = None, **options: Any) -> Tensor:
    """One variation (B, C, S, S) of each image of a batch (B, C, S, S) at the data's size; ``options`` go to
    the decoder's ``sample`` (guidance_scale, steps, sampler)."""
    embeds = model.image_embeddings(images)  # (B, E)
    return _decode(model, embeds, generator, **options)


def _decoder_options(cfg_scale: Any, steps: Any, sampler: Any) -> dict[str, Any]:
    return {"guidance_scale": cfg_scale, "steps": steps, "sampler": sampler}


@torch.no_grad()
def variations(
    model: Any, image: Any, n: int, *, seed: int = 0, cfg_scale: Any = None, steps: Any = None, sampler: Any = None
) -> Tensor:
    """``n`` variations (n, C, S, S) of ``image``: its CLIP image embedding decoded with fresh noise."""
    n = _check_count(n, "n")
    embed = model.image_embeddings(read_source(model, image))  # (1, E)
    return _decode_embeddings(model, embed.expand(n, -1), seed, False, **_decoder_options(cfg_scale, steps, sampler))


@torch.no_grad()
def interpolate(
    model: Any, a: Any, b: Any, frames: int, *, seed: int = 0, cfg_scale: Any = None, steps: Any = None,
    sampler: Any = None,
) -> Tensor:  # fmt: skip
    """``frames`` images (K, C, S, S) decoded from slerp(z_a, z_b, θ), θ = 0 … 1, all with the same noise."""
    frames = _check_count(frames, "the number of frames")
    za = model.image_embeddings(read_source(model, a, "--interpolate"))[0]  # (E,)
    zb = model.image_embeddings(read_source(model, b, "--interpolate"))[0]  # (E,)
    embeds = cond.slerp(za, zb, torch.linspace(0, 1, frames, device=za.device))  # (K, E)
    return _decode_embeddings(model, embeds, seed, True, **_decoder_options(cfg_scale, steps, sampler))


@torch.no_grad()
def text_diff(
    model: Any, image: Any, source: str, target: str, frames: int, *, seed: int = 0, max_angle: float = 0.5,
    truncate: bool = False, cfg_scale: Any = None, steps: Any = None, sampler: Any = None,
) -> Tensor:  # fmt: skip
    """DALL·E 2 §3.3: z_d = normalised(z_t(target) − z_t(source)); frames (K, C, S, S) decoded from
    slerp(z_i, z_d, θ), θ = 0 … ``max_angle`` (the paper: 0.5), all with the same noise."""
    frames = _check_count(frames, "the number of frames")
    zi = model.image_embeddings(read_source(model, image))[0]  # (E,)
    text = model.encode_prompts([source, target], truncate=truncate)[0]  # (2, E)
    zd = F.normalize(text[1] - text[0], dim=-1) * zi.norm()  # (E,) the diff direction at the image's norm
    embeds = cond.slerp(zi, zd, torch.linspace(0, max_angle, frames, device=zi.device))  # (K, E)
    return _decode_embeddings(model, embeds, seed, True, **_decoder_options(cfg_scale, steps, sampler))


def _strip(images: Tensor, out: Path, source: list[Tensor]) -> list[Path]:
    """Each frame, and ``strip.png``: the source image(s) at the ends, the frames between."""
    paths = [save_png(img, out / f"frame_{i:03d}.png") for i, img in enumerate(images)]
    row = torch.cat([source[0], images.cpu(), *source[1:]])  # (K + 1 or 2, C, S, S)
    paths.append(save_png(make_grid(row, nrow=len(row)), out / "strip.png", scale=4))
    return paths


def sample_to_folder(
    model: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """Write samples as PNGs plus a grid (text → image, variations) or frames plus ``strip.png`` (interpolation,
    text diff); returns the paths. Options: :data:`OPTIONS`."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unclip sampling does not support {', '.join(unknown)}; supported: {', '.join(OPTIONS)}")
    n = _check_count(n, "n")
    out = Path(out)
    source, pair, diff_to = (
        options.pop("variations", None),
        options.pop("interpolate", None),
        options.pop("diff_to", None),
    )
    dec = {k: options.get(k) for k in ("cfg_scale", "steps", "sampler")}
    if pair is not None:
        pair = [pair] if isinstance(pair, (str, Path)) else list(pair)
        if len(pair) != 2 or source is not None or prompt is not None:
            raise ValueError(
                f"--interpolate takes exactly two images (--interpolate A.png B.png) and no --prompt or "
                f"--variations; got {len(pair)} image(s)" + (", --prompt" if prompt is not None else "")
            )
        frames = dec.pop("steps") or n
        images = interpolate(model, pair[0], pair[1], frames, seed=seed, **dec)
        ends = [read_source(model, p, "--interpolate") for p in pair]
        return _strip(images, out, ends)
    if diff_to is not None:
        if source is None or prompt is None:
            raise ValueError("--diff-to needs --variations IMAGE and --prompt (the text that describes IMAGE)")
        images = text_diff(model, source, prompt, diff_to, n, seed=seed, truncate=bool(options.get("truncate")), **dec)
        return _strip(images, out, [read_source(model, source)])
    if source is not None:
        if prompt is not None:
            raise ValueError("--variations takes no --prompt (add --diff-to TEXT for a text diff)")
        return write_samples(variations(model, source, n, seed=seed, **dec).cpu(), out)
    if prompt is None:
        raise ValueError("unclip sampling needs --prompt TEXT, --variations IMAGE or --interpolate A.png B.png")
    images = generate(model, [prompt] * n, generator=_generator(model, seed), **options)
    return write_samples(images.cpu(), out)
