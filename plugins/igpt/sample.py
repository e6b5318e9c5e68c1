"""iGPT sampling through the core sampler: unconditional images and completions of a top half.

Every token is drawn by :func:`polymodal.generation.sampling.generate` (temperature, top-k, top-p) through the
core :class:`~polymodal.generation.decoder.CausalDecoder`, by default over a preallocated KV cache
(``use_cache=False`` recomputes the whole stream each step).
A non-finite logit raises in the core sampler (``sample_next``), so a diverged model
gives an error, never a garbage image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.eval.images import read_image, write_samples
from polymodal.generation.options import COMPLETE, TOKEN_SAMPLING
from polymodal.nn import eval_mode

UNSUPPORTED = ("cfg_scale", "rerank", "candidates")
"""``polymodal sample`` options that an unconditional pixel model has no use for."""


class SamplingMixin:
    """Sampling methods of :class:`~polymodal.plugins.igpt.model.IGPT` (kept apart to keep files small)."""

    sample_options = (COMPLETE, *TOKEN_SAMPLING)
    """The options of ``polymodal sample``: an image to complete, and the token-sampling options."""

    def step_fn(self, *, compile: bool | None = None, last_only: bool = False):
        """``(ids_new (B, n), cache) -> logits (B, n, K)`` for :func:`polymodal.generation.sampling.generate`
        (the core decoder's :meth:`~polymodal.generation.decoder.CausalDecoder.step_fn`: compiled static steps
        with ``compile`` or the model's ``compile_inference``; ``last_only``: the last position's logits only)."""
        return self.decoder.step_fn(compile=compile, last_only=last_only)

    @torch.no_grad()
    def sample_tokens(
        self,
        n: int,
        *,
        prefix: Tensor | None = None,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        batch_size: int = 256,
        compile: bool | None = None,
    ) -> Tensor:
        """``n`` token images (n, N); ``prefix`` (n, P) or (P,) fixes their first P tokens. The KV cache is
        preallocated; ``compile`` (None: the model's ``compile_inference``) compiles the decoding steps."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        with eval_mode(self):
            device = self.head.weight.device
            prefix = torch.zeros(n, 0, dtype=torch.long) if prefix is None else prefix.long()
            if prefix.dim() == 1:
                prefix = prefix.expand(n, -1)  # (n, P)
            if prefix.shape[0] != n or prefix.shape[1] >= self.num_tokens + 1:
                raise ValueError(f"prefix must be (n={n}, P) with P <= {self.num_tokens}; got {tuple(prefix.shape)}")
            start = torch.cat([torch.full((n, 1), self.sos, dtype=torch.long), prefix.cpu()], dim=1)  # (n, 1 + P)
            g = torch.Generator(device=device).manual_seed(seed)
            out = []
            for chunk in start.split(batch_size):
                ids = self.decoder.generate(
                    chunk.to(device),
                    self.num_tokens - prefix.shape[1],
                    compile=compile,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=g,
                    use_cache=use_cache,
                )  # (b, 1 + N)
                out.append(ids[:, 1:])
        return torch.cat(out)  # (n, N)

    def sample(self, n: int, **options: Any) -> Tensor:
        """``n`` unconditional images (n, C, S, S) in [0, 1]; options as :meth:`sample_tokens`."""
        return self.images(self.sample_tokens(n, **options))

    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, None]:
        """``polymodal eval --generative``: ``n`` unconditional samples (no prompts, so no targets)."""
        return self.sample(n, seed=seed).cpu(), None

    def read_for_completion(self, path: str | Path) -> Tensor:
        """The image at ``path`` as (C, S, S); a size other than the model's raises a ValueError."""
        image = read_image(path, self.config.channels)  # (C, H, W)
        s = self.config.image_size
        if tuple(image.shape[-2:]) != (s, s):
            raise ValueError(
                f"--complete expects a {s}×{s} image (the model's image_size); "
                f"{path} is {image.shape[-1]}×{image.shape[-2]} (width×height)"
            )
        return image

    def complete(self, image: Tensor, n: int, **options: Any) -> Tensor:
        """``n`` completions (n, C, S, S) of the bottom half of ``image`` (C, S, S); the top half is kept."""
        s = self.config.image_size
        tokens = self.tokens(image.unsqueeze(0))[0]  # (N,)
        top = tokens[: (s // 2) * s]  # (P,) the top rows, raster order
        return self.images(self.sample_tokens(n, prefix=top, **options))

    def sample_to_folder(
        self,
        out: str | Path,
        n: int = 8,
        prompt: str | None = None,
        seed: int = 0,
        complete: str | Path | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        **unsupported: Any,
    ) -> list[Path]:
        """Write ``n`` samples (or completions of ``complete``'s bottom half) as PNGs and a grid into ``out``."""
        if prompt is not None:
            raise ValueError(
                f"iGPT is unconditional and takes no --prompt; got {prompt!r} "
                "(use --complete IMAGE to condition on the top half of an image)"
            )
        if unsupported:
            raise ValueError(
                f"iGPT does not support {', '.join(sorted(unsupported))} (supported: complete, "
                "temperature, top_k, top_p, use_cache)"
            )
        if not bool(self.palette_fitted):
            raise ValueError(
                "this iGPT model has no palette to turn tokens into colours (never trained, or converted "
                "without the image processor's clusters); train it or convert with preprocessor_config.json"
            )
        options = dict(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache)
        if complete is not None:
            images = self.complete(self.read_for_completion(complete), n, **options)
        else:
            images = self.sample(n, **options)
        return write_samples(images.cpu(), out)

    @torch.no_grad()
    def fd_judge(self, dataset: Any, n: int, seed: int = 0) -> float:
        """Fréchet distance between the judge's features of ``n`` samples and of the test images."""
        from polymodal.data.augment import resize
        from polymodal.eval.judge import frechet_distance, get_judge

        judge = get_judge(dataset)
        samples = resize(self.sample(n, seed=seed).cpu(), judge.image_size)  # (n, C, S_judge, S_judge)
        return frechet_distance(judge.embed(samples), judge.embed(dataset.test["image"]))
