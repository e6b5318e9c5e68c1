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
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from polymodal.attention.backends import Backend
from polymodal.attention.masks import AttentionSpec
from polymodal.registry import get_registry, peek_registry

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("polymodal_attention", default=None)
_ENV = "POLYMODAL_ATTENTION"
_AUTO_CACHE_MAX = 4096  # distinct call shapes remembered by ``auto`` before it starts over

# What the dispatcher looked up in the registry, valid while the registry object and its
# version are unchanged: backends by name, the same ranked for ``auto``, and ``auto``'s
# choice per call key (see ``_auto_key``).
_cache: dict[str, object] = {"registry": None, "version": None, "backends": {}, "ranked": (), "auto": {}}


class AttentionError(ValueError):
    """An attention call that no (or not the requested) backend can run."""


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, attention calls use backend ``name`` (``None`` or ``"auto"``: choose).

    Code compiled with ``torch.compile`` does not see the block (reading it would break the graph at
    every attention call): give compiled code ``backend=`` or ``POLYMODAL_ATTENTION`` instead."""
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _backends() -> dict[str, Backend]:
    # Hot path: a lock-free peek at the loaded registry; the locked ``get_registry`` (which
    # loads plugins on first use) only when nothing is loaded yet or it changed.
    registry = peek_registry()
    if registry is None or registry is not _cache["registry"] or registry.version != _cache["version"]:
        registry = get_registry()
        found = {e.name: e.obj for e in registry.entries("attention_backend")}
        ranked = tuple(sorted(found.values(), key=lambda b: -b.priority))
        _cache.update(registry=registry, version=registry.version, backends=found, ranked=ranked, auto={})
    return _cache["backends"]  # type: ignore[return-value]


def backends() -> dict[str, Backend]:
    """Every registered backend by name."""
    return dict(_backends())


def _spec(
    q: Tensor,
    k: Tensor,
    causal: bool,
    key_padding: Tensor | None,
    seqlens: Sequence[int] | None,
    mask: Tensor | None,
    dropout_p: float,
    v: Tensor | None = None,
) -> AttentionSpec:
    dense = "" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or (v is not None and v.requires_grad))
    return AttentionSpec(
        q.device.type,
        q.dtype,
        grad,
        bool(causal),
        key_padding is not None,
        seqlens is not None,
        dense,
        dropout_p > 0.0,
        q.shape[-2],
        k.shape[-2],
        q.shape[-1],
    )


def _auto_key(spec: AttentionSpec) -> tuple:
    # Every field a backend's ``supports`` may look at, so a cached choice is never wrong.
    return (
        spec.device,
        spec.dtype,
        spec.grad,
        spec.causal,
        spec.padding,
        spec.packed,
        spec.dense,
        spec.dropout,
        spec.nq,
        spec.nk,
        spec.head_dim,
    )


def _choose(spec: AttentionSpec, key: tuple) -> Backend:
    """``auto``'s pick for ``spec``: the highest-priority backend allowed on the device that supports it."""
    _backends()
    ranked: tuple[Backend, ...] = _cache["ranked"]  # type: ignore[assignment]
    chosen = next((b for b in ranked if spec.device in b.auto_devices and b.supports(spec) is None), None)
    if chosen is None:
        reasons = "; ".join(f"{b.name}: {b.supports(spec) or 'not picked by auto on ' + spec.device}" for b in ranked)
        raise AttentionError(f"no attention backend supports this call ({reasons})")
    auto: dict = _cache["auto"]  # type: ignore[assignment]
    if len(auto) >= _AUTO_CACHE_MAX:
        auto.clear()
    auto[key] = chosen
    return chosen


def select_backend(spec: AttentionSpec, name: str | None = None) -> Backend:
    """The backend that will run a call described by ``spec`` (``name`` forces one)."""
    table = _backends()
    if name is None or name == "auto":
        key = _auto_key(spec)
        chosen = _cache["auto"].get(key)  # type: ignore[union-attr]
        return chosen if chosen is not None else _choose(spec, key)  # type: ignore[return-value]
    backend = table.get(name)
    if backend is None:
        raise AttentionError(f"unknown attention backend {name!r}; registered: {', '.join(sorted(table))}")
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
            f"attention expects q, k, v of shape (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise AttentionError(
            f"attention expects q (B, H, Nq, D), k (B, H, Nk, D) and v (B, H, Nk, Dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if key_padding is not None and tuple(key_padding.shape) != (k.shape[0], k.shape[-2]):
        raise AttentionError(
            f"key_padding must be (B, Nk) = {(k.shape[0], k.shape[-2])}; got {tuple(key_padding.shape)}"
        )
    if seqlens is not None and (q.shape[0] != 1 or sum(seqlens) != q.shape[-2] or q.shape[-2] != k.shape[-2]):
        raise AttentionError(
            f"packed attention expects B == 1 and Nq == Nk == sum(seqlens) = {sum(seqlens)}; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    # torch.compile breaks the graph at a ContextVar read: compiled code sees ``backend=`` and the
    # environment variable, not a ``use_backend`` block (a compiled model is traced once anyway).
    override = None if torch.compiler.is_compiling() else _override.get()
    name = backend or override or os.environ.get(_ENV) or None
    if name is None or name == "auto":
        # Hot path: ``auto`` keyed on the call without building an AttentionSpec
        # (the key holds exactly the fields of ``_auto_key``).
        _backends()
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        dense = "" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
        key = (
            q.device.type,
            q.dtype,
            grad,
            bool(causal),
            key_padding is not None,
            seqlens is not None,
            dense,
            dropout_p > 0.0,
            q.shape[-2],
            k.shape[-2],
            q.shape[-1],
        )
        chosen = _cache["auto"].get(key)  # type: ignore[union-attr]
        if chosen is None:
            chosen = _choose(_spec(q, k, causal, key_padding, seqlens, mask, dropout_p, v), key)
    else:
        chosen = select_backend(_spec(q, k, causal, key_padding, seqlens, mask, dropout_p, v), name)
    return chosen(
        q, k, v, causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask, dropout_p=dropout_p, scale=scale
    )
