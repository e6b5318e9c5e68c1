"""Attention backends. ``math`` is the readable reference; the others are fused kernels.

Each backend says what it supports (``supports`` returns ``None`` or the reason it
cannot run a call) and computes exactly the function ``math`` computes.
"""

from __future__ import annotations

import math as _math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.attention.masks import AttentionSpec, as_additive, combine, rows_with_keys


class Backend:
    """Base class: a named attention implementation with a support check."""

    name = "base"
    priority = 0  # ``auto`` tries supporting backends from the highest priority down
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    mask_kinds: tuple[str, ...] = ("none", "causal", "padding", "block", "bool", "additive")
    trains = True
    auto_devices: tuple[str, ...] = ("cpu", "cuda")  # where ``auto`` may pick it

    def available(self) -> str | None:
        """``None`` when usable in this process, else why not (e.g. a missing package)."""
        return None

    def supports(self, spec: AttentionSpec) -> str | None:
        """``None`` when this backend can run the call, else the reason it cannot."""
        why = self.available()
        if why:
            return why
        if spec.device not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {spec.device}"
        if spec.dtype not in self.dtypes:
            return f"{self.name} does not support dtype {spec.dtype}"
        if spec.grad and not self.trains:
            return f"{self.name} is inference-only"
        missing = [k for k in spec.kinds if k not in self.mask_kinds]
        if missing:
            return f"{self.name} does not support {', '.join(missing)} masks"
        return None

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        key_padding: Tensor | None,
        seqlens: Sequence[int] | None,
        mask: Tensor | None,
        dropout_p: float,
        scale: float | None,
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention backend {self.name}>"


class MathBackend(Backend):
    """The reference: explicit scores, mask, softmax and weighted sum. Always available."""

    name = "math"
    priority = 0

    def __call__(self, q, k, v, *, causal, key_padding, seqlens, mask, dropout_p, scale):
        nq, nk = q.shape[-2], k.shape[-2]
        scale = 1.0 / _math.sqrt(q.shape[-1]) if scale is None else scale
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
        full = combine(nq, nk, causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask, device=q.device)
        keep = None
        if full is not None:
            keep = rows_with_keys(full)  # (B?, H?, Nq)
            if full.dtype == torch.bool:
                scores = scores.masked_fill(~full, float("-inf"))
            else:
                scores = scores + full.to(scores.dtype)
            # A row with no visible key would softmax to NaN; give it zero weights instead.
            scores = scores.masked_fill(~keep.unsqueeze(-1), 0.0)
        probs = scores.softmax(dim=-1)  # (B, H, Nq, Nk)
        if keep is not None:
            probs = probs * keep.unsqueeze(-1).to(probs.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        return probs @ v  # (B, H, Nq, D)


WIDEN_MIN_SCORES = 768
"""A single reduced-precision query on the CPU runs in float32 when its scores (batch × heads × keys) number at
least this (see :func:`widen_on_cpu`; below it the casts cost more than they save)."""


def widen_on_cpu(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether an ``sdpa`` call runs in float32 and casts back: one bfloat16 / float16 query (a decoding step) on
    the CPU with at least :data:`WIDEN_MIN_SCORES` scores, without gradients or dropout. torch's CPU kernel for
    that shape is up to 3x slower in bfloat16 than in float32 plus the casts (AMD EPYC Zen 4, 2 threads: 12 heads
    over 64 keys 61 vs 40 us, 8 heads over 320 keys 157 vs 99 us, batch 4 × 12 heads over 48 keys 241 vs 87 us);
    the float32 result is the closer one to the exact function."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-2] == 1
        and k.shape[0] * k.shape[1] * k.shape[-2] >= WIDEN_MIN_SCORES
        and dropout_p == 0.0
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    )


class SDPABackend(Backend):
    """torch ``scaled_dot_product_attention``; causal goes through ``is_causal``, not a mask."""

    name = "sdpa"
    priority = 30

    def __call__(self, q, k, v, *, causal, key_padding, seqlens, mask, dropout_p, scale):
        nq, nk = q.shape[-2], k.shape[-2]
        if widen_on_cpu(q, k, v, dropout_p):  # a decoding step in bf16/fp16: the float32 kernel is faster
            mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
            kw = dict(causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask, dropout_p=0.0, scale=scale)
            return self(q.float(), k.float(), v.float(), **kw).to(q.dtype)  # (B, H, 1, D)
        if key_padding is None and seqlens is None and mask is None:
            # Causal with Nq == Nk is the kernel's own is_causal; a single query after a
            # cache sees every key, so it needs no mask at all.
            if not causal or nq == 1:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
            if nq == nk:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        full = combine(nq, nk, causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask, device=q.device)
        if full.dtype != torch.bool:
            full = full.to(q.dtype)
        keep = rows_with_keys(full)  # (B?, H?, Nq)
        # On the CPU, checking is free and saves work; on a GPU ``bool(...)`` would stall the
        # stream on every call, and compiled code would break its graph here, so there the guarded
        # path always runs (same result).
        if q.device.type == "cpu" and not torch.compiler.is_compiling() and bool(keep.all()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=dropout_p, scale=scale)
        # Rows with no visible key: let them attend anywhere, then zero their output.
        if full.dtype == torch.bool:
            full = full | ~keep.unsqueeze(-1)
        else:
            full = full.masked_fill(~keep.unsqueeze(-1), 0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=dropout_p, scale=scale)
        return out * keep.unsqueeze(-1).to(out.dtype)  # (B, H, Nq, D)


class XFormersBackend(Backend):
    """xformers ``memory_efficient_attention`` with its attention-bias types (CUDA only)."""

    name = "xformers"
    priority = 20
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def available(self) -> str | None:
        if not torch.cuda.is_available():
            return "xformers needs CUDA, and no CUDA device is available"
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # ImportError, or a build that does not match torch
            return f"xformers is not importable: {exc}"
        return None

    def __call__(self, q, k, v, *, causal, key_padding, seqlens, mask, dropout_p, scale):
        import xformers.ops as xops
        from xformers.ops import fmha

        nq, nk = q.shape[-2], k.shape[-2]
        bias = None
        if seqlens is not None and key_padding is None and mask is None:
            bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(seqlens))
            if causal:
                bias = bias.make_causal()
        elif causal and key_padding is None and mask is None and nq <= nk:
            # (With Nq > Nk the first queries see no key: the general path zeroes them.)
            bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
        elif key_padding is not None or mask is not None or seqlens is not None or causal:
            full = combine(nq, nk, causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask, device=q.device)
            keep = rows_with_keys(full)
            additive = as_additive(full, q.dtype).masked_fill(~keep.unsqueeze(-1), 0.0)
            b, h = q.shape[0], q.shape[1]
            # xformers wants a (B, H, Nq, Nk) bias whose last dim is stored 8-aligned.
            pad = (-nk) % 8
            store = torch.zeros(b, h, nq, nk + pad, dtype=q.dtype, device=q.device)
            store[..., :nk] = additive.expand(b, h, nq, nk)
            out = xops.memory_efficient_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_bias=store[..., :nk],
                p=dropout_p,
                scale=scale,
            ).transpose(1, 2)  # (B, H, Nq, D)
            return out * keep.unsqueeze(-1).to(out.dtype)
        out = xops.memory_efficient_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),  # (B, N, H, D)
            attn_bias=bias,
            p=dropout_p,
            scale=scale,
        )
        return out.transpose(1, 2)  # (B, H, Nq, D)


class FlexBackend(Backend):
    """torch flex attention with a block mask built from mask functions.

    Fast when compiled on CUDA; on the CPU it runs eagerly (correct, slow), so ``auto``
    picks it only on CUDA. No dropout; no backward on the CPU.
    """

    name = "flex"
    priority = 10
    auto_devices = ("cuda",)

    def available(self) -> str | None:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except Exception as exc:
            return f"flex attention is not available in this torch: {exc}"
        return None

    def supports(self, spec: AttentionSpec) -> str | None:
        why = super().supports(spec)
        if why:
            return why
        if spec.dropout:
            return "flex does not support attention dropout"
        if spec.device != "cuda" and spec.dtype not in (torch.float32, torch.float64):
            return "flex on the CPU supports float32 and float64 only"
        if spec.device != "cuda" and spec.grad:
            return "flex has no backward pass on the CPU (inference only there)"
        return None

    def __call__(self, q, k, v, *, causal, key_padding, seqlens, mask, dropout_p, scale):
        from torch.nn.attention.flex_attention import flex_attention

        nq, nk = q.shape[-2], k.shape[-2]
        full = combine(nq, nk, causal=causal, key_padding=key_padding, seqlens=seqlens, mask=mask, device=q.device)
        if full is None:
            return flex_attention(q, k, v, scale=scale)
        b, h = q.shape[0], q.shape[1]
        full = full.expand(b, h, nq, nk)
        keep = rows_with_keys(full)  # (B, H, Nq)
        if full.dtype == torch.bool:
            allowed = full | ~keep.unsqueeze(-1)
            bias = torch.zeros((), dtype=q.dtype, device=q.device)

            def score_mod(score, bi, hi, qi, ki):
                return torch.where(allowed[bi, hi, qi, ki], score, float("-inf"))
        else:
            bias = full.to(q.dtype).masked_fill(~keep.unsqueeze(-1), 0.0)

            def score_mod(score, bi, hi, qi, ki):
                return score + bias[bi, hi, qi, ki]

        out = flex_attention(q, k, v, score_mod=score_mod, scale=scale)
        return out * keep.unsqueeze(-1).to(out.dtype)  # (B, H, Nq, D)


BUILTIN_BACKENDS: tuple[Backend, ...] = (MathBackend(), SDPABackend(), XFormersBackend(), FlexBackend())
"""The backends the core plugin registers."""
