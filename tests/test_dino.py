"""DINO: contracts, multi-crop, EMA teacher, collapse stop, evaluation pieces, attention maps, CLI, bad input."""

from __future__ import annotations

import json
import math

import attrs
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import polymodal
from polymodal.cli import main
from polymodal.eval.images import save_png
from polymodal.plugins.dino import VARIANTS, DINOModel
from polymodal.plugins.dino.attention_maps import centred_blobs, cls_attention, iou, last_attention, mass_mask
from polymodal.plugins.dino.crops import multi_crop, random_resized_crop
from polymodal.plugins.dino.distill import CollapseError
from polymodal.plugins.dino.evaluate import knn_accuracy, linear_probe_accuracy
from polymodal.testing import contracts
from polymodal.train import TrainingError, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str = "dino", **overrides) -> DINOModel:
    """The tiny variant, weights perturbed."""
    return contracts.build(name, **overrides)


@pytest.mark.parametrize("name", ["dino", "dino-shapes"])
def test_contracts(name):
    contracts.check_all_model_contracts(name)


# -- multi-crop and bad input -------------------------------------------------------------------


def test_multi_crop_shapes_and_counts():
    images = torch.rand(3, 3, 32, 32)
    g, local = multi_crop(
        images,
        global_size=32,
        local_size=16,
        global_scale=(0.4, 1.0),
        local_scale=(0.1, 0.4),
        local_crops=5,
        flip=0.5,
        jitter=0.2,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(g) == 2 and len(local) == 5
    assert all(v.shape == (3, 3, 32, 32) for v in g) and all(v.shape == (3, 3, 16, 16) for v in local)
    assert not torch.equal(g[0], g[1])  # two different random crops


def test_full_crop_without_flip_is_the_identity():
    images = torch.rand(2, 1, 8, 8)
    out = random_resized_crop(images, 8, (1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    flipped = random_resized_crop(images, 8, (1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-5, rtol=0)


def test_image_smaller_than_a_local_crop_raises():
    model = tiny("dino")
    with pytest.raises(ValueError, match=r"at least 4×4 pixels \(the local crop size\); got 3×3"):
        model.loss({"image": torch.rand(2, 1, 3, 3)})
    with pytest.raises(ValueError, match=r"at least 16×16 .* got 12×20"):
        multi_crop(
            torch.rand(2, 3, 12, 20),
            global_size=32,
            local_size=16,
            global_scale=(0.4, 1),
            local_scale=(0.1, 0.4),
            local_crops=2,
        )
    with pytest.raises(ValueError, match="expected 1 image channels; got 3"):
        model(torch.rand(2, 3, 8, 8))


def test_config_checks():
    cfg = VARIANTS["dino"].config
    with pytest.raises(ValueError, match="local_size must be a multiple of the patch size 2"):
        attrs.evolve(cfg, local_size=3)
    with pytest.raises(ValueError, match="global_scale"):
        attrs.evolve(cfg, global_scale=(0.9, 0.2))


# -- the teacher --------------------------------------------------------------------------------


def _step(model: DINOModel) -> None:
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    model.train()
    loss, _ = model.loss(model.example_batch(8, torch.Generator().manual_seed(1)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.after_step()


def test_teacher_gets_no_gradients_and_is_not_optimised():
    model = tiny("dino")
    assert all(not p.requires_grad for p in model.teacher.parameters())
    optimised = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert not optimised & {id(p) for p in model.teacher.parameters()}
    assert {id(p) for p in model.student.parameters()} <= optimised
    model.train()
    assert not model.teacher.training and model.student.training


def test_after_step_with_momentum_one_leaves_teacher_unchanged_and_moves_the_centre():
    model = tiny("dino", momentum=1.0)
    before = {
        k: v.clone() for k, v in model.teacher.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    centre = model.dino_loss.center.clone()
    _step(model)
    after = model.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not torch.equal(model.dino_loss.center, centre)
    assert int(model.steps_done) == 1


def test_after_step_moves_the_teacher_toward_the_student():
    model = tiny("dino", momentum=0.5)
    old = [p.clone() for p in model.teacher.parameters()]
    _step(model)
    for o, t, s in zip(old, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, 0.5 * o + 0.5 * s.detach())


def test_loss_never_reads_labels():
    model = tiny("dino").train()
    loss, metrics = model.loss({"image": torch.rand(4, 1, 8, 8)})  # no label field at all
    assert torch.isfinite(loss)
    assert {"teacher_entropy", "kl_to_centre", "teacher_temp", "momentum"} <= set(metrics)


def test_collapsed_teacher_stops_training_with_a_clear_error():
    from polymodal.data import load_dataset
    from polymodal.train import TrainConfig, train

    model = tiny("dino", collapse_start=0, collapse_patience=3, collapse_min_kl=1e-3)
    with torch.no_grad():  # the teacher's head maps every image to the same bottleneck vector
        for net in (model.teacher, model.student):
            last = [m for m in net.head.mlp if isinstance(m, torch.nn.Linear)][-1]
            last.weight.zero_()
            last.bias.fill_(1.0)
    model.student.head.mlp[-1].weight.requires_grad_(False)
    model.student.head.mlp[-1].bias.requires_grad_(False)
    with pytest.raises(TrainingError, match=r"DINO collapse at step 2: the teacher gives every image the same output"):
        train(
            model,
            load_dataset("digits"),
            TrainConfig(steps=10, batch_size=8, warmup_steps=0, checkpoint_every=0),
            progress=False,
        )


def test_collapse_error_is_reported_by_the_cli(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            "dino",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "m"),
            "--no-progress",
            "--set",
            "collapse_min_kl=100",
            "--set",
            "collapse_start=0",
            "--set",
            "collapse_patience=2",
            "--set",
            "encoder.depth=1",
            "--set",
            "encoder.block.dim=16",
            "--set",
            "encoder.block.heads=2",
        ],
    )
    assert result.exit_code != 0
    assert "DINO collapse at step 1" in result.output
    assert issubclass(CollapseError, TrainingError)


# -- evaluation pieces --------------------------------------------------------------------------


def test_weighted_knn_votes_by_similarity():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    train_y = torch.tensor([0, 0, 1, 1, 1])
    test_x = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([0, 1]), k=2) == 1.0
    # all five neighbours vote: three class-1 points, but the class-0 points are far more similar
    assert knn_accuracy(train_x, train_y, test_x[:1], torch.tensor([0]), k=5, temperature=0.05) == 1.0
    assert knn_accuracy(train_x, train_y, test_x[:1], torch.tensor([0]), k=5, temperature=100.0) == 0.0


def test_linear_probe_separates_separable_data_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) == 1.0
    noise = torch.randn(200, 16, generator=g)
    assert linear_probe_accuracy(noise[:150], y[:150], noise[150:], y[150:]) < 0.5


def test_last_attention_reproduces_the_blocks_output():
    model = tiny("dino-shapes").eval()
    enc = model.teacher.backbone
    images = torch.rand(2, 3, 32, 32)
    probs = last_attention(enc, images)  # (B, H, 1 + N, 1 + N)
    _, hidden = enc(images, return_hidden=True)
    block = enc.blocks.blocks[-1]
    x = block.norm1(hidden[-2])
    v = block.attn._heads(block.attn.qkv(x).chunk(3, dim=-1)[2])  # (B, H, 1 + N, Dh)
    mixed = (probs @ v).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block.attn.proj(mixed), block.attn(x), atol=1e-5, rtol=1e-5)
    maps = cls_attention(enc, images)
    assert maps.shape == (2, enc.cfg.block.heads, 8, 8)
    assert (maps.flatten(2).sum(-1) <= 1 + 1e-5).all()


def test_mass_mask_blobs_and_iou():
    maps = torch.tensor([[0.5, 0.3], [0.15, 0.05]])[None]
    assert mass_mask(maps, 0.6).tolist() == [[[True, True], [False, False]]]
    assert mass_mask(maps, 0.5).tolist() == [[[True, False], [False, False]]]
    blobs = centred_blobs(torch.tensor([4, 12]), 8)
    assert blobs.flatten(1).sum(1).tolist() == [4, 12]
    assert blobs[0, 3:5, 3:5].all()
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2, :2], b[0, :2, :] = True, True
    assert iou(a, b).item() == pytest.approx(0.5)


# -- folders and commands -----------------------------------------------------------------------


def test_eval_and_attention_maps_commands(tmp_path):
    model = tiny("dino-shapes", data="shapes")
    model.save(tmp_path / "m")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    for key in ("knn_accuracy", "linear_probe_accuracy", "attention_mask_iou", "centred_blob_iou"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    images = []
    for i in range(2):
        images.append(str(save_png(torch.rand(3, 32, 32), tmp_path / f"img{i}.png")))
    result = runner.invoke(
        main, ["dino", "attention-maps", str(tmp_path / "m"), *images, "--out", str(tmp_path / "att")]
    )
    assert result.exit_code == 0, result.output
    heads = model.config.encoder.block.heads
    for i in range(2):
        for h in range(heads):
            assert (tmp_path / "att" / f"img{i}_head{h}.png").is_file()
        assert (tmp_path / "att" / f"img{i}_mean.png").is_file()
    assert (tmp_path / "att" / "grid.png").is_file()
    from PIL import Image

    with Image.open(tmp_path / "att" / "img0_head0.png") as img:
        assert img.size == (32 * 8, 32 * 8)
    result = runner.invoke(
        main, ["dino", "attention-maps", str(tmp_path / "m"), "--test-images", "3", "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "test_002_mean.png").is_file() and not (tmp_path / "t" / "test_003_mean.png").exists()
    with Image.open(tmp_path / "t" / "grid.png") as img:  # three rows of (input, heads, mean) 32-pixel tiles
        assert img.size == (8 * ((2 + heads) * 33 + 1), 8 * (3 * 33 + 1))
    result = runner.invoke(main, ["dino", "attention-maps", str(tmp_path / "m"), "--out", str(tmp_path / "n")])
    assert result.exit_code != 0 and "--test-images" in result.output
    # a rerun into the same folder replaces what the last run wrote (test_001 is gone); a user's own file stays,
    # and a folder of the user's files is refused before any work
    result = runner.invoke(
        main, ["dino", "attention-maps", str(tmp_path / "m"), images[0], "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "img0_mean.png").is_file() and not (tmp_path / "t" / "test_001_mean.png").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "grid.png").write_bytes(b"the user's")
    result = runner.invoke(
        main, ["dino", "attention-maps", str(tmp_path / "m"), images[0], "--out", str(tmp_path / "mine")]
    )
    assert result.exit_code != 0 and "did not write" in result.output
    assert (tmp_path / "mine" / "grid.png").read_bytes() == b"the user's"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["grid.png"]


def test_attention_maps_command_rejects_other_families(tmp_path):
    contracts.build("vit").save(tmp_path / "vit")
    img = save_png(torch.rand(1, 8, 8), tmp_path / "x.png")
    result = CliRunner().invoke(
        main, ["dino", "attention-maps", str(tmp_path / "vit"), str(img), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and "not a DINO model" in result.output


def test_save_load_keeps_centre_and_step(tmp_path):
    model = tiny("dino")
    _step(model)
    model.save(tmp_path / "m")
    loaded = polymodal.load(tmp_path / "m")
    assert torch.equal(loaded.dino_loss.center, model.dino_loss.center)
    assert int(loaded.steps_done) == 1
    assert math.isfinite(float(loaded(torch.rand(2, 1, 8, 8)).sum()))
    assert F.cosine_similarity(
        loaded(torch.ones(1, 1, 8, 8)), model.eval()(torch.ones(1, 1, 8, 8))
    ).item() == pytest.approx(1.0)


def test_head_batch_statistics_shared_or_per_crop_size():
    model = tiny("dino")
    views = [torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8), torch.rand(3, 1, 4, 4)]
    model.eval()  # running statistics: the grouping cannot matter
    for a, b in zip(model.student.views(views, True), model.student.views(views, False)):
        torch.testing.assert_close(a, b)
    model.train()  # batch statistics: over all views, or per crop size
    shared, split = model.student.views(views, True), model.student.views(views, False)
    assert all(s.shape == (3, model.config.head.out_dim) for s in shared)
    assert not torch.allclose(shared[0], split[0])
    alone = model.student.head(model.student.features(torch.cat(views[:2])))  # the global views' own statistics
    torch.testing.assert_close(torch.cat(split[:2]), alone)


def test_momentum_schedule_spans_the_trainers_run_unless_fixed():
    model = tiny()
    base = model.config.momentum
    model.begin_step(0, 40)  # what the trainer says before a 40-step run's first step
    assert model.momentum_at(0) == pytest.approx(base)
    assert model.momentum_at(20) == pytest.approx((1 + base) / 2)
    assert model.momentum_at(40) == pytest.approx(1.0)
    fixed = tiny(momentum_steps=10)
    fixed.begin_step(0, 40)
    assert fixed.momentum_at(10) == pytest.approx(1.0)
