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
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal.config import to_dict
from polymodal.io.folders import LoadError, read_json, read_state, recover_folder, replace_folder, save_state
from polymodal.io.output import resolve_device
from polymodal.models.base import PolymodalModel
from polymodal.models.recipe import TrainConfig
from polymodal.train.ema import EMAWeights

CHECKPOINT = "checkpoint"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit …)."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Index batches forever: each epoch a fresh permutation from ``(seed, epoch)``, last partial batch dropped."""
    per_epoch = max(n // batch_size, 1)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield order[offset * batch_size : (offset + 1) * batch_size]
        step += 1


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


def _checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: a composite's frozen parts are left out (see
    :meth:`PolymodalModel.checkpoint_state_dict`)."""
    keep = getattr(model, "checkpoint_state_dict", None)
    return keep() if keep is not None else model.state_dict()


def _save_checkpoint(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    data: str | None = None,
    ema: EMAWeights | None = None,
) -> None:
    def fill(tmp: Path) -> None:
        save_state(tmp / "model.safetensors", _checkpoint_state(model), {"step": str(step)})
        if ema is not None:
            save_state(tmp / "ema.safetensors", ema.state_dict(), {"step": str(step), "updates": str(ema.updates)})
        state = opt.state_dict()
        tensors = {
            f"state.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)
        }
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_state(tmp / "optimizer.safetensors", tensors, {"step": str(step)})
        groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in state["param_groups"]
        ]
        meta = {"step": step, "train": to_dict(cfg), "param_groups": groups, "data": data}
        if ema is not None:
            meta["ema_updates"] = ema.updates
        if isinstance(model, PolymodalModel):
            meta |= {"family": model.family, "model": _plain(model.config_dict())}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))

    replace_folder(out / CHECKPOINT, fill)


def remove_checkpoint(out: str | Path) -> bool:
    """Delete ``out/checkpoint`` (the optimiser state a run keeps for ``--resume``, ≈ 3–4× the weights);
    True if there was one. It is renamed aside first (``.checkpoint.<hex>.tmp``, which the output guard
    removes if a kill interrupts the deletion), so ``--resume`` never finds half a checkpoint."""
    folder = recover_folder(Path(out) / CHECKPOINT)
    if not folder.is_dir() or folder.is_symlink():
        return False
    aside = folder.parent / f".{CHECKPOINT}.{secrets.token_hex(6)}.tmp"
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return True


FREE_ON_RESUME = ("steps", "checkpoint_every", "log_every")
"""Trainer fields a resumed run may change: ``steps`` extends (or shortens) the run; the other two never
touch the weights. Every other field must match the checkpoint's."""


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), for comparing with a saved config."""
    return json.loads(json.dumps(value))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def checkpoint_meta(out: str | Path) -> dict[str, Any] | None:
    """``out/checkpoint/trainer.json`` (after recovering a swap a killed run left half done), or None."""
    folder = recover_folder(Path(out) / CHECKPOINT)
    if not folder.is_dir():
        return None
    meta = read_json(folder / "trainer.json")
    if not isinstance(meta, dict):
        raise LoadError(f"{folder / 'trainer.json'}: expected a JSON object, got {type(meta).__name__}")
    return meta


def check_resume(
    meta: dict[str, Any], cfg: TrainConfig, model: Any, folder: str | Path, data: str | None = None
) -> int:
    """The step to resume from, after checking that this run continues the checkpoint's ``meta``.

    A malformed step is a :class:`~polymodal.io.LoadError` (a ValueError) naming the field; another
    family, dataset (``data``, its name), model config or trainer field (but :data:`FREE_ON_RESUME`),
    or fewer ``steps`` than the checkpoint has done, a :class:`TrainingError` naming every differing
    field. A changed ``steps`` is said on stderr.
    """
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise LoadError(f"{folder}/trainer.json: 'step' must be a whole number ≥ 0, got {step!r}")
    family = getattr(model, "family", None)
    if meta.get("family") and family and meta["family"] != family:
        raise TrainingError(f"--resume: {folder} is a {meta['family']} checkpoint; this run trains a {family} model")
    saved = {f"train.{k}": v for k, v in _flat(meta.get("train", {})).items() if k not in FREE_ON_RESUME}
    asked = {f"train.{k}": v for k, v in _flat(_plain(to_dict(cfg))).items() if k not in FREE_ON_RESUME}
    for k, v in _flat(_plain(to_dict(TrainConfig()))).items():  # a field newer than the checkpoint (ema_*)
        if k not in FREE_ON_RESUME and "train" in meta:  # had its default then
            saved.setdefault(f"train.{k}", v)
    if meta.get("data") and data:
        saved["data"], asked["data"] = meta["data"], data
    if "model" in meta and hasattr(model, "config_dict"):
        saved |= _flat(meta["model"], "model.")
        asked |= _flat(_plain(model.config_dict()), "model.")
    differ = [k for k in sorted(set(saved) | set(asked)) if saved.get(k) != asked.get(k)]
    if differ:
        then = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={asked.get(k)!r}" for k in differ)
        raise TrainingError(
            f"--resume: the checkpoint in {folder} was trained with {then}; this run asks for {now}. "
            "Resume with the checkpoint's settings, or start a new run (another --out, or --overwrite)"
        )
    if cfg.steps < step:
        raise TrainingError(
            f"--resume: steps={cfg.steps} is fewer than the {step} steps the checkpoint in {folder} has done; "
            f"give --steps {step} or more"
        )
    before = meta.get("train", {}).get("steps")
    if before is not None and before != cfg.steps:
        how = "extending" if cfg.steps > before else "shortening"
        print(
            f"--resume: {how} the run from {before} to {cfg.steps} steps (continuing at step {step})", file=sys.stderr
        )
    return step


def _load_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any], ema: EMAWeights | None = None
) -> None:
    from polymodal.io.folders import load_state_strict

    folder = out / CHECKPOINT
    load_state_strict(
        model,
        read_state(folder / "model.safetensors"),
        str(folder / "model.safetensors"),
        expected=_checkpoint_state(model),
    )
    tensors = read_state(folder / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise TrainingError(f"{folder} does not fit this model's optimiser: {exc}") from exc
    if ema is not None:
        file = folder / "ema.safetensors"
        if not file.is_file():
            raise TrainingError(f"--resume: {folder} holds no EMA weights (ema.safetensors) for ema_decay > 0")
        ema.load_state_dict(read_state(file), meta.get("ema_updates"), str(file))
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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
) -> nn.Module:
    """Train ``model`` on ``dataset.train`` for ``cfg.steps`` steps; returns the model.

    With ``out``, checkpoints go to ``out/checkpoint`` every ``cfg.checkpoint_every`` steps and at
    the end; ``resume`` continues from there. ``stop_after`` ends early after that many steps
    (for tests of interrupted runs). A non-finite loss raises :class:`TrainingError` naming the step.
    ``resume`` checks the checkpoint against this run first (:func:`check_resume`); an unavailable
    ``device`` is a ValueError before any work. ``name`` is what the progress bar calls the run
    (``train dino-shapes``; default: the model's family). With ``cfg.ema_decay > 0`` the returned
    model holds the EMA weights (the checkpoint keeps the raw ones and the EMA, to resume from).
    """
    dev = resolve_device(device)
    out = Path(out) if out is not None else None
    meta = checkpoint_meta(out) if resume and out is not None else None
    if resume and meta is None:
        raise TrainingError(f"--resume needs a checkpoint in {out}/{CHECKPOINT}; none found")
    data = getattr(dataset, "name", None)
    step = check_resume(meta, cfg, model, out / CHECKPOINT, data) if meta is not None else 0
    model.to(dev).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    ema = (
        EMAWeights(model, cfg.ema_decay, warmup=cfg.ema_warmup, power=cfg.ema_power, start=cfg.ema_start)
        if cfg.ema_decay > 0
        else None
    )
    if meta is not None:
        _load_checkpoint(out, model, opt, meta, ema)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    split = dataset.train
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps,
            initial=step,
            desc=f"train {name or getattr(model, 'family', '')}",
            unit="step",
            dynamic_ncols=True,
        )
    started, seen = time.perf_counter(), 0
    index_batches = batches(len(split), min(cfg.batch_size, len(split)), cfg.seed, start_step=step)
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    while step < end:
        batch = _to(split.batch(next(index_batches)), dev)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        if isinstance(model, PolymodalModel):
            model.begin_step(step, cfg.steps)
        with autocast:
            loss, metrics = model.loss(batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {step}; stopping (lower lr, or check the data)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if isinstance(model, PolymodalModel):
            model.after_step()
        if ema is not None:
            ema.update(model)
        step += 1
        seen += len(next(iter(batch.values())))
        if on_step is not None:
            on_step(step, {"loss": loss.item(), **metrics})
        if bar is not None:
            bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                rate = seen / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")
        if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
            _save_checkpoint(out, model, opt, step, cfg, data, ema)
    if bar is not None:
        bar.close()
    if out is not None:
        _save_checkpoint(out, model, opt, step, cfg, data, ema)
    if ema is not None:  # after the checkpoint (raw weights, to resume from): the model keeps the average
        ema.copy_to(model)
    return model.eval()
