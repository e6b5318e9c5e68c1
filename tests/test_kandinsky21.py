"""Kandinsky 2.1 (kandinsky21) on tiny parts: the variant, the text_image_proj / text_image conditioning, what trains,
the cached training targets, condition dropout, --mix and --variations (and their bad inputs), the bad inputs of
issue 20, the folder round trip, sampling to a folder and evaluation."""

from __future__ import annotations

import re

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.api import load
from polymodal.data import languages as lang
from polymodal.data import load_dataset
from polymodal.data.multilingual import scene_objects
from polymodal.nn.conditioning import TextImageProjection, TextImageTimeEmbedding
from polymodal.plugins.kandinsky import KANDINSKY2, VARIANTS, Kandinsky21, Kandinsky21Config, sample21
from polymodal.registry import get_registry
from polymodal.testing import contracts


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes-multilingual")


@pytest.fixture(scope="module")
def model(shapes):
    return contracts.build("kandinsky21", dataset=shapes).eval()


@pytest.fixture(scope="module")
def pictures(shapes, tmp_path_factory):
    """Two 32×32 RGB test scenes as PNGs, a 16×16 one, a grey 32×32 one and a file that is not an image."""
    root = tmp_path_factory.mktemp("pictures")
    images = (shapes.test["image"][:2].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    paths = {}
    for name, array in (("a", images[0]), ("b", images[1]), ("small", images[0][::2, ::2])):
        paths[name] = root / f"{name}.png"
        Image.fromarray(array).save(paths[name])
    paths["grey"] = root / "grey.png"
    Image.fromarray(images[0][..., 0]).save(paths["grey"])
    paths["broken"] = root / "broken.png"
    paths["broken"].write_text("not an image")
    return paths


def test_variant_parts_and_config_checks():
    spec = VARIANTS["kandinsky21"]
    assert spec.data == "shapes-multilingual" and spec.model_class is Kandinsky21
    c = spec.config
    assert (c.vae.variant, c.text.variant) == ("movq-shapes", "mclip-shapes") and c.image_tokens == 10
    assert c.text_dropout == 0.5 and c.image_dropout == 0.1 and c.thresholding and c.latent_scaling
    assert c.unplaced_captions == 0.25 and KANDINSKY2.config.unplaced_captions == 0.25  # both recipes (README)
    with pytest.raises(ValueError, match="out_channels must be in_channels=4; got 3"):
        attrs.evolve(c, unet=attrs.evolve(c.unet, out_channels=3))
    with pytest.raises(ValueError, match="prior_heads must divide prior_width=128; got 3"):
        attrs.evolve(c, prior_heads=3)
    with pytest.raises(ValueError, match="text_dropout \\+ image_dropout must be ≤ 1; got 1.5"):
        attrs.evolve(c, text_dropout=0.8, image_dropout=0.7)


def test_the_prior_is_a_fresh_unclip_prior_sized_to_the_clip(model):
    prior_class = get_registry().get("model", "unclip-prior").model_class
    p = model.prior.config
    assert type(model.prior) is prior_class
    assert (p.embed_dim, p.text_dim) == (model.text.embed_dim, model.text.config.text.dim)
    assert p.text_len == model.text.config.text.context_length and p.width == 16 and p.sampler.steps == 4


def test_the_unet_reads_the_image_embedding_through_the_text_image_layout(model):
    cond = model.condition
    assert isinstance(cond.encoder_hid_proj, TextImageProjection)
    assert isinstance(cond.add_embedding, TextImageTimeEmbedding)
    seen = {}
    hooks = [
        cond.encoder_hid_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("context", o)),
        cond.add_embedding.register_forward_hook(lambda m, i, o: seen.__setitem__("additive", o)),
    ]
    x, t, ids, embed, noisy, t_prior = contracts.example_inputs(model, 2)
    eps, x0 = model(x, t, ids, embed, noisy, t_prior)
    for hook in hooks:
        hook.remove()
    n, length = model.config.image_tokens, ids.shape[1]
    assert seen["context"].shape == (2, n + length, model.config.unet.context_dim)
    assert seen["additive"].shape == (2, model.config.unet.time_dim)
    assert eps.shape == (2, 4, 8, 8) and x0.shape == (2, model.prior.config.embed_dim)
    text = model.text_features(ids)
    _, context, mask = cond(text, embed)
    assert mask[:, :n].all() and torch.equal(mask[:, n:], text[2])  # the image tokens are always attended
    other = model(x, t, ids, embed + 1.0, noisy, t_prior)[0]  # the image embedding changes ε
    assert not torch.allclose(other, eps)


def test_loss_trains_the_prior_unet_and_condition_not_the_parts(shapes):
    m = contracts.build("kandinsky21", dataset=shapes).train()
    m.begin_step(0, 1)
    assert m.targets is not None and bool(m.range_fitted) and bool(m.prior.stats_fitted)
    assert float(m.targets.features[0].std()) == pytest.approx(1.0, rel=1e-4)  # latent_scaling: unit variance
    raw = m.vae.encode_latents(shapes.train["image"][:4])  # (4, 4, 8, 8) the MoVQ's own latents
    torch.testing.assert_close(m.to_latents(shapes.train["image"][:4]), raw * m.latent_scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.from_latents(raw * m.latent_scale), m.vae.decode_latents(raw), atol=1e-5, rtol=1e-5)
    unscaled = contracts.build("kandinsky21", dataset=shapes, latent_scaling=False).train()
    unscaled.begin_step(0, 1)
    assert float(unscaled.latent_scale) == 1.0 and float(unscaled.latent_range) >= 1.0
    batch = shapes.train.batch(list(range(6)))
    latents, embeds = m.targets.lookup(batch, batch["image"])
    torch.testing.assert_close(embeds, m.image_embeddings(batch["image"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latents, m.to_latents(batch["image"]), atol=1e-5, rtol=1e-5)
    assert m.targets.lookup(batch, batch["image"].flip(0)) is None  # other images at those rows: not the cache's
    loss, metrics = m.loss(batch)
    loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n.split(".")[0] for n in grads} == {"prior", "unet", "condition"}
    for name in ("vae", "text"):
        assert not any(p.requires_grad for p in getattr(m, name).parameters())
    assert float(loss.detach()) == pytest.approx(float(metrics["loss_prior"]) + float(metrics["loss_unet"]), rel=1e-5)


@pytest.mark.parametrize("name", ["kandinsky2", "kandinsky21"])
@pytest.mark.parametrize("unplaced", [0.0, 1.0])
def test_training_encodes_unplaced_captions_at_the_configured_rate(shapes, name, unplaced):
    m = contracts.build(name, dataset=shapes, unplaced_captions=unplaced).train()
    batch = shapes.train.batch(list(range(8)))
    torch.manual_seed(0)
    m.loss(batch)
    unplaced_forms = {lang.unplaced_caption(code, o) for o in scene_objects(batch, 32) for code in lang.LANGUAGES}
    encoded = set(m.features.rows)  # every caption the frozen encoders were given
    assert encoded and (encoded <= unplaced_forms if unplaced else not encoded & unplaced_forms), encoded


@pytest.mark.parametrize("text,image,want_text,want_image", [(0.0, 1.0, 1.0, 1.0), (1.0, 0.0, 1.0, 0.0), (0, 0, 0, 0)])
def test_condition_dropout_rates(shapes, text, image, want_text, want_image):
    m = contracts.build("kandinsky21", dataset=shapes, text_dropout=text, image_dropout=image).train()
    _, metrics = m.loss(shapes.train.batch(list(range(8))))
    assert float(metrics["text_dropped"]) == want_text and float(metrics["image_dropped"]) == want_image


def test_mix_weights_are_validated_naming_expected_and_given():
    assert sample21.mix_weights(None, 4) == [0.25] * 4
    assert sample21.mix_weights("0.5, 0.25", 2) == [0.5, 0.25] and sample21.mix_weights([1, 2.5], 2) == [1.0, 2.5]
    with pytest.raises(ValueError, match=r"expected 2 numbers \(one per --mix item\); got 3"):
        sample21.mix_weights("0.5,0.25,0.25", 2)
    with pytest.raises(ValueError, match=r"expected 3 numbers .*; got 1"):
        sample21.mix_weights([1.0], 3)
    for bad, shown in (("0.5,abc", "'abc' at position 2"), ([0.5, "x"], "'x' at position 2"), ("nan,1", "'nan'")):
        with pytest.raises(ValueError, match=f"expected finite numbers; got {shown}"):
            sample21.mix_weights(bad, 2)
    with pytest.raises(ValueError, match="position 1"):
        sample21.mix_weights([True, 1.0], 2)
    assert sample21.mix_items("a.png| a blue square ") == ["a.png", "a blue square"]
    with pytest.raises(ValueError, match="--mix item 2: expected an image"):
        sample21.mix_items("a.png||a blue square")


def test_mix_is_the_weighted_sum_of_clip_embeddings(model, pictures):
    za, zb = (model.image_embeddings(sample21.read_source(model, pictures[k])) for k in ("a", "b"))  # (1, E) each
    mixed = sample21.mix(model, [pictures["a"], str(pictures["b"])], "0.3,0.7", 2, seed=4, steps=3)
    want = sample21._decode(model, (0.3 * za + 0.7 * zb).expand(2, -1), 4, None, steps=3)
    torch.testing.assert_close(mixed, want, atol=1e-6, rtol=1e-6)
    alone = sample21.mix(model, [pictures["a"]], None, 2, seed=4, steps=3)
    torch.testing.assert_close(alone, sample21.variations(model, pictures["a"], 2, seed=4, steps=3))
    with_text = sample21.mix(model, f"{pictures['a']}|a blue square", [0.5, 0.5], 2, seed=4, steps=3)
    assert with_text.shape == (2, 3, 32, 32) and not torch.allclose(with_text, alone)


def test_variations_refuse_a_wrong_size_or_unreadable_image(model, pictures, tmp_path):
    images = sample21.variations(model, pictures["a"], 3, seed=1, steps=3)
    assert images.shape == (3, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    with pytest.raises(ValueError, match=r"expects a 32×32 image with 3 channels .*; got 16×16 with 3"):
        sample21.variations(model, pictures["small"], 1)
    with pytest.raises(ValueError, match=r"expects a 32×32 image with 3 channels .*; got 32×32 with 1"):
        sample21.variations(model, pictures["grey"], 1)
    with pytest.raises(ValueError, match="broken.png"):
        sample21.variations(model, pictures["broken"], 1)
    with pytest.raises(ValueError, match=r"--mix expects one image \(3, 32, 32\) .*; got \(3, 16, 16\)"):
        sample21.mix(model, [torch.zeros(3, 16, 16)], [1.0], 1)
    with pytest.raises(ValueError, match="broken.png"):
        model.sample_to_folder(tmp_path / "m", n=1, mix=f"{pictures['broken']}|a red circle", weights="0.5,0.5")


def test_latents_of_the_wrong_channel_count_name_expected_and_given(model):
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\); got \(2, 3, 8, 8\)"):
        model.from_latents(torch.zeros(2, 3, 8, 8))
    x, t, ids, embed, noisy, t_prior = contracts.example_inputs(model, 2)
    with pytest.raises(ValueError, match=r"x_t must be .*\(B, 4, 8, 8\); got \(2, 5, 8, 8\)"):
        model(torch.zeros(2, 5, 8, 8), t, ids, embed, noisy, t_prior)


def test_a_vae_folder_of_another_latent_size_is_refused(shapes, tmp_path):
    spec = get_registry().get("model", "movq-shapes")
    small = contracts.tiny(spec).config
    vae = spec.instantiate(attrs.evolve(small, block_channels=(8, 16, 16, 16)))  # 32 → 4×4 latents
    vae.save(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"expects latents .* = \(4, 8, 8\); the VAE gives \(4, 4, 4\)"):
        contracts.build("kandinsky21", dataset=shapes, vae=str(tmp_path / "vae"))


def test_bad_prompts_name_expected_and_given(model):
    assert model.tokenize(["مربع أحمر 🟥", "赤い円"]).shape[0] == 2
    with pytest.raises(ValueError, match=r"valid UTF-8.*surrogates"):
        model.generate(["red \ud800 circle"])
    with pytest.raises(ValueError, match="expected a non-empty str"):
        model.generate([""])
    with pytest.raises(ValueError, match="M-CLIP tokenizer.*truncate"):
        model.generate([" ".join(["красный круг"] * 200)])


def test_sample_to_folder_writes_files_and_refuses_bad_combinations(model, pictures, tmp_path):
    paths = model.sample_to_folder(tmp_path / "s", n=3, prompt="красный круг", steps=3, threshold=False)
    assert len(paths) == 4 and paths[-1].name == "grid.png" and all(p.exists() for p in paths)
    paths = model.sample_to_folder(tmp_path / "v", n=2, variations=str(pictures["a"]), steps=2)
    assert len(paths) == 3 and all(p.exists() for p in paths)
    paths = model.sample_to_folder(tmp_path / "m", n=2, mix=f"{pictures['a']}|a blue square", weights="0.5,0.5")
    assert len(paths) == 3 and all(p.exists() for p in paths)
    for options, message in (
        ({"prompt": "a", "candidates": 2}, "does not support candidates"),
        ({"weights": "1"}, "--weights without --mix"),
        ({"mix": "a blue square", "weights": "0.5,0.5"}, r"expected 1 numbers .*; got 2"),
        ({"variations": str(pictures["a"]), "prompt": "a"}, "--variations takes no --prompt"),
        ({}, "needs --prompt TEXT, --variations IMAGE or --mix"),
    ):
        with pytest.raises(ValueError, match=message):
            model.sample_to_folder(tmp_path / "bad", n=1, **options)
    flags = {o.flag: o for o in Kandinsky21.sample_options}
    assert {"--mix", "--weights", "--variations", "--cfg", "--prior-cfg", "--no-threshold"} <= set(flags)


def test_save_load_round_trip_gives_the_same_outputs(model, pictures, tmp_path):
    contracts.check_part_folders("kandinsky21")
    model.latent_range.fill_(1.5)
    model.latent_scale.fill_(0.75)
    model.range_fitted.fill_(True)
    model.save(tmp_path / "k21")
    for name in ("vae", "text"):
        assert (tmp_path / "k21" / name / "config.json").exists()
    back = load(tmp_path / "k21").eval()
    assert isinstance(back, Kandinsky21) and float(back.latent_range) == 1.5 and float(back.latent_scale) == 0.75
    inputs = contracts.example_inputs(model, 2)
    for a, b in zip(back(*inputs), model(*inputs), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    def draw(m):
        return m.generate(["un cercle rouge", "红色的圆形"], generator=torch.Generator().manual_seed(2), steps=3)

    torch.testing.assert_close(draw(back), draw(model), atol=0, rtol=0)
    mixed = [sample21.mix(m, f"{pictures['a']}|a red circle", "0.5,0.5", 2, seed=3, steps=2) for m in (back, model)]
    torch.testing.assert_close(mixed[0], mixed[1], atol=0, rtol=0)


def test_evaluate_and_generative_samples(model, shapes):
    metrics = model.evaluate(shapes)
    for code in lang.LANGUAGES:
        for key in ("colour_accuracy", "kind_accuracy", "colour_accuracy_nothreshold", "heldout_colour_accuracy"):
            assert 0 <= metrics[f"{key}_{code}"] <= 1
        assert -1 <= metrics[f"prior_cosine_{code}"] <= 1
    assert metrics["fd_judge"] >= 0 and metrics["samples"] == 4 * 24
    assert 0 <= metrics["variation_colour_accuracy"] <= 1 and 0 <= metrics["variation_kind_accuracy"] <= 1
    images, targets = model.generative_samples(shapes, 30, seed=1)
    assert images.shape == (30, 3, 32, 32) and set(targets) == {"colour", "kind"}
    assert Kandinsky21Config().eval_per_class >= 1


def test_given_image_embeddings_replace_the_prior_s_draw(model, monkeypatch):
    """``generate(..., image_embeds=E)`` decodes E under the prompts' text (diffusers' KandinskyPipeline takes
    the prior pipeline's embeddings) without sampling the prior; a wrong shape names expected and given."""
    prompts = ["a red circle", "красный круг"]
    embeds = model.prior.sample(*model.encode_text(prompts), generator=torch.Generator().manual_seed(3))
    text = model.encode_text(prompts)
    want = model.from_latents(
        sample21.decode_latents(model, text, embeds, generator=torch.Generator().manual_seed(0), steps=3)
    )
    monkeypatch.setattr(sample21, "prior_embeddings", lambda *a, **k: pytest.fail("the prior was sampled"))
    got = model.generate(prompts, image_embeds=embeds, generator=torch.Generator().manual_seed(0), steps=3)
    torch.testing.assert_close(got, want)
    e = model.prior.config.embed_dim
    for bad, shown in ((embeds[:1], f"(1, {e})"), (embeds[:, :3], "(2, 3)"), (embeds.tolist(), "list")):
        with pytest.raises(ValueError, match=rf"image_embeds must be \(2, {e}\).*got {re.escape(shown)}"):
            model.generate(prompts, image_embeds=bad, steps=3)


def test_evaluation_samples_the_prior_once_per_prompt_set(model, shapes, monkeypatch):
    """Per language the evaluation prompts' prior draws serve the thresholded and the plain samples and the
    cosine, and the held-out phrasings get their own: two prior samplings per language, not four."""
    calls = []
    sample = type(model.prior).sample

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(type(model.prior), "sample", counted)
    model.evaluate(shapes)
    per_set = 24 * model.config.eval_per_class
    assert calls == [per_set] * (2 * len(lang.LANGUAGES)), calls


def test_polymodal_sample_offers_mix_weights_and_variations(model, pictures, tmp_path):
    from click.testing import CliRunner

    from polymodal.cli import main

    model.save(tmp_path / "m")
    runs = {
        "prompt": ["--prompt", "красный круг", "-n", "2", "--cfg", "2", "--prior-cfg", "3", "--no-threshold"],
        "variations": ["--variations", str(pictures["a"]), "-n", "2"],
        "mix": ["--mix", f"{pictures['a']}|a blue square", "--weights", "0.5,0.5", "-n", "2"],
    }
    for name, args in runs.items():
        out = tmp_path / name
        result = CliRunner().invoke(main, ["sample", str(tmp_path / "m"), "--out", str(out), "--steps", "2", *args])
        assert result.exit_code == 0, (name, result.output)
        assert (out / "grid.png").exists() and Image.open(out / "sample_000.png").size == (32, 32)
    bad = CliRunner().invoke(
        main, ["sample", str(tmp_path / "m"), "--out", str(tmp_path / "bad"), "--mix", "a red circle", "--weights", "x"]
    )
    assert bad.exit_code != 0 and "expected finite numbers; got 'x'" in bad.output, bad.output
