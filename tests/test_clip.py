"""CLIP: parity with transformers through ``polymodal convert --from hf-clip``, properties, bad input, CLI.

The transformers model is built from a small config with random weights (nothing is
downloaded), every weight overwritten by a visible random value, saved with
``save_pretrained`` (safetensors), converted on the command line and loaded back.
"""

from __future__ import annotations

import json
import math

import attrs
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal
from polymodal.cli import main
from polymodal.data import load_digits
from polymodal.objectives import info_nce, similarity_logits
from polymodal.plugins.clip import CLIPModel
from polymodal.plugins.clip.captions import corpus
from polymodal.plugins.clip.zeroshot import retrieval, zero_shot_classifier
from polymodal.testing import contracts

ATOL = 1e-5
EOS = 7
TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    eos_token_id=EOS,
    bos_token_id=5,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
)


def tiny_clip(perturb: bool = True, **overrides) -> CLIPModel:
    """The tiny ``clip`` variant (weights perturbed so zero-initialised parts cannot hide anything)."""
    return contracts.build("clip", perturb=perturb, **overrides).eval()


# -- parity with transformers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers CLIPModel in eval mode, polymodal model loaded from the converted folder)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # visible random values everywhere, so a swapped tensor would show
        for name, p in hf.named_parameters():
            base = 1.0 if ("norm" in name or "layrnorm" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        hf.logit_scale.fill_(2.5)
    root = tmp_path_factory.mktemp("hf-clip")
    hf.save_pretrained(root / "hf")
    result = CliRunner().invoke(main, ["convert", "--from", "hf-clip", str(root / "hf"), str(root / "pm")])
    assert result.exit_code == 0, result.output
    return hf, polymodal.load(root / "pm")


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hf_clip_image_features_match(converted):
    hf, model = converted
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _features(hf.get_image_features(pixel_values=pixels))
        ours = model.encode_image(pixels)
    assert ours.shape == ref.shape == (3, 24)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_hf_clip_text_features_match_and_pool_at_the_first_eos(converted):
    hf, model = converted
    ids = torch.randint(8, 99, (4, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 5] = ids[1, 11] = ids[2, 2] = ids[2, 6] = ids[3, 0] = EOS  # row 2: two eos, the first one counts
    with torch.no_grad():
        ref = _features(hf.get_text_features(input_ids=ids))
        ours = model.encode_text(ids)
        shorter = model.encode_text(ids[[0, 2, 3], :7])  # causal: tokens after the eos do not matter
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(shorter, ref[[0, 2, 3]], atol=ATOL, rtol=0)
    assert model.logit_scale.item() == pytest.approx(2.5)
    assert model.config.eos_id == EOS and model.config.vision.channels == 3 and model.config.embed_dim == 24


def test_hf_clip_text_tokens_match_last_hidden_state_and_mask_ends_at_the_first_eos(converted):
    hf, model = converted
    ids = torch.randint(8, 99, (3, 10), generator=torch.Generator().manual_seed(4))
    ids[0, 4] = ids[1, 9] = ids[2, 1] = ids[2, 6] = EOS
    with torch.no_grad():
        ref = hf.text_model(input_ids=ids).last_hidden_state  # (3, 10, D)
        tokens, mask = model.encode_text_tokens(ids)
        pooled = model.textual.proj(tokens[torch.arange(3), mask.sum(1) - 1])  # (3, E)
        features = model.encode_text(ids)
    torch.testing.assert_close(tokens, ref, atol=ATOL, rtol=0)
    assert mask.sum(1).tolist() == [5, 10, 2] and not mask[0, 5:].any()  # up to and including the first eos
    torch.testing.assert_close(pooled, features, atol=0, rtol=0)


def test_converted_text_without_eos_is_a_clear_error(converted):
    _, model = converted
    with pytest.raises(ValueError, match="end-of-text"):
        model.encode_text(torch.full((1, 4), 9))


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 4), seed=st.integers(0, 1000))
def test_normalised_embeddings_have_unit_norm(b, seed):
    model = tiny_clip()
    pixels, ids = model.example_inputs(b, torch.Generator().manual_seed(seed))
    image, text, scale = model(pixels, ids)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(b), atol=1e-5, rtol=0)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(b), atol=1e-5, rtol=0)
    assert scale.shape == (b,) and torch.allclose(scale, model.logit_scale.exp())


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), d=st.integers(1, 8), scale=st.floats(0.5, 100.0), seed=st.integers(0, 10_000))
def test_loss_is_symmetric_in_the_modalities(b, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    a, t = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    torch.testing.assert_close(info_nce(a, t, scale), info_nce(t, a, scale), atol=1e-5, rtol=1e-5)
    logits = similarity_logits(a, t, scale)
    torch.testing.assert_close(similarity_logits(t, a, scale), logits.t())


def test_logit_scale_starts_at_one_over_007_and_never_exceeds_100_after_any_step():
    model = tiny_clip(perturb=False).train()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    digits = load_digits()
    opt = torch.optim.SGD([model.logit_scale], lr=1e4)
    for step in range(5):
        batch = digits.train.batch(list(range(8 * step, 8 * step + 8)))
        loss, metrics = model.loss(batch)
        (-loss * 1e3).backward()  # push the scale up as hard as possible
        model.logit_scale.grad.fill_(-1.0)
        opt.step()
        model.after_step()  # what the trainer does after every optimiser step
        opt.zero_grad()
        assert model.logit_scale.exp().item() <= 100.0 + 1e-4
        assert metrics["logit_scale"] <= 100.0 + 1e-4
    from polymodal.train import TrainConfig, train

    train(
        model, digits, TrainConfig(steps=3, batch_size=8, lr=10.0, warmup_steps=0, checkpoint_every=0), progress=False
    )
    assert model.logit_scale.exp().item() <= 100.0 + 1e-4


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000))
def test_batch_independence_in_eval_mode(seed):
    model = tiny_clip()
    pixels, ids = model.example_inputs(4, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(ids)
        for i in range(4):
            torch.testing.assert_close(model.encode_image(pixels[i : i + 1]), img[i : i + 1], atol=ATOL, rtol=0)
            torch.testing.assert_close(model.encode_text(ids[i : i + 1]), txt[i : i + 1], atol=ATOL, rtol=0)


# -- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_is_trained_on_training_captions_only_and_keeps_eot_on_truncation():
    from polymodal.data import digits, shapes

    texts = " ".join(corpus())
    for t in digits.HELDOUT_TEMPLATES + shapes.HELDOUT_TEMPLATES:
        assert t.format(word="seven", numeral="7", colour="red", kind="circle", where="at the top") not in texts
    model = tiny_clip()
    eos, limit = model.tokenizer.special_tokens["eos"], model.config.text.context_length
    long = "a handwritten seven " * 40
    with pytest.raises(ValueError, match=rf"tokens, longer than the limit of {limit}"):
        model.tokenize([long])
    ids = model.tokenize([long, "a seven"], truncate=True)
    assert ids.shape == (2, limit) and ids[0, -1] == eos and (ids[1] == eos).sum() == 1
    assert ids.dtype == torch.long


def test_tokenizer_is_saved_in_the_model_folder(tmp_path):
    model = tiny_clip()
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    loaded = polymodal.load(tmp_path / "m")
    assert torch.equal(loaded.tokenize(["a scanned digit 3"]), model.tokenize(["a scanned digit 3"]))


# -- bad input ----------------------------------------------------------------------------------


def test_bad_input_names_expected_and_given():
    model = tiny_clip()
    s, c = model.config.vision.image_size, model.config.vision.channels
    with pytest.raises(ValueError, match=rf"expected images \(B, {c}, {s}, {s}\); got \(2, {c}, {s + 2}, {s + 2}\)"):
        model.encode_image(torch.rand(2, c, s + 2, s + 2))
    with pytest.raises(ValueError, match=rf"expected images \(B, {c}, {s}, {s}\); got \(2, 3, {s}, {s}\)"):
        model.encode_image(torch.rand(2, 3, s, s))
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_image(torch.rand(0, c, s, s))
    vocab = model.config.text.vocab_size
    with pytest.raises(ValueError, match=rf"\[0, {vocab}\).*got ids from 1 to {vocab}"):
        model.encode_text(torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_text(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one text"):
        model.tokenize([])


# -- zero-shot and retrieval helpers ------------------------------------------------------------


def test_zero_shot_classifier_ensembles_normalised_prompts():
    model = tiny_clip()
    prompts = [["a handwritten 1", "the digit one"], ["a handwritten 2"]]
    clf = zero_shot_classifier(model, prompts)
    with torch.no_grad():
        e = F.normalize(model.encode_text(model.tokenize(prompts[0])), dim=-1)
    torch.testing.assert_close(clf[0], F.normalize(e.mean(0), dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(clf.norm(dim=-1), torch.ones(2))


def test_retrieval_counts_identical_captions_as_one_text():
    emb = torch.eye(3)
    out = retrieval(emb, emb, ["a", "b", "c"])
    assert out == {"image_to_text_r1": 1.0, "text_to_image_r1": 1.0, "image_to_text_r5": 1.0, "text_to_image_r5": 1.0}
    swapped = retrieval(emb, emb[[1, 0, 2]], ["a", "b", "c"])
    assert swapped["image_to_text_r1"] == pytest.approx(1 / 3)
    dup = retrieval(torch.eye(3)[[0, 0, 1]], torch.eye(3)[[0, 0, 1]], ["a", "a", "b"])
    assert dup["image_to_text_r1"] == 1.0 and dup["text_to_image_r1"] == 1.0


# -- CLI ----------------------------------------------------------------------------------------


def test_train_eval_and_classify_on_the_command_line(tmp_path):
    from PIL import Image

    out = tmp_path / "clip"
    run = CliRunner().invoke
    result = run(
        main,
        [
            "train",
            "clip",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "vision.depth=1",
            "--set",
            "text.depth=1",
        ],
    )
    assert result.exit_code == 0, result.output
    result = run(main, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    for key in (
        "zero_shot_accuracy",
        "zero_shot_accuracy_heldout",
        "image_to_text_r1",
        "image_to_text_r5",
        "text_to_image_r1",
        "text_to_image_r5",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    card = (out / "README.md").read_text()
    assert "Training templates" in card and "a handwritten {numeral}" in card and "digits" in card
    assert "someone wrote the number {numeral}" in card  # held-out, listed as evaluation only
    Image.fromarray((torch.rand(12, 10, 3) * 255).byte().numpy()).save(tmp_path / "x.png")
    result = run(main, ["clip", "classify", str(out), str(tmp_path / "x.png"), "--labels", "zero,one,two"])
    assert result.exit_code == 0, result.output
    probs = [float(line.split(":")[1]) for line in result.output.splitlines()[1:]]
    assert len(probs) == 3 and sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_shapes_config_adapts_and_resamples_captions():
    from polymodal.data import load_shapes
    from polymodal.plugins.clip.captions import resample

    data = load_shapes(train_size=16, test_size=8)
    cfg = CLIPModel.config_for_data(polymodal.api.spec("clip-shapes").config, data)
    assert cfg.captioner == "shapes" and cfg.vision.channels == 3
    batch = data.train.batch(list(range(16)))
    torch.manual_seed(0)
    texts = resample(cfg, batch)
    for text, original in zip(texts, batch["caption"]):
        assert text.count(" and ") == original.count(" and ")
        for word in original.split():
            if word in ("red", "green", "blue", "yellow", "magenta", "cyan", "square", "circle", "triangle", "cross"):
                assert word in text
    assert attrs.has(type(cfg))


# -- shapes caption views, attribute dropout, multi-positive InfoNCE, curriculum ----------------


def _shapes_cfg(**overrides):
    from polymodal.data import load_shapes

    data = load_shapes(train_size=64, test_size=8)
    cfg = CLIPModel.config_for_data(polymodal.api.spec("clip-shapes").config, data)
    return attrs.evolve(cfg, **overrides), data.train.batch(list(range(64)))


def test_shape_clause_leaves_out_the_dropped_attributes():
    from polymodal.plugins.clip.captions import shape_clause

    assert shape_clause("a {colour} {kind} {where}", (0, 1, 4)) == "a red circle in the center"
    assert shape_clause("a {colour} {kind} {where}", (None, 1, 4)) == "a circle in the center"
    assert shape_clause("{where} a {colour} {kind}", (None, 3, None)) == "a cross"
    assert shape_clause("one {colour} {kind} {where}", (2, None, None)) == "one blue"


def test_attribute_dropout_keeps_at_least_one_attribute_at_the_given_rates():
    from polymodal.plugins.clip.captions import drop_attributes

    torch.manual_seed(0)
    assert drop_attributes(5, (0.0, 0.0, 0.0)) == [(True, True, True)] * 5
    everything = drop_attributes(300, (1.0, 1.0, 1.0))
    assert all(sum(k) == 1 for k in everything)  # all drawn out: exactly one random attribute kept
    assert {k.index(True) for k in everything} == {0, 1, 2}
    keep = torch.tensor(drop_attributes(4000, (0.8, 0.0, 0.5)), dtype=torch.float)
    assert (
        keep[:, 1].all() and abs(keep[:, 0].mean().item() - 0.2) < 0.03 and abs(keep[:, 2].mean().item() - 0.5) < 0.03
    )
    with pytest.raises(ValueError, match="three dropout probabilities"):
        drop_attributes(3, (0.5, 1.5, 0.0))


def test_positives_mark_every_scene_a_caption_is_true_of():
    from polymodal.plugins.clip.captions import claim_holds, positives

    scenes = [[(0, 1, 4)], [(0, 1, 0), (2, 3, 8)], [(2, 1, 4)], [(5, 0, 2)]]
    claims = [[(0, 1, 4)], [(None, 1, None)], [(2, None, None), (0, None, 0)], [(5, 0, 2)]]
    want = torch.tensor([[claim_holds(c, s) for c in claims] for s in scenes])
    assert want.tolist() == [
        [True, True, False, False],  # "a circle" is true of every scene with a circle
        [False, True, True, False],  # both clauses of caption 2 hold in scene 1 only
        [False, True, False, False],
        [False, False, False, True],
    ]
    assert torch.equal(positives(claims, scenes), want | torch.eye(4, dtype=torch.bool))
    cfg, batch = _shapes_cfg(caption_dropout=(0.5, 0.5, 0.5))
    from polymodal.plugins.clip.captions import shapes_captions

    texts, claims, scenes = shapes_captions(cfg, batch)
    brute = torch.tensor([[claim_holds(c, s) for c in claims] for s in scenes]) | torch.eye(
        len(texts), dtype=torch.bool
    )
    assert torch.equal(positives(claims, scenes), brute)


def test_multi_positive_info_nce_is_info_nce_with_one_positive_and_symmetric():
    from polymodal.plugins.clip.objective import multi_positive_info_nce

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    eye = torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(multi_positive_info_nce(a, b, 3.0, eye), info_nce(a, b, 3.0))
    pos = eye.clone()
    pos[0, 1] = pos[2, 5] = pos[3, 0] = True
    torch.testing.assert_close(multi_positive_info_nce(a, b, 3.0, pos), multi_positive_info_nce(b, a, 3.0, pos.t()))
    # Two positives in a row: the target is split between them.
    logits = similarity_logits(a, b, 3.0)
    target = pos.float() / pos.sum(1, keepdim=True)
    col = (pos.float() / pos.sum(0, keepdim=True)).t()
    manual = (-(target * logits.log_softmax(1)).sum(1).mean() - (col * logits.t().log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(multi_positive_info_nce(a, b, 3.0, pos), manual)
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_info_nce(a, b, 3.0, torch.zeros(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool positives matrix of shape \(6, 6\)"):
        multi_positive_info_nce(a, b, 3.0, torch.eye(5, dtype=torch.bool))


def test_caption_views_name_only_their_attributes():
    from polymodal.data import shapes as s
    from polymodal.plugins.clip.captions import parse_view, resample_views

    cfg, batch = _shapes_cfg(caption_views=("all", "kind", "colour+position"))
    torch.manual_seed(0)
    (full, _), (kinds, kind_pos), (colpos, _) = resample_views(cfg, batch)
    colours = set(s.COLOURS)
    for text, kind_text, cp_text, boxes in zip(full, kinds, colpos, batch["boxes"]):
        words = set(kind_text.split())
        assert not words & colours and not {"top", "left", "right", "bottom", "center"} & words
        assert sorted(w for w in kind_text.split() if w in s.KINDS) == sorted(s.KINDS[b[5]] for b in boxes)
        assert not set(cp_text.split()) & set(s.KINDS)
        assert {w for w in text.split() if w in colours} == {tuple(s.COLOURS)[b[4]] for b in boxes}
    present = [{b[5] for b in boxes} for boxes in batch["boxes"]]
    for j, text in enumerate(kinds):  # a kind caption is true of exactly the scenes holding all its kinds
        named = {s.KINDS.index(w) for w in text.split() if w in s.KINDS}
        assert kind_pos[:, j].tolist() == [named <= p or i == j for i, p in enumerate(present)]
    assert parse_view("all") is None and parse_view("kind+colour") == (True, True, False)
    for bad in ("shape", "kind+kind", ""):
        with pytest.raises(ValueError, match="caption view"):
            parse_view(bad)
    with pytest.raises(ValueError, match="caption view"):
        attrs.evolve(cfg, caption_views=("all", "size"))
    with pytest.raises(ValueError, match="three probabilities"):
        attrs.evolve(cfg, caption_dropout=(0.1, 0.2))


def test_caption_curriculum_switches_views_after_first_view_steps():
    from polymodal.plugins.clip.captions import resample_views, views_at

    cfg, batch = _shapes_cfg(first_views=("kind",), first_view_steps=3, caption_views=("all", "colour"))
    assert views_at(cfg, 0) == views_at(cfg, 2) == ("kind",)
    assert views_at(cfg, 3) == views_at(cfg, None) == ("all", "colour")
    assert len(resample_views(cfg, batch, 0)) == 1 and len(resample_views(cfg, batch, 3)) == 2
    model = CLIPModel(attrs.evolve(CLIPModel.tiny_config(cfg), first_view_steps=1)).train()
    small = {k: v[:8] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
    seen = []
    original = model.encode_text
    model.encode_text = lambda ids: (seen.append(len(ids)), original(ids))[1]
    for step in range(2):
        model.begin_step(step, 2)
        loss, _ = model.loss(small)
        loss.backward()
        model.after_step()
    assert seen == [8, 8, 8]  # one view at step 0, two views at step 1


def test_label_captioner_keeps_plain_info_nce():
    from polymodal.plugins.clip.captions import resample_views

    data = load_digits()
    cfg = CLIPModel.config_for_data(polymodal.api.spec("clip").config, data)
    views = resample_views(cfg, data.train.batch(list(range(10))), 0)
    assert len(views) == 1 and views[0][1] is None and len(views[0][0]) == 10
