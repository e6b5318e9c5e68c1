"""EMA of the weights as a trainer option: the decay warm-ups (the same as diffusers' EMAModel), exact
resume, frozen parts untouched, ``ema_decay = 0`` changes nothing, and the model folder holds the EMA."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polymodal
from polymodal.config import apply_overrides
from polymodal.data import load_digits
from polymodal.io import read_state
from polymodal.train import TrainConfig, TrainingError, train
from polymodal.train.ema import EMAWeights

TINY = ["encoder.block.dim=32", "encoder.depth=2", "encoder.block.heads=2", "encoder.block.mlp_ratio=2.0"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny_vit(digits, seed=0):
    spec = polymodal.registry.get("model", "vit")
    cfg = apply_overrides(spec.model_class.config_for_data(spec.config, digits), TINY)
    torch.manual_seed(seed)
    return spec.model_class(cfg)


def _walk(model: nn.Module, steps: int, seed: int):
    """Moves ``model``'s parameters randomly ``steps`` times, as an optimiser would, yielding their
    values after each move."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        yield {k: v.detach().clone() for k, v in model.named_parameters()}


@settings(max_examples=20, deadline=None)
@given(
    decay=st.floats(0.5, 0.9999),
    start=st.integers(0, 4),
    warmup=st.sampled_from(["step", "power"]),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_the_ema_equals_diffusers_ema_model(decay, start, warmup, steps, seed):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ours = EMAWeights(model, decay, warmup=warmup, start=start)
    theirs = EMAModel(
        model.parameters(), decay=decay, update_after_step=start, use_ema_warmup=warmup == "power", power=2 / 3
    )
    for _ in _walk(model, steps, seed):
        d = ours.update(model)
        theirs.step(model.parameters())
        assert d == pytest.approx(theirs.cur_decay_value, abs=0, rel=1e-15)
    for s, t in zip(ours.shadow.values(), theirs.shadow_params):
        torch.testing.assert_close(s, t, atol=0, rtol=0)


def test_decay_warmups_by_hand():
    model = nn.Linear(2, 2)
    none = EMAWeights(model, 0.9, warmup="none", start=2)
    assert [none.decay_at(u) for u in range(1, 6)] == [0.0, 0.0, 0.0, 0.9, 0.9]
    step = EMAWeights(model, 0.999, warmup="step")
    assert [step.decay_at(u) for u in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert step.decay_at(10**7) == 0.999
    power = EMAWeights(model, 0.999, warmup="power", power=0.75)
    assert power.decay_at(2) == pytest.approx(1 - 2**-0.75)


def test_a_constant_decay_is_the_textbook_average():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    ema = EMAWeights(model, 0.8, warmup="none")
    walk = []
    for values in _walk(model, 5, seed=1):
        walk.append(values)
        ema.update(model)
    for name in init:
        expected = walk[0][name]  # the first update copies (diffusers' rule); then s ← 0.8 s + 0.2 p
        for w in walk[1:]:
            expected = 0.8 * expected + 0.2 * w[name]
        torch.testing.assert_close(ema.shadow[name], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, "decay must be a number in \\(0, 1\\); got 1.0"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 0.9, "warmup": "cosine"}, "warmup must be one of 'none', 'step', 'power'; got 'cosine'"),
        ({"decay": 0.9, "power": 0.0}, "power must be a number above 0; got 0.0"),
        ({"decay": 0.9, "start": -1}, "start must be a whole number >= 0; got -1"),
    ],
)
def test_bad_ema_arguments_name_what_was_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAWeights(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("ema_decay", 1.0, "TrainConfig.ema_decay must be in \\[0, 1\\)"),
        ("ema_decay", -0.5, "TrainConfig.ema_decay must be in"),
        ("ema_decay", float("nan"), "TrainConfig.ema_decay must be a finite number"),
        ("ema_warmup", "linear", "TrainConfig.ema_warmup must be one of"),
        ("ema_start", -3, "TrainConfig.ema_start must be in"),
        ("ema_power", 0.0, "TrainConfig.ema_power must be in"),
    ],
)
def test_bad_trainer_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_ema_decay_zero_changes_nothing(digits, tmp_path):
    cfg = TrainConfig(steps=5, batch_size=8, warmup_steps=1)
    a = train(tiny_vit(digits), digits, cfg, out=tmp_path / "a", progress=False)
    b = train(tiny_vit(digits), digits, attrs.evolve(cfg), progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not (tmp_path / "a" / "checkpoint" / "ema.safetensors").exists()
    assert "ema_updates" not in json.loads((tmp_path / "a" / "checkpoint" / "trainer.json").read_text())


def test_the_trained_model_holds_the_ema_and_the_checkpoint_the_raw_weights(digits, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=1, ema_decay=0.9, ema_warmup="none")
    seen = []
    model = tiny_vit(digits)
    ema = EMAWeights(model, 0.9, warmup="none")  # an independent average of the same steps
    trained = train(
        model, digits, cfg, out=tmp_path, progress=False, on_step=lambda step, m: (ema.update(model), seen.append(step))
    )
    assert seen == list(range(1, 7))
    raw = read_state(tmp_path / "checkpoint" / "model.safetensors")
    saved_ema = read_state(tmp_path / "checkpoint" / "ema.safetensors")
    params = dict(trained.named_parameters())
    assert set(saved_ema) == {k for k, p in params.items() if p.requires_grad}
    for name, value in saved_ema.items():
        assert torch.equal(params[name].detach(), value), name  # the returned model holds the EMA
        assert torch.equal(value, ema.shadow[name]), name
    assert any(not torch.equal(raw[n], saved_ema[n]) for n in saved_ema), "EMA weights equal the raw ones"
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["ema_updates"] == 6


def test_resume_continues_the_ema_exactly(digits, tmp_path):
    cfg = TrainConfig(steps=10, batch_size=8, warmup_steps=2, checkpoint_every=3, ema_decay=0.95, ema_start=1)
    straight = train(tiny_vit(digits), digits, cfg, out=tmp_path / "a", progress=False)
    train(tiny_vit(digits), digits, cfg, out=tmp_path / "b", progress=False, stop_after=5)  # "interrupted"
    resumed = train(tiny_vit(digits, seed=7), digits, cfg, out=tmp_path / "b", progress=False, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for file in ("model.safetensors", "ema.safetensors"):
        x, y = read_state(tmp_path / "a" / "checkpoint" / file), read_state(tmp_path / "b" / "checkpoint" / file)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (file, k)


def test_resume_refuses_another_decay_and_a_checkpoint_without_ema(digits, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0)
    train(tiny_vit(digits), digits, cfg, out=tmp_path, progress=False, stop_after=2)
    with pytest.raises(TrainingError, match="train.ema_decay=0.0.*train.ema_decay=0.99"):
        train(tiny_vit(digits), digits, attrs.evolve(cfg, ema_decay=0.99), out=tmp_path, resume=True)


def test_an_older_checkpoint_without_ema_fields_still_resumes(digits, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0)
    train(tiny_vit(digits), digits, cfg, out=tmp_path, progress=False, stop_after=2)
    meta_file = tmp_path / "checkpoint" / "trainer.json"
    meta = json.loads(meta_file.read_text())
    meta["train"] = {k: v for k, v in meta["train"].items() if not k.startswith("ema_")}  # written before EMA
    meta_file.write_text(json.dumps(meta))
    train(tiny_vit(digits), digits, cfg, out=tmp_path, progress=False, resume=True)


def test_an_older_checkpoint_without_backfilled_model_fields_still_resumes(digits, tmp_path):
    """BlockConfig options added later (``field(backfill=True)``: attn_scale, position_bias …) are absent from a
    checkpoint written before them; it resumes, and a run that sets one of them is still refused."""
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0)
    train(tiny_vit(digits), digits, cfg, out=tmp_path, progress=False, stop_after=2)
    meta_file = tmp_path / "checkpoint" / "trainer.json"
    meta = json.loads(meta_file.read_text())
    block = meta["model"]["encoder"]["block"]
    dropped = [k for k in ("attn_scale", "position_bias", "relative_buckets") if block.pop(k, "absent") != "absent"]
    assert dropped == ["attn_scale", "position_bias", "relative_buckets"]
    meta_file.write_text(json.dumps(meta))
    changed = tiny_vit(digits)
    changed.config = attrs.evolve(
        changed.config,
        encoder=attrs.evolve(changed.config.encoder, block=attrs.evolve(changed.config.encoder.block, attn_scale=1.0)),
    )
    with pytest.raises(TrainingError, match="attn_scale"):
        train(changed, digits, cfg, out=tmp_path, progress=False, resume=True)
    train(tiny_vit(digits), digits, cfg, out=tmp_path, progress=False, resume=True)


def test_frozen_parts_are_not_averaged(digits):
    from polymodal.testing.contracts import tiny

    torch.manual_seed(0)
    model = tiny("dalle").build(digits)
    frozen = {k: v.clone() for k, v in model.vq.state_dict().items()}
    ema = EMAWeights(model, 0.9)
    assert ema.shadow and not any(k.startswith("vq.") for k in ema.shadow)
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=0, ema_decay=0.9)
    trained = train(model, digits, cfg, progress=False)
    for k, v in trained.vq.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_the_model_folder_stores_and_reports_the_ema(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "vit"
    model, metrics = polymodal.train(
        "vit",
        steps=4,
        out=out,
        progress=False,
        train_set={"ema_decay": 0.9, "batch_size": 8},
        encoder={"depth": 1, "block": {"dim": 32, "heads": 2}},
    )
    assert metrics["ema_decay"] == 0.9
    saved = read_state(out / "model.safetensors")
    ema = read_state(out / "checkpoint" / "ema.safetensors")
    raw = read_state(out / "checkpoint" / "model.safetensors")
    for name, value in ema.items():
        assert torch.equal(saved[name], value), name
    assert any(not torch.equal(saved[n], raw[n]) for n in ema)
    assert "EMA (decay 0.9" in (out / "README.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["ema_decay"] == 0.9
    again = polymodal.evaluate_folder(out)
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
