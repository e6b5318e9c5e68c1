"""DINO on 2 gloo processes trains exactly as 1 process on the same global batch.

The head's BatchNorm (student and teacher), the centre's batch mean and the collapse statistics
are synchronised across ranks; the multi-crop views are drawn once for the global batch (same
seed on every rank) and each rank takes its slice, so the only difference left is the split.
A control run with the BatchNorm left local shows the test can tell.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from test_collectives import run_ranks
from torch import nn

from polymodal.plugins.dino import VARIANTS
from polymodal.plugins.dino.distill import DINOHead, collapse_stats
from polymodal.plugins.dino.model import DINOModel
from polymodal.plugins.dino.sync import SyncBatchNorm1d

WORLD, LOCAL, STEPS, LR = 2, 4, 3, 1e-3  # SGD: one process permuting its batch moves the weights by ~1e-6
N = WORLD * LOCAL


def build() -> DINOModel:
    """The registered ``dino`` variant at toy size (BatchNorm head), no collapse check, fixed init."""
    spec = VARIANTS["dino"]
    config = DINOModel.tiny_config(spec.config)
    config = attrs.evolve(config, collapse_min_kl=0.0)
    torch.manual_seed(0)
    return DINOModel(config).train()


def global_views(model: DINOModel, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The global batch of step ``step`` (N, 1, 8, 8) and its multi-crop views, the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    images = torch.rand(N, 1, 8, 8, generator=g)
    return DINOModel.views(model, images, generator=g)  # the class's: the test sets a per-step override


class Loss(nn.Module):
    """What the trainer wraps: ``forward`` computes the loss, so DDP's hooks run."""

    def __init__(self, model: DINOModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def train(rank: int = 0, world: int = 1, local_bn: bool = False, fsdp: bool = False) -> dict:
    """STEPS of loss, backward, SGD and ``after_step`` on this rank's slice under DDP (or FSDP2 ``fully_shard``,
    the frozen teacher left whole); the weights, centre and per-step values."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build()
    if local_bn:  # the control: BatchNorm statistics of this rank's slice only
        for m in model.modules():
            if isinstance(m, SyncBatchNorm1d):
                m.forward = nn.BatchNorm1d.forward.__get__(m)
    wrapped = Loss(model)
    if world > 1:
        wrapped = fully_shard(wrapped, ignored_params=set(model.teacher.parameters())) if fsdp else DDP(wrapped)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    b = N // world
    losses, metrics = [], []
    for step in range(STEPS):
        globals_, locals_ = global_views(model, step)
        mine = ([v[rank * b : (rank + 1) * b] for v in globals_], [v[rank * b : (rank + 1) * b] for v in locals_])
        model.views = lambda images, generator=None, mine=mine: mine
        loss, m = wrapped({"image": torch.zeros(b, 1, 8, 8)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
        losses.append(loss.detach())
        metrics.append({k: m[k] for k in ("teacher_entropy", "kl_to_centre")})
    return {
        "state": {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()
        },
        "losses": losses,
        "metrics": metrics,
    }


@pytest.fixture(scope="module")
def one():
    return train()


def train_both(rank: int, world: int) -> dict:
    """This rank's runs: DDP and FSDP2 with synchronised statistics, and the control with local BatchNorm."""
    runs = {"ddp": train(rank, world), "fsdp": train(rank, world, fsdp=True)}
    return {**runs, "local": train(rank, world, local_bn=True)}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(train_both, world=WORLD)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two(ranks, request):
    return [out[request.param] for out in ranks]


def test_dino_two_ranks_reach_the_one_process_weights_and_centre(one, two):
    assert any(isinstance(m, SyncBatchNorm1d) for m in build().student.head.modules())
    for r, out in enumerate(two):
        for name, ref in one["state"].items():
            torch.testing.assert_close(out["state"][name], ref, atol=1e-5, rtol=0, msg=f"rank {r}: {name}")
    for step in range(STEPS):  # the loss of the global batch is the mean of the ranks' losses
        mean = (two[0]["losses"][step] + two[1]["losses"][step]) / 2
        torch.testing.assert_close(mean, one["losses"][step], atol=1e-5, rtol=1e-5)  # losses ~4: rounding ~1e-5
        for key in ("teacher_entropy", "kl_to_centre"):  # the collapse statistics are global on every rank
            # float32 trajectories summed in other orders; the KL is a difference of two sums the size of the loss
            # (~4, rounding ~1e-5 each): 1.3e-5 apart seen on an Intel Xeon
            for out in two:
                assert out["metrics"][step][key] == pytest.approx(one["metrics"][step][key], abs=5e-5)
    # the weights moved: equal weights are not the initial ones
    start = build().state_dict()
    assert (one["state"]["student.head.mlp.0.weight"] - start["student.head.mlp.0.weight"]).abs().max() > 1e-3
    assert not torch.equal(one["state"]["dino_loss.center"], start["dino_loss.center"])


def test_dino_with_local_batchnorm_would_differ(one, ranks):
    """The control: BatchNorm over each rank's half of the batch does not give one process's weights."""
    two = ranks[0]["local"]
    gap = max((two["state"][k] - v).abs().max().item() for k, v in one["state"].items() if v.is_floating_point())
    assert gap > 1e-4


def test_sync_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    sync, plain = SyncBatchNorm1d(6), nn.BatchNorm1d(6)
    plain.load_state_dict(sync.state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(sync(x), plain(x))
    assert sync.state_dict().keys() == plain.state_dict().keys()  # folders saved before load unchanged
    assert all(torch.equal(a, b) for a, b in zip(sync.state_dict().values(), plain.state_dict().values()))
    head = DINOHead(8, VARIANTS["dino"].config.head)
    assert sum(isinstance(m, SyncBatchNorm1d) for m in head.modules()) == 2


def test_collapse_stats_across_ranks_is_local_in_one_process():
    p = torch.softmax(torch.randn(6, 5), -1)
    assert collapse_stats(p, across_ranks=True) == collapse_stats(p)


def test_centre_counts_every_micro_batch_of_an_accumulated_step():
    """With gradient accumulation the centre moves by the mean teacher logits of the whole step, not its last part."""
    model = build()
    seen, views = [], model.teacher.views
    model.teacher.views = lambda *a, **k: seen.append(views(*a, **k)) or seen[-1]
    globals_, locals_ = global_views(model, 0)
    for half in (slice(0, LOCAL), slice(LOCAL, N)):  # two micro-batches of one optimiser step
        model.views = lambda images, generator=None, half=half: (
            [v[half] for v in globals_],
            [v[half] for v in locals_],
        )
        model.loss({"image": torch.zeros(LOCAL, 1, 8, 8)})
    before = model.dino_loss.center.clone()
    model.after_step()
    m = model.dino_loss.cfg.center_momentum
    mean = torch.cat([t for views_ in seen for t in views_]).mean(0, keepdim=True)  # (1, K) over both halves
    torch.testing.assert_close(model.dino_loss.center, m * before + (1 - m) * mean)
    assert not torch.allclose(mean, torch.cat(seen[-1]).mean(0, keepdim=True), atol=1e-3)  # the last half alone differs
