"""Objectives: segment-weighted cross-entropy and the contrastive loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.objectives import (
    ContrastiveLoss,
    cross_entropy,
    info_nce,
    info_nce_from_logits,
    retrieval_accuracies,
    similarity_logits,
)


def test_cross_entropy_matches_torch():
    logits, targets = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    targets[0, :2] = -100
    loss, metrics = cross_entropy(logits, targets)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    assert 0.0 <= metrics["accuracy"] <= 1.0
    smooth, _ = cross_entropy(logits, targets, label_smoothing=0.1)
    assert torch.allclose(smooth, F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), label_smoothing=0.1))


def test_segment_weights_one_zero_is_segment_zero_only():
    logits, targets = torch.randn(3, 8, 7), torch.randint(0, 7, (3, 8))
    seg = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])  # text then image
    loss, metrics = cross_entropy(logits, targets, segment_ids=seg, segment_weights=(1.0, 0.0))
    expected = F.cross_entropy(logits[:, :3].reshape(-1, 7), targets[:, :3].reshape(-1))
    assert torch.allclose(loss, expected)
    assert metrics["ce_segment_0"] == pytest.approx(expected.item(), rel=1e-5)


def test_dalle_weighting():
    logits, targets = torch.randn(2, 10, 5), torch.randint(0, 5, (2, 10))
    seg = torch.tensor([0] * 4 + [1] * 6)
    loss, _ = cross_entropy(logits, targets, segment_ids=seg, segment_weights=(1 / 8, 7 / 8))
    text = F.cross_entropy(logits[:, :4].reshape(-1, 5), targets[:, :4].reshape(-1))
    image = F.cross_entropy(logits[:, 4:].reshape(-1, 5), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss, text / 8 + 7 * image / 8)


def test_segments_respect_ignore_index_and_empty_segments():
    logits, targets = torch.randn(1, 4, 5), torch.randint(0, 5, (1, 4))
    targets[0, 2:] = -100  # segment 1 has no counted tokens
    seg = torch.tensor([[0, 0, 1, 1]])
    loss, metrics = cross_entropy(logits, targets, segment_ids=seg, segment_weights=(1.0, 1.0))
    assert torch.allclose(loss, F.cross_entropy(logits[0, :2], targets[0, :2]))
    assert metrics["ce_segment_1"] == 0.0
    all_ignored, _ = cross_entropy(logits, torch.full((1, 4), -100))
    assert all_ignored.item() == 0.0


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match="segment_ids"):
        cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), segment_weights=(1.0,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cross_entropy(
            torch.randn(1, 3, 4),
            torch.zeros(1, 3, dtype=torch.long),
            segment_ids=torch.tensor([0, 1, 2]),
            segment_weights=(0.5, 0.5),
        )
    with pytest.raises(ValueError, match="must match"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_cross_entropy_gradient_flows():
    logits = torch.randn(2, 4, 6, requires_grad=True)
    loss, _ = cross_entropy(
        logits, torch.randint(0, 6, (2, 4)), segment_ids=torch.tensor([0, 0, 1, 1]), segment_weights=(0.5, 0.5)
    )
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_contrastive_init_and_registry():
    import polymodal

    loss_fn = ContrastiveLoss()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert polymodal.registry.get("objective", "contrastive") is ContrastiveLoss
    assert polymodal.registry.get("objective", "cross-entropy") is cross_entropy
    from polymodal.nn.mae import masked_patch_loss
    from polymodal.plugins.dino.distill import DINOLoss

    assert polymodal.registry.get("objective", "masked-patches") is masked_patch_loss
    assert polymodal.registry.get("objective", "self-distillation") is DINOLoss
    loss, metrics = loss_fn(*loss_fn.example_inputs(4))
    assert set(metrics) == {"accuracy_i2t", "accuracy_t2i", "logit_scale"}
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_contrastive_symmetric_when_swapping(batch, dim, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    loss_fn = ContrastiveLoss()
    ab, m_ab = loss_fn(a, b)
    ba, m_ba = loss_fn(b, a)
    assert torch.allclose(ab, ba, atol=1e-5)
    assert m_ab["accuracy_i2t"] == m_ba["accuracy_t2i"] and m_ab["accuracy_t2i"] == m_ba["accuracy_i2t"]
    logits = similarity_logits(a, b, 10.0)
    assert torch.allclose(logits.t(), similarity_logits(b, a, 10.0), atol=1e-6)
    assert torch.allclose(info_nce(a, b, 10.0), info_nce(b, a, 10.0), atol=1e-5)


def test_contrastive_matches_functional_and_normalises():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    loss_fn = ContrastiveLoss()
    loss, _ = loss_fn(a * 7.0, b * 0.1)  # scaling the inputs does not matter
    assert torch.allclose(loss, info_nce(a, b, loss_fn.scale()), atol=1e-5)


def test_contrastive_loss_is_info_nce_at_its_scale():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g, requires_grad=True)
    loss_fn = ContrastiveLoss(init_temperature=0.2)
    loss, metrics = loss_fn(a, b)
    want = info_nce(a, b, loss_fn.scale())
    assert torch.equal(loss, want)  # the same computation, not a copy of it
    got_grads = torch.autograd.grad(loss, (a, b, loss_fn.logit_scale))
    want_grads = torch.autograd.grad(want, (a, b, loss_fn.logit_scale))
    for got, expected in zip(got_grads, want_grads):
        assert torch.equal(got, expected)
    logits = similarity_logits(a, b, loss_fn.scale())
    assert torch.equal(info_nce_from_logits(logits), want)
    assert metrics == {**retrieval_accuracies(logits), "logit_scale": pytest.approx(5.0)}
    with pytest.raises(ValueError, match=r"square \(B, B\).*\(6, 5\)"):
        loss_fn(a, b[:5])


def test_perfect_alignment_low_loss_and_full_accuracy():
    a = torch.eye(6, 16)
    loss, metrics = ContrastiveLoss()(a, a.clone())
    assert metrics["accuracy_i2t"] == 1.0 and metrics["accuracy_t2i"] == 1.0
    assert loss.item() < 1e-3
    random_loss, _ = ContrastiveLoss()(torch.randn(6, 16), torch.randn(6, 16))
    assert random_loss.item() > loss.item()


def test_logit_scale_never_exceeds_100():
    loss_fn = ContrastiveLoss()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=g)
    b = a + 0.3 * torch.randn(8, 16, generator=g)  # mostly aligned: the loss wants a larger scale
    opt = torch.optim.SGD(loss_fn.parameters(), lr=1e4)
    for _ in range(5):
        loss, metrics = loss_fn(a, b)
        assert metrics["logit_scale"] <= 100.0 + 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
        unclamped = loss_fn.logit_scale.item()
        loss_fn.clamp_()
        assert loss_fn.logit_scale.item() <= math.log(100) + 1e-6
    assert unclamped > math.log(100)  # the huge lr did push past the bound before clamping
    with torch.no_grad():
        loss_fn.logit_scale.fill_(50.0)
    assert loss_fn(a, b)[1]["logit_scale"] == pytest.approx(100.0, rel=1e-5)  # forward clamps too


def test_fixed_temperature():
    loss_fn = ContrastiveLoss(learnable=False, init_temperature=0.5)
    assert not loss_fn.logit_scale.requires_grad
    assert loss_fn.scale().item() == pytest.approx(2.0)
