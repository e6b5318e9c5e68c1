"""Inference options a user can turn on: reduced-precision weights (``dtype``) and compiled compute (``compile``).

``prepare_inference(model, dtype="bf16", compile=True)`` (what ``polymodal.load(DIR, dtype=..., compile=...)``
and the CLI's ``--dtype`` / ``--compile`` call) changes a model in place for inference:

* **dtype** casts every floating parameter and buffer to that dtype, so matmuls really run in it (no autocast:
  on this CPU bf16 matmuls run about 4× faster than fp32 ones). Callers keep passing float32 inputs (images,
  noise, embeddings): every module that owns weights gets a forward pre-hook that casts its floating inputs
  to its weights' dtype, so a family's own fp32 tensors (sampler state, schedules, sinusoids) meet its bf16
  layers without any change to the family. Buffers whose precision is part of the function stay as they are:
  integer tables and masks (never cast), VQ codebooks with their EMA statistics (``*codebook.*``: nearest-code
  search must not change), colour palettes (``palette``: pixel ↔ token quantisation), the audio mel filterbank
  (``filterbank``: the fp32 preprocessing of a waveform), and what a model lists in ``inference_keep_fp32``
  (buffer-name patterns). A part holding such a buffer (DALL·E's and RuDolph's VQ-VAE tokenizer) stays fp32
  whole, so images become exactly the tokens the model was trained on. Outputs come back in the compute
  dtype (or in fp32 where a family mixes in fp32 tensors).
* **compile** sets ``model.compile_inference = True`` (the core :class:`~polymodal.generation.decoder.CausalDecoder`
  reads it to compile its static, preallocated-cache decoding step) and compiles the model's uncached compute:
  every outermost :class:`~polymodal.nn.stack.TransformerStack` and :class:`~polymodal.nn.unet.UNet` (or, in a
  model that has neither, the model's ``forward``) with ``torch.compile(dynamic=False)``. A call with a KV cache
  (incremental decoding) runs eagerly, as does a call made while something else is being compiled, so
  decoding never recompiles per token; repeated calls of one shape reuse one graph. State-dict keys do not
  change.

Training paths are unaffected: a model is changed only when this is called, and it is put in eval mode.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from polymodal.nn import TransformerStack, UNet

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
"""The dtype names :func:`parse_dtype` accepts."""

DTYPE_CHOICES = ("fp32", "bf16", "fp16")
"""The short names the CLI offers (``--dtype``)."""

KEEP_FP32 = ("*codebook.*", "palette", "*.palette", "filterbank", "*.filterbank")
"""Buffer-name patterns (fnmatch, on names relative to the model) never cast: precision they carry is part of
the function (VQ codebooks and their EMA statistics, colour palettes, the audio mel filterbank that turns an
fp32 waveform into the spectrogram). A model adds its own with a class
attribute ``inference_keep_fp32``."""

_HOOKS = "_inference_hooks"

M = TypeVar("M", bound=nn.Module)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``, one of those
    torch dtypes, or None (no change) → the torch dtype (or None); anything else is a ValueError naming the
    choices."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(
        f"dtype must be one of {', '.join(DTYPES)} (or torch.float32/bfloat16/float16, or None); got {dtype!r}"
    )


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with floating tensors (also inside a list or tuple) cast to ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return (
            type(value)(_cast(v, dtype) for v in value)
            if isinstance(value, list)
            else tuple(_cast(v, dtype) for v in value)
        )
    return value


def _input_caster(dtype: torch.dtype) -> Callable[..., Any]:
    """A forward pre-hook (with kwargs) casting a module's floating inputs to ``dtype``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(_cast(a, dtype) for a in args), {k: _cast(v, dtype) for k, v in kwargs.items()}

    return hook


def kept_in_fp32(model: nn.Module) -> tuple[set[str], set[str]]:
    """What :func:`cast_model` leaves as it is: ``(buffers, parts)``, the names (relative to ``model``) of the
    floating buffers matching :data:`KEEP_FP32` or the model's ``inference_keep_fp32``, and of the parts (model
    submodules that are themselves :class:`~polymodal.models.PolymodalModel` instances, e.g. DALL·E's and RuDolph's
    VQ-VAE tokenizer) holding such a buffer: a part whose function rests on an fp32 lookup stays fp32 whole,
    so it gives exactly the tokens the model was trained on (its layers then cast their inputs to fp32). The parts
    also hold the submodules matching the model's ``inference_fp32_modules`` (fnmatch patterns on module names):
    the layers in front of a model's own codebook (MoVQ's encoder), whose bf16 rounding would flip codes."""
    from polymodal.models.base import PolymodalModel

    patterns = (*KEEP_FP32, *getattr(model, "inference_keep_fp32", ()))
    buffers = {
        name
        for name, buf in model.named_buffers()
        if buf.is_floating_point() and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }
    parts = {
        name
        for name, module in model.named_modules()
        if name and isinstance(module, PolymodalModel) and any(b.startswith(name + ".") for b in buffers)
    }
    own = getattr(model, "inference_fp32_modules", ())  # a model's own modules whose precision is its function
    parts |= {name for name, _ in model.named_modules() if name and any(fnmatch.fnmatchcase(name, p) for p in own)}
    return buffers, parts


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating weights and buffers to ``dtype`` in place, but for what
    :func:`kept_in_fp32` names, and hook every module owning floating weights so its floating inputs are cast
    to its weights' dtype (removing the hooks of an earlier call; none are added when everything is fp32)."""
    buffers, parts = kept_in_fp32(model)
    for handle in model.__dict__.pop(_HOOKS, []):
        handle.remove()
    kept = [m for name, m in model.named_modules() if name in parts]
    skip = {id(m) for part in kept for m in part.modules()}
    for prefix, module in model.named_modules():
        if id(module) in skip:
            continue
        for p in module._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # the same Parameter object: tied weights stay tied
        for name, buf in module._buffers.items():
            full = f"{prefix}.{name}" if prefix else name
            if buf is not None and buf.is_floating_point() and full not in buffers:
                module._buffers[name] = buf.to(dtype)
    handles = []
    if dtype != torch.float32:
        # a stack's blocks only ever see what the stack passes them: one hook on the stack casts its inputs
        # (x, context, …) and its blocks run unhooked (a hook per layer costs ~10 µs of Python per call)
        stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
        inner = {id(m) for stack in stacks for m in stack.blocks.modules()}
        for module in model.modules():
            if id(module) in inner:
                continue
            own = next((p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()), None)
            if own is None and isinstance(module, TransformerStack):
                own = next((p.dtype for p in module.blocks.parameters() if p.is_floating_point()), None)
            if own is not None:
                handles.append(module.register_forward_pre_hook(_input_caster(own), with_kwargs=True))
    model.__dict__[_HOOKS] = handles


class CompiledForward:
    """What a compiled module's ``forward`` becomes: the ``torch.compile(dynamic=False)``'d forward for
    uncached calls, the eager one for calls with a KV cache (``cache=``) or made while dynamo is tracing
    (an enclosing compiled function inlines the eager code)."""

    def __init__(self, eager: Callable[..., Any]) -> None:
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledForward:
        """A deep-copied module gets a compiled forward of its own (the eager method rebound to the copy)."""
        return CompiledForward(copy.deepcopy(self.eager, memo))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache") is not None or torch.compiler.is_compiling():
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)


def _compile_targets(model: nn.Module) -> list[nn.Module]:
    """The outermost TransformerStacks and UNets in ``model`` (the model itself when it has none)."""
    kinds = (TransformerStack, UNet)
    targets: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, kinds):
            targets.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return targets or [model]


def compile_model(model: nn.Module) -> list[nn.Module]:
    """Compile ``model``'s uncached compute in place (see the module docs); returns the modules compiled.
    Calling it again leaves already compiled modules as they are."""
    targets = _compile_targets(model)
    for module in targets:
        if not isinstance(module.__dict__.get("forward"), CompiledForward):
            module.forward = CompiledForward(module.forward)
    return targets


def prepare_inference(model: M, dtype: str | torch.dtype | None = None, compile: bool = False) -> M:
    """Prepare ``model`` for inference, in place, and return it: eval mode, weights in ``dtype``
    (:func:`parse_dtype`; None keeps them) with inputs cast by hooks, and with ``compile`` the uncached compute
    compiled (``torch.compile(dynamic=False)``). Sets ``model.inference_dtype`` (the dtype of most floating weights)
    and ``model.compile_inference`` (True once compiled). Example::

        model = prepare_inference(polymodal.load("runs/vit"), dtype="bf16", compile=True)
    """
    target = parse_dtype(dtype)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False; got {compile!r}")
    model.eval()
    if target is not None:
        cast_model(model, target)
    sizes: dict[torch.dtype, int] = {}  # the dtype most floating weights have (parts may stay fp32)
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    model.inference_dtype = max(sizes, key=sizes.__getitem__) if sizes else torch.float32
    if compile:
        compile_model(model)
    model.compile_inference = bool(compile or getattr(model, "compile_inference", False))
    return model


def inference_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Click decorator: ``--dtype {fp32,bf16,fp16}`` and ``--compile`` on a command that loads a model, passed
    as ``dtype`` (a str, or None when not given) and ``compile_`` (a bool); give them to
    ``polymodal.load(DIR, dtype=dtype, compile=compile_)``. A bad ``--dtype`` is a usage error naming the
    choices. (Here rather than in :mod:`polymodal.cli` so that a plugin's command module can use it without
    importing the CLI.)"""
    import click

    command = click.option(
        "--compile",
        "compile_",
        is_flag=True,
        help="Compile the model's uncached compute (and its decoding step) with torch.compile: a slow first "
        "call, then faster calls of the same shape.",
    )(command)
    return click.option(
        "--dtype",
        type=click.Choice(DTYPE_CHOICES, case_sensitive=False),
        default=None,
        help="Run the model in this dtype (weights cast; default: as saved). bf16 is several times faster on "
        "CPUs with bf16 matmuls, at a small accuracy change.",
    )(command)


__all__ = [
    "DTYPES",
    "DTYPE_CHOICES",
    "KEEP_FP32",
    "CompiledForward",
    "cast_model",
    "compile_model",
    "inference_options",
    "kept_in_fp32",
    "parse_dtype",
    "prepare_inference",
]
