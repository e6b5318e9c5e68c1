"""unCLIP composite: parts fitted to the CLIP, loss, the prior's statistics, folders with part sub-folders,
text → image, variations, interpolation, text diffs, the sample command, and every bad input of issue 19.

Every model here is tiny and untrained (fresh tiny CLIP, prior, decoder and SR3), with weights perturbed so
that no head is trivially zero.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from polymodal.api import load
from polymodal.data import load_dataset
from polymodal.io.samples import MANIFEST
from polymodal.models.parts import PartConfig
from polymodal.plugins.unclip import VARIANTS, UnCLIP, UnCLIPCascade, UnCLIPConfig
from polymodal.plugins.unclip import condition as cond
from polymodal.plugins.unclip import sample as smp
from polymodal.plugins.unclip.decoder import UnCLIPDecoder
from polymodal.plugins.unclip.evaluate import generative_samples, split_losses
from polymodal.plugins.unclip.prior import DiffusionPrior
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes")


def make(name: str, dataset, seed: int = 0, **overrides) -> UnCLIP:
    """A tiny composite adapted to ``dataset``, perturbed, with the prior's statistics fitted on 64 images."""
    model = contracts.build(name, dataset=dataset, seed=seed, **overrides).eval()
    model.fit_clip_stats(dataset.train["image"][:64])
    return model


@pytest.fixture(scope="module")
def model(digits):
    return make("unclip", digits)


@pytest.fixture(scope="module")
def cascade(shapes):
    return make("unclip-shapes", shapes)


def fast(model, **extra):
    """Cheap sampling options for the tiny parts."""
    return {"steps": 3, **extra}


# -- the recipe ---------------------------------------------------------------------------------------------
def test_variants_and_their_parts():
    assert VARIANTS["unclip"].parts() == [("clip", "clip"), ("prior", "unclip-prior"), ("decoder", "unclip-decoder")]
    assert VARIANTS["unclip-shapes"].parts()[-1] == ("upsampler", "sr3")
    assert VARIANTS["unclip-shapes"].model_class is UnCLIPCascade
    families = {VARIANTS[n].model_class.family for n in VARIANTS}
    assert families == {"unclip", "unclip-cascade", "unclip-prior", "unclip-decoder"}  # one class per family


def test_config_refuses_inconsistent_sizes():
    with pytest.raises(ValueError, match="decoder_size must be at most image_size=8; got 16"):
        UnCLIPConfig(image_size=8, decoder_size=16)
    with pytest.raises(ValueError, match="needs an upsampler"):
        UnCLIPConfig(image_size=32, decoder_size=16)
    with pytest.raises(ValueError, match="unclip-cascade"):
        UnCLIP(attrs.evolve(contracts.tiny("unclip").config, upsampler=PartConfig(variant="sr3", path="", tiny=True)))


def test_fresh_parts_are_built_for_the_clip_and_the_data(model, cascade):
    for m in (model, cascade):
        clip = m.clip.config
        assert (m.prior.config.embed_dim, m.prior.config.text_dim) == (clip.embed_dim, clip.text.dim)
        assert m.prior.config.text_len == clip.text.context_length
        assert (m.decoder.config.embed_dim, m.decoder.config.text_dim) == (clip.embed_dim, clip.text.dim)
    assert model.decoder.image_shape == (1, 8, 8)
    assert cascade.decoder.image_shape == (3, 16, 16)  # the SR3 brings it to 32×32
    assert (cascade.config.image_size, cascade.upsampler.config.low_size) == (32, 16)
    assert cascade.prior.config.text_len == 48  # the shapes CLIP's context
    # the shapes recipe's decoder weighting reaches its fresh decoder; the digits keep the variant's
    assert (cascade.decoder.config.loss_weighting, model.decoder.config.loss_weighting) == ("min_snr", "none")


def test_loss_trains_prior_and_decoder_but_not_clip(digits):
    m = make("unclip", digits).train()
    batch = digits.train.batch(list(range(6)))
    loss, metrics = m.loss(batch)
    assert torch.isfinite(loss) and {"loss_prior", "loss_decoder"} <= set(metrics)
    torch.testing.assert_close(loss.detach(), metrics["loss_prior"] + metrics["loss_decoder"])
    loss.backward()
    assert all(p.grad is None for p in m.clip.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.prior.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.decoder.parameters())


def test_begin_step_fits_the_prior_statistics_on_the_training_split(digits):
    m = contracts.build("unclip", dataset=digits)
    assert not bool(m.prior.stats_fitted)
    m.begin_step(0, 10)
    embeds = m.image_embeddings(digits.train["image"])  # (N, E)
    assert bool(m.prior.stats_fitted)
    torch.testing.assert_close(m.prior.clip_mean, embeds.mean(0))
    torch.testing.assert_close(m.prior.clip_std, embeds.std(0))


def test_the_training_features_are_the_clips_and_are_only_used_for_their_own_rows(digits):
    """begin_step computes the frozen CLIP's features once; a step uses them only for a batch that names its split
    rows and holds those rows' images, and for captions of the template × class set (else None: computed)."""
    m = contracts.build("unclip", dataset=digits)
    m.begin_step(0, 10)
    features = m.training_features
    rows = torch.tensor([5, 0, 17, 3])
    batch = digits.train.batch(rows)
    images = batch["image"].float()
    torch.testing.assert_close(features.image_embeddings(batch, images), m.image_embeddings(images), atol=1e-5, rtol=0)
    assert features.image_embeddings(dict(batch), images) is None  # no split rows
    other = digits.train.batch(rows + 1)
    assert features.image_embeddings(other, images) is None  # rows of other images
    labels = batch["label"].tolist()
    captions = [cond.fill_label(m.config.templates[i % 3], k, m.config.class_names) for i, k in enumerate(labels)]
    stored = features.text_condition(captions)
    embed, tokens, mask = m.text_condition(m.clip.tokenize(captions, truncate=True))
    n = mask.shape[1]
    assert not stored[2][:, n:].any()  # the set's longer padding is masked out
    torch.testing.assert_close(stored[0], embed, atol=1e-5, rtol=0)
    torch.testing.assert_close(stored[2][:, :n], mask)
    torch.testing.assert_close(stored[1][:, :n][mask], tokens[mask], atol=1e-5, rtol=0)
    assert features.text_condition([*captions, "a caption outside the set"]) is None


def test_a_training_step_with_the_stored_features_equals_one_without(digits):
    m = contracts.build("unclip", dataset=digits).train()
    m.begin_step(0, 10)
    batch = digits.train.batch(list(range(12)))
    torch.manual_seed(3)
    stored, _ = m.loss(batch)
    features, m.training_features = m.training_features, None
    torch.manual_seed(3)
    computed, _ = m.loss(batch)
    m.training_features = features
    torch.testing.assert_close(stored, computed, atol=1e-5, rtol=1e-5)


def test_captions_are_redrawn_from_the_templates(model, shapes, digits):
    torch.manual_seed(0)
    batch = digits.train.batch(list(range(8)))
    captions = cond.resample_captions(model.config, batch)
    for text, label in zip(captions, batch["label"].tolist()):
        assert any(cond.fill_label(t, label, model.config.class_names) == text for t in model.config.templates)
    scenes = shapes.train.batch(list(range(8)))
    texts = cond.resample_captions(
        attrs.evolve(model.config, data="shapes", templates=("a {colour} {kind} {where}",)), scenes
    )
    assert [t.count(" and ") + 1 for t in texts] == scenes["count"].tolist()


def test_text_features_mask_ends_at_end_of_text(model):
    ids = model.clip.tokenize(["the digit 3", "a handwritten 7 written by hand"])
    embed, tokens, mask = model.text_condition(ids)
    assert tokens.shape[:2] == mask.shape and embed.shape == (2, model.clip.config.embed_dim)
    assert mask.sum(1).tolist() == [int((row != model.clip.tokenizer.special_tokens["pad"]).sum()) for row in ids]


# -- folders ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unclip", "unclip-shapes"])
def test_parts_are_saved_once_in_their_sub_folders(name):
    contracts.check_part_folders(name)


def test_saved_folder_reloads_the_trained_prior_and_decoder(model, tmp_path):
    model.save(tmp_path / "m")
    assert isinstance(load(tmp_path / "m" / "prior"), DiffusionPrior)
    assert isinstance(load(tmp_path / "m" / "decoder"), UnCLIPDecoder)
    loaded = load(tmp_path / "m")
    assert bool(loaded.prior.stats_fitted)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    g = {"steps": 3}
    a = smp.generate(model, ["the digit 5"] * 2, generator=torch.Generator().manual_seed(3), **g)
    b = smp.generate(loaded, ["the digit 5"] * 2, generator=torch.Generator().manual_seed(3), **g)
    assert torch.equal(a, b)


# -- sampling -----------------------------------------------------------------------------------------------
def test_text_to_image_and_the_ablation(model):
    g = torch.Generator().manual_seed(0)
    images = smp.generate(model, ["the digit 1", "the digit 2"], generator=g, candidates=3, **fast(model))
    assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    text = smp.generate(model, ["the digit 1"], generator=g, embedding="text", **fast(model))
    assert text.shape == (1, 1, 8, 8)
    e = model.encode_prompts(["the digit 1"])[0]
    norm = smp.text_as_image_embed(model, e).norm()
    want = (model.prior.clip_mean.pow(2).sum() + model.prior.clip_std.pow(2).sum()).sqrt()
    torch.testing.assert_close(norm, want)


def test_cascade_writes_the_upsampled_size(cascade):
    images = smp.generate(cascade, ["a red circle"], generator=torch.Generator().manual_seed(0), **fast(cascade))
    assert images.shape == (1, 3, 32, 32)


def test_variations_differ_with_fresh_noise(model, digits):
    image = digits.test["image"][0]
    out = smp.variations(model, image, 3, seed=0, steps=3)
    assert out.shape == (3, 1, 8, 8)
    assert not torch.equal(out[0], out[1])
    assert torch.equal(out, smp.variations(model, image, 3, seed=0, steps=3))


def test_slerp_keeps_ends_and_interpolates_norms():
    a, b = torch.randn(16), 3 * torch.randn(16)
    path = cond.slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(path.norm(dim=1), torch.linspace(0, 1, 5) * (b.norm() - a.norm()) + a.norm())


def test_interpolation_uses_the_same_noise_for_every_frame(model, digits):
    a, b = digits.test["image"][0], digits.test["image"][1]
    same = smp.interpolate(model, a, a, 3, seed=1, steps=3)
    torch.testing.assert_close(same[1:], same[:1].expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    strip = smp.interpolate(model, a, b, 4, seed=1, steps=3)
    assert strip.shape == (4, 1, 8, 8)
    torch.testing.assert_close(strip[0], same[0], atol=1e-4, rtol=0)
    diff = smp.text_diff(model, a, "the digit 0", "the digit 9", 3, seed=1, steps=3)
    assert diff.shape == (3, 1, 8, 8)
    torch.testing.assert_close(diff[0], same[0], atol=1e-4, rtol=0)  # θ = 0 is the image's own embedding


def test_generative_samples_cycle_the_prompts(model, digits):
    images, targets = generative_samples(model, digits, 12, seed=0)
    assert images.shape == (12, 1, 8, 8)
    assert targets["label"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_test_losses_are_finite(model, digits):
    metrics = split_losses(model, digits, batch_size=512)
    assert set(metrics) == {"test_loss_prior", "test_loss_decoder"}
    assert all(v == v and v > 0 for v in metrics.values())


def test_sample_command_prompt_variations_interpolation(model, digits, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from polymodal.cli import main
    from polymodal.eval.images import save_png

    model.save(tmp_path / "m")
    a, b = save_png(digits.test["image"][0], tmp_path / "a.png"), save_png(digits.test["image"][1], tmp_path / "b.png")
    runs = {
        "prompt": ["--prompt", "the digit 3", "-n", "3", "--cfg", "2", "--prior-cfg", "3", "--sampler", "ddpm"],
        "variations": ["--variations", str(a), "-n", "2"],
        "interpolate": ["--interpolate", str(a), str(b), "--steps", "4"],
        "diff": ["--variations", str(a), "--prompt", "the digit 0", "--diff-to", "the digit 9", "-n", "2"],
    }
    for name, args in runs.items():
        out = tmp_path / name
        common = ["sample", str(tmp_path / "m"), "--out", str(out), "--seed", "1"]
        steps = [] if name == "interpolate" else ["--steps", "3"]
        result = CliRunner().invoke(main, [*common, *args, *steps])
        assert result.exit_code == 0, (name, result.output)
        files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
        if name in ("interpolate", "diff"):
            assert "strip.png" in files and len([f for f in files if f.startswith("frame_")]) == (
                4 if name == "interpolate" else 2
            )
        else:
            assert "grid.png" in files and Image.open(out / "sample_000.png").size == (8, 8)
    one = CliRunner().invoke(
        main, ["sample", str(tmp_path / "m"), "--out", str(tmp_path / "one"), "--interpolate", str(a)]
    )
    assert one.exit_code == 2 and "--interpolate" in one.output and "2 arguments" in one.output, one.output


# -- bad input (issue 19) -------------------------------------------------------------------------------------
def test_a_clip_of_another_embedding_width_is_refused(digits, tmp_path):
    prior = contracts.build("unclip-prior", embed_dim=64, text_dim=16)  # embed width 64; the tiny CLIP's is 16
    prior.save(tmp_path / "prior")
    with pytest.raises(ValueError, match=r"embed_dim: the CLIP needs 16, the prior has 64"):
        contracts.build("unclip", prior=str(tmp_path / "prior"))


def test_prompt_errors_name_expected_and_given(model):
    g = torch.Generator().manual_seed(0)
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="non-empty prompt"):
            smp.generate(model, [empty], generator=g)
    with pytest.raises(ValueError, match="non-empty prompt"):
        smp.generate(model, [], generator=g)
    long = "the digit three " * 20
    with pytest.raises(ValueError, match=str(model.clip.config.text.context_length)):
        smp.generate(model, [long], generator=g)
    assert smp.generate(model, [long], generator=g, truncate=True, **fast(model)).shape == (1, 1, 8, 8)


def test_variation_images_of_another_size_or_channels_are_refused(model, tmp_path):
    from PIL import Image

    Image.new("L", (9, 9)).save(tmp_path / "big.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"expects a 8×8 image with 1 channel\(s\).*got 9×9 with 1"):
        smp.variations(model, tmp_path / "big.png", 2)
    with pytest.raises(ValueError, match=r"expects a 8×8 image with 1 channel\(s\).*got 8×8 with 3"):
        smp.variations(model, tmp_path / "rgb.png", 2)
    with pytest.raises(ValueError, match=r"expects one image \(1, 8, 8\).*got \(3, 8, 8\)"):
        smp.variations(model, torch.rand(3, 8, 8), 2)
    with pytest.raises(ValueError, match="--interpolate expects a 8×8 image"):
        smp.interpolate(model, tmp_path / "big.png", tmp_path / "big.png", 2)


def test_sample_to_folder_refuses_bad_combinations(model, digits, tmp_path):
    from polymodal.eval.images import save_png

    a = save_png(digits.test["image"][0], tmp_path / "a.png")
    cases = [
        ({"interpolate": (str(a),)}, "exactly two images"),
        ({"diff_to": "the digit 1"}, "--diff-to needs --variations"),
        ({"variations": str(a), "prompt": "the digit 1"}, "takes no --prompt"),
        ({}, "needs --prompt"),
        ({"prompt": "the digit 1", "temperature": 1.0}, "does not support temperature"),
        ({"prompt": "the digit 1", "steps": 0}, "steps must be an integer"),
        ({"prompt": "the digit 1", "sampler": "euler"}, "sampler must be 'ddpm' or 'ddim'"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            smp.sample_to_folder(model, tmp_path / "s", n=2, **options)


def test_the_composite_guidance_defaults_reach_the_parts(model):
    tuned = attrs.evolve(model.config, guidance_scale=1.0, prior_guidance_scale=1.0)
    m = UnCLIP(tuned, parts={"clip": model.clip, "prior": model.prior, "decoder": model.decoder}).eval()
    a = smp.generate(m, ["the digit 4"], generator=torch.Generator().manual_seed(2), steps=3)
    b = smp.generate(
        model, ["the digit 4"], generator=torch.Generator().manual_seed(2), steps=3, cfg_scale=1.0, prior_cfg_scale=1.0
    )
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"guidance_scale must be in \[0.0, 100.0\], got -1"):
        attrs.evolve(model.config, guidance_scale=-1.0)


@pytest.mark.parametrize("ablation", [True, False])
def test_eval_ablation_decides_whether_the_text_embedding_samples_are_drawn(monkeypatch, ablation):
    """``eval_ablation=False`` (the shapes recipe) skips the paper's ablation: no second round of samples and
    no ``text_embed_*`` metrics; True draws both and reports them."""
    from types import SimpleNamespace

    import polymodal.plugins.unclip.evaluate as ev
    from polymodal.eval import judge

    drawn = []

    def samples(model, prompts, seed, embedding="prior", batch_size=256):
        drawn.append(embedding)
        return torch.zeros(len(prompts), 1, 8, 8)  # (N, C, S, S)

    monkeypatch.setattr(judge, "get_judge", lambda dataset: None)
    monkeypatch.setattr(judge, "judge_samples", lambda dataset, images, targets: {"sample_accuracy": 0.5})
    monkeypatch.setattr(ev, "prompted_samples", samples)
    monkeypatch.setattr(ev, "split_losses", lambda *args, **kwargs: {})
    config = SimpleNamespace(eval_per_class=1, eval_seed=0, eval_ablation=ablation, eval_variations=0)
    metrics = ev.evaluate_unclip(SimpleNamespace(config=config), SimpleNamespace(name="digits"))
    assert drawn == (["prior", "text"] if ablation else ["prior"])
    assert ("text_embed_sample_accuracy" in metrics) is ablation
