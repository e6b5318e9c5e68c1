"""The key/value cache of autoregressive decoding: preallocated, written in place, with cross-attention reuse.

Self-attention: each layer's keys and values live in one buffer (B, H, capacity, Dh) allocated on the
layer's first write; a decoding step writes its new positions into the buffer (no copy of the past, unlike
growing by concatenation) and attends over a view of the filled part::

    cache = KVCache(capacity=prompt_len + new_tokens)   # or KVCache(): grows by doubling when full
    k_all, v_all = cache.update(layer, k, v)            # (B, H, n, Dh) in; (B, H, filled + n, Dh) views out

Cross-attention to a context that does not change during a generation (Flamingo's images, an encoder's output):
:meth:`KVCache.cross_kv` projects the context once and serves the same keys and values at every later step.

Static steps (:class:`polymodal.nn.decoder.CausalDecoder` with ``compile=True``): the decoder sets ``static``,
``positions`` (a tensor) and ``keys`` (a length bucket) around a compiled call; :meth:`update` then writes at
those tensor positions and returns the first ``keys`` positions of the buffers, so the compiled code sees the
same shapes at every step of a bucket and never reads a Python counter (which would recompile per token).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

MIN_GROWTH = 64
"""Positions a growing cache (no ``capacity``) allocates at least; it then doubles when full."""


def bucket(length: int, capacity: int) -> int:
    """The key length a static step attends over: the next power of two >= ``length`` (at least 64),
    capped at ``capacity``; so a compiled step recompiles once per bucket, not once per token."""
    size = MIN_GROWTH
    while size < length:
        size *= 2
    return min(size, capacity)


class KVCache:
    """Keys and values of past positions, one preallocated buffer pair per layer (see the module docstring)."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"KVCache capacity must be a positive integer or None; got {capacity!r}")
        self.capacity = capacity
        self.buffers: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (k, v) each (B, H, capacity, Dh)
        self.filled: dict[int, int] = {}  # layer -> positions written
        self._cross: dict[int, tuple[Tensor, int, tuple[Tensor, Tensor]]] = {}  # id(owner) -> (context, version, kv)
        self.static = False
        self.positions: Tensor | None = None  # (n,) positions a static step writes
        self.keys = 0  # key positions a static step attends over

    # -- self-attention ---------------------------------------------------------------------------
    def _allocate(self, layer: int, k: Tensor, needed: int) -> tuple[Tensor, Tensor]:
        """A buffer pair for ``layer`` holding at least ``needed`` positions, the filled part copied over."""
        b, h, _, d = k.shape
        if self.capacity is not None:
            if needed > self.capacity:
                raise ValueError(
                    f"the KV cache was allocated for {self.capacity} positions; got {needed} "
                    "(make the cache with a larger capacity, or capacity=None to grow)"
                )
            size = self.capacity
        else:
            size = max(MIN_GROWTH, 2 * self.buffers[layer][0].shape[2] if layer in self.buffers else needed)
            while size < needed:
                size *= 2
        # zeros, not garbage: a static step masks the unwritten keys, but a NaN there would still poison 0·v
        new_k = k.new_zeros(b, h, size, d)  # (B, H, size, Dh)
        new_v = k.new_zeros(b, h, size, d)
        old = self.buffers.get(layer)
        filled = self.filled.get(layer, 0)
        if old is not None and filled:
            new_k[:, :, :filled] = old[0][:, :, :filled]
            new_v[:, :, :filled] = old[1][:, :, :filled]
        self.buffers[layer] = (new_k, new_v)
        return new_k, new_v

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` (B, H, n, Dh) after ``layer``'s filled positions; returns the keys and values so far
        (B, H, filled + n, Dh), views of the buffers. In a static step: written at ``positions``, and the
        first ``keys`` positions are returned."""
        if self.static:
            kb, vb = self.buffers[layer]
            kb[:, :, self.positions] = k  # in place, at tensor positions
            vb[:, :, self.positions] = v
            return kb[:, :, : self.keys], vb[:, :, : self.keys]  # (B, H, keys, Dh)
        start = self.filled.get(layer, 0)
        end = start + k.shape[2]
        buf = self.buffers.get(layer)
        if (
            buf is None
            or buf[0].shape[2] < end
            or buf[0].shape[:2] != k.shape[:2]
            or buf[0].shape[3] != k.shape[3]
            or buf[0].dtype != k.dtype
            or buf[0].device != k.device
        ):
            if buf is not None and start and (buf[0].shape[:2] != k.shape[:2] or buf[0].shape[3] != k.shape[3]):
                raise ValueError(
                    f"layer {layer} caches keys of shape (B, H, ·, Dh) = {tuple(buf[0].shape[:2])}, "
                    f"{buf[0].shape[3]}; got {tuple(k.shape)} (use select() to change the batch)"
                )
            buf = self._allocate(layer, k, end)
        kb, vb = buf
        kb[:, :, start:end] = k  # (B, H, n, Dh) written in place
        vb[:, :, start:end] = v
        self.filled[layer] = end
        return kb[:, :, :end], vb[:, :, :end]  # (B, H, end, Dh)

    @property
    def length(self) -> int:
        """How many positions the cache holds (those of the first layer written)."""
        return next(iter(self.filled.values()), 0)

    def set_length(self, length: int) -> None:
        """Mark ``length`` positions as filled in every layer (after a static step wrote them)."""
        for layer in self.buffers:
            self.filled[layer] = length

    @property
    def layers(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Per layer, the filled keys and values (B, H, filled, Dh) (views of the buffers)."""
        return {i: (k[:, :, : self.filled[i]], v[:, :, : self.filled[i]]) for i, (k, v) in self.buffers.items()}

    def select(self, index: Tensor, *, keep_cross: bool = False) -> None:
        """Keep batch rows ``index`` (e.g. after beam or candidate selection). The cross-attention entries are
        dropped (their context changes with the batch) and recomputed on the next call — unless ``keep_cross``:
        then their rows are selected too and kept for the same context tensor, which the caller promises has
        equal rows wherever ``index`` moves one (beam search over a context repeated per hypothesis)."""
        self.buffers = {i: (k[index], v[index]) for i, (k, v) in self.buffers.items()}
        if not keep_cross:
            self._cross.clear()
            return
        for owner, (context, version, kv) in list(self._cross.items()):
            self._cross[owner] = (context, version, tuple(t[index] for t in kv))

    # -- cross-attention --------------------------------------------------------------------------
    def cross_kv(
        self, owner: nn.Module, context: Tensor, project: Callable[[Tensor], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """``project(context)`` computed once per ``owner`` (an attention module) and reused while the same
        context tensor, unchanged, is passed again; a different tensor or an in-place change recomputes (an
        inference-mode tensor has no version counter, so for it only the identity is checked)."""
        version = -1 if context.is_inference() else context._version  # inference tensors keep no version: identity only
        entry = self._cross.get(id(owner))
        if entry is not None and entry[0] is context and entry[1] == version:
            return entry[2]
        kv = project(context)
        self._cross[id(owner)] = (context, version, kv)
        return kv

    @property
    def cross_entries(self) -> int:
        """How many cross-attention layers hold cached context keys and values."""
        return len(self._cross)


__all__ = ["MIN_GROWTH", "KVCache", "bucket"]
