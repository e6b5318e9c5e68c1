"""The trainer: schedule, exact resume, non-finite stop, checkpoints that survive interruption."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

import polymodal
from polymodal.config import apply_overrides
from polymodal.data import load_digits
from polymodal.train import TrainConfig, TrainingError, batches, lr_at, train

TINY = ["encoder.block.dim=32", "encoder.depth=2", "encoder.block.heads=2", "encoder.block.mlp_ratio=2.0"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny_vit(digits, seed=0):
    spec = polymodal.registry.get("model", "vit")
    cfg = apply_overrides(spec.model_class.config_for_data(spec.config, digits), TINY)
    torch.manual_seed(seed)
    return spec.model_class(cfg)


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_lr_schedule_starts_again_at_each_restart():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, restarts=(40,))
    plain = TrainConfig(steps=40, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    second = TrainConfig(steps=60, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(40)] == [lr_at(s, plain) for s in range(40)]  # phase 1 ends at its floor
    assert [lr_at(s, cfg) for s in range(40, 101)] == [lr_at(s, second) for s in range(61)]  # phase 2: anew
    assert lr_at(39, cfg) < 0.11 and lr_at(49, cfg) == pytest.approx(1.0)
    assert TrainConfig(restarts=[500]).restarts == (500,)  # a saved config's JSON list
    for bad in ((0,), (50, 40), (40, 40), (1.5,)):
        with pytest.raises(ValueError, match="restarts must be increasing positive step numbers"):
            TrainConfig(restarts=bad)


def test_batches_are_a_pure_function_of_seed_and_step():
    straight = [b.tolist() for _, b in zip(range(7), batches(10, 3, seed=1))]
    resumed = [b.tolist() for _, b in zip(range(3), batches(10, 3, seed=1, start_step=4))]
    assert straight[4:] == resumed
    assert sorted(sum(straight[:3], [])) == sorted(set(sum(straight[:3], [])))  # no repeats within an epoch


def test_resume_reaches_the_same_weights(digits, tmp_path):
    cfg = TrainConfig(steps=12, batch_size=16, warmup_steps=3, checkpoint_every=5, log_every=1)
    straight = train(tiny_vit(digits), digits, cfg, out=tmp_path / "a", progress=False)
    train(tiny_vit(digits), digits, cfg, out=tmp_path / "b", progress=False, stop_after=7)  # "interrupted"
    resumed = train(tiny_vit(digits, seed=123), digits, cfg, out=tmp_path / "b", progress=False, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_foreach_optimiser_and_ema_give_the_bits_of_the_per_tensor_loop(digits, monkeypatch):
    """The trainer runs AdamW, gradient clipping and the EMA with foreach kernels (a quarter of the per-tensor
    loop's cost on the CPU); they must reach exactly the weights of the per-tensor loop torch picks there."""
    from polymodal.train import ema as ema_module

    cfg = TrainConfig(steps=6, batch_size=16, warmup_steps=2, grad_clip=0.05, ema_decay=0.9, log_every=1)
    fast = train(tiny_vit(digits), digits, cfg, progress=False).state_dict()

    adamw, clip = torch.optim.AdamW, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: adamw(*a, **{**k, "foreach": False}))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clip(*a, **{**k, "foreach": False}))

    def per_tensor_update(self, model):
        self.updates += 1
        d = self.decay_at(self.updates)
        params = dict(model.named_parameters())
        for name, s in self.shadow.items():
            s.sub_((1 - d) * (s - params[name].detach()))
        return d

    monkeypatch.setattr(ema_module.EMAWeights, "update", per_tensor_update)
    slow = train(tiny_vit(digits), digits, cfg, progress=False).state_dict()
    assert fast.keys() == slow.keys()
    changed = [k for k in fast if not torch.equal(fast[k], slow[k])]
    assert not changed, changed


def test_training_changes_weights_and_uses_augmentation_rng(digits):
    model = tiny_vit(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, digits, TrainConfig(steps=3, batch_size=8, warmup_steps=0), progress=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_loss_stops_naming_the_step(digits):
    model = tiny_vit(digits)
    original = model.loss
    calls = {"n": 0}

    def loss(batch):
        calls["n"] += 1
        value, metrics = original(batch)
        return (value * float("nan") if calls["n"] == 4 else value), metrics

    model.loss = loss
    with pytest.raises(TrainingError, match="at step 3"):
        train(model, digits, TrainConfig(steps=10, batch_size=8, warmup_steps=0), progress=False)


def test_resume_without_checkpoint_is_a_clear_error(digits, tmp_path):
    with pytest.raises(TrainingError, match="needs a checkpoint"):
        train(tiny_vit(digits), digits, TrainConfig(steps=2), out=tmp_path, resume=True, progress=False)


def test_interrupted_checkpoint_write_keeps_the_previous_one(digits, tmp_path, monkeypatch):
    import polymodal.train.checkpoint as train_module

    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0, checkpoint_every=2)
    train(tiny_vit(digits), digits, cfg, out=tmp_path, progress=False)
    saved = (tmp_path / "checkpoint" / "trainer.json").read_text()

    def broken(path, tensors, metadata):
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(train_module, "save_state", broken)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_vit(digits), digits, attrs.evolve(cfg, steps=6), out=tmp_path, progress=False)
    assert (tmp_path / "checkpoint" / "trainer.json").read_text() == saved
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint" in names and not [n for n in names if n.startswith(".")], names  # no half-written leftover


def test_frozen_parts_stay_in_eval_mode_without_gradients():
    from torch import nn

    from polymodal.models import PolymodalModel

    class WithFrozen(PolymodalModel):
        config_class = dict
        frozen = ("teacher",)

        def __init__(self):
            super().__init__({})
            self.teacher = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
            self.student = nn.Linear(2, 2)
            self.freeze()

    m = WithFrozen().train()
    assert m.training and m.student.training
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.student.parameters())

    class Unset(WithFrozen):
        frozen = ("missing",)

    with pytest.raises(AttributeError, match="'missing'"):
        Unset()


def test_the_trainer_tells_the_model_its_global_step_across_resume(digits, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0, checkpoint_every=2)
    seen = []

    def run(resume, stop_after):
        model = tiny_vit(digits)
        original = model.begin_step
        model.begin_step = lambda step, total: (seen.append((step, total)), original(step, total))[1]
        train(model, digits, cfg, out=tmp_path, resume=resume, stop_after=stop_after, progress=False)
        return model

    run(False, 2)
    model = run(True, None)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert (model.train_step, model.train_steps) == (3, 4)


def test_default_data_is_the_registered_dataset_the_config_names(digits):
    model = tiny_vit(digits)
    assert model.default_data is None or model.default_data == getattr(model.config, "data", None)

    class Named:
        data = "digits"

    class Unknown:
        data = "no-such-dataset"

    for cfg, expected in ((Named(), "digits"), (Unknown(), None)):
        model.config = cfg
        assert model.default_data == expected


def test_a_checkpoint_leaves_out_frozen_parts_and_resumes_exactly(digits, tmp_path):
    # DALL·E's frozen VQ-VAE lives in its own folder; the checkpoint holds only what trains.
    from polymodal.io import read_state
    from polymodal.testing.contracts import tiny

    spec = tiny("dalle")

    def fresh():
        torch.manual_seed(0)
        return spec.build(digits)

    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=1, checkpoint_every=3)
    straight = train(fresh(), digits, cfg, out=tmp_path / "a", progress=False)
    keys = set(read_state(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    part = {f"vq.{k}" for k in straight.vq.state_dict()}
    assert keys and not keys & part, "the frozen tokenizer's weights are in the checkpoint"
    assert keys == set(straight.state_dict()) - part
    train(fresh(), digits, cfg, out=tmp_path / "b", progress=False, stop_after=4)
    resumed = train(fresh(), digits, cfg, out=tmp_path / "b", progress=False, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
