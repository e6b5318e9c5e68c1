"""Kandinsky 2.0 (kandinsky2) on tiny parts: what trains, condition dropout, the training captions, thresholding,
the bad inputs of issue 20, the folder round trip with the parts in sub-folders, sampling and evaluation."""

from __future__ import annotations

import json

import attrs
import pytest
import torch

from polymodal.api import load
from polymodal.config import from_dict
from polymodal.data import languages as lang
from polymodal.data import load_dataset
from polymodal.data.multilingual import scene_objects
from polymodal.nn.conditioning import AttentionPooling
from polymodal.plugins.kandinsky import VARIANTS, Kandinsky2, Kandinsky2Config
from polymodal.plugins.kandinsky import condition as cond
from polymodal.plugins.kandinsky.sample import SAMPLE_OPTIONS, generate
from polymodal.registry import get_registry
from polymodal.testing import contracts


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes-multilingual")


@pytest.fixture(scope="module")
def model(shapes):
    return contracts.build("kandinsky2", dataset=shapes).eval()


def test_variant_parts_and_config_checks():
    spec = VARIANTS["kandinsky2"]
    assert spec.data == "shapes-multilingual" and spec.model_class is Kandinsky2
    c = spec.config
    assert (c.vae.variant, c.text.variant, c.t5.variant) == ("kl-vae-shapes", "mclip-shapes", "t5-multilingual")
    assert c.thresholding and c.threshold_ratio == 0.995 and c.text_dropout == 0.1
    s = c.schedule  # latent diffusion's betas, not DDPM's pixel-space 1e-4 … 0.02
    assert (s.kind, s.timesteps, s.beta_start, s.beta_end, s.prediction) == ("linear", 1000, 0.00085, 0.012, "epsilon")
    assert VARIANTS["kandinsky21"].config.schedule == s
    with pytest.raises(ValueError, match="out_channels must be in_channels=4; got 3"):
        attrs.evolve(c, unet=attrs.evolve(c.unet, out_channels=3))
    with pytest.raises(ValueError, match="context_dim must be ≥ 1"):
        attrs.evolve(c, unet=attrs.evolve(c.unet, context_dim=0))


def test_loss_trains_the_unet_and_projection_not_the_parts(model, shapes):
    m = model.train()
    m.begin_step(0, 1)
    for name in ("vae", "text", "t5"):
        assert not any(p.requires_grad for p in getattr(m, name).parameters())
    loss, metrics = m.loss(shapes.train.batch(list(range(6))))
    loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("unet.") for n in grads) and any(n.startswith("proj.") for n in grads)
    assert all(n.split(".")[0] in ("unet", "proj") for n in grads)
    assert bool(m.range_fitted) and float(m.latent_range) > 0
    m.zero_grad(set_to_none=True)
    m.eval()


def test_attention_pooling_learns_t5s_pooled_feature_and_old_configs_keep_the_mean(shapes, tmp_path):
    m = contracts.build("kandinsky2", dataset=shapes, pooling="attention").train()
    assert isinstance(m.proj.t5_pooled, AttentionPooling)
    m.begin_step(0, 1)
    loss, _ = m.loss(shapes.train.batch(list(range(6))))
    loss.backward()
    for name in ("t5_pooled.q_proj", "t5_pooled.out", "pooled_norms.0", "pooled_norms.1"):
        grad = m.proj.get_submodule(name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the pooled feature now reads T5's tokens, not the mean the encoder hands over
    text = m.encode_text(["красный круг", "a blue square"])
    additive, _, _ = m.proj(text)
    moved = (*text[:3], text[3] + 5.0, *text[4:])
    torch.testing.assert_close(m.proj(moved)[0], additive)
    m.eval().save(tmp_path / "k2")
    saved = tmp_path / "k2" / "config.json"
    data = json.loads(saved.read_text())
    assert data["config"]["pooling"] == "attention"
    del data["config"]["pooling"]  # a folder written before the option: it computed the mean
    assert from_dict(Kandinsky2Config, data["config"]).pooling == "mean"


def test_text_dropout_empties_both_encoders(model, shapes):
    text = model.encode_text(["красный круг", "a blue square"])
    cp, ct, cm, tp, tt, tm = cond.drop_text(text, torch.tensor([True, False]))
    assert not cm[0].any() and not tm[0].any() and cp[0].abs().sum() == 0 and tp[0].abs().sum() == 0
    assert torch.equal(cm[1], text[2][1]) and torch.equal(tp[1], text[3][1])
    for rate, want in ((1.0, 1.0), (0.0, 0.0)):
        m = contracts.build("kandinsky2", dataset=shapes, text_dropout=rate).train()
        _, metrics = m.loss(shapes.train.batch(list(range(8))))
        assert float(metrics["text_dropped"]) == want


def test_training_captions_come_from_training_pairs_only(shapes):
    data = "shapes-multilingual"
    batch = shapes.train.batch(list(range(40)))
    objects = scene_objects(batch, 32)
    torch.manual_seed(0)
    drawn = [cond.draw_captions(data, objects) for _ in range(20)]
    held = set(lang.heldout_pairs(data))
    assert held and not held & {(t, c) for c, t in cond.training_pairs(data)}
    for i, obj in enumerate(objects):
        allowed = {lang.shapes_caption(c, t, obj) for c, t in cond.training_pairs(data)}
        forbidden = {lang.shapes_caption(c, t, obj) for t, c in held} - allowed
        seen = {d[i] for d in drawn}
        assert seen <= allowed and not seen & forbidden
    languages = {c for d in drawn for cap in d for c, t in cond.training_pairs(data) if cap in {
        lang.shapes_caption(c, t, o) for o in objects}}  # fmt: skip
    assert languages == set(lang.LANGUAGES)


def test_unplaced_captions_name_the_objects_without_positions_at_their_rate(shapes):
    data = "shapes-multilingual"
    batch = shapes.train.batch(list(range(200)))
    objects = scene_objects(batch, 32)
    torch.manual_seed(0)
    plain = cond.draw_captions(data, objects)
    torch.manual_seed(0)
    assert cond.draw_captions(data, objects, unplaced=0.0) == plain  # the default draws nothing more
    torch.manual_seed(0)
    mixed = cond.draw_captions(data, objects, unplaced=0.3)
    for obj, p, m in zip(objects, plain, mixed, strict=True):
        unplaced = {lang.unplaced_caption(code, obj) for code in lang.LANGUAGES}
        assert m == p or (m in unplaced and p not in unplaced), (p, m)  # same language pick, positions dropped
    share = sum(m != p for m, p in zip(mixed, plain, strict=True)) / len(plain)
    assert 0.2 < share < 0.4, share
    torch.manual_seed(1)
    everything = cond.draw_captions(data, objects, unplaced=1.0)
    assert all(c in {lang.unplaced_caption(code, o) for code in lang.LANGUAGES} for c, o in zip(everything, objects))
    # one object: exactly the language's evaluation prompt, positions gone
    assert lang.unplaced_caption("ru", [(0, 1, 8)]) == lang.evaluation_prompts("shapes", "ru")[1] == "красный круг"
    assert lang.unplaced_caption("en", [(0, 1, 8), (2, 0, 0)]) == "a red circle and a blue square"


def test_feature_cache_matches_a_fresh_encoding(model):
    cache = cond.FeatureCache()
    captions = ["красный круг", "a blue square in the top left", "红色的圆形", "красный круг"]
    cached = cache.get(model, captions)
    assert len(cache) == 3
    fresh = model.encode_text(captions)
    for pooled in (0, 3):
        torch.testing.assert_close(cached[pooled], fresh[pooled], atol=1e-5, rtol=1e-5)
    for tokens, mask in ((1, 2), (4, 5)):
        n = int(fresh[mask].sum(1).max())
        assert torch.equal(cached[mask][:, :n], fresh[mask][:, :n])
        keep = fresh[mask][:, :n, None]  # (B, n, 1): padding features are not compared
        torch.testing.assert_close(cached[tokens][:, :n] * keep, fresh[tokens][:, :n] * keep, atol=1e-5, rtol=1e-5)


def test_thresholding_on_and_off_change_sampling(model):
    def run(**kw):
        g = torch.Generator().manual_seed(3)
        return generate(model, ["красный круг", "un cercle rouge"], generator=g, steps=4, **kw)

    on, off = run(threshold=True), run(threshold=False)
    assert on.shape == (2, 3, 32, 32) and 0 <= float(on.min()) and float(on.max()) <= 1
    assert not torch.equal(on, off)
    torch.testing.assert_close(on, run())  # the config's default is on
    assert not torch.equal(run(sampler="ddpm"), on)
    flags = {o.flag: o for o in SAMPLE_OPTIONS}
    assert flags["--no-threshold"].keyword == "threshold" and flags["--no-threshold"].value is False
    assert {"--cfg", "--steps", "--sampler"} <= set(flags)


def test_thresholding_keeps_data_like_predictions_and_pulls_saturated_ones_in(model):
    from polymodal.plugins.kandinsky.sample import thresholded

    model.latent_range.fill_(3.0)
    t = torch.tensor([10, 60])  # (B,)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for scale, changed in ((0.5, False), (10.0, True)):
        x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-2.5, 2.5) * scale

        def fn(x_t, tt, x0=x0):
            ab = model.schedule.alpha_bar(tt, x_t)  # (B, 1, 1, 1)
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()  # the ε that predicts x0

        out = model.schedule.to_x0(thresholded(model, fn)(x, t), x, t)
        if changed:
            assert out.abs().amax() <= 3.0 + 1e-4 and not torch.allclose(out, x0)
        else:
            torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_any_utf8_prompt_encodes_and_bad_prompts_name_expected_and_given(model):
    ids = model.tokenize(["مربع أحمر 🟥", "लाल वृत्त", "赤い円", "κόκκινος κύκλος"])
    assert ids[0].shape[0] == ids[1].shape[0] == 4
    with pytest.raises(ValueError, match=r"valid UTF-8.*surrogates"):
        model.tokenize(["red \ud800 circle"])
    with pytest.raises(ValueError, match="expected a non-empty str"):
        model.tokenize([""])
    long = " ".join(["красный круг"] * 200)
    with pytest.raises(ValueError, match="tokenizer.*truncate"):
        model.tokenize([long])
    with pytest.warns(UserWarning, match="truncated"):
        clip_ids, t5_ids = model.tokenize([long], truncate=True)
    assert clip_ids.shape[1] <= model.text.config.text.context_length and t5_ids.shape[1] <= model.t5.config.max_len


def test_latents_of_the_wrong_channel_count_name_expected_and_given(model):
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\); got \(2, 3, 8, 8\)"):
        model.from_latents(torch.zeros(2, 3, 8, 8))
    x, t, clip_ids, t5_ids = contracts.example_inputs(model, 2)
    with pytest.raises(ValueError, match=r"x_t must be .*\(B, 4, 8, 8\); got \(2, 5, 8, 8\)"):
        model(torch.zeros(2, 5, 8, 8), t, clip_ids, t5_ids)


def test_a_vae_folder_of_another_latent_size_is_refused(shapes, tmp_path):
    spec = get_registry().get("model", "kl-vae-shapes")
    small = contracts.tiny(spec).config
    vae = spec.instantiate(attrs.evolve(small, block_channels=(8, 16, 16, 16)))  # 32 → 4×4 latents
    vae.save(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"expects latents .* = \(4, 8, 8\); the VAE gives \(4, 4, 4\)"):
        contracts.build("kandinsky2", dataset=shapes, vae=str(tmp_path / "vae"))


def test_folder_round_trip_keeps_the_parts_in_sub_folders(model, tmp_path):
    contracts.check_part_folders("kandinsky2")
    model.latent_range.fill_(2.5)
    model.range_fitted.fill_(True)
    model.save(tmp_path / "k2")
    for name in ("vae", "text", "t5"):
        assert (tmp_path / name / "config.json").exists() is False and (tmp_path / "k2" / name / "config.json").exists()
    back = load(tmp_path / "k2").eval()
    assert float(back.latent_range) == 2.5 and bool(back.range_fitted)
    inputs = contracts.example_inputs(model, 2)
    torch.testing.assert_close(back(*inputs), model(*inputs), atol=0, rtol=0)


def test_heldout_prompts_use_only_evaluation_only_pairs():
    from polymodal.plugins.kandinsky.evaluate import heldout_prompts

    data = "shapes-multilingual"
    for code in lang.LANGUAGES:
        prompts, targets = heldout_prompts(data, code, 1)
        assert len(prompts) == 24 and targets["colour"].tolist()[:5] == [0, 0, 0, 0, 1]
        train = {lang.caption_for(data, code, t, colour=c, kind=k, position=p)
                 for t in lang.template_ids(data, code) for c in range(6) for k in range(4) for p in range(9)}  # fmt: skip
        assert not set(prompts) & train


def test_sample_to_folder_and_evaluate(model, shapes, tmp_path):
    paths = model.sample_to_folder(tmp_path / "s", n=3, prompt="красный круг", steps=3, threshold=False)
    assert len(paths) == 4 and paths[-1].name == "grid.png"
    with pytest.raises(ValueError, match="does not support candidates"):
        model.sample_to_folder(tmp_path / "t", n=1, prompt="a", candidates=2)
    metrics = model.evaluate(shapes)
    for code in lang.LANGUAGES:
        for key in ("colour_accuracy", "kind_accuracy", "colour_accuracy_nothreshold", "kind_accuracy_nothreshold"):
            assert 0 <= metrics[f"{key}_{code}"] <= 1
        assert 0 <= metrics[f"heldout_colour_accuracy_{code}"] <= 1
    assert metrics["fd_judge"] >= 0 and metrics["samples"] == 4 * 24
    images, targets = model.generative_samples(shapes, 30, seed=1)
    assert images.shape == (30, 3, 32, 32) and set(targets) == {"colour", "kind"}
    assert Kandinsky2Config().eval_per_class >= 1
