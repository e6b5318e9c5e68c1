"""Text generation through the core sampler (:func:`polymodal.generation.sampling.generate`), with a KV cache.

Every token is drawn by the core sampler (greedy, temperature, top-k, top-p) through the core
:class:`~polymodal.generation.decoder.CausalDecoder`; by default the model runs on the new token only
over a preallocated :class:`~polymodal.nn.KVCache` (``use_cache=False`` recomputes the whole stream
each step, the reference path). Generation stops at the
end-of-text token or at ``max_len`` positions. Ids the tokenizer does not use (spare embedding
rows), the padding token and (when distinct from eos) the start token are never drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.generation.options import TOKEN_SAMPLING, check_sample_values, keywords
from polymodal.io import atomic_write
from polymodal.nn import eval_mode

SAMPLING_OPTIONS = keywords(TOKEN_SAMPLING)
"""``polymodal sample`` options a language model understands (besides ``prompt``, ``n`` and ``seed``)."""


def printable(text: str) -> str:
    """``text`` on one readable line: characters that are not printable (newlines, control bytes)
    are written as escapes (``\\n``, ``\\x1f``)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class SamplingMixin:
    """Sampling methods of :class:`~polymodal.plugins.lm.model.LMModel` (kept apart to keep files small)."""

    sample_options = TOKEN_SAMPLING
    """The options of ``polymodal sample`` (temperature, top-k, top-p, no cache)."""

    def step_fn(self, *, compile: bool | None = None, last_only: bool = False):
        """``(ids_new (B, n), cache) -> logits (B, n, V)`` for :func:`polymodal.generation.sampling.generate`
        (the core decoder's :meth:`~polymodal.generation.decoder.CausalDecoder.step_fn`: compiled static steps
        with ``compile`` or the model's ``compile_inference``; ``last_only`` returns the last position's
        logits (B, 1, V) only, all the sampler reads)."""
        return self.decoder.step_fn(compile=compile, last_only=last_only)

    def allowed_tokens(self) -> Tensor:
        """Bool (V,): the ids the sampler may draw (tokenizer ids except pad and a separate bos)."""
        tok = self.require_tokenizer()
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)  # (V,)
        allowed[: tok.vocab_size] = True
        specials = tok.special_tokens
        for role in ("pad", "bos"):
            if specials[role] != specials["eos"]:
                allowed[specials[role]] = False
        return allowed

    def prompt_ids(self, prompt: str = "") -> list[int]:
        """The start token followed by the tokens of ``prompt`` (no end-of-text)."""
        tok = self.require_tokenizer()
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str; got {type(prompt).__name__}")
        return [tok.special_tokens["bos"]] + tok.encode(prompt, add_bos=False, add_eos=False)

    @torch.no_grad()
    def generate_ids(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        *,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        use_cache: bool = True,
        stop_at_eos: bool = True,
        compile: bool | None = None,
    ) -> Tensor:
        """Extend ``prompt_ids`` (B, T) by up to ``max_new_tokens`` (fewer at ``max_len``); returns (B, T + n).

        Rows that emitted end-of-text are filled with it (``stop_at_eos``). The KV cache is preallocated for
        the whole generation; ``compile`` (None: the model's ``compile_inference``) runs the decoding steps
        through one compiled static step.
        """
        if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2:
            got = tuple(prompt_ids.shape) if isinstance(prompt_ids, Tensor) else type(prompt_ids).__name__
            raise ValueError(f"prompt_ids must be (B, T) token ids; got {got}")
        if prompt_ids.shape[1] > self.max_len:
            raise ValueError(f"the prompt has {prompt_ids.shape[1]} tokens, more than max_len={self.max_len}")
        room = (
            min(max_new_tokens, self.max_len - prompt_ids.shape[1])
            if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool)
            else max_new_tokens
        )
        device = self.token_embed.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        eos = self.tokenizer.special_tokens["eos"] if stop_at_eos and self.tokenizer is not None else None
        allowed = self.allowed_tokens().to(device) if self.tokenizer is not None else None
        with eval_mode(self):
            return self.decoder.generate(
                prompt_ids.to(device),
                room,
                compile=compile,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                greedy=greedy,
                generator=g,
                allowed=allowed,
                eos_id=eos,
                use_cache=use_cache,
            )  # (B, T + n)

    def decode_new(self, ids: Tensor, start: int) -> list[str]:
        """Text of every row of ``ids`` (B, L) from position ``start``, cut at the first end-of-text."""
        tok = self.require_tokenizer()
        eos = tok.special_tokens["eos"]
        out = []
        for row in ids[:, start:].tolist():
            row = row[: row.index(eos)] if eos in row else row
            out.append(tok.decode(row))
        return out

    def generate_text(
        self,
        prompt: str = "",
        max_new_tokens: int = 32,
        *,
        seed: int = 0,
        include_prompt: bool = False,
        **sampling: Any,
    ) -> str:
        """The continuation of ``prompt`` (after the start token), up to end-of-text or ``max_new_tokens``.

        ``sampling``: ``temperature``, ``top_k``, ``top_p``, ``greedy``, ``use_cache``. With
        ``include_prompt`` the prompt is returned in front of the continuation.
        """
        start = self.prompt_ids(prompt)
        ids = self.generate_ids(torch.tensor([start]), max_new_tokens, seed=seed, **sampling)  # (1, T + n)
        text = self.decode_new(ids, len(start))[0]
        return prompt + text if include_prompt else text

    def generate(
        self,
        prompt: str = "",
        max_new_tokens: int = 32,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
        include_prompt: bool = False,
    ) -> str:
        """The text that continues ``prompt`` (transformers' ``generate`` + decode, in one call).

        Greedy when no sampling option is given; with ``temperature`` (> 0), ``top_k`` (>= 1) or
        ``top_p`` (in (0, 1]) the tokens are sampled, reproducibly for a ``seed``. Stops at
        end-of-text, after ``max_new_tokens`` or at the model's ``max_len``. ``include_prompt``
        returns the prompt in front of the continuation. Bad values raise a ValueError naming them.
        """
        values = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        check_sample_values(values, ())
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        greedy = all(v is None for v in values.values())
        sampling = {"temperature": 1.0 if temperature is None else temperature, "top_k": top_k, "top_p": top_p}
        return self.generate_text(
            prompt,
            max_new_tokens,
            seed=seed,
            include_prompt=include_prompt,
            greedy=greedy,
            use_cache=use_cache,
            **sampling,
        )

    def sample_texts(
        self, n: int, prompt: str = "", max_new_tokens: int = 48, *, seed: int = 0, **sampling: Any
    ) -> list[str]:
        """``n`` continuations of ``prompt``, drawn together in one batch."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        start = self.prompt_ids(prompt)
        ids = self.generate_ids(torch.tensor([start] * n), max_new_tokens, seed=seed, **sampling)  # (n, T + m)
        return self.decode_new(ids, len(start))

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Write ``n`` samples (continuations of ``prompt``), one per line, to ``out/samples.txt``
        (non-printable characters escaped, see :func:`printable`).

        Options: ``temperature``, ``top_k``, ``top_p``, ``use_cache``; others raise a ValueError.
        """
        unsupported = sorted(k for k in options if k not in SAMPLING_OPTIONS)
        if unsupported:
            raise ValueError(
                f"the language model does not support {', '.join(unsupported)} "
                f"(supported: prompt, {', '.join(SAMPLING_OPTIONS)})"
            )
        prompt = prompt or ""
        texts = self.sample_texts(n, prompt, self.max_len, seed=seed, **options)
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [printable(prompt + t) for t in texts]
        return [atomic_write(folder / "samples.txt", "\n".join(lines) + "\n")]


__all__ = ["SAMPLING_OPTIONS", "SamplingMixin", "printable"]
