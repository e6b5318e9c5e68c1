"""Per-family collates: tokenising and caption re-sampling moved out of ``loss`` into the data pipeline.

For every registered variant of a family whose loss tokenises or re-samples captions,
``model.loss(collate(batch, step))`` must equal ``model.loss(batch)`` bit for bit under the same
torch seed (same loss, metrics, gradients and generator state afterwards: the random draws come in
the same order), the collate must pickle (DataLoader workers) and hold no weights. FROMAGe's
retrieval loss, gathered across 2 gloo ranks under DDP, equals the one-process loss and gradients
on the global batch.
"""

from __future__ import annotations

import functools
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from polymodal.data import load_dataset
from polymodal.objectives import ContrastiveLoss
from polymodal.plugins.fromage.objective import FromageTraining
from polymodal.registry import get_registry
from polymodal.testing import contracts
from polymodal.testing.ranks import run_ranks

FAMILIES = ("clip", "dalle", "rudolph", "lm", "flamingo", "fromage")
VARIANTS = [n for n in get_registry().names("model") if get_registry().get("model", n).model_class.family in FAMILIES]
STEPS = (0, 1000)  # before and after CLIP-shapes' first-view curriculum


@functools.lru_cache(maxsize=4)
def _dataset(name: str):
    return load_dataset(name)


def _model_and_batch(name: str):
    """A tiny seeded model of ``name`` in training mode and a 6-sample training batch."""
    spec = contracts.resolve(name)
    if hasattr(spec.model_class, "example_batch"):
        model = contracts.build(spec)
        batch = model.example_batch(6, torch.Generator().manual_seed(4))
    else:
        data = _dataset(spec.data)
        model = contracts.build(spec, dataset=data)
        batch = data.train.batch(list(range(6)))
    return model.train(), batch


def _run(model, batch, step: int) -> dict:
    """Loss, metrics (as floats), every gradient and the generator state after, from seed 11."""
    model.begin_step(step, 2000)
    torch.manual_seed(11)
    loss, metrics = model.loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {
        "loss": loss.detach(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "grads": grads,
        "rng": torch.get_rng_state(),
    }


def _assert_same(got: dict, want: dict, what: str) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], atol=0, rtol=0, msg=f"{what}: loss differs")
    assert got["metrics"] == want["metrics"], f"{what}: metrics differ"
    assert got["grads"].keys() == want["grads"].keys(), f"{what}: different parameters get gradients"
    for n, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, atol=0, rtol=0, msg=f"{what}: gradient of {n} differs")
    assert torch.equal(got["rng"], want["rng"]), f"{what}: the generator drew differently"


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_of_the_collated_batch_equals_loss_of_the_raw_batch(name):
    model, batch = _model_and_batch(name)
    collate = model.collator()
    assert collate is not None, f"{name}: its loss tokenises captions, so it needs a collator"
    shipped = pickle.loads(pickle.dumps(collate))  # what a DataLoader worker receives
    assert not any(isinstance(v, nn.Module) for v in vars(collate).values()), f"{name}: the collate holds a module"
    for step in STEPS:
        want = _run(model, batch, step)
        for label, fn in (("collate", collate), ("unpickled collate", shipped)):
            torch.manual_seed(11)
            collated = fn(batch, step)
            assert set(batch) <= set(collated), f"{name}: the collate dropped fields {set(batch) - set(collated)}"
            # the collate's draws and the loss's then follow one another as in the raw loss
            model.begin_step(step, 2000)
            loss, metrics = model.loss(collated)
            loss.backward()
            got = {
                "loss": loss.detach(),
                "metrics": {k: float(v) for k, v in metrics.items()},
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "rng": torch.get_rng_state(),
            }
            model.zero_grad(set_to_none=True)
            _assert_same(got, want, f"{name} at step {step} through the {label}")


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_metrics_are_detached_tensors_or_numbers(name):
    model, batch = _model_and_batch(name)
    _, metrics = model.loss(model.collator()(batch, 0))
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            assert v.dim() == 0 and not v.requires_grad, f"{name}: metric {k} is not a detached 0-dim tensor"
        else:
            assert isinstance(v, (int, float)), f"{name}: metric {k} is a {type(v).__name__}"


def test_clip_collate_is_the_data_pipeline_for_augmented_shapes():
    """CLIP-shapes: the shift augmentation and every caption view are done by the collate."""
    model, batch = _model_and_batch("clip-shapes")
    assert model.config.augment_shift > 0 and len(model.config.caption_views) > 1
    torch.manual_seed(3)
    out = model.collator()(batch, 1000)
    views = len(model.config.caption_views)
    assert len(out["text_ids"]) == len(out["positives"]) == views
    assert out["pixels"].shape[0] == len(batch["caption"]) and all(t.shape[0] == 6 for t in out["text_ids"])
    torch.manual_seed(4)
    assert not torch.equal(model.collator()(batch, 1000)["pixels"], out["pixels"])  # a fresh shift per call


def test_clip_collated_loss_equals_the_loss_composed_in_the_original_order():
    """The order CLIP's loss drew in before the collate existed: shift, then the caption views
    (positives as matrices), then the towers; the collated loss must be exactly that."""
    from polymodal.data.augment import random_translate
    from polymodal.objectives import info_nce
    from polymodal.plugins.clip import captions as cap
    from polymodal.plugins.clip.objective import multi_positive_info_nce

    model, batch = _model_and_batch("clip-shapes")
    for step in STEPS:
        model.begin_step(step, 2000)
        torch.manual_seed(11)
        images = random_translate(model.prepare(batch["image"]), model.config.augment_shift)
        views = cap.resample_views(model.config, batch, step)
        image, scale = model.encode_image(images), model.scale()
        terms = []
        for texts, pos in views:
            text = model.encode_text(model.tokenize(texts, truncate=True))
            terms.append(
                info_nce(image, text, scale) if pos is None else multi_positive_info_nce(image, text, scale, pos)
            )
        want = torch.stack(terms).mean()
        torch.manual_seed(11)
        got, _ = model.loss(model.collator()(batch, step))
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# -- FROMAGe's gathered retrieval loss on 2 ranks -----------------------------------------------------

WORLD, LOCAL, TIMEOUT_S = 2, 4, 60
LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1])  # repeated digits: distinct-negative groups span the ranks


class RetrievalTowers(FromageTraining, nn.Module):
    """Linear image and text 'towers' feeding FROMAGe's own retrieval loss (its groups and ContrastiveLoss)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        torch.manual_seed(0)
        self.config = SimpleNamespace(distinct_negatives=True)
        self.image, self.text = nn.Linear(5, 6), nn.Linear(7, 6)
        self.contrastive = ContrastiveLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.retrieval_loss({"label": labels}, self.image(x), self.text(y))[0]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(WORLD * LOCAL, 5, generator=g), torch.randn(WORLD * LOCAL, 7, generator=g)


def _ranks(fn) -> list[dict]:
    """``fn(rank, world) -> dict`` on WORLD gloo processes (killed after TIMEOUT_S); the results in rank order."""
    return run_ranks(fn, world=WORLD, timeout=TIMEOUT_S)


def _fromage_rank(rank: int, world: int) -> dict:
    model = nn.parallel.DistributedDataParallel(RetrievalTowers().train())
    x, y = _global_batch()
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    loss = model(x[mine], y[mine], LABELS[mine])
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.module.named_parameters()}}


def _both_rank(rank: int, world: int) -> dict:
    return {"fromage": _fromage_rank(rank, world), "clip": _clip_rank(rank, world)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """FROMAGe's and CLIP-shapes' rank results from one spawn of WORLD gloo processes."""
    return _ranks(_both_rank)


def test_fromage_retrieval_loss_gathered_over_two_ranks_equals_one_process(two_ranks):
    one = RetrievalTowers().train()
    x, y = _global_batch()
    want = one(x, y, LABELS)
    want.backward()
    assert len(one.contrastive_groups({"label": LABELS}, len(LABELS))) == 3  # groups of the global batch
    ranks = [r["fromage"] for r in two_ranks]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], want.detach(), atol=1e-6, rtol=0, msg=f"rank {r}: loss")
        for n, p in one.named_parameters():  # DDP's averaged gradients are the one-process ones
            torch.testing.assert_close(got["grads"][n], p.grad, atol=1e-6, rtol=0, msg=f"rank {r}: gradient of {n}")


# -- CLIP-shapes' loss (several caption views, multi-positive) gathered over 2 ranks ----------------------


def _clip_global() -> tuple[nn.Module, dict]:
    """Tiny CLIP-shapes without stochastic layers (dropout, drop-path) in training mode, and one collated
    global batch of WORLD·LOCAL scenes (seeded: every process draws the same)."""
    model, _ = _model_and_batch("clip-shapes")
    for m in model.modules():
        if hasattr(m, "p") and isinstance(m.p, float):  # nn.Dropout and DropPath
            m.p = 0.0
    batch = _dataset("shapes").train.batch(list(range(WORLD * LOCAL)))
    torch.manual_seed(2)
    return model, model.collator()(batch, 1000)


def _rows(batch: dict, rows: slice) -> dict:
    """The collated batch's samples ``rows`` (tensors and per-view ids and keys sliced alike)."""
    out = {}
    for k, v in batch.items():
        if k in ("text_ids", "positives"):
            out[k] = [
                None if t is None else type(t)(*(u[rows] for u in t)) if isinstance(t, tuple) else t[rows] for t in v
            ]
        else:
            out[k] = v[rows]
    return out


def _clip_rank(rank: int, world: int) -> dict:
    model, batch = _clip_global()
    ddp = nn.parallel.DistributedDataParallel(_LossModule(model))
    loss = ddp(_rows(batch, slice(rank * LOCAL, (rank + 1) * LOCAL)))
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


class _LossModule(nn.Module):
    """What DDP wraps: forward is the model's loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.loss(batch)[0]


def test_clip_shapes_loss_gathered_over_two_ranks_equals_one_process(two_ranks):
    model, batch = _clip_global()
    assert any(p is not None for p in batch["positives"]) and len(batch["text_ids"]) > 1
    want = model.loss(batch)[0]
    want.backward()
    ranks = [r["clip"] for r in two_ranks]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, want.detach(), atol=1e-6, rtol=0)
    for r, got in enumerate(ranks):
        assert got["grads"].keys() == {n for n, p in model.named_parameters() if p.grad is not None}
        for n, p in model.named_parameters():
            if p.grad is not None:  # DDP's averaged gradients are the one-process ones
                torch.testing.assert_close(got["grads"][n], p.grad, atol=1e-5, rtol=0, msg=f"rank {r}: {n}")
