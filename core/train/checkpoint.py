"""Checkpoints a run keeps in ``OUT/checkpoint`` to ``--resume`` from, at any world size and strategy.

A checkpoint holds the weights, the optimiser state, the step, rank 0's RNG state and (``ema_decay > 0``)
the EMA; ``trainer.json`` holds the settings a resumed run must ask for (:func:`check_resume`), the
optimiser's hyper-parameters (``param_groups``), and the world size and strategy that saved it.

* **One process** (no sharded parameters) writes the layout it always has: ``model.safetensors`` (a
  composite's frozen parts left out), ``optimizer.safetensors`` (``state.<index>.<name>``, ``rng.*``),
  ``ema.safetensors``, ``trainer.json``. Nothing in the single-process path changes.
* **Several processes** (DDP, or FSDP2's DTensor shards) write with :mod:`torch.distributed.checkpoint`
  (DCP): each rank writes what it holds to ``state/shard-<rank>-model-00001-of-00001.safetensors`` (FSDP:
  its shards; DDP: each replicated tensor once, DCP spreading them over the ranks), keyed ``model.<name>``,
  ``optim.<parameter>.<state>``, ``ema.<name>``; rank 0 adds ``rng.safetensors`` and ``trainer.json``
  (``"format": "dcp-safetensors"``). Loading reshards: a rank reads the pieces its own tensors cover.

Both layouts load at any world size and strategy. **Nothing is unpickled**: DCP's default
``FileSystemReader`` unpickles a ``.metadata`` file, so this module uses DCP's own
``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader``: the shards are safetensors files whose header
holds each chunk's offset in the whole tensor as JSON, from which the reader rebuilds DCP's metadata.
Planning, resharding and DTensors stay torch's, with neither a pickle nor a storage layer of our own.

Writes are atomic: every rank writes into one temporary folder beside ``OUT/checkpoint`` (rank 0 makes it
and broadcasts its name), then rank 0 writes ``trainer.json`` and swaps it in
(:func:`polymodal.io.folders.replace_folder`): a kill at any moment leaves the old or the new checkpoint.
Every rank must see ``OUT`` (one machine, or a shared file system across machines, as DCP's own writers
need). On load every rank takes rank 0's saved RNG state (the data order does not depend on it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from polymodal.config import backfilled, runtime_fields, to_dict
from polymodal.io.folders import (
    LoadError,
    check_state_keys,
    read_json,
    read_state,
    recover_folder,
    replace_folder,
    save_state,
)
from polymodal.models.base import PolymodalModel
from polymodal.models.recipe import TrainConfig
from polymodal.nn.collectives import rank, world_size
from polymodal.train.ema import EMAWeights

CHECKPOINT = "checkpoint"
SHARDED = "dcp-safetensors"
"""``trainer.json``'s ``format`` for a checkpoint written with :mod:`torch.distributed.checkpoint`."""
SHARDS = "state"
"""The sub-folder of a DCP checkpoint that holds the ranks' safetensors shards."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit …)."""


def _checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: a composite's frozen parts are left out (see
    :meth:`PolymodalModel.checkpoint_state_dict`)."""
    keep = getattr(model, "checkpoint_state_dict", None)
    return keep() if keep is not None else model.state_dict()


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensor shards (FSDP2's ``fully_shard``)."""
    return any(_is_dtensor(p) for p in model.parameters())


def _strategy(model: nn.Module, world: int) -> str:
    """What ``trainer.json`` records as the strategy that saved: 'fsdp', 'ddp' or 'single'."""
    return "fsdp" if _sharded(model) else "ddp" if world > 1 else "single"


def _uses_dcp(model: nn.Module) -> bool:
    """Whether this run saves with DCP: several processes, or sharded parameters."""
    return world_size() > 1 or _sharded(model)


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpointed weights as :func:`~torch.distributed.checkpoint.state_dict.get_model_state_dict`
    gives them (DTensor shards under FSDP; no ``module.`` prefix), the frozen parts left out."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    keep = set(_checkpoint_state(model))
    return {k: v for k, v in get_model_state_dict(model).items() if k in keep}


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimiser holds, in its ``state_dict`` index order."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        return [names[id(p)] for g in opt.param_groups for p in g["params"]]
    except KeyError:
        raise ValueError("the optimiser holds a parameter that is not the model's; build it on the model") from None


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as safetensors takes them: a tensor whose storage an earlier one uses (tied weights) or
    that is not contiguous is copied (as :func:`~polymodal.io.folders.save_state` does)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        local = v.to_local() if _is_dtensor(v) else v
        ptr = local.untyped_storage().data_ptr() if local.numel() else None
        if ptr in seen or not local.is_contiguous() or local.is_shared():
            v = v.contiguous().clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def _rng_state() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def _meta(model: nn.Module, param_groups: list, step: int, cfg: TrainConfig, data, ema) -> dict[str, Any]:
    """``trainer.json``: the step, the settings, the optimiser's hyper-parameters, who saved."""
    world = world_size()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in param_groups]
    meta = {"step": step, "train": to_dict(cfg), "param_groups": groups, "data": data}
    meta |= {"world_size": world, "strategy": _strategy(model, world)}
    if ema is not None:
        meta["ema_updates"] = ema.updates
    if isinstance(model, PolymodalModel):
        meta |= {"family": model.family, "model": _plain(model.config_dict())}
    return meta


def save_checkpoint(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    data: str | None = None,
    ema: EMAWeights | None = None,
    *,
    ctx: Any = None,
) -> None:
    """Write ``out/checkpoint`` atomically (a kill leaves the old checkpoint or the new one whole).

    ``model`` is the unwrapped model (or the FSDP2-sharded one), ``opt`` its optimiser, ``ema`` its EMA.
    In one process this writes the single-file layout; with a process group of several ranks (or
    sharded parameters) every rank must call it (it is collective) and it writes with DCP (see the
    module's docstring). ``ctx`` (a :class:`~polymodal.train.distributed.DistributedContext`) gives the
    device collectives run on (the process group's own otherwise).
    """
    out = Path(out)
    if _uses_dcp(model):
        _save_sharded(out, model, opt, step, cfg, data, ema, ctx)
        return

    def fill(tmp: Path) -> None:
        save_state(tmp / "model.safetensors", _checkpoint_state(model), {"step": str(step)})
        if ema is not None:
            save_state(tmp / "ema.safetensors", ema.state_dict(), {"step": str(step), "updates": str(ema.updates)})
        state = opt.state_dict()
        tensors = {
            f"state.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)
        }
        save_state(tmp / "optimizer.safetensors", tensors | _rng_state(), {"step": str(step)})
        meta = _meta(model, state["param_groups"], step, cfg, data, ema)
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))

    replace_folder(out / CHECKPOINT, fill)


def _comm_device(ctx: Any) -> torch.device:
    """The device the process group's collectives take tensors on (CUDA for nccl)."""
    if ctx is not None and getattr(ctx, "device", None) is not None:
        return torch.device(ctx.device)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _share_name(name: str | None, ctx: Any) -> str:
    """Rank 0's ``name`` (a temporary folder's, ASCII, < 256 bytes) on every rank: a broadcast of its
    bytes (no pickling)."""
    buf = torch.zeros(256, dtype=torch.uint8, device=_comm_device(ctx))
    if name is not None:
        raw = name.encode("ascii")
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return bytes(b for b in buf.cpu().tolist() if b).decode("ascii")


def _barrier(ctx: Any) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(device_ids=[_comm_device(ctx).index] if _comm_device(ctx).type == "cuda" else None)


def _save_sharded(out: Path, model, opt, step: int, cfg: TrainConfig, data, ema, ctx: Any) -> None:
    """Every rank: its shard of the weights, optimiser state and EMA through DCP into one temporary
    folder; then rank 0 writes the RNG state and ``trainer.json`` and swaps the folder in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    me = rank()
    grouped = dist.is_available() and dist.is_initialized()
    tensors = {f"model.{k}": v for k, v in _model_state(model).items()}
    names, state = _param_names(model, opt), opt.state_dict()
    for i, s in state["state"].items():
        tensors |= {f"optim.{names[i]}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    if ema is not None:
        tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors = _unshared(tensors)

    def write(tmp: Path) -> None:
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True)
        with warnings.catch_warnings():  # without a process group DCP warns that it saves in one process
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tensors, storage_writer=writer, no_dist=not grouped)

    if me == 0:

        def fill(tmp: Path) -> None:
            if grouped:
                _share_name(tmp.name, ctx)
            write(tmp)
            save_state(tmp / "rng.safetensors", _rng_state(), {"step": str(step)})
            meta = _meta(model, state["param_groups"], step, cfg, data, ema) | {"format": SHARDED}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))

        replace_folder(out / CHECKPOINT, fill)
    else:
        write(out / _share_name(None, ctx))
    _barrier(ctx)  # every rank returns once the new checkpoint is in place


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


FREE_ON_RESUME = ("steps", "checkpoint_every", "log_every", "strategy", "cpu_offload", "compile", "workers")
FREE_ON_RESUME += ("eval_every", "tensorboard", "accumulate")
"""Trainer fields a resumed run may change: ``steps`` extends (or shortens) the run; the others never
change what is trained (how many processes share the work and how, compiling, data workers, evaluation
and logging, micro-batching of the same global batch). Every other field must match the checkpoint's."""


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
    field. A changed ``steps`` is said on stderr (by rank 0).
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
        for k, v in _flat(_plain(backfilled(type(model.config), meta["model"])), "model.").items():
            saved.setdefault(k, v)  # an option added since (``field(backfill=True)``) had its default then
        asked |= _flat(_plain(model.config_dict()), "model.")
        for name in runtime_fields(type(model.config)):  # how the model runs (checkpointing): free to change
            saved.pop(f"model.{name}", None)
            asked.pop(f"model.{name}", None)
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
    if before is not None and before != cfg.steps and rank() == 0:
        how = "extending" if cfg.steps > before else "shortening"
        print(
            f"--resume: {how} the run from {before} to {cfg.steps} steps (continuing at step {step})", file=sys.stderr
        )
    return step


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as ``target``: this rank's shard of it where ``target`` is a DTensor."""
    if not _is_dtensor(target):
        return full
    from torch.distributed.tensor import distribute_tensor

    local = full.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(local, target.device_mesh, target.placements, src_data_rank=None)


def _load_optimizer(opt, folder: Path, state: dict[int, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{folder} does not fit this model's optimiser: {exc}") from exc


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def load_checkpoint(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
    ema: EMAWeights | None = None,
    *,
    ctx: Any = None,
) -> None:
    """Load ``out/checkpoint`` into ``model``, ``opt`` and ``ema`` (strictly) and restore the RNG state.

    Either layout loads at any world size and strategy (a DCP checkpoint is resharded; a single-file
    one is split into this rank's shards under FSDP); with a process group every rank calls it.
    A checkpoint whose keys or shapes do not fit the model is a :class:`~polymodal.io.LoadError` naming
    the file; one that does not fit the optimiser (or lacks the EMA) a :class:`TrainingError`. When the
    world size or strategy differs from the saving run's, rank 0 says so in one line on stderr.
    ``ctx`` is accepted for symmetry with :func:`save_checkpoint` (loading needs no device of its own).
    """
    out = Path(out)
    folder = out / CHECKPOINT
    me, world = rank(), world_size()
    load = _load_sharded if meta.get("format") == SHARDED else _load_files
    _set_rng(load(folder, model, opt, meta, ema))
    then, now = meta.get("world_size", 1), world
    before, strategy = meta.get("strategy", "single"), _strategy(model, world)
    if (then, before) != (now, strategy) and me == 0:
        print(
            f"--resume: the checkpoint was saved by {then} process(es) ({before}); resuming on {now} ({strategy})",
            file=sys.stderr,
        )


def _load_files(folder: Path, model, opt, meta, ema) -> dict[str, torch.Tensor]:
    """The single-file layout. In one process exactly what the trainer always did; on several ranks (or
    with sharded parameters) each rank reads the whole files and keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from polymodal.io.folders import load_state_strict

    file = folder / "model.safetensors"
    if not _uses_dcp(model):
        load_state_strict(model, read_state(file), str(file), expected=_checkpoint_state(model))
    else:
        whole, own = read_state(file), _model_state(model)
        check_state_keys({k: tuple(v.shape) for k, v in whole.items()}, own, str(file))
        loaded = {k: _like(whole[k], v) for k, v in own.items()}
        set_model_state_dict(model, loaded, options=StateDictOptions(strict=False))
    tensors = read_state(folder / "optimizer.safetensors")
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            i = int(idx)
            if not 0 <= i < len(params):
                raise TrainingError(f"{folder} does not fit this model's optimiser: it has no parameter {i}")
            same = name != "step" and value.shape == params[i].shape
            state.setdefault(i, {})[name] = _like(value, params[i]) if same else value
    _load_optimizer(opt, folder, state, meta)
    if ema is not None:
        file = folder / "ema.safetensors"
        if not file.is_file():
            raise TrainingError(f"--resume: {folder} holds no EMA weights (ema.safetensors) for ema_decay > 0")
        saved, shadow = read_state(file), ema.state_dict()
        saved = {k: _like(v, shadow[k]) if k in shadow else v for k, v in saved.items()}
        ema.load_state_dict(saved, meta.get("ema_updates"), str(file))
    return tensors


def _load_sharded(folder: Path, model, opt, meta, ema) -> dict[str, torch.Tensor]:
    """A DCP checkpoint at any world size: check its keys and shapes against this run's tensors, then let
    DCP read into them the pieces this rank holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    shards = folder / SHARDS
    if not shards.is_dir():
        raise LoadError(f"missing folder {shards} (the shards of a {SHARDED} checkpoint)")
    try:
        md = HuggingFaceStorageReader(str(shards)).read_metadata().state_dict_metadata
    except Exception as exc:  # a truncated or foreign file: safetensors' and json's errors vary
        raise LoadError(f"{shards} holds a shard that is not readable ({exc}); it may be truncated") from exc
    sizes = {k: tuple(v.size) for k, v in md.items()}
    own = _model_state(model)
    check_state_keys({k[6:]: s for k, s in sizes.items() if k.startswith("model.")}, own, str(shards))
    targets = {f"model.{k}": torch.empty_like(v) for k, v in own.items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    opt_keys: dict[str, tuple[int, str]] = {}
    for key, size in sizes.items():
        if not key.startswith("optim."):
            continue
        name, stat = key[6:].rsplit(".", 1)
        if name not in index:
            raise TrainingError(f"{shards} does not fit this model's optimiser: it has state for {name!r}")
        p, dtype = params[name], md[key].properties.dtype
        if stat != "step" and size == tuple(p.shape):
            targets[key] = torch.empty_like(p.detach(), dtype=dtype)
        else:
            targets[key] = torch.empty(size, dtype=dtype)
        opt_keys[key] = (index[name], stat)
    if ema is not None:
        shadow = ema.state_dict()
        saved = {k[4:]: s for k, s in sizes.items() if k.startswith("ema.")}
        if not saved:
            raise TrainingError(f"--resume: {folder} holds no EMA weights (ema.*) for ema_decay > 0")
        check_state_keys(saved, shadow, f"{shards} (EMA)")
        targets |= {f"ema.{k}": torch.empty_like(v) for k, v in shadow.items()}
    grouped = dist.is_available() and dist.is_initialized()
    with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(shards)), no_dist=not grouped)
        except dcp.api.CheckpointException as exc:  # raised on every rank alike
            raise LoadError(f"{shards} could not be read ({exc}); a shard may be truncated or corrupted") from exc
    set_model_state_dict(
        model, {k[6:]: v for k, v in targets.items() if k.startswith("model.")}, options=StateDictOptions(strict=False)
    )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, (i, stat) in opt_keys.items():
        state.setdefault(i, {})[stat] = targets[key]
    _load_optimizer(opt, folder, state, meta)
    if ema is not None:
        loaded = {k[4:]: v for k, v in targets.items() if k.startswith("ema.")}
        ema.load_state_dict(loaded, meta.get("ema_updates"), f"{shards} (EMA)")
    return read_state(folder / "rng.safetensors")
