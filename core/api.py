"""The Python API the CLI mirrors: ``create``, ``list_models``, ``load``, ``train`` (= ``train_model``),
``evaluate_folder``."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from polymodal.config import apply_overrides
from polymodal.data import load_dataset
from polymodal.io import load_model
from polymodal.io.cache import announce, entry_lock
from polymodal.io.folders import plain_metrics, write_metrics
from polymodal.io.output import output_folder, resolve_device
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.models.parts import auto_folder, load_parts, part_data, part_fields
from polymodal.registry import get_registry
from polymodal.train import TrainConfig, TrainingError
from polymodal.train import train as run_training
from polymodal.train.distributed import DistributedContext, barrier, joined
from polymodal.train.trainer import CHECKPOINT, checkpoint_meta, remove_checkpoint


def spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec` called ``name`` (close names suggested when unknown)."""
    return get_registry().get("model", name)


def prepare_parts(config: Any, *, progress: bool = True, isolated: bool = False) -> dict[str, PolymodalModel]:
    """Every pretrained part ``config`` names, made before the model is built: an ``"auto"`` part
    missing from the cache is trained there first (:func:`train_model` on its variant and data),
    then each part is loaded or built by :func:`~polymodal.models.parts.load_parts`.

    Each ``"auto"`` part says on stderr whether it is trained into the cache or reused from it, and where.
    Training a part leaves the global torch RNG state as it was, so building a model draws the same
    random numbers whether or not a part had to be trained. ``isolated`` trains a missing part in a fresh
    process of its own (``polymodal train VARIANT``; what rank 0 of a distributed run does, so the part's
    training is a world of one beside the run's process group).
    """
    for name, part in part_fields(config).items():
        if part.path == "auto":
            with entry_lock(auto_folder(part)):  # a second run needing it waits here, then reuses it
                _make_auto_part(name, part, progress, isolated)
    return load_parts(config)


def _make_auto_part(name: str, part: Any, progress: bool, isolated: bool) -> None:
    """Train the ``"auto"`` part ``part`` into the cache unless it is there (the caller holds its entry lock)."""
    folder, data = auto_folder(part), part_data(part)
    if (folder / "config.json").is_file():
        announce(f"using the cached default part `{name}` ({part.variant} trained on {data}) from {folder}")
        return
    announce(
        f"training the default part `{name}` ({part.variant} on {data}) once into {folder}; "
        "later runs reuse it (`polymodal cache list` shows it)"
    )
    if isolated:
        _train_part_alone(part.variant, data, folder, progress)
        return
    rng = torch.get_rng_state()
    try:
        train_model(part.variant, data=data, out=folder, progress=progress, overwrite=True, keep_checkpoint=False)
    finally:
        torch.set_rng_state(rng)


def _train_part_alone(variant: str, data: str, folder: Path, progress: bool) -> None:
    """``polymodal train VARIANT --data DATA --out FOLDER`` in a fresh process without torchrun's environment
    (so it is a world of one, beside the run's process group); a failure is a TrainingError."""
    import os
    import subprocess
    import sys

    from polymodal.train.distributed import TORCHRUN_ENV

    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    command = [sys.executable, "-m", "polymodal.cli", "train", variant, "--data", data, "--out", str(folder)]
    command += ["--overwrite", "--no-checkpoint", "--threads", str(torch.get_num_threads())]
    command += [] if progress else ["--no-progress"]
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL)  # its progress and errors: on stderr
    if done.returncode != 0:
        raise TrainingError(
            f"training the default part {variant} (on {data}) into {folder} failed with exit code "
            f"{done.returncode} (its error is printed above)"
        )


def _parts_for(config: Any, ctx: DistributedContext, progress: bool) -> dict[str, PolymodalModel]:
    """:func:`prepare_parts` for a distributed run: rank 0 prepares (trains any missing 'auto' part into the
    cache, in a process of its own), the other ranks wait, then load the parts from the cache."""
    if not ctx.distributed:
        return prepare_parts(config, progress=progress)
    parts = prepare_parts(config, progress=progress, isolated=True) if ctx.is_main else None
    barrier(ctx)
    return parts if parts is not None else load_parts(config)


def create(name: str, dataset: Any = None, **overrides: Any) -> PolymodalModel:
    """A new, untrained model of variant ``name`` (timm's ``create_model``).

    ``dataset`` (a loaded dataset or a registered name such as ``"shapes"``) adapts the config to
    it first, as ``polymodal train --data`` does. Keyword ``overrides`` change config fields and are
    merged into the variant's config (:func:`polymodal.models.base.merge_overrides`): a dict for a
    nested config changes only the fields it names (``encoder={"depth": 2}``), a dotted key reaches
    one field (``**{"encoder.depth": 2}``), a string for a part field is its folder
    (``lm="runs/lm"``). An unknown field raises a ValueError naming it. The model's 'auto' parts
    are trained into the cache first when missing (:func:`prepare_parts`). Example::

        model = polymodal.create("vit", encoder={"depth": 2}, **{"encoder.patch_size": 4})
    """
    model_spec = spec(name)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    cfg = model_spec.make_config(dataset, **overrides)
    return model_spec.instantiate(cfg, prepare_parts(cfg))


def list_models(filter: str | Sequence[str] = "", exclude_filters: str | Sequence[str] = ()) -> list[str]:
    """Sorted names of the registered model variants (timm's ``list_models``).

    ``filter`` is an :mod:`fnmatch` pattern or several (``"vit*"``, ``["clip*", "*-shapes"]``; ''
    for all): a name is listed when it matches any of them. A name that matches any pattern in
    ``exclude_filters`` is left out. Matching is case-sensitive, as names are registered lower-case.
    """
    include = [filter] if isinstance(filter, str) else list(filter)
    exclude = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    for pattern in include + exclude:
        if not isinstance(pattern, str):
            raise ValueError(f"list_models filters are fnmatch patterns (str); got {pattern!r}")
    names = get_registry().names("model")
    if any(include):
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include if p)]
    return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude if p))


def load(
    directory: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None, compile: bool = False
) -> PolymodalModel:
    """Load a model folder (strict; safetensors only), or convert a pretrained model (transformers'
    ``from_pretrained``):

    * ``"hf:ORG/NAME"`` or ``"hf:ORG/NAME@REVISION"``: a Hugging Face Hub repository, fetched through
      ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply), converted by the converter
      of its ``config.json`` ``model_type`` and cached, so the next call for that commit reuses the model
      folder (:mod:`polymodal.io.hub`);
    * a transformers folder (``config.json`` with a ``model_type``, no polymodal ``family``): converted in memory.

    Each conversion or reuse says so in one line on stderr.

    ``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"``, a torch dtype; None keeps the saved one) and ``compile``
    prepare the loaded model for inference (:func:`polymodal.models.inference.prepare_inference`: weights cast,
    inputs cast by hooks, uncached compute compiled with ``torch.compile(dynamic=False)``, eval mode). A bad
    ``dtype`` is a ValueError naming the choices, raised before anything is loaded. Example::

        model = polymodal.load("runs/vit", dtype="bf16", compile=True)
    """
    from polymodal.io import hub
    from polymodal.models.inference import parse_dtype, prepare_inference

    parse_dtype(dtype)  # a bad value fails before the (maybe slow) load
    if hub.is_hub_name(directory):
        model = hub.load_hub(str(directory), device=device)
    elif hub.is_transformers_folder(directory):
        model = hub.load_transformers_folder(directory, device=device)
    else:
        model = load_model(directory, device=device)
    if dtype is None and not compile:
        return model
    return prepare_inference(model, dtype=dtype, compile=compile)


class EvaluationError(RuntimeError):
    """Training finished and the model folder was saved, but evaluating the model failed.

    ``model`` is the trained model, ``metrics`` what ``metrics.json`` records (with
    ``evaluation_failed``), ``folder`` where the weights are (None without ``out``).
    """

    def __init__(self, message: str, model: PolymodalModel, metrics: dict[str, Any], folder: Path | None) -> None:
        super().__init__(message)
        self.model, self.metrics, self.folder = model, metrics, folder


def _check_length(steps: int | None, epochs: float | None) -> None:
    """``steps`` ≥ 1 and ``epochs`` > 0 (finite), each named when it is not."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a whole number ≥ 1, got {steps!r}")
    if epochs is not None and not (isinstance(epochs, (int, float)) and 0 < epochs < math.inf):
        raise ValueError(f"epochs must be a number above 0, got {epochs!r}")


def _train_config(
    model_spec: ModelSpec,
    dataset: Any,
    train_set: tuple[str, ...],
    steps: int | None,
    epochs: float | None,
    seed: int | None,
    resumed: dict[str, Any] | None,
) -> TrainConfig:
    """The run's :class:`TrainConfig`: the variant's, ``train_set``, then ``seed``/``epochs``/``steps``.

    ``resumed`` (a checkpoint's ``trainer.json``) supplies what this function would otherwise derive:
    ``steps`` when neither ``steps`` nor ``epochs`` is given, and ``warmup_steps`` (derived from the
    run's first step count) unless ``train_set`` sets it, so the trainer compares what the user asked.
    """
    cfg: TrainConfig = apply_overrides(model_spec.train, train_set, flag="--train-set")
    if seed is not None:
        cfg = attrs.evolve(cfg, seed=seed)
    if epochs is not None:
        cfg = attrs.evolve(cfg, steps=max(1, math.ceil(epochs * len(dataset.train) / cfg.batch_size)))
    elif steps is not None:
        cfg = attrs.evolve(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, max(steps // 10, 0)))
    saved = (resumed or {}).get("train", {})
    if steps is None and epochs is None and isinstance(saved.get("steps"), int):
        cfg = attrs.evolve(cfg, steps=saved["steps"])
    explicit = {item.split("=", 1)[0].strip() for item in train_set}
    if "warmup_steps" not in explicit and isinstance(saved.get("warmup_steps"), int):
        cfg = attrs.evolve(cfg, warmup_steps=saved["warmup_steps"])
    return cfg


def train_model(
    name: str,
    *,
    data: str | None = None,
    set_: tuple[str, ...] = (),
    steps: int | None = None,
    epochs: float | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    train_set: tuple[str, ...] = (),
    overwrite: bool = False,
    keep_checkpoint: bool = True,
    ctx: DistributedContext | None = None,
) -> tuple[PolymodalModel, dict[str, Any]]:
    """Train variant ``name`` on ``data`` (its default when None), save to ``out``, then evaluate.

    ``set_`` holds ``key=value`` model-config overrides, ``train_set`` trainer overrides.
    Returns the trained model and its metrics. Before any work: the device, ``steps``/``epochs``
    and ``out`` are checked, and ``out`` is locked against a second writer
    (:func:`polymodal.io.output.output_folder`: an existing model folder needs ``overwrite`` or
    ``resume``; a folder of other files is never written). ``resume`` continues ``out/checkpoint``
    (same settings; ``steps`` defaults to the checkpoint's). The weights are saved before the model
    is evaluated: if evaluation fails, ``metrics.json`` records ``evaluation_failed`` and an
    :class:`EvaluationError` says where the weights are. ``keep_checkpoint=False`` removes
    ``out/checkpoint`` (the optimiser state, ≈ 3–4× the weights) once the weights are saved: the run
    still checkpoints while it trains, but the final folder cannot be resumed.

    Under torchrun (``ctx``, default :func:`~polymodal.train.distributed.init_from_env`) every rank
    calls it with the same arguments: rank 0 alone takes the output folder's lock, prepares the 'auto'
    parts (the other ranks then load them from the cache), writes, evaluates and returns the metrics;
    the others train their shard and return ``(model, {})`` (the same trained weights). An error on any
    rank ends the run (torchrun stops the others).
    """
    resolve_device(device)
    _check_length(steps, epochs)
    with joined(ctx, device) as ctx:
        return _train_model(
            name, data, set_, steps, epochs, seed, out, ctx, resume, progress, train_set, overwrite, keep_checkpoint
        )


def _train_model(
    name: str,
    data: str | None,
    set_: tuple[str, ...],
    steps: int | None,
    epochs: float | None,
    seed: int | None,
    out: str | Path | None,
    ctx: DistributedContext,
    resume: bool,
    progress: bool,
    train_set: tuple[str, ...],
    overwrite: bool,
    keep_checkpoint: bool,
) -> tuple[PolymodalModel, dict[str, Any]]:
    model_spec = spec(name)
    family = model_spec.model_class.family
    guard = (
        output_folder(out, family=family, overwrite=overwrite, resume=resume)
        if out is not None and ctx.is_main
        else contextlib.nullcontext()
    )
    with guard:
        dataset = load_dataset(data or model_spec.data)
        resumed = checkpoint_meta(out) if resume and out is not None else None
        if resume and resumed is None:  # before any part is trained
            raise TrainingError(f"--resume needs a checkpoint in {out}/{CHECKPOINT}; none found")
        cfg = _train_config(model_spec, dataset, train_set, steps, epochs, seed, resumed)
        model_cfg = model_spec.config_for(dataset, set_)
        torch.manual_seed(cfg.seed)  # a fresh ('') part draws first, then the model: one seed makes both
        model = model_spec.instantiate(model_cfg, _parts_for(model_cfg, ctx, progress))
        model = run_training(model, dataset, cfg, out=out, resume=resume, progress=progress, name=name, ctx=ctx)
        if not ctx.is_main:  # rank 0 writes and evaluates; the others wait for it and return the model
            barrier(ctx)
            return model, {}
        metrics: dict[str, Any] = {"data": dataset.name, "steps": cfg.steps, "seed": cfg.seed}
        source = f"trained with `polymodal train {name}` on {dataset.name} ({cfg.steps} steps, seed {cfg.seed})"
        if cfg.ema_decay > 0:  # the trainer has loaded the EMA weights: they are saved and evaluated
            metrics["ema_decay"] = cfg.ema_decay
            source += f"; the weights are the EMA (decay {cfg.ema_decay}, warm-up {cfg.ema_warmup!r})"
        if out is not None:
            model.save(out, metrics=metrics, source=source)  # the weights first: an evaluation error loses nothing
            if not keep_checkpoint:
                remove_checkpoint(out)  # this run's own: its trainer has just written it
        try:
            metrics |= plain_metrics(model.evaluate(dataset))
        except Exception as exc:
            metrics["evaluation_failed"] = f"{type(exc).__name__}: {exc}"
            where = f"the weights were saved to {out}" if out is not None else "no folder was asked for (out=None)"
            if out is not None:
                write_metrics(model, out, metrics, source=source)
            raise EvaluationError(
                f"training finished and {where}, but evaluating the model failed: {metrics['evaluation_failed']}",
                model,
                metrics,
                Path(out) if out is not None else None,
            ) from exc
        if out is not None:  # again, whole and atomic, with what evaluation adds (iGPT's probe plot)
            model.save(out, metrics=metrics, source=source)
    barrier(ctx)
    return model, metrics


def _set_pairs(overrides: dict[str, Any]) -> tuple[str, ...]:
    """Python keyword ``overrides`` (nested dicts, dotted keys) as the ``key=value`` strings of ``--set``."""
    pairs = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            pairs += [f"{key}.{pair}" for pair in _set_pairs(value)]
            continue
        try:
            text = json.dumps(list(value) if isinstance(value, tuple) else value)
        except TypeError:
            raise ValueError(
                f"train: override {key}={value!r} is not a JSON value; give numbers, strings, lists or dicts of them"
            ) from None
        pairs.append(f"{key}={text}")
    return tuple(pairs)


def train(
    name: str,
    *,
    data: str | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    out: str | Path | None = None,
    seed: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    train_set: dict[str, Any] | tuple[str, ...] = (),
    keep_checkpoint: bool = True,
    **overrides: Any,
) -> tuple[PolymodalModel, dict[str, Any]]:
    """Train variant ``name`` and return ``(model, metrics)``: ``polymodal train`` in Python.

    ``data`` is a registered dataset (the variant's default when None); ``steps`` or ``epochs``
    sets the length (the variant's recipe when neither); ``out`` is the model folder to write
    (none when None; an existing model folder needs ``overwrite=True`` or ``resume=True``, a
    folder of other files is refused). Keyword ``overrides`` change the model config as in
    :func:`create` (``encoder={"depth": 2}``, ``**{"encoder.depth": 2}``); ``train_set`` holds
    trainer overrides (``--train-set``), a dict (``{"lr": 1e-3}``) or ``"key=value"`` strings. ``metrics``
    is what ``metrics.json`` records: the data, steps and seed, and the family's evaluation.
    ``keep_checkpoint=False`` leaves no ``out/checkpoint`` (``--no-checkpoint``). Everything else is
    :func:`train_model`'s. Example::

        model, metrics = polymodal.train("vit", steps=20, out="runs/vit-tiny", encoder={"depth": 1})
    """
    return train_model(
        name,
        data=data,
        set_=_set_pairs(overrides),
        steps=steps,
        epochs=epochs,
        seed=seed,
        out=out,
        device=device,
        resume=resume,
        progress=progress,
        train_set=_set_pairs(train_set) if isinstance(train_set, dict) else tuple(train_set),
        overwrite=overwrite,
        keep_checkpoint=keep_checkpoint,
    )


def evaluate_folder(
    directory: str | Path,
    data: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Load a model folder and compute its family's metrics on ``data`` (the family default when None);
    ``dtype`` and ``compile`` as in :func:`load` (e.g. ``dtype="bf16"``: the metrics of bf16 inference)."""
    model = load(directory, device=device, dtype=dtype, compile=compile)
    name = data or getattr(model, "default_data", None)  # a model may name the data it was adapted to
    if not name:
        name = next(e.obj.data for e in get_registry().entries("model") if e.obj.model_class is type(model))
    return plain_metrics(model.evaluate(load_dataset(name)))
