"""The Python API the CLI mirrors: ``create``, ``load``, ``train_model``, ``evaluate_folder``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import torch

from polymodal.config import apply_overrides
from polymodal.data import load_dataset
from polymodal.io import load_model
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.models.parts import auto_folder, load_parts, part_data, part_fields
from polymodal.registry import get_registry
from polymodal.train import TrainConfig, train


def spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec` called ``name`` (close names suggested when unknown)."""
    return get_registry().get("model", name)


def prepare_parts(config: Any, *, progress: bool = True) -> dict[str, PolymodalModel]:
    """Every pretrained part ``config`` names, made before the model is built: an ``"auto"`` part
    missing from the cache is trained there first (:func:`train_model` on its variant and data),
    then each part is loaded or built by :func:`~polymodal.models.parts.load_parts`.

    Training a part leaves the global torch RNG state as it was, so building a model draws the same
    random numbers whether or not a part had to be trained.
    """
    for name, part in part_fields(config).items():
        folder = auto_folder(part)
        if part.path == "auto" and not (folder / "config.json").is_file():
            data = part_data(part)
            print(
                f"{type(config).__name__}.{name}: no trained `{part.variant}` at {folder}; training it on {data} first"
            )
            rng = torch.get_rng_state()
            try:
                train_model(part.variant, data=data, out=folder, progress=progress)
            finally:
                torch.set_rng_state(rng)
    return load_parts(config)


def create(name: str, dataset: Any = None, **overrides: Any) -> PolymodalModel:
    """A new model of variant ``name``; keyword overrides change its config fields (a string for a
    part field is its folder). Its 'auto' parts are trained into the cache first when missing."""
    model_spec = spec(name)
    cfg = model_spec.make_config(dataset, **overrides)
    return model_spec.instantiate(cfg, prepare_parts(cfg))


def load(directory: str | Path, device: str = "cpu") -> PolymodalModel:
    """Load a model folder (strict; safetensors only)."""
    return load_model(directory, device=device)


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
) -> tuple[PolymodalModel, dict[str, Any]]:
    """Train variant ``name`` on ``data`` (its default when None), evaluate, and save to ``out``.

    ``set_`` holds ``key=value`` model-config overrides, ``train_set`` trainer overrides.
    Returns the trained model and its metrics.
    """
    model_spec = spec(name)
    dataset = load_dataset(data or model_spec.data)
    cfg: TrainConfig = apply_overrides(model_spec.train, train_set)
    if seed is not None:
        cfg = attrs.evolve(cfg, seed=seed)
    if epochs is not None:
        cfg = attrs.evolve(cfg, steps=max(1, math.ceil(epochs * len(dataset.train) / cfg.batch_size)))
    elif steps is not None:
        cfg = attrs.evolve(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, max(steps // 10, 0)))
    model_cfg = model_spec.config_for(dataset, set_)
    torch.manual_seed(cfg.seed)  # a fresh ('') part draws first, then the model: one seed makes both
    model = model_spec.instantiate(model_cfg, prepare_parts(model_cfg, progress=progress))
    model = train(model, dataset, cfg, out=out, device=device, resume=resume, progress=progress)
    metrics = model.evaluate(dataset)
    metrics = {"data": dataset.name, "steps": cfg.steps, "seed": cfg.seed, **metrics}
    if out is not None:
        model.save(
            out,
            metrics=metrics,
            source=f"trained with `polymodal train {name}` on {dataset.name} ({cfg.steps} steps, seed {cfg.seed})",
        )
    return model, metrics


def evaluate_folder(directory: str | Path, data: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Load a model folder and compute its family's metrics on ``data`` (the family default when None)."""
    model = load(directory, device=device)
    name = data or getattr(model, "default_data", None)  # a model may name the data it was adapted to
    if not name:
        name = next(e.obj.data for e in get_registry().entries("model") if e.obj.model_class is type(model))
    return model.evaluate(load_dataset(name))
