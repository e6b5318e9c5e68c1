"""Issue 17, gradient checkpointing as a core option (``--set encoder.checkpointing=true``, or
``polymodal.nn.stack.set_checkpointing`` for any model): the same gradients (stochastic layers on, every
family, and under FSDP2 on 2 gloo ranks), less activation memory (measured on CPU as the peak bytes of live
tensor storage that the forward and backward allocate), untouched evaluation / ``no_grad`` / KV-cache paths,
and saved configs written before the field still load (``polymodal.config``'s ``runtime`` fields)."""

from __future__ import annotations

import json
import weakref

import attrs
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import polymodal
import polymodal.nn.stack as stack_module
from polymodal.config import apply_overrides, config, field, from_dict, runtime_fields, to_dict
from polymodal.nn import BlockConfig, KVCache, StackConfig, TransformerStack
from polymodal.nn.encoders import TextEncoder, TextEncoderConfig, ViTEncoder, ViTEncoderConfig
from polymodal.nn.stack import set_checkpointing
from polymodal.testing import contracts
from polymodal.testing.ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


class PeakMemory(TorchDispatchMode):
    """The peak, over the region, of the bytes of tensor storage allocated in it and still alive: every
    op's outputs are counted once per storage and uncounted when the storage is freed (CPU has no
    allocator statistics; this is what ``torch.cuda.max_memory_allocated`` measures on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.seen and storage.nbytes():
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _vit(checkpointing: bool, **block) -> ViTEncoder:
    torch.manual_seed(0)
    cfg = ViTEncoderConfig(image_size=16, patch_size=2, depth=6, checkpointing=checkpointing).with_block(
        dim=64, heads=4, **block
    )
    return ViTEncoder(cfg).train()


def _grads(model: torch.nn.Module, images: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout / drop-path draws in both runs
    model.zero_grad(set_to_none=True)
    model(images).square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_checkpointing_gives_the_same_gradients_with_stochastic_layers():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))  # (B, C, H, W)
    stochastic = {"dropout": 0.1, "attn_dropout": 0.1, "drop_path": 0.2}
    plain, checkpointed = _grads(_vit(False, **stochastic), images), _grads(_vit(True, **stochastic), images)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=0, msg=key)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_checkpointing_lowers_peak_activation_memory():
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))  # (B, C, H, W)
    peaks = {}
    for on in (False, True):
        model = _vit(on)
        with PeakMemory() as meter:
            model(images).square().mean().backward()
        peaks[on] = meter.peak
    # 6 blocks of (8, 65, 64) tokens: without checkpointing every block's activations (qkv, attention,
    # the 4x MLP …) are alive at the end of the forward; with it only each block's input is
    assert peaks[True] < 0.5 * peaks[False], peaks


def test_checkpointing_skips_no_grad_eval_inputs_and_the_kv_cache_but_not_a_frozen_path(monkeypatch):
    calls = []
    real = stack_module.checkpoint
    monkeypatch.setattr(stack_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = StackConfig(depth=2, block=BlockConfig(dim=32, heads=2), checkpointing=True)
    torch.manual_seed(0)
    stack = TransformerStack(cfg)
    plain = TransformerStack(attrs.evolve(cfg, checkpointing=False))
    plain.load_state_dict(stack.state_dict())
    x = torch.randn(2, 5, 32)  # (B, N, D)
    stack.eval(), plain.eval()
    torch.testing.assert_close(stack(x, causal=True), plain(x, causal=True), atol=0, rtol=0)
    stack.train(), plain.train()
    with torch.no_grad():
        stack(x)
    cache, step_out = KVCache(), []
    for i in range(5):  # decoding position by position with a cache, in training mode
        step_out.append(stack(x[:, i : i + 1], causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(step_out, 1), plain(x, causal=True), atol=1e-5, rtol=0)
    assert calls == []  # none of these recomputes
    out = stack(x.requires_grad_())
    assert len(calls) == 2  # training with gradients: once per block
    torch.testing.assert_close(out, plain(x), atol=0, rtol=0)
    stack.eval().requires_grad_(False), plain.eval().requires_grad_(False)  # a frozen LM gradients flow through
    (grad,) = torch.autograd.grad(stack(x).square().sum(), x)
    assert len(calls) == 4
    torch.testing.assert_close(grad, torch.autograd.grad(plain(x).square().sum(), x)[0], atol=1e-6, rtol=0)


def test_set_checkpointing_switches_every_stack_of_a_model():
    model = TextEncoder(TextEncoderConfig(vocab_size=32, context_length=8, depth=2).with_block(dim=16, heads=2))
    assert model.blocks.checkpointing is False
    assert set_checkpointing(model) == 1 and model.blocks.checkpointing is True
    assert set_checkpointing(model, False) == 1 and model.blocks.checkpointing is False
    assert TextEncoder(attrs.evolve(model.cfg, checkpointing=True)).blocks.checkpointing is True


def test_set_key_reaches_a_vit_and_its_saved_folder_loads_without_the_field(tmp_path):
    model = contracts.build("vit", perturb=False)
    cfg = apply_overrides(model.config, ["encoder.checkpointing=true"])
    assert cfg.encoder.checkpointing is True and "encoder.checkpointing" in runtime_fields(type(cfg))
    torch.manual_seed(0)
    on = type(model)(cfg)
    assert on.encoder.blocks.checkpointing is True
    on.save(tmp_path / "vit")
    header = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert header["config"]["encoder"]["checkpointing"] is True
    del header["config"]["encoder"]["checkpointing"]  # a folder saved before the field existed
    (tmp_path / "vit" / "config.json").write_text(json.dumps(header))
    back = polymodal.load(tmp_path / "vit")
    assert back.config.encoder.checkpointing is False
    images = on.example_inputs(2, torch.Generator().manual_seed(1))[0]  # (B, C, H, W)
    torch.testing.assert_close(back.eval()(images), on.eval()(images), atol=0, rtol=0)


def test_only_runtime_fields_may_be_missing_from_a_saved_config():
    @config
    class Old:
        width: int = field(4, "A width.")
        fast: bool = field(False, "How it runs; not what it computes.", runtime=True)

    assert from_dict(Old, {"width": 8}) == Old(width=8)
    assert runtime_fields(Old) == ["fast"]
    with pytest.raises(ValueError, match="Old is missing field\\(s\\) width"):
        from_dict(Old, {"fast": True})
    data = to_dict(ViTEncoderConfig())
    del data["checkpointing"], data["depth"]
    with pytest.raises(ValueError, match="missing field\\(s\\) depth;"):  # only depth is named
        from_dict(ViTEncoderConfig, data)
    assert runtime_fields(StackConfig) == ["checkpointing"]


# -- with FSDP2 ---------------------------------------------------------------------------------------------


def _small(checkpointing: bool) -> ViTEncoder:
    torch.manual_seed(0)
    cfg = ViTEncoderConfig(image_size=8, patch_size=2, depth=3, checkpointing=checkpointing)
    return ViTEncoder(cfg.with_block(dim=32, heads=2)).train()


def _fsdp_rank(rank: int, world: int) -> dict:
    """One rank: every block and then the whole checkpointed encoder under ``fully_shard``; its half of
    the batch forward and backward; the full gradients."""
    from torch.distributed.fsdp import fully_shard

    model = _small(True)
    for block in model.blocks.blocks:
        fully_shard(block)
    fully_shard(model)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    model(images[rank * 2 : (rank + 1) * 2]).square().mean().backward()
    return {k: p.grad.full_tensor() for k, p in model.named_parameters()}


def test_checkpointing_under_fsdp2_gives_the_single_process_gradients():
    sharded = run_ranks(_fsdp_rank, world=2, timeout=90)[0]
    plain = _small(False)
    plain(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    for key, param in plain.named_parameters():  # FSDP averages the ranks' gradients: the global mean's
        torch.testing.assert_close(sharded[key], param.grad, atol=1e-6, rtol=0, msg=key)


# -- every family -------------------------------------------------------------------------------------------

FAMILIES = ["vit", "vit-mae", "clip", "dino", "lm", "dalle", "igpt", "rudolph", "flamingo", "fromage", "imagebind"]


def _family_grads(name: str, on: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """A tiny ``name`` with every stack's checkpointing ``on``: the gradients of its seeded loss (on the
    batch ``contracts.check_loss_backward`` draws) and how many times its blocks ran (recomputing ones twice)."""
    spec = contracts.resolve(name)
    if hasattr(spec.model_class, "example_batch"):
        model = contracts.build(spec)
        batch = model.example_batch(4, torch.Generator().manual_seed(4))
    else:
        dataset = contracts._dataset(spec.data)
        model = contracts.build(spec, dataset=dataset)
        batch = dataset.train.batch(list(range(4)))
    assert set_checkpointing(model, on) >= 1
    runs = []
    for module in model.modules():
        if isinstance(module, stack_module.Block):
            module.register_forward_pre_hook(lambda *args: runs.append(1))
    model.train()
    torch.manual_seed(7)
    model.loss(batch)[0].backward()
    return len(runs), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpointing_every_family_gives_the_same_gradients(name):
    runs, plain = _family_grads(name, False)
    recomputed, checkpointed = _family_grads(name, True)
    assert recomputed > runs  # blocks did run again in the backward pass
    assert plain and plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=0, msg=key)
