"""Collectives a model's loss may need when training runs on several processes (ranks).

Every function here is the identity (or the plain local value) when ``torch.distributed`` is not
initialised or the world has one process, so a loss written with them runs unchanged in one process.

With a process group (gloo on CPU, nccl on CUDA) every rank must call the same collectives in the
same order with tensors of the same shape and dtype (the global batch is split evenly over ranks).
The differentiable ones (:func:`gather_with_grad`, :func:`all_reduce_sum_with_grad`) are built on
PyTorch's functional collectives, whose autograd formulas are the adjoints of the forward
collective: a loss computed on every rank from gathered or summed values back-propagates into each
rank's own inputs the gradient of the **sum over ranks** of the losses. Data parallelism (DDP,
FSDP) then averages the parameter gradients over ranks, so the result is the gradient of the mean
of the ranks' losses: what one process gets on the global batch (open_clip's "local loss + gather
with grad").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_mean",
    "all_reduce_sum_",
    "all_reduce_sum_with_grad",
    "gather",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "share_of_global_mean",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def _functional():
    """``torch.distributed._functional_collectives`` (imported lazily: it is only needed with a group)."""
    import torch.distributed._functional_collectives as fc

    return fc


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} expects a tensor with a batch dimension (B_local, ...); got {got}")


def _all_gather(x: Tensor) -> Tensor:
    """All-gather along dim 0 through the functional collective (autograd: reduce-scatter of the sum)."""
    fc = _functional()
    out = fc.all_gather_single(x.contiguous(), 0, dist.group.WORLD)  # (W·B, ...)
    return fc.wait_tensor(out)


def gather_with_grad(x: Tensor) -> Tensor:
    """``(B_local, ...) → (W·B_local, ...)``: every rank's ``x`` concatenated in rank order, with gradients.

    The backward pass sums over ranks the gradients with respect to each slice and gives every
    rank the sum for its own slice (a reduce-scatter), so the gathered features of other ranks
    train their owners. Every rank must pass the same shape. Identity in one process.
    """
    _check_batch(x, "gather_with_grad")
    if not is_distributed():
        return x
    return _all_gather(x)  # (W·B, ...)


def gather(x: Tensor) -> Tensor:
    """``(B_local, ...) → (W·B_local, ...)`` in rank order, without gradients (labels, keys, positives).

    Bool tensors are gathered as bytes and come back as bool. Identity (detached) in one process.
    """
    _check_batch(x, "gather")
    x = x.detach()
    if not is_distributed():
        return x
    if x.dtype == torch.bool:
        return _all_gather(x.to(torch.uint8)).bool()  # (W·B, ...)
    return _all_gather(x)  # (W·B, ...)


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """The sum of ``x`` over ranks (a new tensor), differentiable: the backward pass sums the
    gradients over ranks too (the adjoint of a sum that every rank receives). Identity in one process."""
    if not is_distributed():
        return x
    fc = _functional()
    return fc.wait_tensor(fc.all_reduce(x.contiguous(), "sum", dist.group.WORLD))


def share_of_global_mean(total: Tensor, count: Tensor) -> Tensor:
    """This rank's share of a mean over the global batch: ``total / mean over ranks of count``.

    For a loss normalised by a count that varies between ranks (tokens that are not padding):
    with ``total`` this rank's sum of per-item losses and ``count`` its number of items, the
    mean over ranks of the results (what data parallelism's gradient averaging optimises) is
    ``Σ total / Σ count``, the mean one process takes over the global batch; a rank-local
    ``total / count`` is not. ``total`` keeps its gradient; ``count`` has none. In one process:
    ``total / count`` (a zero count counts as one).
    """
    if not isinstance(count, Tensor):
        raise ValueError(f"share_of_global_mean expects count as a tensor; got {type(count).__name__}")
    count = count.detach().to(total.dtype if total.is_floating_point() else torch.float32)
    return total / all_reduce_mean(count).clamp(min=1)


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over ranks as a new tensor, without gradients; identity in one process.

    Floating tensors only (an integer mean would truncate): ValueError otherwise.
    """
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"all_reduce_mean expects a floating-point tensor; got {got}")
    if not is_distributed():
        return x
    out = x.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


def all_reduce_sum_(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks in place (no gradient) and return it; unchanged in one process."""
    if not isinstance(x, Tensor):
        raise ValueError(f"all_reduce_sum_ expects a tensor; got {type(x).__name__}")
    if is_distributed():
        if not x.is_contiguous():
            raise ValueError(f"all_reduce_sum_ works in place on a contiguous tensor; got strides {x.stride()}")
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
