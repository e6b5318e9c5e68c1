"""Autoregressive sampling: one next-token choice, classifier-free guidance, and a generate loop.

    ids = generate(step_fn, prompt, max_new_tokens=32, top_k=50, temperature=0.9,
                   generator=torch.Generator().manual_seed(0))

``step_fn(ids_new (B, n), cache) -> logits (B, n, V)`` runs the model on the new tokens
only, writing their keys and values in place into ``cache`` (a :class:`polymodal.nn.KVCache`);
with ``use_cache=False`` it gets the whole sequence and ``cache=None`` each step (the
readable reference path). Diffusion schedulers live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from polymodal.generation.options import check_sample_values
from polymodal.nn import KVCache

StepFn = Callable[[Tensor, "KVCache | None"], Tensor]


def _check_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ValueError naming the option, the expected range and the value given
    (:func:`polymodal.generation.options.check_sample_values`; temperature must be finite and > 0)."""
    if temperature is None:
        raise ValueError("temperature must be a number > 0, got None")
    check_sample_values({"temperature": temperature, "top_k": top_k, "top_p": top_p}, ())


def check_prompt(prompt_ids: Tensor, max_new_tokens: int, least: int = 0) -> None:
    """A ValueError naming what was given unless ``prompt_ids`` is (B, T) with T >= 1 and ``max_new_tokens`` an
    integer >= ``least`` (the checks of :func:`generate` and :func:`~polymodal.generation.beam.beam_search`)."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (B, T) with T >= 1, got {tuple(prompt_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < least:
        raise ValueError(f"max_new_tokens must be an integer >= {least}, got {max_new_tokens!r}")


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    allowed: Tensor | None = None,
) -> Tensor:
    """Choose one token per row of ``logits`` (B, V); returns ids (B,).

    Order: ``allowed`` (bool (V,) or (B, V), True = may be chosen) masks the vocabulary;
    ``greedy`` takes the arg-max; else the logits are divided by ``temperature``, cut to
    the ``top_k`` largest, then to the smallest set whose probability mass is at least
    ``top_p`` (nucleus), and one token is drawn with ``generator``. Any non-finite logit
    (NaN, ±inf) raises a ValueError: mask tokens with ``allowed`` instead of ``-inf``.
    """
    _check_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"sample_next expects logits of shape (B, V), got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).sum().item()
        raise ValueError(
            f"logits contain {bad} non-finite value(s) (NaN or inf); the model diverged or "
            "masked with inf — pass allowed= to restrict the vocabulary"
        )
    logits = logits.float()  # (B, V)
    if allowed is not None:
        allowed = allowed.to(device=logits.device, dtype=torch.bool).expand_as(logits)  # (B, V)
        if not allowed.any(-1).all():
            raise ValueError("allowed leaves no token for some row; every row needs at least one True")
        logits = logits.masked_fill(~allowed, float("-inf"))
    if greedy:
        return logits.argmax(-1)  # (B,)
    # shift by the row max before dividing, so a tiny temperature cannot overflow
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature  # (B, V), max 0
    if top_k is not None and top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))  # (B, V)
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)  # (B, V) each
        keep_sorted = (probs.cumsum(-1) - probs) < top_p  # mass before a token < p: still needed
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)  # (B, V)
        logits = logits.masked_fill(~keep, float("-inf"))
    probs = logits.softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def apply_cfg(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in logit space: ``uncond + scale · (cond − uncond)``.

    ``scale == 1`` returns ``cond_logits`` exactly; ``0`` gives the unconditional logits;
    larger values push towards the condition.
    """
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(
            f"cond and uncond logits must match; got {tuple(cond_logits.shape)} and {tuple(uncond_logits.shape)}"
        )
    if scale == 1:
        return cond_logits
    return uncond_logits + scale * (cond_logits - uncond_logits)  # (..., V)


@torch.no_grad()
def generate(
    step_fn: StepFn,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    allowed: Tensor | Callable[[Tensor], Tensor] | None = None,
    cfg_scale: float | None = None,
    uncond_ids: Tensor | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    use_cache: bool = True,
    new_cache: Callable[[int], KVCache] | None = None,
    sampler: Callable[..., Tensor] | None = None,
    **sampler_kwargs: Any,
) -> Tensor:
    """Extend ``prompt_ids`` (B, T) by up to ``max_new_tokens``; returns (B, T + n).

    ``allowed`` is a bool mask over the vocabulary, or a callable ``(ids (B, t)) -> mask``
    for masks that change along the sequence (DALL·E: text ids, then image ids). With
    ``cfg_scale``, the unconditional stream ``uncond_ids`` (B, T') runs beside the prompt
    (its own cache; the same new tokens are appended to both) and the logits are mixed by
    :func:`apply_cfg`. With ``eos_id``, a row that emitted it is filled with ``pad_id``
    (``eos_id`` when None) and the loop stops once every row has finished. ``sampler``
    replaces :func:`sample_next` (e.g. a registered token sampler); it gets ``generator``, the
    ``temperature``/``top_k``/``top_p`` given here and ``sampler_kwargs``. ``new_cache(positions)`` makes each
    stream's cache given the positions its tokens fill (default: ``KVCache()``, which grows by doubling; a
    :class:`~polymodal.generation.decoder.CausalDecoder` preallocates exactly).
    """
    check_prompt(prompt_ids, max_new_tokens)
    if cfg_scale is not None and uncond_ids is None:
        raise ValueError("cfg_scale needs uncond_ids, the prompt of the unconditional stream (B, T')")
    if uncond_ids is not None and uncond_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"uncond_ids must have batch {prompt_ids.shape[0]}, got {tuple(uncond_ids.shape)}")
    _check_args(temperature, top_k, top_p)
    passed = {
        k: v
        for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
        if v is not None and not (k == "temperature" and v == 1.0)
    }
    passed.update(sampler_kwargs)
    streams = [prompt_ids] + ([uncond_ids] if cfg_scale is not None else [])
    # a stream of T tokens feeds T + max_new_tokens - 1 positions (a step may add more, e.g. image embeddings)
    make = new_cache or (lambda positions: KVCache())
    caches = [make(s.shape[1] + max(max_new_tokens, 1)) if use_cache else None for s in streams]
    pending = list(streams)  # what each stream still has to feed the model
    ids = prompt_ids
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)  # (B,)
    fill = eos_id if pad_id is None else pad_id
    for _ in range(max_new_tokens):
        outs = []
        for s, cache in enumerate(caches):
            logits = step_fn(pending[s] if use_cache else streams[s], cache)  # (B, n, V)
            if logits.dim() != 3 or logits.shape[0] != ids.shape[0]:
                raise ValueError(f"step_fn must return logits (B, n, V); got {tuple(logits.shape)}")
            outs.append(logits[:, -1])  # (B, V)
        last = apply_cfg(outs[0], outs[1], cfg_scale) if cfg_scale is not None else outs[0]  # (B, V)
        mask = allowed(ids) if callable(allowed) else allowed
        if sampler is not None:
            if mask is not None:
                last = last.masked_fill(~mask.to(last.device, torch.bool).expand_as(last), torch.finfo(last.dtype).min)
            nxt = sampler(last, generator=generator, **passed)  # (B,)
        else:
            nxt = sample_next(
                last,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                greedy=greedy,
                allowed=mask,
            )  # (B,)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            done = done | (nxt == eos_id)
        new = nxt.unsqueeze(1).to(ids.dtype)  # (B, 1)
        ids = torch.cat([ids, new], dim=1)  # (B, t + 1)
        streams = [torch.cat([st, new], dim=1) for st in streams]
        pending = [new for _ in streams]
        if eos_id is not None and done.all():
            break
    return ids


def sample_greedy(logits: Tensor, generator: torch.Generator | None = None, **kw: Any) -> Tensor:
    """Token sampler ``"greedy"``: the arg-max of each row of ``logits`` (B, V)."""
    return sample_next(logits, greedy=True, allowed=kw.get("allowed"))


def sample_temperature(
    logits: Tensor, generator: torch.Generator | None = None, *, temperature: float = 1.0, **kw: Any
) -> Tensor:
    """Token sampler ``"temperature"``: draw from ``softmax(logits / temperature)``."""
    return sample_next(logits, temperature=temperature, generator=generator, allowed=kw.get("allowed"))


def sample_top_k(
    logits: Tensor, generator: torch.Generator | None = None, *, top_k: int = 50, temperature: float = 1.0, **kw: Any
) -> Tensor:
    """Token sampler ``"top-k"``: draw among the ``top_k`` most likely tokens."""
    return sample_next(logits, temperature=temperature, top_k=top_k, generator=generator, allowed=kw.get("allowed"))


def sample_top_p(
    logits: Tensor, generator: torch.Generator | None = None, *, top_p: float = 0.9, temperature: float = 1.0, **kw: Any
) -> Tensor:
    """Token sampler ``"top-p"``: draw from the smallest set of tokens with mass at least ``top_p``."""
    return sample_next(logits, temperature=temperature, top_p=top_p, generator=generator, allowed=kw.get("allowed"))


__all__ = [
    "apply_cfg",
    "generate",
    "sample_greedy",
    "sample_next",
    "sample_temperature",
    "sample_top_k",
    "sample_top_p",
]
