"""Collectives and gathered contrastive losses: 2 gloo processes against 1 process on the same global batch.

One module fixture spawns two ranks once; each runs every check (the collectives, plain and
multi-positive InfoNCE and CLIP's ContrastiveLoss under DDP) and saves its results, which the
tests compare with the one-process values computed here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polymodal.nn import collectives as C
from polymodal.objectives import (
    ContrastiveLoss,
    cross_entropy,
    gathered_logits,
    info_nce,
    info_nce_from_logits,
    similarity_logits,
)
from polymodal.plugins.clip import captions as cap
from polymodal.plugins.clip.objective import PositiveKeys, multi_positive_info_nce, positive_keys
from polymodal.testing.ranks import run_ranks

WORLD, LOCAL, TIMEOUT_S = 2, 4, 60
N = WORLD * LOCAL  # the global batch


# -- running ranks ----------------------------------------------------------------------------------


# -- the problems both sides solve ------------------------------------------------------------------


class Towers(nn.Module):
    """Two linear 'towers' producing the embeddings, and CLIP's learnable log logit scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(5, 6), nn.Linear(7, 6)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, kind: str, x: torch.Tensor, y: torch.Tensor, keys: PositiveKeys | None, gather: bool):
        a, b = self.image(x), self.text(y)  # (B, 6) each
        if kind == "info_nce":
            return info_nce(a, b, self.log_scale.exp(), gather=gather)
        return multi_positive_info_nce(a, b, self.log_scale.exp(), keys, gather=gather)


class ContrastiveTowers(nn.Module):
    """Two linear towers and :class:`ContrastiveLoss` (its own learnable scale), as FROMAGe uses it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(5, 6), nn.Linear(7, 6)
        self.contrastive = ContrastiveLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor, gather: bool):
        return self.contrastive(self.image(x), self.text(y), gather=gather)


def global_batch() -> tuple[torch.Tensor, torch.Tensor, PositiveKeys]:
    """Inputs (N, 5), (N, 7) and shapes-caption keys with many shared positives (partial captions)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randn(N, 7, generator=g)
    scenes, claims = [], []
    for i in range(N):
        cells = torch.randperm(9, generator=g)[: 1 + i % 3].tolist()
        objects = [(int(torch.randint(6, (), generator=g)), int(torch.randint(4, (), generator=g)), c) for c in cells]
        scenes.append(objects)
        claims.append([(None, k, None) for _, k, _ in objects])  # kind-only captions: true of many scenes
    return x, y, positive_keys(claims, scenes)


def local(t, rank: int):
    """This rank's slice of a global batch (tensor or keys)."""
    if isinstance(t, PositiveKeys):
        return PositiveKeys(*(local(u, rank) for u in t))
    return t[rank * LOCAL : (rank + 1) * LOCAL]


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict = {}
    # the primitives
    x = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_()  # (3, 2)
    w = torch.arange(12.0).reshape(6, 2) * (rank + 1)  # (6, 2)
    gathered = C.gather_with_grad(x)  # (6, 2)
    (gathered * w).sum().backward()
    out["gathered"], out["gathered_grad"] = gathered.detach(), x.grad
    out["gather_bool"] = C.gather(torch.tensor([[rank == 0, True]]))  # (2, 2)
    out["mean"] = C.all_reduce_mean(torch.tensor([1.0, 2.0]) * (rank + 1))
    out["sum_"] = C.all_reduce_sum_(torch.tensor([1, 2]) * (rank + 1))
    z = torch.ones(2, requires_grad=True)
    s = C.all_reduce_sum_with_grad(z * (rank + 1))
    (s * (rank + 1)).sum().backward()
    out["sum_with_grad"], out["sum_with_grad_grad"] = s.detach(), z.grad
    out["world"], out["rank"] = C.world_size(), C.rank()
    tokens = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0][: 2 + 3 * rank], requires_grad=True)  # 2 and 5 counted tokens
    share = C.share_of_global_mean(tokens.sum(), torch.tensor(tokens.numel()))
    share.backward()
    out["share"], out["share_grad"] = share.detach(), tokens.grad
    logits, targets = padded_tokens()
    ce, _ = cross_entropy(local(logits, rank), local(targets, rank))  # this rank's rows: 4 vs 12 counted tokens
    out["token_ce"] = ce.detach()

    # the losses: this rank's slice under DDP, with and without gathering
    xg, yg, keys = global_batch()
    for kind in ("info_nce", "multi_positive"):
        for gather in (True, False):
            model = DDP(Towers())
            loss = model(kind, local(xg, rank), local(yg, rank), local(keys, rank), gather)
            loss.backward()
            out[f"{kind}/{gather}/loss"], out[f"{kind}/{gather}/grads"] = loss.detach(), grads(model.module)
    # CLIP's ContrastiveLoss (FROMAGe): the learnable scale lives in the loss module
    model = DDP(ContrastiveTowers())
    loss, metrics = model(local(xg, rank), local(yg, rank), True)
    loss.backward()
    out["contrastive/loss"], out["contrastive/metrics"] = loss.detach(), metrics
    out["contrastive/grads"] = grads(model.module)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_worker)


def one_process(kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients of one process on the whole global batch."""
    x, y, keys = global_batch()
    model = Towers()
    loss = model(kind, x, y, keys, False)
    loss.backward()
    return loss.detach(), grads(model)


# -- the collectives --------------------------------------------------------------------------------


def test_collectives_on_two_ranks(ranks):
    for r, out in enumerate(ranks):
        assert (out["world"], out["rank"]) == (2, r)
        # rank-ordered concatenation; the backward sums every rank's gradient of its own slice
        assert torch.equal(out["gathered"], torch.cat([torch.arange(6.0).reshape(3, 2) + 10 * q for q in range(2)]))
        w = torch.arange(12.0).reshape(6, 2)
        assert torch.equal(out["gathered_grad"], (w * 1 + w * 2)[3 * r : 3 * r + 3])
        assert torch.equal(out["gather_bool"], torch.tensor([[True, True], [False, True]]))
        assert torch.equal(out["mean"], torch.tensor([1.5, 3.0]))
        assert torch.equal(out["sum_"], torch.tensor([3, 6]))
        assert torch.equal(out["sum_with_grad"], torch.tensor([3.0, 3.0]))
        assert torch.equal(out["sum_with_grad_grad"], torch.full((2,), 3.0 * (r + 1)))


def test_share_of_global_mean_averages_to_the_global_token_mean(ranks):
    """Ranks with 2 and 5 counted tokens: the mean of the shares is the mean over all 7 tokens, each token's
    gradient after rank-averaging 1/7 (a rank-local mean would give (1.5 + 3) / 2 and 1/4, 1/10)."""
    everything = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    mean = (ranks[0]["share"] + ranks[1]["share"]) / 2
    torch.testing.assert_close(mean, everything.mean(), atol=1e-6, rtol=0)
    for out in ranks:
        torch.testing.assert_close(out["share_grad"] / 2, torch.full_like(out["share_grad"], 1 / 7))


def padded_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, 4, 5) and targets (N, 4) whose first half of rows is mostly padding (-100)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, 4, 5, generator=g)  # (N, T, V)
    targets = torch.randint(0, 5, (N, 4), generator=g)  # (N, T)
    targets[: N // 2, 1:] = -100  # rank 0's rows: one counted token each; rank 1's: four
    return logits, targets


def test_token_cross_entropy_is_the_global_token_mean_on_two_ranks(ranks):
    """Ranks with different numbers of padding tokens: the mean of their cross-entropies (what gradient
    averaging optimises) is one process's mean over every counted token, not the mean of two local means."""
    logits, targets = padded_tokens()
    whole, _ = cross_entropy(logits, targets)
    torch.testing.assert_close((ranks[0]["token_ce"] + ranks[1]["token_ce"]) / 2, whole, atol=1e-6, rtol=0)
    local_means = [cross_entropy(local(logits, r), local(targets, r))[0] for r in range(WORLD)]
    assert abs((local_means[0] + local_means[1]) / 2 - whole) > 1e-3  # the check can fail


def test_collectives_are_identities_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert C.gather_with_grad(x) is x and C.all_reduce_sum_with_grad(x) is x
    assert torch.equal(C.gather(x), x) and not C.gather(x).requires_grad
    assert torch.equal(C.all_reduce_mean(x), x) and torch.equal(C.all_reduce_sum_(x.detach().clone()), x)
    assert (C.is_distributed(), C.world_size(), C.rank()) == (False, 1, 0)
    assert C.share_of_global_mean(torch.tensor(6.0), torch.tensor(4)) == 1.5


def test_collectives_reject_bad_input():
    with pytest.raises(ValueError, match=r"batch dimension.*got \(\)"):
        C.gather_with_grad(torch.tensor(1.0))
    with pytest.raises(ValueError, match="floating-point.*torch.int64"):
        C.all_reduce_mean(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expects a tensor; got list"):
        C.all_reduce_sum_([1.0])


# -- gathered contrastive losses --------------------------------------------------------------------

GRAD_TOL = dict(atol=1e-6, rtol=1e-6)
"""Gradients of magnitude up to ~7 summed in another order (two ranks, then the average): float32 rounding is
a few units in the last place of the value (4.8e-7 at 4), so a relative term joins the absolute one (seen:
1.9e-6 at 4.4 on an Intel Xeon's BLAS). Without gathering they differ by more than 1e-3 (the control below)."""


@pytest.mark.parametrize("kind", ["info_nce", "multi_positive"])
def test_gathered_loss_and_gradients_equal_one_process(ranks, kind):
    """Mean of the ranks' local losses == the 1-process loss; DDP-averaged gradients (towers and the
    learnable logit scale) == the 1-process gradients."""
    ref_loss, ref_grads = one_process(kind)
    mean = torch.stack([out[f"{kind}/True/loss"] for out in ranks]).mean()
    torch.testing.assert_close(mean, ref_loss, atol=1e-6, rtol=0)
    for out in ranks:
        for name, g in ref_grads.items():
            torch.testing.assert_close(out[f"{kind}/True/grads"][name], g, **GRAD_TOL, msg=name)
    assert ref_grads["log_scale"].abs() > 1e-4  # the scale's gradient is checked, not a zero


@pytest.mark.parametrize("kind", ["info_nce", "multi_positive"])
def test_without_gather_each_rank_sees_only_its_own_negatives(ranks, kind):
    """The control: without gathering, the ranks' losses are not the global batch's."""
    ref_loss, _ = one_process(kind)
    mean = torch.stack([out[f"{kind}/False/loss"] for out in ranks]).mean()
    assert (mean - ref_loss).abs() > 1e-3


def test_contrastive_loss_module_gathers(ranks):
    x, y, _ = global_batch()
    model = ContrastiveTowers()
    loss, metrics = model(x, y, False)
    loss.backward()
    mean = torch.stack([o["contrastive/loss"] for o in ranks]).mean()
    torch.testing.assert_close(mean, loss.detach(), atol=1e-6, rtol=0)
    for out in ranks:
        for name, g in grads(model).items():
            torch.testing.assert_close(out["contrastive/grads"][name], g, **GRAD_TOL, msg=name)
    for key in ("accuracy_i2t", "accuracy_t2i"):
        assert sum(o["contrastive/metrics"][key] for o in ranks) / 2 == pytest.approx(metrics[key])


def test_gather_is_the_plain_loss_in_one_process():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.equal(info_nce(a, b, 10.0, gather=True), info_nce(a, b, 10.0))
    assert torch.equal(similarity_logits(a, b, 10.0, gather=True), similarity_logits(a, b, 10.0))
    logits_ab, logits_ba, offset = gathered_logits(a, b, 10.0)
    assert offset == 0 and torch.equal(logits_ba, logits_ab.t())
    assert torch.equal(info_nce_from_logits(logits_ab, logits_ba), info_nce(a, b, 10.0))
    _, _, keys = global_batch()
    x, y = torch.randn(N, 4, generator=g), torch.randn(N, 4, generator=g)
    assert torch.equal(
        multi_positive_info_nce(x, y, 10.0, keys, gather=True), multi_positive_info_nce(x, y, 10.0, keys.matrix())
    )


def test_positive_keys_match_the_captions_positives():
    """Keys rebuild exactly the matrix :func:`captions.positives` computes (partial captions, empty scenes)."""
    g = torch.Generator().manual_seed(4)
    for trial in range(50):
        scenes, claims = [], []
        for i in range(1 + trial % 9):
            cells = torch.randperm(9, generator=g)[: int(torch.randint(0 if i == 2 else 1, 4, (), generator=g))]
            objects = [
                (int(torch.randint(6, (), generator=g)), int(torch.randint(4, (), generator=g)), int(c)) for c in cells
            ]
            keep = (torch.rand(3, generator=g) < 0.6).tolist()
            scenes.append(objects)
            claims.append([tuple(a if k else None for a, k in zip(o, keep)) for o in objects])
        if not any(scenes):
            continue
        assert torch.equal(positive_keys(claims, scenes).matrix(), cap.positives(claims, scenes))
    with pytest.raises(ValueError, match="one caption per scene; got 1 captions and 2 scenes"):
        positive_keys([[]], [[], []])


def test_info_nce_from_logits_checks_the_gathered_form():
    with pytest.raises(ValueError, match=r"one shape \(B, N\).*offset=5"):
        info_nce_from_logits(torch.zeros(2, 4), torch.zeros(2, 4), offset=5)
    with pytest.raises(ValueError, match="offset needs the gathered form"):
        info_nce_from_logits(torch.zeros(2, 2), offset=1)
