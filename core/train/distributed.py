"""The distributed machinery the trainer uses: the process group torchrun describes, and the wrappers
(DDP, FSDP2) that average gradients over its ranks.

One process without torchrun's environment is a world of one: :func:`init_from_env` makes no process
group and :func:`wrap` only puts the model behind a :class:`LossModule`, so the single-process path runs
the same operations as before. With ``WORLD_SIZE > 1`` (``torchrun --nproc-per-node N``), every rank
joins one process group (``nccl`` on CUDA, each rank on ``cuda:LOCAL_RANK``; ``gloo`` on the CPU) and the
model is wrapped for gradient synchronisation:

* ``strategy='ddp'`` (the default): :class:`~torch.nn.parallel.DistributedDataParallel`. Frozen parts
  (``requires_grad`` off: a frozen CLIP, LM or tokenizer) hold no gradients, so DDP never syncs them.
* ``strategy='fsdp'``: FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) on every trainable
  :class:`~polymodal.nn.block.Block` (and U-Net block), bottom-up, then on the root; frozen parameters are
  ``ignored_params`` (kept whole on every rank, never gathered or reduced); bf16 mixed precision
  (reduce in fp32) when the recipe asks for bf16 (or 'auto' on CUDA), parameters offloaded to the CPU with
  ``cpu_offload``. FSDP2 changes the modules' classes in place, so the trainer shards a copy of the
  model and loads the gathered weights back into the original at the end (:func:`full_state`).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn

from polymodal.io.output import resolve_device
from polymodal.models.recipe import TrainConfig

TIMEOUT_ENV = "POLYMODAL_DIST_TIMEOUT_S"
"""Environment variable: seconds a collective may wait for the other ranks before the run fails (1800)."""

TORCHRUN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
)
"""The environment torchrun gives each worker (with the ``TORCHELASTIC_*`` variables): what a process of
its own must not inherit to be a world of one."""


@attrs.frozen
class DistributedContext:
    """Where this process stands in the run: its ``rank`` of ``world_size``, its ``local_rank`` on the
    machine, the ``device`` it trains on and the process group's ``backend`` (None: one process, no group)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False
    """Whether :func:`init_from_env` made the process group (and so :func:`shutdown` destroys it)."""

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the rank that writes model folders, logs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains (a process group with world size > 1)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a whole number, got {value!r}") from None


def timeout() -> timedelta:
    """How long a collective waits for the other ranks: ``POLYMODAL_DIST_TIMEOUT_S`` seconds (default 1800)."""
    value = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds above 0, got {value!r}")
    return timedelta(seconds=seconds)


def init_from_env(device: str = "cpu") -> DistributedContext:
    """This process's :class:`DistributedContext` from torchrun's environment.

    With ``WORLD_SIZE > 1`` (and ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set by torchrun)
    it joins the process group (``nccl`` and ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else ``gloo``),
    with the timeout of :func:`timeout`; a group already initialised (by the caller) is used as it is.
    Without that environment it is a world of one on ``device`` and makes no group. An unavailable
    ``device`` is a ValueError.
    """
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
        return DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), dev, dist.get_backend())
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistributedContext(device=dev)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} needs cuda:{local_rank}, but this machine has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    extra: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout(), **extra)
    return DistributedContext(rank, local_rank, world, dev, backend, owns_group=True)


def shutdown(ctx: DistributedContext, *, wait: bool = True) -> None:
    """Destroy the process group if :func:`init_from_env` made it (a caller's own group is left alone).

    With ``wait`` every rank first meets at a barrier, which also waits for this rank's pending work: a
    gloo group torn down while a peer still talks to it can abort the process ("terminate called without
    an active exception"). A rank that failed passes ``wait=False`` and leaves at once.

    First the garbage the run left is collected while the group still lives: FSDP2's sharded copy and its
    optimiser state sit in reference cycles that hold the group's device mesh, and freed only at interpreter
    exit they would tear gloo's threads down after the group is gone (the same abort, seen under load)."""
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        gc.collect()
        if wait:
            barrier(ctx)
        dist.destroy_process_group()


@contextmanager
def joined(ctx: DistributedContext | None, device: str = "cpu") -> Iterator[DistributedContext]:
    """``ctx``, or this process's :func:`init_from_env` context, left at the end when made here: after a
    barrier when the body finished (:func:`shutdown`), at once when it raised (``wait=False``: no barrier a
    failed rank's peers could match by mistake; they time out on their next collective instead)."""
    own = ctx is None
    ctx = init_from_env(device) if own else ctx
    try:
        yield ctx
    except BaseException:
        if own:
            shutdown(ctx, wait=False)
        raise
    if own:
        shutdown(ctx)


def barrier(ctx: DistributedContext) -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index or 0])
        else:
            dist.barrier()


class LossModule(nn.Module):
    """The module DDP and FSDP wrap: its ``forward(batch)`` is ``model.loss(batch)``, so their hooks
    (gradient sync, parameter gathering) run around the loss (``model.loss`` alone bypasses ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """``model.loss(batch)``: ``(loss, metrics)``."""
        return self.model.loss(batch)


def strategy(cfg: TrainConfig, ctx: DistributedContext) -> str:
    """The strategy this run uses: 'none' in one process, else ``cfg.strategy`` ('auto' → 'ddp')."""
    if not ctx.distributed:
        return "none"
    return "ddp" if cfg.strategy == "auto" else cfg.strategy


def _frozen(module: nn.Module) -> set[nn.Parameter]:
    return {p for p in module.parameters() if not p.requires_grad}


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards on their own, bottom-up (children before parents): every core Block and
    U-Net block that holds a trainable parameter."""
    from polymodal.nn.block import Block

    kinds: tuple[type, ...] = (Block,)
    try:
        from polymodal.nn import unet

        kinds += tuple(
            getattr(unet, n) for n in ("ResBlock", "SelfAttention2d", "CrossAttention2d") if hasattr(unet, n)
        )
    except ImportError:  # pragma: no cover - the U-Net is part of the core
        pass
    units = [m for m in model.modules() if isinstance(m, kinds) and any(p.requires_grad for p in m.parameters())]
    return units[::-1]  # modules() is pre-order: reversed, every child comes before its parent


def wrap(model: nn.Module, cfg: TrainConfig, ctx: DistributedContext) -> nn.Module:
    """``model`` behind a :class:`LossModule`, then DDP or FSDP2 as :func:`strategy` says.

    In one process the LossModule alone. FSDP2 shards ``model`` in place (its classes change): give it a
    copy when the original must stay a plain module. Frozen parameters are never synchronised.
    """
    how = strategy(cfg, ctx)
    module = LossModule(model)
    if how == "none":
        return module
    if how == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
    kwargs: dict[str, Any] = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    # fully_shard cannot shard a 0-dim parameter (CLIP's logit scale): it stays whole on every rank and its
    # gradient is averaged by reduce_replicated, as DDP would
    replicated = [p for p in module.parameters() if p.requires_grad and p.ndim == 0]
    scalars = set(replicated)
    for unit in _shard_units(model):
        fully_shard(unit, ignored_params=(_frozen(unit) | (scalars & set(unit.parameters()))) or None, **kwargs)
    fully_shard(module, ignored_params=(_frozen(module) | scalars) or None, **kwargs)
    module.replicated = replicated
    return module


def reduce_replicated(module: nn.Module, ctx: DistributedContext) -> None:
    """Average over the ranks the gradients of the trainable parameters FSDP2 leaves whole (0-dim ones);
    call it after the last micro-batch's backward. Nothing for DDP or one process."""
    params = [p for p in getattr(module, "replicated", ()) if p.grad is not None]
    if not params or not ctx.distributed:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


def full_state(model: nn.Module, ctx: DistributedContext, *, main_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP-sharded ``model``; a collective every rank calls.

    ``main_only``: gathered to rank 0 only, on the CPU (the other ranks get ``{}``); else every rank
    gets every tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=main_only)
    return get_model_state_dict(model, options=options)


def sync_gradients(module: nn.Module, sync: bool) -> Any:
    """A context in which backward does (``sync``) or does not reduce gradients over the ranks: DDP's
    ``no_sync()`` for the micro-batches before the last; FSDP2's ``set_requires_gradient_sync``."""
    from contextlib import nullcontext

    if isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else module.no_sync()
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(sync)
    return nullcontext()


def launch(args: list[str], nproc: int) -> None:
    """Run ``python ARGS`` as ``nproc`` processes of one machine under torchrun's agent (what
    ``torchrun --standalone --nproc-per-node NPROC ARGS`` does: c10d rendezvous on a free local port, no
    restarts). Returns when every process has exited 0; if any fails, the agent stops the others and a
    RuntimeError names the failed rank(s), their exit code (or signal) and the first failure."""
    import signal
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a whole number >= 1, got {nproc!r}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as exc:

        def order(item: tuple[int, Any]) -> tuple[int, int]:  # the cause first: a kill, an error, then the
            code = item[1].exitcode  # ranks the agent stopped (SIGTERM) because of it
            return (2 if code == -signal.SIGTERM else 0 if code < 0 else 1), item[0]

        failed = []
        for rank, failure in sorted(exc.failures.items(), key=order):
            code = failure.exitcode
            how = f"killed by {failure.signal_name()}" if code < 0 else f"exit code {code}"
            failed.append(f"rank {rank} ({how})")
        raise RuntimeError(
            f"the run on {nproc} processes failed: {', '.join(failed)}; the other ranks were stopped "
            "(a rank's own error is printed above; what was already saved is whole: --resume continues it)"
        ) from None


__all__ = [
    "TIMEOUT_ENV",
    "TORCHRUN_ENV",
    "DistributedContext",
    "LossModule",
    "barrier",
    "full_state",
    "init_from_env",
    "joined",
    "launch",
    "reduce_replicated",
    "shutdown",
    "strategy",
    "sync_gradients",
    "timeout",
    "wrap",
]
