"""Train/eval mode helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the ``with`` block, then give each back the mode it had.

    The mode is restored with ``module.train(mode)`` (also when the block raises), so a module
    that overrides :meth:`~torch.nn.Module.train`, e.g. a model that keeps its frozen parts in
    eval mode, keeps doing so::

        with torch.no_grad(), eval_mode(model):
            logits = model(x)
    """
    for module in modules:
        if not isinstance(module, nn.Module):
            raise ValueError(f"eval_mode expects torch.nn.Module arguments; got {type(module).__name__}")
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
