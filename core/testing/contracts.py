"""Contract checks every registered model must pass; ``tests/test_contracts.py`` runs them all.

Each check raises ``AssertionError`` with a message that names the component and what is
wrong, so plugin authors can call them from their own tests::

    from polymodal.testing import contracts

    def test_my_model():
        contracts.check_all_model_contracts("my-model")      # a registered name or a ModelSpec

**Tiny variants.** Model checks build :func:`tiny` variants so that the whole registry
runs in seconds. A model class may define a classmethod::

    @classmethod
    def tiny_config(cls, config):
        '''The same architecture at toy size (a few thousand parameters).'''
        return attrs.evolve(config, encoder=attrs.evolve(config.encoder.with_block(dim=16, heads=2), depth=1))

Without one, :func:`shrink_config` lowers fields with the usual size names (``depth``,
``dim``, ``heads`` …, in nested configs too) where the config stays valid. A model still
above :data:`MAX_PARAMS` parameters is skipped with a message asking for ``tiny_config``.

**Optional hooks a model may define** (all looked up with ``getattr``):
``tiny_config(config)`` (classmethod, above); ``example_batch(batch_size, generator)`` a
training batch for :func:`check_loss_backward` (default: the first samples of the
variant's dataset); ``batch_independent = False`` for models whose outputs couple the
samples of a batch (contrastive logits), which skips the per-sample checks.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from polymodal.config import from_json, to_dict, to_json
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.models.tiny import resize_config, shrink_config, tiny_config  # noqa: F401  (part of the kit's API)

MAX_PARAMS = 3_000_000
"""Model checks skip variants whose tiny form still has more parameters than this."""

ATOL = 1e-5
"""Tolerance of the batch-independence check."""


# -- specs and tiny variants ------------------------------------------------------------------


def resolve(spec: str | ModelSpec) -> ModelSpec:
    """A :class:`ModelSpec` from a registered name (or the spec itself)."""
    if isinstance(spec, ModelSpec):
        return spec
    from polymodal.registry import get_registry

    return get_registry().get("model", spec)


def tiny(spec: str | ModelSpec) -> ModelSpec:
    """The variant at toy size (see the module docs), with a short training recipe."""
    spec = resolve(spec)
    train = attrs.evolve(
        spec.train,
        steps=min(spec.train.steps, 2),
        batch_size=min(spec.train.batch_size, 8),
        warmup_steps=0,
        checkpoint_every=0,
    )
    return dataclasses.replace(spec, config=tiny_config(spec.model_class, spec.config), train=train)


def _skip(message: str) -> None:
    try:
        import pytest
    except ImportError:  # pragma: no cover - the kit is used under pytest
        raise AssertionError(message) from None
    pytest.skip(message)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Add small noise to every parameter, so zero-initialised heads do not hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def build(
    spec: str | ModelSpec,
    *,
    use_tiny: bool = True,
    dataset: Any = None,
    seed: int = 0,
    perturb: bool = True,
    **overrides: Any,
) -> PolymodalModel:
    """A seeded model of ``spec`` (tiny by default), with config ``overrides``; skips huge ones."""
    spec = resolve(spec)
    if use_tiny:
        spec = tiny(spec)
    torch.manual_seed(seed)
    model = spec.build(dataset, **overrides)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        _skip(
            f"{type(model).__name__} has {n:,} parameters even at tiny size; define a "
            f"`tiny_config` classmethod on it (see polymodal.testing.contracts)"
        )
    if perturb:
        _perturb(model, seed)
    return model


def example_inputs(model: Any, batch_size: int, seed: int = 0) -> tuple:
    """``model.example_inputs(batch_size, generator)`` (the generator only where it is accepted)."""
    g = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.example_inputs).parameters
    inputs = (
        model.example_inputs(batch_size, generator=g) if "generator" in params else model.example_inputs(batch_size)
    )
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _tensors(out: Any, path: str = "output") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in a (nested) output: a tensor, tuple, list, dict or dataclass."""
    if isinstance(out, Tensor):
        yield path, out
    elif isinstance(out, (tuple, list)):
        for i, o in enumerate(out):
            yield from _tensors(o, f"{path}[{i}]")
    elif isinstance(out, dict):
        for k, o in out.items():
            yield from _tensors(o, f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(out):
        for f in dataclasses.fields(out):
            yield from _tensors(getattr(out, f.name), f"{path}.{f.name}")


def _run(model: Any, inputs: tuple) -> dict[str, Tensor]:
    with torch.no_grad():
        found = dict(_tensors(model(*inputs)))
    assert found, f"{type(model).__name__}.forward returned no tensors"
    return found


def _slice(inputs: tuple, i: int) -> tuple:
    return tuple(x[i : i + 1] if isinstance(x, Tensor) and x.dim() > 0 else x for x in inputs)


def _name(spec: ModelSpec) -> str:
    return spec.model_class.__name__


# -- model checks -------------------------------------------------------------------------------


def check_output_shapes(spec: str | ModelSpec, *, use_tiny: bool = True, **overrides: Any) -> None:
    """Every output tensor has the batch as its first dim, and the same trailing shape for B = 1 and 3."""
    spec = resolve(spec)
    model = build(spec, use_tiny=use_tiny, **overrides).eval()
    if not getattr(model, "batch_independent", True):
        return
    one, three = _run(model, example_inputs(model, 1)), _run(model, example_inputs(model, 3))
    assert one.keys() == three.keys(), (
        f"{_name(spec)}: outputs differ with the batch size: {sorted(one)} vs {sorted(three)}"
    )
    for key in one:
        a, b = one[key], three[key]
        assert a.dim() >= 1 and a.shape[0] == 1 and b.shape[0] == 3, (
            f"{_name(spec)}: {key} has shape {tuple(a.shape)} for batch 1 and {tuple(b.shape)} for batch 3; "
            "expected the batch first (set batch_independent = False if outputs couple samples)"
        )
        assert a.shape[1:] == b.shape[1:], f"{_name(spec)}: {key} trailing shape changes with the batch size"


def check_batch_independence(
    spec: str | ModelSpec, *, use_tiny: bool = True, atol: float = ATOL, **overrides: Any
) -> None:
    """In eval mode a sample's output is the same alone and inside a batch (to ``atol``)."""
    spec = resolve(spec)
    model = build(spec, use_tiny=use_tiny, **overrides).eval()
    if not getattr(model, "batch_independent", True):
        return
    inputs = example_inputs(model, 3, seed=1)
    full = _run(model, inputs)
    for i in range(3):
        alone = _run(model, _slice(inputs, i))
        for key, value in alone.items():
            torch.testing.assert_close(
                value,
                full[key][i : i + 1],
                atol=atol,
                rtol=0,
                msg=lambda m, k=key, i=i: f"{_name(spec)}: {k} of sample {i} differs alone and in a batch of 3: {m}",
            )


def check_finite_outputs(spec: str | ModelSpec, *, use_tiny: bool = True, **overrides: Any) -> None:
    """Outputs on example inputs are finite, in eval and in train mode."""
    spec = resolve(spec)
    model = build(spec, use_tiny=use_tiny, **overrides)
    inputs = example_inputs(model, 2, seed=2)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        for key, value in _run(model, inputs).items():
            if value.is_floating_point() or value.is_complex():
                assert torch.isfinite(value).all(), f"{_name(spec)}: {key} has non-finite values in {mode} mode"


def check_save_load_equal(spec: str | ModelSpec, *, use_tiny: bool = True, **overrides: Any) -> None:
    """``save`` then ``polymodal.load`` gives the same class, config, state and outputs."""
    from polymodal.api import load

    spec = resolve(spec)
    model = build(spec, use_tiny=use_tiny, **overrides).eval()
    inputs = example_inputs(model, 2, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save(folder, metrics={"contract": 1.0})
        for name in ("config.json", "model.safetensors", "README.md", "metrics.json"):
            assert (folder / name).is_file(), f"{_name(spec)}: the saved folder lacks {name}"
        loaded = load(folder)
    assert type(loaded) is type(model), f"{_name(spec)}: loaded a {type(loaded).__name__}"
    assert loaded.config == model.config, (
        f"{_name(spec)}: config changed on save/load:\n{loaded.config}\n{model.config}"
    )
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys(), f"{_name(spec)}: state keys differ: {sorted(set(mine) ^ set(theirs))}"
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), f"{_name(spec)}: {key} changed on save/load"
    a, b = _run(model, inputs), _run(loaded.eval(), inputs)
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], atol=0, rtol=0, msg=lambda m, k=key: f"{_name(spec)}: {k} differs after save/load: {m}"
        )


def check_part_folders(spec: str | ModelSpec, *, use_tiny: bool = True, **overrides: Any) -> None:
    """A composite keeps each pretrained part once: ``DIR/<field>/`` is a model folder of its own that
    loads alone as the part's registered variant with the part's weights, the parent's
    ``model.safetensors`` holds none of them, and save → load gives identical outputs.

    Variants whose config names no :class:`~polymodal.models.parts.PartConfig` pass trivially.
    """
    from polymodal.api import load
    from polymodal.io import read_state
    from polymodal.models.parts import part_fields
    from polymodal.registry import get_registry

    spec = resolve(spec)
    fields = part_fields(spec.config)
    if not fields:
        return
    assert set(fields) == set(spec.model_class.part_attributes), (
        f"{_name(spec)}.part_attributes names {sorted(spec.model_class.part_attributes)}; the config's part fields "
        f"are {sorted(fields)}"
    )
    model = build(spec, use_tiny=use_tiny, **overrides).eval()
    inputs = example_inputs(model, 2, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save(folder)
        parent = read_state(folder / "model.safetensors")
        assert parent.keys() == model.own_state_dict().keys(), (
            f"{_name(spec)}: model.safetensors is not own_state_dict()"
        )
        for name, part_config in fields.items():
            assert (folder / name / "config.json").is_file(), (
                f"{_name(spec)}: the saved folder lacks the part folder {name}/"
            )
            part = load(folder / name)
            variant = get_registry().get("model", part_config.variant).model_class
            assert type(part) is variant, (
                f"{_name(spec)}: {name}/ loads as a {type(part).__name__}, not a {variant.__name__}"
            )
            attr, mine = spec.model_class.part_attributes[name], model.part_modules()[name].state_dict()
            leaked = sorted({f"{attr}.{k}" for k in part.state_dict()} & parent.keys())
            assert not leaked, f"{_name(spec)}: model.safetensors repeats weights of the part {name}: {leaked[:3]}"
            for key, value in part.state_dict().items():
                assert torch.equal(value, mine[key]), (
                    f"{_name(spec)}: {name}/ holds another {key} than the model's part"
                )
        loaded = load(folder)
    a, b = _run(model, inputs), _run(loaded.eval(), inputs)
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], atol=0, rtol=0, msg=lambda m, k=key: f"{_name(spec)}: {k} differs after save/load: {m}"
        )


GROW = {"depth": 2, "layers": 2, "num_layers": 2, "dim": 24, "width": 24, "embed_dim": 24, "hidden_dim": 48}
"""The size fields :func:`grow_config` raises in a part's tiny config, and the value each is raised to."""


def grow_config(cfg: Any) -> Any:
    """``cfg`` with the size fields of :data:`GROW` raised (in nested configs too) wherever it stays valid:
    a part of another size than the tiny default, for :func:`check_nondefault_parts`."""
    return resize_config(cfg, GROW, grow=True)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _seeded_loss(model: Any, batch: Any) -> dict[str, Any]:
    torch.manual_seed(7)
    with torch.no_grad():
        loss, metrics = model.loss(batch)
    return {"loss": loss.item(), **metrics}


def check_nondefault_parts(spec: str | ModelSpec, *, use_tiny: bool = True) -> None:
    """A composite built with parts of another size than its defaults (each part's tiny variant
    grown by :func:`grow_config`, saved and given as a folder, as ``--set lm=DIR`` does) saves, loads
    back with :func:`polymodal.load`, and gives the same config, weights, outputs and seeded loss and
    metrics on a small batch.

    A config field that repeats a part's config (PIXEL's ``pretrain``) is given the grown config too.
    Variants without parts pass trivially.
    """
    from polymodal.api import load
    from polymodal.models.parts import part_fields
    from polymodal.registry import get_registry

    spec = resolve(spec)
    fields = part_fields(spec.config)
    if not fields:
        return
    small = tiny(spec) if use_tiny else spec
    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, Any] = {}
        grown: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, part in fields.items():
            part_spec = get_registry().get("model", part.variant)
            default_cfg = tiny_config(part_spec.model_class, part_spec.config)
            torch.manual_seed(11)
            default, bigger = part_spec.instantiate(default_cfg), part_spec.instantiate(grow_config(default_cfg))
            _perturb(bigger, 11)
            if _shapes(bigger) == _shapes(default):
                continue
            bigger.save(Path(tmp) / name)
            # a config field that repeats the part's config (PIXEL's `pretrain`) follows the part
            mirrors = {
                a.name: bigger.config
                for a in attrs.fields(type(small.config))
                if getattr(small.config, a.name) == default_cfg
            }
            trial = {**overrides, **mirrors, name: str(Path(tmp) / name)}
            overrides, grown[name] = trial, _shapes(bigger)
        assert grown, f"{_name(spec)}: no part grows past its tiny default ({', '.join(fields)}); see grow_config"
        try:  # as `--set lm=DIR` gives them
            model = build(small, use_tiny=False, **overrides).eval()
        except (ValueError, TypeError, RuntimeError) as exc:
            raise AssertionError(
                f"{_name(spec)} does not take its parts {', '.join(grown)} at another size: {exc}"
            ) from exc
        for name, shapes in grown.items():
            used = _shapes(model.part_modules()[name])
            assert all(used.get(k) == v for k, v in shapes.items()), (
                f"{_name(spec)}: the part {name} given from a folder was not the one built in"
            )
        if hasattr(spec.model_class, "example_batch"):
            batch = model.example_batch(2, torch.Generator().manual_seed(4))
        else:
            batch = _dataset(spec.data).train.batch([0, 1])
        inputs = example_inputs(model, 2, seed=6)
        folder = Path(tmp) / "model"
        model.save(folder)
        loaded = load(folder).eval()
    assert type(loaded) is type(model), f"{_name(spec)}: loaded a {type(loaded).__name__}"
    assert loaded.config_dict() == model.config_dict(), (
        f"{_name(spec)} with parts {', '.join(grown)} of another size: config changed on save/load:\n"
        f"{loaded.config_dict()}\n{model.config_dict()}"
    )
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys(), f"{_name(spec)}: state keys differ: {sorted(set(mine) ^ set(theirs))[:5]}"
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), (
            f"{_name(spec)} with parts {', '.join(grown)}: {key} changed on save/load"
        )
    a, b = _run(model, inputs), _run(loaded, inputs)
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], atol=0, rtol=0, msg=lambda m, k=key: f"{_name(spec)}: {k} differs after save/load: {m}"
        )
    before, after = _seeded_loss(model, batch), _seeded_loss(loaded, batch)
    assert before == after, (
        f"{_name(spec)} with parts {', '.join(grown)}: loss and metrics differ after save/load: {before} vs {after}"
    )


def _config_round_trip(cfg: Any, label: str) -> None:
    text = to_json(cfg)
    json.loads(text)  # plain JSON
    back = from_json(type(cfg), text)
    assert back == cfg, f"{label}: {type(cfg).__name__} changed through JSON:\n{back}\n{cfg}"


def check_config_json_round_trip(spec: str | ModelSpec) -> None:
    """The variant's config, its tiny form and its training recipe survive config → JSON → config."""
    spec = resolve(spec)
    for cfg in (spec.config, tiny_config(spec.model_class, spec.config), spec.train):
        _config_round_trip(cfg, _name(spec))
    data = json.loads(json.dumps(to_dict(spec.config)))
    assert spec.model_class.config_from_dict(data) == spec.config, (
        f"{_name(spec)}: config_from_dict(to_dict(config)) differs"
    )


@functools.lru_cache(maxsize=8)
def _dataset(name: str) -> Any:
    from polymodal.data import load_dataset

    return load_dataset(name)


def check_loss_backward(spec: str | ModelSpec, *, use_tiny: bool = True, batch_size: int = 4, **overrides: Any) -> None:
    """``loss`` on a small batch is a finite scalar with finite metrics (numbers or detached 0-dim tensors), and backward gives finite gradients.

    The batch is ``model.example_batch(batch_size, generator)`` when the model defines it,
    else the first samples of the variant's dataset (with the config adapted to it).
    """
    spec = resolve(spec)
    if hasattr(spec.model_class, "example_batch"):
        model = build(spec, use_tiny=use_tiny, **overrides)
        batch = model.example_batch(batch_size, torch.Generator().manual_seed(4))
    else:
        dataset = _dataset(spec.data)
        model = build(spec, use_tiny=use_tiny, dataset=dataset, **overrides)
        batch = dataset.train.batch(list(range(min(batch_size, len(dataset.train)))))
    model.train()
    loss, metrics = model.loss(batch)
    assert isinstance(loss, Tensor) and loss.dim() == 0, f"{_name(spec)}.loss must return a scalar tensor"
    assert torch.isfinite(loss), f"{_name(spec)}.loss is {loss.item()}"
    assert loss.requires_grad, f"{_name(spec)}.loss does not require grad (is it detached?)"
    assert isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics), (
        f"{_name(spec)}: metrics must be a dict"
    )
    shown = set(getattr(model, "progress_metrics", ())) - set(metrics)
    assert not shown, f"{_name(spec)}.progress_metrics names {sorted(shown)}, which loss does not return"
    for k, v in metrics.items():
        if isinstance(v, Tensor):  # a metric kept on the device (no host sync per step): a detached scalar
            assert v.dim() == 0 and not v.requires_grad, f"{_name(spec)}: metric {k!r} must be a detached 0-dim tensor"
            v = float(v)
        assert isinstance(v, (int, float)) and math.isfinite(v), (
            f"{_name(spec)}: metric {k!r} = {v!r} is not a finite number"
        )
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads, f"{_name(spec)}: the loss gives no parameter a gradient"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"{_name(spec)}: non-finite gradients in {bad[:5]}"
    assert any(bool(g.abs().sum() > 0) for g in grads.values()), f"{_name(spec)}: every gradient is zero"


MODEL_CHECKS = (
    check_output_shapes,
    check_batch_independence,
    check_finite_outputs,
    check_save_load_equal,
    check_config_json_round_trip,
    check_loss_backward,
)
"""Every per-model check, in the order :func:`check_all_model_contracts` runs them."""


def check_all_model_contracts(spec: str | ModelSpec) -> None:
    """Run every check in :data:`MODEL_CHECKS` on one variant."""
    for check in MODEL_CHECKS:
        check(spec)
