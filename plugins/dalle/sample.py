"""DALL·E sampling through the core decoder (:attr:`DALLE.decoder`): preallocated KV cache, compiled steps
(``compile_inference``), temperature, top-k/top-p, guidance, CLIP reranking.

    model = polymodal.load("runs/dalle")
    codes = generate_codes(model, ["the digit 3"] * 8, generator=torch.Generator().manual_seed(0), cfg_scale=3.0)
    images = model.decode_codes(codes)                                    # (8, 1, 8, 8)
    images = sample_images(model, "the digit 3", 4, seed=0, rerank="runs/clip", candidates=8)

Only image codes can be drawn (``allowed=``); a non-finite logit raises a ValueError
(from :func:`polymodal.generation.sampling.sample_next`) instead of decoding garbage. Classifier-free
guidance runs the unconditional stream (``bos`` + pads: the dropped caption of training)
beside the prompt. Reranking draws ``candidates`` images per kept sample and keeps the
one whose CLIP image embedding has the highest cosine with the prompt's text embedding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.eval.images import read_image, write_samples
from polymodal.generation.options import COMPLETE, NO_CACHE, TEMPERATURE, TOP_K, TOP_P, SampleOption, keywords
from polymodal.models.interfaces import ImageEncoder, TextEncoder, require
from polymodal.nn import eval_mode

SAMPLE_OPTIONS = (
    TEMPERATURE,
    TOP_K,
    TOP_P,
    SampleOption("cfg_scale", "--cfg", "Classifier-free guidance scale (1 = none)."),
    SampleOption("rerank", "--rerank", "CLIP model folder that reranks candidates.", type="folder"),
    SampleOption("candidates", "--candidates", "Candidates drawn per kept sample when reranking.", type="int"),
    NO_CACHE,
    COMPLETE,
)
"""What ``polymodal sample`` offers for a DALL·E folder (``DALLE.sample_options``)."""

OPTIONS = keywords(SAMPLE_OPTIONS)
"""The ``sample_to_folder`` options DALL·E understands."""

MAX_CANDIDATES = 512
"""The most candidates drawn per kept sample when reranking (the DALL·E paper reranks 512): every
candidate is a full image stream drawn in one batch, so a larger number only allocates."""


def check_prefix(model: Any, prefix: Any, prompts: int) -> None:
    """ValueError naming expected vs given unless ``prefix`` is (prompts, k) integer codes with k <= h·w."""
    if not isinstance(prefix, Tensor) or prefix.dim() != 2 or prefix.is_floating_point():
        got = tuple(prefix.shape) if isinstance(prefix, Tensor) else type(prefix).__name__
        raise ValueError(f"expected an integer prefix of image codes (B, k); got {got}")
    if prefix.shape[0] != prompts:
        raise ValueError(
            f"the prefix must hold one row of codes per prompt; got {prefix.shape[0]} prefix row(s) "
            f"for {prompts} prompt(s)"
        )
    if prefix.shape[1] > model.num_image:
        raise ValueError(f"a prefix holds at most the {model.num_image} image codes; got {prefix.shape[1]}")
    if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= model.codebook_size):
        raise ValueError(
            f"prefix codes must lie in [0, {model.codebook_size}); got values in "
            f"[{int(prefix.min())}, {int(prefix.max())}]"
        )


@torch.no_grad()
def generate_codes(
    model: Any,
    prompts: list[str | None],
    *,
    generator: torch.Generator | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    use_cache: bool = True,
    prefix: Tensor | None = None,
) -> Tensor:
    """(B, h, w) image codes for ``prompts`` (None: unconditional), one row each.

    ``prefix`` (B, k) holds the first ``k`` codes of each image (completion), one row per prompt
    (a ValueError names both sizes otherwise). Unset options take the model config's defaults.
    """
    if prefix is not None:
        check_prefix(model, prefix, len(prompts))
    c = model.config
    temperature = c.temperature if temperature is None else temperature
    top_k = c.top_k if top_k is None else top_k
    top_p = c.top_p if top_p is None else top_p
    cfg_scale = c.cfg_scale if cfg_scale is None else cfg_scale
    b = len(prompts)
    text = model.empty_text(b)  # (B, L)
    given = [i for i, p in enumerate(prompts) if p is not None]
    if given:
        text[given] = model.encode_text([prompts[i] for i in given])
    ids = text
    if prefix is not None:
        ids = torch.cat([text, prefix.to(text.device) + model.image_offset], dim=1)  # (B, L + k)
    uncond = None
    if cfg_scale is not None:
        uncond = model.empty_text(b)
        if prefix is not None:
            uncond = torch.cat([uncond, ids[:, model.config.text_length :]], dim=1)
    allowed = torch.arange(model.vocab_size, device=text.device) >= model.image_offset  # (V,) image codes only
    with eval_mode(model):
        out = model.decoder.generate(
            ids,
            model.seq_len - ids.shape[1],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            allowed=allowed,
            cfg_scale=cfg_scale,
            uncond_ids=uncond,
            use_cache=use_cache,
        )  # (B, T)
    return (out[:, model.config.text_length :] - model.image_offset).reshape(b, *model.grid)  # (B, h, w)


def load_clip(rerank: Any) -> Any:
    """The reranking CLIP (an :class:`~polymodal.models.interfaces.ImageEncoder` and
    :class:`~polymodal.models.interfaces.TextEncoder`): a model or its folder."""
    if isinstance(rerank, (str, Path)):
        from polymodal.api import load

        rerank = load(rerank)
    return require(rerank, (ImageEncoder, TextEncoder), what="rerank")


@torch.no_grad()
def clip_scores(clip: Any, images: Tensor, prompt: str) -> Tensor:
    """(N,) cosine of each image's CLIP embedding with ``prompt``'s; images resized to CLIP's input."""
    pixels = clip.prepare(images)  # (N, C, S, S)
    img = F.normalize(clip.encode_image(pixels).float(), dim=-1)  # (N, E)
    txt = F.normalize(clip.encode_text(clip.tokenize([prompt])).float(), dim=-1)  # (1, E)
    return (img @ txt.t()).squeeze(1)  # (N,)


def _completion_prefix(model: Any, path: Any, n: int) -> Tensor:
    """(n, k) the top half's codes of the image at ``path`` (rows ``h // 2`` of the code grid)."""
    size = model.config.image_size or model.vq.config.image_size
    channels = model.vq.config.channels
    image = read_image(path, channels)  # (C, H, W)
    if tuple(image.shape[-2:]) != (size, size):
        raise ValueError(
            f"--complete expects a {size}×{size} image (the model's data size); got "
            f"{image.shape[-1]}×{image.shape[-2]} from {path}"
        )
    codes = model.image_codes(image[None])  # (1, h, w)
    rows = model.grid[0] // 2
    return codes[:, :rows].reshape(1, -1).expand(n, -1)  # (n, rows·w)


@torch.no_grad()
def sample_images(model: Any, prompt: str | None, n: int, seed: int = 0, **options: Any) -> Tensor:
    """(n, C, S, S) images at the data's native size; ``options`` as :data:`OPTIONS`.

    With ``rerank`` (a CLIP folder or model), ``candidates`` (default 8) images are drawn per
    kept sample — the same draws as ``n · candidates`` plain samples with this seed — and the
    best-scoring one of each consecutive group is kept.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"dalle sampling does not support {', '.join(unknown)}; supported: {', '.join(OPTIONS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    rerank, candidates = options.pop("rerank", None), options.pop("candidates", None)
    if candidates is not None and rerank is None:
        raise ValueError("candidates needs rerank=CLIP_DIR (the model that picks among them)")
    if candidates is not None and (
        isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES
    ):
        raise ValueError(f"--candidates must be an integer in [1, {MAX_CANDIDATES}]; got {candidates!r}")
    cfg = options.get("cfg_scale")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg)):
        raise ValueError(f"--cfg (cfg_scale) must be a finite number; got {cfg!r}")
    if rerank is not None and prompt is None:
        raise ValueError("rerank scores samples against the prompt; give --prompt")
    clip = load_clip(rerank) if rerank is not None else None
    per = (candidates or 8) if clip is not None else 1
    complete = options.pop("complete", None)
    prefix = _completion_prefix(model, complete, n * per) if complete is not None else None
    g = torch.Generator(device=model.head.weight.device).manual_seed(int(seed))
    codes = generate_codes(model, [prompt] * (n * per), generator=g, prefix=prefix, **options)  # (n·per, h, w)
    images = model.decode_codes(codes)  # (n·per, C, S, S)
    if clip is None:
        return images
    scores = clip_scores(clip, images, prompt).reshape(n, per)  # (n, per)
    best = scores.argmax(1) + torch.arange(n) * per  # (n,)
    return images[best.to(images.device)]


def sample_to_folder(
    model: Any, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
) -> list[Path]:
    """Write ``n`` samples as ``sample_000.png`` … at the data's native size and a ``grid.png``; returns the paths."""
    return write_samples(sample_images(model, prompt, n, seed, **options).cpu(), out)
