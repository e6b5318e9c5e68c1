"""The one attention function every layer calls, and how it picks a backend.

Choice, first match wins: the ``backend=`` argument, then :func:`use_backend` (a context
manager), then ``POLYMODAL_ATTENTION``, then ``auto``: the highest-priority registered
backend that supports the call. A backend asked for by name that cannot run the call
raises with its reason; nothing silently computes something else.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .backends import Backend
from .masks import AttentionSpec

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("polymodal_attention", default=None)
_cache: dict[str, object] = {"version": None, "backends": {}, "auto": {}}


class AttentionError(ValueError):
    """An attention call that no (or not the requested) backend can run."""


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, attention calls use backend ``name`` (``None`` or ``"auto"``: choose)."""
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _backends() -> dict[str, Backend]:
    from ..plugin_loader import get_registry

    registry = get_registry()
    if _cache["version"] != registry.version:
        found = {e.name: e.obj for e in registry.entries("attention_backend")}
        _cache.update(version=registry.version, backends=found, auto={})
    return _cache["backends"]  # type: ignore[return-value]


def backends() -> dict[str, Backend]:
    """Every registered backend by name."""
    return dict(_backends())


def _spec(q: Tensor, k: Tensor, causal: bool, key_padding: Tensor | None,
          seqlens: Sequence[int] | None, mask: Tensor | None, dropout_p: float) -> AttentionSpec:
    dense = "" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    return AttentionSpec(
        q.device.type, q.dtype, torch.is_grad_enabled() and (q.requires_grad or k.requires_grad),
        bool(causal), key_padding is not None, seqlens is not None, dense, dropout_p > 0.0,
        q.shape[-2], k.shape[-2], q.shape[-1],
    )


def select_backend(spec: AttentionSpec, name: str | None = None) -> Backend:
    """The backend that will run a call described by ``spec`` (``name`` forces one)."""
    table = _backends()
    if name is None or name == "auto":
        cache_key = (spec.device, spec.dtype, spec.grad, spec.kinds, spec.dropout)
        chosen = _cache["auto"].get(cache_key)  # type: ignore[union-attr]
        if chosen is None:
            ranked = sorted(table.values(), key=lambda b: -b.priority)
            chosen = next((b for b in ranked if spec.device in b.auto_devices
                           and b.supports(spec) is None), None)
            if chosen is None:
                reasons = "; ".join(f"{b.name}: {b.supports(spec)}" for b in ranked)
                raise AttentionError(f"no attention backend supports this call ({reasons})")
            _cache["auto"][cache_key] = chosen  # type: ignore[index]
        return chosen  # type: ignore[return-value]
    backend = table.get(name)
    if backend is None:
        raise AttentionError(
            f"unknown attention backend {name!r}; registered: {', '.join(sorted(table))}"
        )
    why = backend.supports(spec)
    if why is not None:
        raise AttentionError(f"attention backend {name!r} cannot run this call: {why}")
    return backend


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding: Tensor | None = None,
    seqlens: Sequence[int] | None = None,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Scaled dot-product attention through the chosen backend.

    Args:
        q: (B, H, Nq, D) queries. k, v: (B, H, Nk, D) keys and values.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq).
        key_padding: (B, Nk) bool, True for real keys.
        seqlens: lengths of packed sequences (B == 1, Nq == Nk == sum): block-diagonal.
        mask: bool (True = attend) or additive float, broadcastable to (B, H, Nq, Nk).
        dropout_p: dropout on the attention weights (pass 0.0 in eval).
        scale: logit scale; ``1/sqrt(D)`` when None.
        backend: force a backend by name (else context manager, env, then ``auto``).

    Returns:
        (B, H, Nq, D). Rows that may attend to no key are zeros.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttentionError(
            f"attention expects q, k, v of shape (B, H, N, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if seqlens is not None and (q.shape[0] != 1 or sum(seqlens) != q.shape[-2] or q.shape[-2] != k.shape[-2]):
        raise AttentionError(
            f"packed attention expects B == 1 and Nq == Nk == sum(seqlens) = {sum(seqlens)}; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    name = backend or _override.get() or os.environ.get("POLYMODAL_ATTENTION") or None
    spec = _spec(q, k, causal, key_padding, seqlens, mask, dropout_p)
    chosen = select_backend(spec, name)
    return chosen(q, k, v, causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask,
                  dropout_p=dropout_p, scale=scale)
