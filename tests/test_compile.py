"""Issue 17, ``--compile`` and CPU bf16: a tiny ViT trains through ``compile_loss`` with every graph compiled
once and never recompiled across steps (a counting backend, and dynamo told to raise on any recompile),
to the same losses as without compiling; a machine that cannot compile is a clear :class:`CompileError`;
and ``precision='bf16'`` trains on CPU under autocast with a finite loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polymodal.config import apply_overrides
from polymodal.data import load_digits
from polymodal.nn.stack import set_checkpointing
from polymodal.registry import get_registry
from polymodal.train import TrainConfig, train
from polymodal.train.compile import CompileError, check_compile, compile_loss

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["encoder.block.dim=32", "encoder.depth=2", "encoder.block.heads=2", "encoder.block.mlp_ratio=2.0"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny_vit(digits):
    spec = get_registry().get("model", "vit")
    cfg = apply_overrides(spec.model_class.config_for_data(spec.config, digits), TINY)
    torch.manual_seed(0)
    return spec.model_class(cfg)


class Loss(nn.Module):
    """What the trainer compiles: ``forward(batch)`` is the family's loss (the distributed LossModule's way)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def _steps(module: nn.Module, opt: torch.optim.Optimizer, digits, steps: int, start: int = 0) -> list[float]:
    """``steps`` optimiser steps from ``start`` (a new learning rate and seeded augmentation each)."""
    losses = []
    for step in range(start, start + steps):
        torch.manual_seed(step)
        opt.param_groups[0]["lr"] = 1e-3 / (1 + step)
        index = torch.arange(step * 16, (step + 1) * 16)
        loss, _ = module(digits.train.batch(index))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _usable(backend: str) -> None:
    try:
        check_compile(backend)
    except CompileError as exc:
        pytest.skip(f"torch.compile is unavailable here: {exc}")


def _compiles_once(digits, backend: str, steps: int = 5, checkpointing: bool = False) -> int:
    """Train a tiny ViT ``steps`` steps through ``compile_loss(backend=...)`` and eagerly; check that only the
    first step compiles (later ones under dynamo's ``error_on_recompile``), that the state-dict keys are
    unchanged and that the losses match eager ones. Returns how many graphs the first step compiled."""
    _usable(backend)
    dynamo.reset()
    counter = CompileCounterWithBackend(backend)  # counts every graph handed to the backend
    eager = Loss(tiny_vit(digits))
    eager_losses = _steps(eager, torch.optim.AdamW(eager.parameters()), digits, steps)
    model = tiny_vit(digits)
    set_checkpointing(model, checkpointing)  # recomputed blocks compile too, and give the same losses
    module = compile_loss(Loss(model), backend=counter, check=False)
    assert "_orig_mod" not in "".join(module.state_dict())  # compiled in place: checkpoints keep their keys
    opt = torch.optim.AdamW(module.parameters())
    first = _steps(module, opt, digits, 1)
    graphs = counter.frame_count  # one per piece between graph breaks, each block's own included
    with dynamo.config.patch(error_on_recompile=True):  # from here on, any recompilation raises
        losses = first + _steps(module, opt, digits, steps - 1, start=1)
    # the later steps (the same shapes, new data, a new learning rate) compile nothing
    assert graphs >= 1 and counter.frame_count == graphs, (graphs, counter.frame_count)
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), atol=1e-5, rtol=1e-5)
    return graphs


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compiled_loss_never_recompiles_across_steps(digits, checkpointing):
    graphs = _compiles_once(digits, "aot_eager", checkpointing=checkpointing)
    if not checkpointing:  # no graph break anywhere (the attention dispatcher's ContextVar once made 11)
        assert graphs == 1, graphs


@pytest.mark.slow
def test_the_default_inductor_backend_compiles_the_loss_once(digits):
    _compiles_once(digits, "inductor", steps=3)


def test_a_backend_that_cannot_compile_is_a_clear_error(digits):
    def broken(gm, example_inputs):
        raise OSError("cc: command not found")

    module = Loss(tiny_vit(digits))
    with pytest.raises(
        CompileError,
        match=r"--compile: torch.compile with the 'broken' backend cannot compile.*"
        r"cc: command not found.*or train without --compile",
    ):
        compile_loss(module, backend=broken)
    with pytest.raises(ValueError, match="dynamic=False; got dynamic=True"):
        compile_loss(module, backend="eager", dynamic=True)
    with pytest.raises(ValueError, match="expects an nn.Module, got function"):
        compile_loss(broken)


def test_bf16_autocast_trains_on_cpu(digits):
    model = tiny_vit(digits)
    dtypes = set()
    model.encoder.blocks.blocks[0].mlp.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    losses = []
    cfg = TrainConfig(steps=4, batch_size=16, warmup_steps=0, precision="bf16", checkpoint_every=0)
    train(model, digits, cfg, progress=False, on_step=lambda step, m: losses.append(m["loss"]))
    assert dtypes == {torch.bfloat16}  # the blocks ran under bf16 autocast
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
