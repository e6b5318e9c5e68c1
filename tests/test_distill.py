"""Self-distillation pieces (polymodal.plugins.dino.distill): head, loss, centre, EMA, schedules, collapse statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polymodal.plugins.dino.distill import (
    CollapseError,
    CollapseMonitor,
    DINOHead,
    DINOHeadConfig,
    DINOLoss,
    DINOLossConfig,
    collapse_stats,
    teacher_temperature,
)
from polymodal.train import TrainingError, cosine_momentum, ema_update_

pytestmark = pytest.mark.usefixtures("one_thread")

K = 12


def _pair(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = DINOHead(8, DINOHeadConfig(hidden_dim=16, bottleneck_dim=6, out_dim=K, batchnorm=True))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        for b in student.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    return teacher, student


def _views(seed: int, b: int = 5, n_student: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(b, K, generator=g) for _ in range(n_student)]
    teacher = [torch.randn(b, K, generator=g) for _ in range(2)]
    return student, teacher


# -- the head ---------------------------------------------------------------------------------------


def test_head_shapes_unit_prototypes_and_cosine_logits():
    torch.manual_seed(0)
    head = DINOHead(10, DINOHeadConfig(hidden_dim=32, bottleneck_dim=8, out_dim=50))
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 32), (32, 32), (32, 8)]  # 3 layers, bottleneck
    with torch.no_grad():
        head.last.direction.mul_(7.0)  # the gain is fixed: scaling V changes nothing
    w = head.last.weight()
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(50))
    x = torch.randn(6, 10)
    out = head(x)
    assert out.shape == (6, 50)
    assert out.abs().max() <= 1 + 1e-5  # L2-normalised bottleneck · unit prototypes = cosines
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(out, z @ w.t())


# -- EMA ----------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_ema_with_momentum_one_leaves_teacher_unchanged(seed):
    teacher, student = _pair(seed)
    before = {k: v.clone() for k, v in teacher.state_dict().items() if k.endswith(("weight", "bias", "direction"))}
    ema_update_(teacher, student, 1.0)
    after = teacher.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.floats(0.0, 0.999))
def test_ema_is_the_convex_combination(seed, m):
    teacher, student = _pair(seed)
    old = {k: p.detach().clone() for k, p in teacher.named_parameters()}
    ema_update_(teacher, student, m)
    for k, p in teacher.named_parameters():
        expected = m * old[k] + (1 - m) * dict(student.named_parameters())[k].detach()
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)
    for (name, tb), sb in zip(teacher.named_buffers(), student.buffers()):
        assert torch.equal(tb, sb), name  # BatchNorm statistics are copied


def test_ema_rejects_bad_momentum_and_mismatched_modules():
    teacher, student = _pair(0)
    with pytest.raises(ValueError, match=r"\[0, 1\]; got 1.5"):
        ema_update_(teacher, student, 1.5)
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update_(teacher, nn.Linear(2, 2), 0.5)


def test_cosine_momentum_schedule():
    values = [cosine_momentum(s, 100, 0.99) for s in range(0, 131, 10)]
    assert values[0] == pytest.approx(0.99) and values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(1.0)
    assert values[5] == pytest.approx(0.995)
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="total > 0"):
        cosine_momentum(0, 0, 0.99)


def test_teacher_temperature_warmup():
    assert teacher_temperature(0, 0.04, 0.07, 10) == pytest.approx(0.04)
    assert teacher_temperature(5, 0.04, 0.07, 10) == pytest.approx(0.055)
    assert teacher_temperature(10, 0.04, 0.07, 10) == teacher_temperature(99, 0.04, 0.07, 10) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07


# -- the loss and the centre ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.floats(0.0, 0.99))
def test_centre_moves_toward_the_batch_mean(seed, m):
    loss = DINOLoss(K, DINOLossConfig(center_momentum=m))
    g = torch.Generator().manual_seed(seed)
    loss.center.copy_(torch.randn(1, K, generator=g) * 3)
    _, teacher = _views(seed)
    mean = torch.cat(teacher).mean(0, keepdim=True)
    before = (loss.center - mean).norm().item()
    old = loss.center.clone()
    loss.update_center(teacher)
    torch.testing.assert_close(loss.center, m * old + (1 - m) * mean)
    assert (loss.center - mean).norm().item() <= before * m + 1e-5
    assert (loss.center - mean).norm().item() < before


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), step=st.integers(0, 50))
def test_loss_is_invariant_to_batch_order(seed, step):
    loss = DINOLoss(K, DINOLossConfig(warmup_teacher_temp_steps=20, warmup_teacher_temp=0.03))
    loss.center.copy_(torch.randn(1, K, generator=torch.Generator().manual_seed(seed + 1)))
    student, teacher = _views(seed, b=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(seed))
    a = loss(student, teacher, step)
    b = loss([s[perm] for s in student], [t[perm] for t in teacher], step)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_loss_skips_identical_views_and_averages_the_other_pairs():
    cfg = DINOLossConfig(student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04)
    loss = DINOLoss(K, cfg)
    loss.center.copy_(torch.randn(1, K))
    student, teacher = _views(3, n_student=3)

    def ce(t, s):
        q = F.softmax((t - loss.center) / 0.04, dim=-1)
        return -(q * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    pairs = [
        ce(teacher[0], student[1]),
        ce(teacher[0], student[2]),
        ce(teacher[1], student[0]),
        ce(teacher[1], student[2]),
    ]
    torch.testing.assert_close(loss(student, teacher), torch.stack(pairs).mean())


def test_loss_gradient_reaches_the_student_only():
    loss = DINOLoss(K)
    student, teacher = _views(4)
    student = [s.requires_grad_(True) for s in student]
    teacher = [t.requires_grad_(True) for t in teacher]
    loss(student, teacher).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_loss_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match="must be below student_temp"):
        DINOLossConfig(student_temp=0.1, teacher_temp=0.2)
    loss = DINOLoss(K)
    with pytest.raises(ValueError, match=rf"expected \(B, {K}\) logits"):
        loss([torch.randn(3, K + 1)] * 2, [torch.randn(3, K)] * 2)
    with pytest.raises(ValueError, match="no pair"):
        loss([torch.randn(3, K)], [torch.randn(3, K)])


# -- collapse -----------------------------------------------------------------------------------------


def test_collapse_stats_tell_apart_collapsed_and_healthy_outputs():
    same = F.softmax(torch.randn(1, K), -1).expand(8, K)
    uniform = torch.full((8, K), 1 / K)
    distinct = torch.eye(K)[:8]
    assert collapse_stats(same)["kl_to_centre"] == pytest.approx(0.0, abs=1e-6)
    u = collapse_stats(uniform)
    assert u["teacher_entropy"] == pytest.approx(math.log(K), abs=1e-5) and u["kl_to_centre"] == pytest.approx(
        0, abs=1e-6
    )
    d = collapse_stats(distinct)
    assert d["teacher_entropy"] == pytest.approx(0.0, abs=1e-5)
    assert d["kl_to_centre"] == pytest.approx(math.log(8), abs=1e-4)  # eight one-hots: log B nats of information


def test_collapse_monitor_waits_for_start_and_patience():
    monitor = CollapseMonitor(min_kl=0.01, patience=3, start=5)
    low = {"teacher_entropy": math.log(K), "kl_to_centre": 1e-5, "max_entropy": math.log(K)}
    high = dict(low, kl_to_centre=0.5)
    for step in range(5):
        monitor.update(step, low)  # ignored before ``start``
    monitor.update(5, low)
    monitor.update(6, low)
    monitor.update(7, high)  # a healthy step resets the count
    monitor.update(8, low)
    monitor.update(9, low)
    with pytest.raises(CollapseError, match=r"collapse at step 10.*uniform") as info:
        monitor.update(10, low)
    assert isinstance(info.value, TrainingError)
    CollapseMonitor(min_kl=0.0, patience=1).update(100, low)  # 0 disables the check
