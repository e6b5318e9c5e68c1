"""One trainer for every family: AdamW, warmup + cosine, clipping, autocast, atomic checkpoints.

Resuming is exact: the checkpoint holds the weights, the optimiser state, the step and the
RNG state, and the data order is a pure function of ``(seed, epoch)``, so a resumed run
reaches the same weights as an uninterrupted one (on the CPU, bit for bit). It is also checked:
a resumed run must ask for the checkpoint's settings (family, model config, every trainer field
but ``steps``, ``checkpoint_every`` and ``log_every``); more ``steps`` extend the run, fewer steps
than the checkpoint has done are refused.

With ``ema_decay > 0`` the trainer also keeps an EMA of the trainable weights
(:class:`~polymodal.train.ema.EMAWeights`), updated after every optimiser step; the checkpoint holds
it (``checkpoint/ema.safetensors``) so a resumed run continues it exactly, and at the end the EMA
weights are loaded into the model that :func:`train` returns (and so saved and evaluated).

The same loop runs on W processes under torchrun (:mod:`polymodal.train.distributed`): ``batch_size`` is
the global batch, each rank takes its ``batch_size / W`` samples of it (in ``accumulate`` micro-batches,
each loss scaled by ``1/accumulate``) and DDP or FSDP2 average the gradients, so W processes reach the
weights one process reaches. The loss and metrics stay on the device and are reduced over the steps and
ranks only every ``log_every`` steps (the progress bar and ``train_log.jsonl``, on rank 0).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal.data.sampling import global_batches as batches
from polymodal.data.sampling import local_indices
from polymodal.io.folders import plain_metrics
from polymodal.models.base import PolymodalModel
from polymodal.models.recipe import TrainConfig
from polymodal.train.checkpoint import (
    CHECKPOINT,
    FREE_ON_RESUME,
    TrainingError,
    check_resume,
    checkpoint_meta,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from polymodal.train.compile import compile_loss
from polymodal.train.distributed import (
    DistributedContext,
    barrier,
    full_state,
    joined,
    reduce_replicated,
    strategy,
    sync_gradients,
    wrap,
)
from polymodal.train.ema import EMAWeights
from polymodal.train.log import TrainLog, progress_metrics, progress_postfix

_save_checkpoint = save_checkpoint  # the names the trainer calls them by (tests wrap them)
_load_checkpoint = load_checkpoint

__all__ = [
    "CHECKPOINT",
    "FREE_ON_RESUME",
    "TrainingError",
    "batches",
    "check_resume",
    "checkpoint_meta",
    "lr_at",
    "param_groups",
    "remove_checkpoint",
    "train",
]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``; with
    ``cfg.restarts``, the same again from each restart step, the cosine spanning its phase."""
    begin, end = 0, cfg.steps
    for restart in cfg.restarts:
        if restart <= step:
            begin = restart
        else:
            end = min(end, restart)
            break
    step, length = step - begin, end - begin
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(length - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave biases, norms, position tables and special tokens undecayed."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(s in name for s in ("pos_embed", "cls_token", "token_embed", "position"))
        (plain if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` on ``device``; a :class:`~polymodal.data.base.Batch` stays one (its missing field names the dataset)."""
    if callable(getattr(batch, "to", None)):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _micro(batch: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """A streamed rank batch, read without the family's collate, split into ``k`` micro-batches (tensors
    chunked, lists sliced alike); each is collated on its own, as the in-memory path does (a collated batch
    need not have one row per sample: a language model packs its text)."""
    if k == 1:
        return [batch]
    n = len(next(iter(batch.values())))
    size = n // k
    parts = []
    for i in range(k):
        fields = {key: v[i * size : (i + 1) * size] for key, v in batch.items()}
        parts.append(type(batch)(fields, batch.source) if hasattr(batch, "source") else fields)
    return parts


def _global_batch(cfg: TrainConfig, split: Any, ctx: DistributedContext) -> int:
    """The global batch (an in-memory split smaller than ``batch_size`` gives all of it), checked to divide
    into ``world_size`` ranks × ``accumulate`` micro-batches."""
    size = cfg.batch_size if hasattr(split, "loader") else min(cfg.batch_size, len(split))
    if size % (ctx.world_size * cfg.accumulate):
        clamp = f" (the {len(split)} training samples)" if size != cfg.batch_size else ""
        raise ValueError(
            f"batch_size={size}{clamp} must divide into world size {ctx.world_size} × accumulate={cfg.accumulate} "
            f"equal micro-batches; choose a batch_size that is a multiple of {ctx.world_size * cfg.accumulate}"
        )
    return size


class _Meter:
    """Loss and metrics summed on the device over the steps since the last log; reduced over the ranks
    (one all-reduce) and read to the host only when :meth:`read` is called."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.steps = 0

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def read(self, ctx: DistributedContext) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        packed = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32).to(ctx.device) for k in keys])
        packed = packed / self.steps
        if ctx.distributed:
            torch.distributed.all_reduce(packed)
            packed = packed / ctx.world_size
        self.sums, self.steps = {}, 0
        return dict(zip(keys, packed.tolist(), strict=True))


def _evaluate(model: nn.Module, original: nn.Module, dataset: Any, how: str, ctx: DistributedContext) -> dict:
    """Rank 0's metrics on ``dataset`` mid-run (the RNG state is kept, so training draws as without it);
    the other ranks wait at a barrier. Under FSDP the weights are gathered into ``original`` first."""
    metrics: dict[str, Any] = {}
    target = model
    if how == "fsdp":
        state = full_state(model, ctx, main_only=True)
        if ctx.is_main:
            original.load_state_dict(state)
        target = original
    if ctx.is_main:
        rng = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        target.eval()
        try:
            metrics = target.evaluate(dataset)
        finally:
            target.train()
            torch.set_rng_state(rng)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
    barrier(ctx)
    return {f"eval/{k}": float(v) for k, v in plain_metrics(metrics).items() if isinstance(v, (int, float))}


def train(
    model: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    name: str | None = None,
    ctx: DistributedContext | None = None,
) -> nn.Module:
    """Train ``model`` on ``dataset.train`` for ``cfg.steps`` steps; returns the model.

    With ``out``, checkpoints go to ``out/checkpoint`` every ``cfg.checkpoint_every`` steps and at
    the end; ``resume`` continues from there. ``stop_after`` ends early after that many steps
    (for tests of interrupted runs). A non-finite loss raises :class:`TrainingError` naming the step.
    ``resume`` checks the checkpoint against this run first (:func:`check_resume`); an unavailable
    ``device`` is a ValueError before any work. ``name`` is what the progress bar calls the run
    (``train dino-shapes``; default: the model's family). With ``cfg.ema_decay > 0`` the returned
    model holds the EMA weights (the checkpoint keeps the raw ones and the EMA, to resume from).

    ``ctx`` is the process's place in a distributed run (default: :func:`init_from_env`, which joins
    torchrun's process group, and leaves it at the end). Each of the W ranks trains on its slice of every
    global batch of ``cfg.batch_size`` samples, in ``cfg.accumulate`` micro-batches, the model wrapped as
    ``cfg.strategy`` says (:func:`~polymodal.train.distributed.wrap`); every rank gets the same trained,
    plain model back. Only rank 0 shows progress, logs and evaluates (``cfg.eval_every``). A batch that
    does not divide into W × accumulate is a ValueError.
    """
    with joined(ctx, device) as ctx:
        return _train(model, dataset, cfg, out, ctx, resume, progress, stop_after, on_step, name)


def _train(
    model: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    out: str | Path | None,
    ctx: DistributedContext,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    on_step: Callable[[int, dict[str, float]], None] | None,
    name: str | None,
) -> nn.Module:
    dev = ctx.device
    out = Path(out) if out is not None else None
    meta = checkpoint_meta(out) if resume and out is not None else None
    if resume and meta is None:
        raise TrainingError(f"--resume needs a checkpoint in {out}/{CHECKPOINT}; none found")
    data = getattr(dataset, "name", None)
    step = check_resume(meta, cfg, model, out / CHECKPOINT, data) if meta is not None else 0
    split = dataset.train
    size, k = _global_batch(cfg, split, ctx), cfg.accumulate
    how = strategy(cfg, ctx)
    original = model.to(dev).train()
    if how == "fsdp":  # fully_shard swaps classes in place: shard a copy, load the result back at the end
        model = copy.deepcopy(original)
    wrapped = wrap(model, cfg, ctx)
    # foreach: one kernel launch per group instead of per tensor; on the CPU it gives the same bits as the
    # per-tensor loop torch picks there by default (tests/test_train.py), at a quarter of the cost
    foreach = True if how != "fsdp" else None  # FSDP's DTensors: torch's own choice
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=foreach
    )
    ema = (
        EMAWeights(model, cfg.ema_decay, warmup=cfg.ema_warmup, power=cfg.ema_power, start=cfg.ema_start)
        if cfg.ema_decay > 0
        else None
    )
    if meta is not None:
        _load_checkpoint(out, model, opt, meta, ema, ctx=ctx)
    call = compile_loss(wrapped, device=dev) if cfg.compile else wrapped
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    log = TrainLog(
        out,
        enabled=ctx.is_main and out is not None,
        tensorboard=cfg.tensorboard,
        every=cfg.log_every,
        resume_from=step if meta is not None else None,
    )
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps,
            initial=step,
            desc=f"train {name or getattr(model, 'family', '')}",
            unit="step",
            dynamic_ncols=True,
        )
    collate = model.collator() if isinstance(model, PolymodalModel) else None
    names = progress_metrics(original)
    streamed = hasattr(split, "loader")
    if streamed:
        stream = split.loader(
            batch_size=size,
            seed=cfg.seed,
            rank=ctx.rank,
            world=ctx.world_size,
            start_step=step,
            workers=cfg.workers,
            collate=collate if k == 1 else None,  # a collated batch need not split by rows (packed text)
            pin_memory=dev.type == "cuda",
        )
        micro_batches: Iterator[list[Any]] = (_micro(b, k) for b in stream)
    else:
        micro_batches = (
            local_indices(index, ctx.rank, ctx.world_size).chunk(k)
            for index in batches(len(split), size, cfg.seed, step)
        )
    check_each = dev.type == "cpu"  # a per-step finiteness check costs nothing without a device to wait for
    meter, last_log, started, seen = _Meter(), step, time.perf_counter(), 0
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    try:
        while step < end:
            parts = next(micro_batches)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            if isinstance(model, PolymodalModel):
                model.begin_step(step, cfg.steps)
            opt.zero_grad(set_to_none=True)
            step_loss: Any = 0.0
            step_metrics: dict[str, Any] = {}
            for i, part in enumerate(parts):
                if not streamed:
                    part = split.batch(part)
                if collate is not None and not (streamed and k == 1):  # else the loader's workers collated it
                    part = collate(part, step)
                batch = _to(part, dev)
                with sync_gradients(wrapped, i == k - 1):
                    with autocast:
                        loss, metrics = call(batch)
                    if check_each and not torch.isfinite(loss):
                        raise TrainingError(
                            f"loss became {loss.item()} at step {step}; stopping (lower lr, or check the data)"
                        )
                    (loss / k if k > 1 else loss).backward()
                step_loss = loss.detach() if k == 1 else step_loss + loss.detach() / k
                for key, v in metrics.items():
                    v = v.detach() if isinstance(v, torch.Tensor) else v
                    step_metrics[key] = v if k == 1 else step_metrics.get(key, 0.0) + v / k
            reduce_replicated(wrapped, ctx)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=foreach)  # DTensors too
            opt.step()
            if isinstance(model, PolymodalModel):
                model.after_step()
            if ema is not None:
                ema.update(model)
            step += 1
            seen += size
            meter.add({"loss": step_loss, **step_metrics})
            if on_step is not None:
                on_step(step, {"loss": float(step_loss), **{k_: float(v) for k_, v in step_metrics.items()}})
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                rate = seen / max(time.perf_counter() - started, 1e-9)
                _log(meter, ctx, bar, log, names, step=step, since=last_log, lr=lr_at(step - 1, cfg), samples_s=rate)
                last_log = step
            if cfg.eval_every and step % cfg.eval_every == 0 and step < end:
                record = _evaluate(model, original, dataset, how, ctx)
                if record:
                    log.log(step, record)
            if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
                _save_checkpoint(out, model, opt, step, cfg, data, ema, ctx=ctx)
        if out is not None:
            _save_checkpoint(out, model, opt, step, cfg, data, ema, ctx=ctx)
    finally:  # a failed run still closes its progress bar, its loader's workers and its log
        if bar is not None:
            bar.close()
        if streamed and callable(getattr(stream, "close", None)):
            stream.close()
        log.close()
    if ema is not None:  # after the checkpoint (raw weights, to resume from): the model keeps the average
        ema.copy_to(model)
    if how == "fsdp":  # every rank gets the whole trained weights back in the plain model it was given
        original.load_state_dict(full_state(model, ctx))
    return original.eval()


def _log(meter: _Meter, ctx: DistributedContext, bar: Any, log: TrainLog, names: tuple[str, ...], **row: Any) -> None:
    """Reduce the loss and metrics since the last log over the ranks (the only host sync of the loop), stop
    on a non-finite loss, and show them (rank 0's progress bar, the family's ``names`` too) and log them
    (rank 0's ``train_log.jsonl``). ``row`` holds ``step``, ``since``, ``lr`` and ``samples_s``."""
    step, since = row.pop("step"), row.pop("since")
    values = meter.read(ctx)
    loss = values.get("loss", 0.0)
    if not math.isfinite(loss):
        raise TrainingError(
            f"loss became {loss} between steps {since} and {step - 1}; stopping (lower lr, or check the data)"
        )
    record = {"loss": loss, **row, **{k: v for k, v in values.items() if k != "loss"}}
    if bar is not None:
        bar.set_postfix(progress_postfix(record, names))
    log.log(step, record)
