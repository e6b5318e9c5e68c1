"""``--compile``: the loss computation through ``torch.compile``, compiled once for the trainer's one shape.

The trainer's steps all have one batch shape, so the module is compiled with ``dynamic=False`` and is
never recompiled across steps (``tests/test_compile.py`` counts the compiles). The module is compiled in
place (``nn.Module.compile``): its ``state_dict`` keys stay as they were (no ``_orig_mod.`` prefix), so
checkpoints and model folders do not depend on whether a run compiled. Before compiling, a one-line probe
runs the backend, so a machine that cannot compile (inductor without a C++ compiler or the Python
headers, a Python that torch.compile does not support) fails at once with a :class:`CompileError` saying
so, not in the middle of the first step.

What recompiles: a Python number that changes every step and is read inside the compiled ``forward``
(a schedule kept as a float attribute) is a guard that fails at every step; keep such values in tensors
(buffers) for ``--compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DEFAULT_BACKEND = "inductor"
"""torch.compile's default backend (generated C++/Triton kernels)."""


class CompileError(RuntimeError):
    """``torch.compile`` cannot compile on this machine; the message names the backend and why."""


def check_compile(backend: str | Callable = DEFAULT_BACKEND, device: str | torch.device = "cpu") -> None:
    """Compile and run a one-line function with ``backend`` on ``device``; a :class:`CompileError` when it
    fails (no C++ compiler, no Python headers, an unsupported Python or platform)."""
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))

    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2.0 + 1.0  # (4,)

    try:
        compiled = torch.compile(probe, backend=backend, dynamic=False)
        out = compiled(torch.ones(4, device=device))  # (4,)
        expected = probe(torch.ones(4, device=device))  # (4,)
        if not torch.allclose(out, expected):
            raise RuntimeError(f"the compiled probe computed {out.tolist()}, expected {expected.tolist()}")
    except Exception as exc:  # noqa: BLE001 - any failure of the backend is the same answer to the user
        cause = exc
        for _ in range(8):  # dynamo wraps the backend's own error
            inner = getattr(cause, "inner_exception", None) or cause.__cause__
            if not isinstance(inner, BaseException):
                break
            cause = inner
        text = str(cause).strip()
        first = f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__
        hint = (
            "inductor needs a working C++ compiler (g++ or clang) and the Python development headers on CPU, "
            "Triton on CUDA"
            if name == "inductor"
            else "check that the backend is installed"
        )
        raise CompileError(
            f"--compile: torch.compile with the {name!r} backend cannot compile on {device} here "
            f"({first}); {hint}, or train without --compile"
        ) from exc


def compile_loss(
    module: nn.Module,
    *,
    backend: str | Callable = DEFAULT_BACKEND,
    device: str | torch.device | None = None,
    check: bool = True,
    **options: Any,
) -> nn.Module:
    """Compile ``module`` (the module whose ``forward(batch)`` returns ``(loss, metrics)``) in place with
    ``torch.compile(dynamic=False, backend=backend)`` and return it (the same object).

    ``check`` first runs :func:`check_compile` on ``device`` (default: the device of the module's first
    parameter), so a machine that cannot compile raises a :class:`CompileError` now. ``options`` go to
    ``torch.compile`` (``mode="max-autotune"``, ``fullgraph=True`` …). Compiling happens at the first call
    and once per distinct graph (a ``.item()`` in ``forward`` breaks it in two); a step with the same shapes
    never recompiles.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"compile_loss expects an nn.Module, got {type(module).__name__}")
    if "dynamic" in options:
        raise ValueError(f"compile_loss always compiles with dynamic=False; got dynamic={options['dynamic']!r}")
    if check:
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else "cpu"
        check_compile(backend, device)
    module.compile(backend=backend, dynamic=False, **options)
    return module


__all__ = ["DEFAULT_BACKEND", "CompileError", "check_compile", "compile_loss"]
