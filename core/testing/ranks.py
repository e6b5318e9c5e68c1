"""Run a function on several gloo processes and collect what each rank returns: how a loss, a wrapper or a
checkpoint is tested against one process on this CPU (the core's distributed tests use it; so can a plugin's).

    def step(rank: int, world: int) -> dict:          # a module-level function (it is sent to the ranks)
        loss = my_loss(local_slice(batch, rank, world), gather=True)
        loss.backward()
        return {"loss": loss.detach(), "grad": model.weight.grad}

    ranks = run_ranks(step, world=2)                  # [rank 0's dict, rank 1's dict]
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's or a rendezvous's address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 60.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes joined in one gloo process group on 127.0.0.1 (one
    torch thread each); the ranks' return values, in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function: the ranks are spawned). A rank that
    raises fails the call with its traceback; past ``timeout`` seconds every rank is killed and a
    TimeoutError says so, so a test never hangs. The results travel through files this call writes in
    its own temporary folder, read back with ``weights_only=True`` (nothing is unpickled): return tensors,
    numbers, strings and dicts, lists or tuples of them.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"run_ranks: world must be a whole number >= 1, got {world!r}")
    with tempfile.TemporaryDirectory(prefix="polymodal-ranks-") as out:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ctx = mp.start_processes(
            _entry, args=(fn, world, free_port(), out, timeout, args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish within {timeout} s")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]


__all__ = ["free_port", "run_ranks"]
