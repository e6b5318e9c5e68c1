"""Linear layers for decoding steps: the faster of BLAS (``F.linear``) and oneDNN for each weight, on this machine.

A decoding step multiplies one to a few rows by every weight of the model, so it streams the weights from memory
and the kernel's memory access decides its speed. Which kernel streams faster depends on the CPU: on the AMD EPYC
of the committed benchmarks oneDNN with the weight packed in its blocked layout reads ~35 GB/s against ~22 GB/s
for the BLAS call behind ``F.linear``, and in bfloat16 (AVX512-BF16, AMD EPYC Zen 4) GPT-2's greedy decoding at
batch 4 took 538 ms against 906 ms; on an Intel Xeon, GPT-2's decoding steps were 15 % slower with it. So a
model's decoding steps run under a :class:`KernelTuner`, which times its first steps with each kernel and keeps
the faster (per batch size and thread count). ``POLYMODAL_LINEAR_KERNEL`` = ``blas`` or ``onednn`` fixes the
choice (``auto``, the default, tunes). Training never comes here: with gradients recorded, :func:`fast_linear`
is ``F.linear``.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

KERNEL_ENV = "POLYMODAL_LINEAR_KERNEL"
"""The environment variable that fixes :func:`fast_linear`'s kernel: ``auto`` (measure; default), ``blas``, ``onednn``."""

KERNELS = ("blas", "onednn")

PACK_ROWS = 16
"""Calls of at most this many rows (decoding steps) give oneDNN a copy of the weight in its blocked layout (packed
for this many rows); more rows read the live weight."""

ONE_ROW_AS = 4
"""A one-row call (batch-1 decoding) runs oneDNN's packed kernel on this many copies of its row: on the AMD EPYC
Zen 4 the few-row kernel streams the weights ~10-15 % faster than the one-row one (GPT-2-sized weights, fp32 and
bf16), and the extra rows cost arithmetic a memory-bound step has to spare."""

FAST_DTYPES = (torch.float32, torch.bfloat16)
"""The weight dtypes :func:`fast_linear` may run through oneDNN (bfloat16: ``polymodal.load(DIR, dtype="bf16")``)."""

_PACKED: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}  # id(weight) -> (weight, its key, packed copy)


def fast_linear_applies(weight: Tensor, x: Tensor | None = None) -> bool:
    """Whether :func:`fast_linear` may leave ``F.linear``: oneDNN is built in, float32 or bfloat16 weights on the
    CPU with inputs of the same dtype, and no gradient is recorded (inference only: training keeps ``F.linear``,
    so its numbers never change)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in FAST_DTYPES
        and not torch.is_grad_enabled()
        and (x is None or x.dtype == weight.dtype)
        and _ONEDNN
    )


def fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for decoding, through the kernel :func:`linear_kernel` names when
    :func:`fast_linear_applies`, ``F.linear`` otherwise. The results agree with ``F.linear``
    to float32 rounding (oneDNN sums in another order)."""
    if not fast_linear_applies(weight, x):
        return nn.functional.linear(x, weight, bias)
    if torch.compiler.is_compiling():  # an opaque call in compiled code (inductor lowers the oneDNN op only
        return torch.ops.polymodal.fast_linear(x, weight, bias)  # for frozen weights)
    return _chosen_linear(x, weight, bias)  # (..., O)


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _chosen_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if linear_kernel() == "blas":
        return nn.functional.linear(x, weight, bias)  # (..., O)
    return onednn_linear(x, weight, bias)  # (..., O)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` by oneDNN's matmul: up to :data:`PACK_ROWS` rows on a packed copy of the weight (one more copy
    of the weights in memory while decoding, see :func:`_packed`), more rows on the live weight."""
    rows = _rows(x)
    packed = _packed(weight) if rows <= PACK_ROWS else None
    if packed is not None:
        flat = x.reshape(rows, x.shape[-1])  # (rows, I)
        if rows == 1:  # oneDNN's one-row kernel streams the weight ~10 % slower than its few-row one
            flat = flat.expand(ONE_ROW_AS, -1)  # (ONE_ROW_AS, I): the same row; the others are dropped
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")[:rows]  # (rows, O)
        return out.view(*x.shape[:-1], weight.shape[0])  # (..., O)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., O)


def linear_kernel() -> str:
    """The kernel (``"blas"`` or ``"onednn"``) :func:`fast_linear` uses now: the running :class:`KernelTuner`
    step's (``POLYMODAL_LINEAR_KERNEL``'s when it names one), outside a step the variable's, else ``"blas"``."""
    return _ACTIVE[0] or _fixed_kernel() or "blas"


def _fixed_kernel() -> str | None:
    """The kernel ``POLYMODAL_LINEAR_KERNEL`` fixes, None for ``auto``; any other value raises, naming the choices."""
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode in KERNELS:
        return mode
    if mode != "auto":
        raise ValueError(f"{KERNEL_ENV} must be one of auto, {', '.join(KERNELS)}; got {mode!r}")
    return None


_ACTIVE: list[str | None] = [None]  # the kernel of the running tuned step (a list, not a ContextVar: compiled
# code reads it only inside the opaque op, at run time)


class KernelTuner:
    """Chooses a model's decoding kernel by timing whole steps, where the weights stream from memory as they do
    in generation (a kernel timed alone on one weight reads it from cache and misleads). Its first steps
    alternate the kernels (a warm-up each, then ``trials`` timed steps each); later steps use the faster.
    One choice per key (the caller's: batch rows, thread count)."""

    def __init__(self, trials: int = 2) -> None:
        self.trials = trials
        self.times: dict[tuple, dict[str, list[float]]] = {}
        self.choice: dict[tuple, str] = {}

    @contextmanager
    def step(self, key: tuple) -> Iterator[None]:
        """Runs the block (one decoding step) under this key's kernel, timing it while the choice is open."""
        key = (*key, torch.get_num_threads())
        chosen = self.choice.get(key)
        fixed = _fixed_kernel()  # read once per step, not per layer
        if chosen is not None or fixed is not None:
            with _running(fixed or chosen):
                yield
            return
        times = self.times.setdefault(key, {k: [] for k in KERNELS})
        kernel = min(KERNELS, key=lambda k: len(times[k]))  # alternate
        start = time.perf_counter()
        with _running(kernel):
            yield
        times[kernel].append(time.perf_counter() - start)
        if all(len(t) > self.trials for t in times.values()):  # the first of each is a warm-up (packing)
            self.choice[key] = min(KERNELS, key=lambda k: min(times[k][1:]))
            if self.choice[key] == "blas":
                clear_packed_weights()  # the packed copies (one more copy of the weights) are not used


@contextmanager
def _running(kernel: str | None) -> Iterator[None]:
    before, _ACTIVE[0] = _ACTIVE[0], kernel
    try:
        yield
    finally:
        _ACTIVE[0] = before


def _packed(weight: Tensor) -> Tensor | None:
    """``weight`` in oneDNN's layout for :data:`PACK_ROWS` rows, kept while the weight lives and rebuilt when its
    storage, version counter (any in-place change: an optimiser step, ``load_state_dict``) or shape changes.
    None for inference tensors (no version counter to check). Writes through ``weight.data`` bypass the version
    counter: call :func:`clear_packed_weights` after those."""
    try:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), PACK_ROWS)
    except RuntimeError:  # an inference tensor
        return None
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    if entry is None or entry[0]() is not weight:  # a new weight: forget its copy when it is freed
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    _PACKED[id(weight)] = (weakref.ref(weight), key, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS))
    return _PACKED[id(weight)][2]


def clear_packed_weights() -> None:
    """Drop every packed weight copy of oneDNN's path (they are rebuilt on the next call)."""
    _PACKED.clear()


_LIBRARY = torch.library.Library("polymodal", "FRAGMENT")  # compiled decoding steps call the chosen kernel too
_LIBRARY.define("fast_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("fast_linear", lambda x, weight, bias: _chosen_linear(x, weight, bias), "CPU")  # (..., O)


@torch.library.register_fake("polymodal::fast_linear")
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # (..., O)


def _linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    return fast_linear(x, module.weight, module.bias)  # (..., O)


@contextmanager
def fast_linears(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, the plain ``nn.Linear`` layers among ``modules`` compute through :func:`fast_linear`
    (an instance ``forward`` set for the block and removed after it; hooks still run, subclasses and
    parametrised layers are left alone)."""
    patched = [m for m in modules if type(m) is nn.Linear and "forward" not in m.__dict__]
    for m in patched:
        m.forward = _linear_forward.__get__(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


__all__ = [
    "KERNELS",
    "KERNEL_ENV",
    "PACK_ROWS",
    "clear_packed_weights",
    "fast_linear",
    "fast_linear_applies",
    "fast_linears",
    "KernelTuner",
    "linear_kernel",
    "onednn_linear",
]
