"""The causal decoder trunk the autoregressive families compose: tokens + positions → causal stack → head.

A family (GPT-2, iGPT, DALL·E, RuDolph, …) keeps its own weights and state-dict keys and describes its trunk
with callables; :class:`CausalDecoder` runs it over a :class:`~polymodal.nn.cache.KVCache`::

    self.decoder = CausalDecoder(
        self.stack,
        tokens=self.token_embed,                          # ids (B, n) -> (B, n, D)
        positions=lambda pos: self.pos_table[pos],        # pos (n,) -> (n, D)
        head=self.head,                                   # (B, n, D) -> (B, n, V)
        max_len=1024,
        masks=None,                                       # or (pos (n,), keys) -> per-layer bool (n, keys)
        owner=self,
    )
    logits = self.decoder(ids, cache)                     # eager, positions cache.length … + n
    out = self.decoder.generate(prompt, 32, greedy=True)  # the core sampler over preallocated caches

Generation with ``compile=True`` (or ``owner.compile_inference``, set by
:func:`polymodal.models.inference.prepare_inference`) runs the prompt eagerly and every later step through one
``torch.compile``'d static step: the new token's keys and values are written at tensor positions into the
preallocated cache and the step attends over a power-of-two bucket of key positions (at least 64, masked
beyond the current position), so a compiled step is reused for every token of a bucket instead of recompiling.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from polymodal.generation.linear import (  # noqa: F401 (fast_linear_applies, clear_packed_weights: re-exported)
    KernelTuner,
    clear_packed_weights,
    fast_linear,
    fast_linear_applies,
    fast_linears,
)
from polymodal.generation.sampling import generate
from polymodal.nn.cache import KVCache, bucket
from polymodal.nn.stack import TransformerStack

Masks = Callable[[Tensor, int], "Tensor | list[Tensor | None] | None"]


class CausalDecoder:
    """A causal decoder over a family's own modules (no weights of its own; see the module docstring).

    ``masks(pos, keys)`` returns, for query positions ``pos`` (n,) and key positions ``[0, keys)``, a bool mask
    (n, keys) or one per layer (None: that layer is plain causal); True = may attend, and every row must already
    exclude later keys (key j > pos[i]). Without ``masks`` the decoder is plain causal.
    """

    def __init__(
        self,
        stack: TransformerStack,
        *,
        tokens: Callable[[Tensor], Tensor],
        positions: Callable[[Tensor], Tensor],
        head: Callable[[Tensor], Tensor],
        max_len: int,
        masks: Masks | None = None,
        dropout: nn.Module | None = None,
        owner: nn.Module | None = None,
        head_weight: Callable[[], Tensor] | None = None,
    ) -> None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"CausalDecoder max_len must be a positive integer; got {max_len!r}")
        self.stack, self.tokens, self.positions, self.head = stack, tokens, positions, head
        self.max_len, self.masks, self.dropout, self.owner = max_len, masks, dropout, owner
        self.head_weight = head_weight
        self._compiled: Callable[..., Tensor] | None = None
        self._seen: set[tuple] = set()  # static-step shapes run once eagerly before the compiled step
        self.tuner = KernelTuner()  # the faster linear kernel of this machine for the cached steps

    def __deepcopy__(self, memo: dict) -> CausalDecoder:
        """A copy over the copied modules (a deep-copied family gets its own decoder); compiled code is not copied."""
        new = copy.copy(self)
        memo[id(self)] = new
        for name in ("stack", "tokens", "positions", "head", "masks", "dropout", "owner", "head_weight"):
            setattr(new, name, copy.deepcopy(getattr(self, name), memo))
        new._compiled, new._seen, new.tuner = None, set(), KernelTuner()
        return new

    # -- eager ------------------------------------------------------------------------------------
    def _embed(self, embeds: Tensor, pos: Tensor) -> Tensor:
        x = embeds + self.positions(pos)  # (B, n, D)
        return self.dropout(x) if self.dropout is not None else x

    def run(
        self,
        embeds: Tensor,
        cache: KVCache | None = None,
        *,
        key_padding: Tensor | None = None,
        injected: Any = None,
        inject_kwargs: dict[str, Any] | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Token embeddings (B, n, D) continuing the cache's positions → hidden states (B, n, D) after the stack.

        Adds the positions ``cache.length … + n - 1`` (and the dropout), runs the stack causally with the
        masks over the cache (appending to it). ``key_padding`` (B, cache.length + n), ``injected``,
        ``inject_kwargs`` and ``return_hidden`` go to :meth:`TransformerStack.forward`.
        """
        if not isinstance(embeds, Tensor) or embeds.dim() != 3:
            got = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
            raise ValueError(f"expected token embeddings (B, n, D); got {got}")
        start, n = (cache.length if cache is not None else 0), embeds.shape[1]
        if start + n > self.max_len:
            raise ValueError(f"at most max_len={self.max_len} positions; got {start} cached + {n} new")
        pos = torch.arange(start, start + n, device=embeds.device)  # (n,)
        mask = self.masks(pos, start + n) if self.masks is not None else None
        return self.stack(
            self._embed(embeds, pos),
            causal=True,
            mask=mask,
            key_padding=key_padding,
            cache=cache,
            injected=injected,
            inject_kwargs=inject_kwargs,
            return_hidden=return_hidden,
        )

    def __call__(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Ids (B, n) continuing the cache's positions → logits (B, n, V)."""
        return self.head(self.run(self.tokens(ids), cache))

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A cache preallocated (on its first write) for ``capacity`` positions (default ``max_len``)."""
        return KVCache(capacity=min(capacity or self.max_len, self.max_len))

    # -- static (compiled) steps ------------------------------------------------------------------
    def static_step(self, ids: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, n, V) of ``ids`` (B, n) written at the tensor positions ``cache.positions`` and
        attending over the cache's first ``cache.keys`` positions (what the compiled step runs)."""
        pos = cache.positions  # (n,)
        keys = torch.arange(cache.keys, device=ids.device)  # (keys,)
        visible = keys[None, :] <= pos[:, None]  # (n, keys): causal, and nothing beyond what is written
        masks = self.masks(pos, cache.keys) if self.masks is not None else None
        if isinstance(masks, (list, tuple)):
            mask: Tensor | list[Tensor] = [visible if m is None else m for m in masks]
        else:
            mask = visible if masks is None else masks
        x = self._embed(self.tokens(ids), pos)  # (B, n, D)
        return self.decode_logits(self.stack(x, mask=mask, cache=cache))  # (B, n, V)

    def compiled_step(self) -> Callable[..., Tensor]:
        """The ``torch.compile``'d :meth:`static_step` (compiled once per decoder, reused across calls)."""
        if self._compiled is None:
            self._compiled = torch.compile(self.static_step, dynamic=False)
        return self._compiled

    def _step_static(self, ids: Tensor, cache: KVCache, fn: Callable[..., Tensor]) -> Tensor:
        start, n = cache.length, ids.shape[1]
        capacity = cache.capacity or self.max_len
        if start + n > min(capacity, self.max_len):
            raise ValueError(f"at most {min(capacity, self.max_len)} positions; got {start} cached + {n} new")
        cache.static, cache.positions = True, torch.arange(start, start + n, device=ids.device)  # (n,)
        cache.keys = bucket(start + n, min(capacity, self.max_len))
        shape = (tuple(ids.shape), cache.keys, next(iter(cache.buffers.values()))[0].shape)
        if fn is not self.static_step and shape not in self._seen:
            # the first step of a new shape runs eagerly: the same result, and it fills the lookup caches the
            # compiled code would otherwise guard on as missing (the attention dispatcher's), then recompile
            self._seen.add(shape)
            fn = self.static_step
        try:
            logits = fn(ids, cache)  # (B, n, V)
        finally:
            cache.static, cache.positions = False, None
        cache.set_length(start + n)
        return logits

    def use_compile(self, compile: bool | None) -> bool:
        """``compile``, or when None the owner's ``compile_inference`` flag (False without one)."""
        return bool(getattr(self.owner, "compile_inference", False)) if compile is None else bool(compile)

    def decode_logits(self, hidden: Tensor) -> Tensor:
        """Logits (B, n, V) of hidden states (B, n, D) for decoding: ``F.linear`` on ``head_weight()`` through
        :func:`fast_linear` when the decoder has a ``head_weight`` (a tied head), else ``head``."""
        if self.head_weight is not None:
            return fast_linear(hidden, self.head_weight())  # (B, n, V)
        return self.head(hidden)  # (B, n, V)

    def inference_linears(self) -> list[nn.Module]:
        """The modules whose plain ``nn.Linear`` layers decoding runs through :func:`fast_linear`: the stack's
        and the head's (when the head is a module)."""
        modules = list(self.stack.modules())
        if isinstance(self.head, nn.Module):
            modules += list(self.head.modules())
        return modules

    def step_fn(
        self, *, compile: bool | None = None, last_only: bool = False
    ) -> Callable[[Tensor, KVCache | None], Tensor]:
        """``(ids_new (B, n), cache) -> logits (B, n, V)`` for :func:`polymodal.generation.sampling.generate`.

        Without a cache the ids are the whole sequence (the reference path: the eager forward). With one, the
        first call (the prompt) runs eagerly, filling the preallocated buffers (an empty cache without a
        capacity is given ``max_len``); later calls run :meth:`static_step` compiled when ``compile`` (see
        :meth:`use_compile`), eagerly otherwise. Cached steps without gradients compute their float32 and
        bfloat16 CPU linear layers through :func:`fast_linear`, by the kernel :attr:`tuner` found faster on this
        machine. ``last_only`` returns the logits of the last position only (B, 1, V), which is all the sampler
        reads (the prompt's other positions skip the head).
        """
        compiled = self.use_compile(compile)
        linears = self.inference_linears()

        def step(ids: Tensor, cache: KVCache | None) -> Tensor:
            if cache is None:
                logits = self(ids, None)  # (B, n, V)
                return logits[:, -1:] if last_only else logits
            with fast_linears(linears), self.tuner.step((ids.shape[0],)) if cache.length else nullcontext():
                if compiled and cache.length:
                    return self._step_static(ids, cache, self.compiled_step())  # (B, n, V)
                if compiled and cache.capacity is None and not cache.buffers:
                    cache.capacity = self.max_len  # the prompt, eagerly, into buffers sized for the static steps
                hidden = self.run(self.tokens(ids), cache)  # (B, n, D); unwritten keys stay zero (KVCache)
                return self.decode_logits(hidden[:, -1:] if last_only else hidden)  # (B, n or 1, V)

        return step

    def generate(
        self, prompt_ids: Tensor, max_new_tokens: int, *, compile: bool | None = None, **kwargs: Any
    ) -> Tensor:
        """:func:`polymodal.generation.sampling.generate` over this decoder (preallocated caches); ``kwargs`` are
        its options (greedy, temperature, top_k, top_p, generator, allowed, cfg_scale, uncond_ids, eos_id, …)."""
        kwargs.setdefault("new_cache", self.new_cache)
        return generate(self.step_fn(compile=compile, last_only=True), prompt_ids, max_new_tokens, **kwargs)


__all__ = ["CausalDecoder"]
