"""DALL·E: stream layout, vocabulary restriction, loss weights, sparse masks, KV cache, sampling, folders.

Every model here is tiny and untrained (a fresh tiny VQ-VAE tokenizer), with weights
perturbed so that no head is trivially zero.
"""

from __future__ import annotations

import math
import shutil

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polymodal.api import load
from polymodal.attention.masks import image_pattern_mask
from polymodal.data import load_dataset
from polymodal.io.samples import MANIFEST
from polymodal.models.parts import PartConfig, load_part
from polymodal.nn import KVCache
from polymodal.plugins.dalle import DALLE, VARIANTS
from polymodal.plugins.dalle.sample import clip_scores, generate_codes, sample_images
from polymodal.testing import contracts

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make(digits, seed: int = 0, **overrides) -> DALLE:
    """A tiny DALL·E adapted to the digits (its BPE learns the digit captions), perturbed."""
    return contracts.build("dalle", dataset=digits, seed=seed, **overrides).eval()


@pytest.fixture(scope="module")
def model(digits):
    return make(digits)


def random_stream(model: DALLE, batch: int, seed: int) -> torch.Tensor:
    """(B, T) a valid stream: a caption's text, then random codes."""
    g = torch.Generator().manual_seed(seed)
    text = model.encode_text([f"the digit {d}" for d in torch.randint(0, 10, (batch,), generator=g).tolist()])
    codes = torch.randint(0, model.codebook_size, (batch, *model.grid), generator=g)
    return model.stream(text, codes)


# -- stream layout ----------------------------------------------------------------------------------


def test_stream_layout_and_unique_pads(model):
    c, tok = model.config, model.text_tokenizer
    assert model.vocab_size == c.text_vocab + c.text_length + model.codebook_size
    assert model.seq_len == c.text_length + model.grid[0] * model.grid[1]
    text = model.encode_text(["the digit 3", "a 7"])  # (2, L)
    assert text.shape == (2, c.text_length)
    for row, caption in zip(text.tolist(), ["the digit 3", "a 7"]):
        body = tok.encode(caption)
        assert (
            row[: len(body)] == body and body[0] == tok.special_tokens["bos"] and body[-1] == tok.special_tokens["eos"]
        )
        assert row[len(body) :] == [
            c.text_vocab + i for i in range(len(body), c.text_length)
        ]  # pad i is text_vocab + i
    empty = model.empty_text(3)
    assert empty[:, 0].eq(tok.special_tokens["bos"]).all()
    assert empty[0, 1:].tolist() == [c.text_vocab + i for i in range(1, c.text_length)]
    assert len(set(model.pad_ids().tolist())) == c.text_length
    codes = torch.randint(0, model.codebook_size, (2, *model.grid))
    stream = model.stream(text, codes)
    assert torch.equal(stream[:, : c.text_length], text)
    assert torch.equal(stream[:, c.text_length :], codes.flatten(1) + c.text_vocab + c.text_length)


def test_too_long_prompt_names_length_and_limit(model):
    long = " ".join(["the digit seven"] * 10)
    n = len(model.text_tokenizer.encode(long))
    with pytest.raises(ValueError, match=rf"{n} tokens.*limit of {model.config.text_length}"):
        model.encode_text(long)
    with pytest.raises(ValueError, match="limit"):
        generate_codes(model, [long])
    cut = model.encode_text(long, truncate=True)[0]
    assert cut[-1] == model.text_tokenizer.special_tokens["eos"]


# -- vocabulary restriction and loss weights --------------------------------------------------------


def test_vocab_mask_splits_text_and_image(model):
    L, off = model.config.text_length, model.image_offset
    mask = model.vocab_mask(torch.arange(model.seq_len - 1))  # (T-1, V)
    assert mask[: L - 1, :off].all() and not mask[: L - 1, off:].any()  # the next token is text
    assert mask[L - 1 :, off:].all() and not mask[L - 1 :, :off].any()  # the next token is an image code


def test_image_positions_never_sample_text_ids(digits):
    model = make(digits)
    with torch.no_grad():
        model.head.bias[: model.image_offset] += 50.0  # text ids would win every arg-max
    codes = generate_codes(model, ["the digit 1"] * 4, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (4, *model.grid) and codes.min() >= 0 and codes.max() < model.codebook_size


def test_loss_is_one_eighth_text_seven_eighths_image_by_hand(digits):
    model = make(digits, seed=1)
    with torch.no_grad():
        model.head.bias[model.image_offset :] += 5.0  # unrestricted, image ids would dominate text positions
        model.head.bias[: model.image_offset] += 3.0
    ids = random_stream(model, 3, seed=2)  # (B, T)
    loss, metrics = model.stream_loss(ids)
    logits = model.stream_logits(ids[:, :-1]).detach()  # (B, T-1, V)
    L, off = model.config.text_length, model.image_offset
    text_lp = F.log_softmax(logits[:, : L - 1, :off], -1)  # text positions: text vocabulary only
    image_lp = F.log_softmax(logits[:, L - 1 :, off:], -1)  # image positions: codes only
    ce_text = -text_lp.gather(-1, ids[:, 1:L, None]).mean()
    ce_image = -image_lp.gather(-1, (ids[:, L:, None] - off)).mean()
    torch.testing.assert_close(loss.detach(), ce_text / 8 + 7 * ce_image / 8, rtol=1e-5, atol=1e-6)
    assert math.isclose(metrics["loss_text"], ce_text.item(), rel_tol=1e-5)
    assert math.isclose(metrics["loss_image"], ce_image.item(), rel_tol=1e-5)
    unrestricted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert not math.isclose(unrestricted.item(), loss.item(), rel_tol=1e-3)


def test_caption_dropout_trains_the_empty_text(digits):
    model = make(digits, caption_dropout=1.0, dropout=0.0).train()  # no other randomness in the loss
    batch = digits.train.batch(list(range(4)))
    torch.manual_seed(3)
    loss, _ = model.loss(batch)
    expected, _ = model.stream_loss(model.stream(model.empty_text(4), model.image_codes(batch["image"])))
    torch.testing.assert_close(loss, expected)


def test_scene_augmentation_moves_boxes_with_the_pixels():
    from polymodal.data.augment import augment_scenes

    shapes = load_dataset("shapes", train_size=64, test_size=1)
    single = (shapes.train["count"] == 1).nonzero().flatten()[:16].tolist()
    batch = shapes.train.batch(single)
    torch.manual_seed(0)
    out = augment_scenes(batch, flip=True, shift=2)
    mirrored = checked = 0
    for i in range(len(single)):
        img = out["image"][i].amax(0) > 0  # (S, S) object pixels
        ys, xs = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        x0, y0, x1, y1, c, k = out["boxes"][i][0]
        size = out["image"].shape[-1]
        if min(x0, y0) > 0 and max(x1, y1) < size:  # (a box cut by the border is no longer tight)
            assert (x0, y0, x1, y1) == (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
            checked += 1
        assert (c, k) == tuple(batch["boxes"][i][0][4:])
        mirrored += int(
            not torch.equal(
                out["image"][i].sum(0).nonzero().float().mean(0), batch["image"][i].sum(0).nonzero().float().mean(0)
            )
        )
    assert mirrored > 0 and checked > len(single) // 2
    flipped = augment_scenes(batch, flip=True, shift=0)
    size = batch["image"].shape[-1]
    kinds = set()
    for i in range(len(single)):
        same = torch.equal(flipped["image"][i], batch["image"][i])
        if not same:
            assert torch.equal(flipped["image"][i], batch["image"][i].flip(-1))
        x0, y0, x1, y1, *rest = batch["boxes"][i][0]
        assert flipped["boxes"][i][0] == ((x0, y0, x1, y1, *rest) if same else (size - x1, y0, size - x0, y1, *rest))
        kinds.add(same)
    assert kinds == {True, False}
    digits_batch = {"image": torch.rand(2, 1, 8, 8), "caption": ["a 1", "a 2"], "label": torch.tensor([1, 2])}
    assert augment_scenes(digits_batch, flip=True, shift=2) is digits_batch  # no boxes: nothing to keep true


# -- sparse attention -----------------------------------------------------------------------------


def test_layer_masks_follow_the_schedule_and_reach_every_block(digits):
    model = make(digits, depth=4, attention=("row", "column"), attention_last="conv")
    assert model.config.schedule == ["row", "column", "row", "conv"]
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, kw["mask"]), with_kwargs=True)
        for i, block in enumerate(model.stack.blocks)
    ]
    ids = random_stream(model, 2, seed=0)[:, :-1]
    model.stream_logits(ids)
    for h in hooks:
        h.remove()
    t = ids.shape[1]
    for i, pattern in enumerate(model.config.schedule):
        want = image_pattern_mask(pattern, model.grid, prefix=model.config.text_length)[:t, :t]
        assert torch.equal(seen[i], want), f"layer {i} ({pattern})"
    assert make(digits, depth=2, attention=("full",), attention_last="").layer_masks(0, 5, torch.device("cpu")) is None


@pytest.mark.parametrize("pattern", ["row", "column", "conv", "full"])
def test_a_sparse_pattern_hides_what_it_masks(digits, pattern):
    """One layer: changing image token j changes the logits of exactly the queries its mask lets see j."""
    model = make(digits, depth=1, attention=(pattern,), attention_last="")
    L = model.config.text_length
    ids = random_stream(model, 1, seed=5)[:, :-1]  # (1, T-1)
    j = L + model.grid[1] + 1  # image token (1, 1)
    other = ids.clone()
    other[0, j] = model.image_offset + (ids[0, j] - model.image_offset + 1) % model.codebook_size
    with torch.no_grad():
        changed = (model.stream_logits(ids) - model.stream_logits(other)).abs().amax(-1)[0] > 1e-6  # (T-1,)
    mask = image_pattern_mask(pattern, model.grid, prefix=L)[: ids.shape[1], j]  # who may see key j
    assert torch.equal(changed, mask)


# -- KV cache -------------------------------------------------------------------------------------


@st.composite
def decodes(draw, total: int):
    """(length, chunks, seed): a random stream prefix cut into random chunks (sometimes one token each)."""
    n = draw(st.integers(1, total))
    if draw(st.booleans()):
        return n, [(i, i + 1) for i in range(n)], draw(st.integers(0, 2**31 - 1))
    cuts = sorted({c for c in draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4)) if 0 < c < n})
    edges = [0, *cuts, n]
    return n, list(zip(edges[:-1], edges[1:])), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("attention,last", [(("full",), ""), (("row", "column"), "conv"), (("conv",), "row")])
def test_cached_decoding_equals_the_full_forward(digits, attention, last):
    model = make(digits, depth=3, attention=attention, attention_last=last)

    @given(decodes(model.seq_len - 1))
    @SETTINGS
    def check(case):
        n, chunks, seed = case
        ids = random_stream(model, 2, seed)[:, :n]  # (2, n)
        with torch.no_grad():
            full = model.stream_logits(ids)  # (2, n, V)
            cache = KVCache()
            steps = [model.stream_logits(ids[:, a:b], cache) for a, b in chunks]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)

    check()


def test_sampling_with_and_without_cache_agree(digits):
    model = make(digits, depth=2, attention=("row",), attention_last="conv")
    kw = dict(top_k=5, temperature=0.9)
    a = generate_codes(model, ["the digit 4"] * 3, generator=torch.Generator().manual_seed(1), **kw)
    b = generate_codes(model, ["the digit 4"] * 3, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert torch.equal(a, b)


def test_the_trunk_is_the_core_decoder_over_the_models_own_modules(digits):
    """``stream_logits`` runs the core CausalDecoder over DALL·E's own embeddings, stack and head with the
    schedule's mask rows; the decoder holds no weights, so the state dict is the model's alone."""
    model = make(digits, depth=3, attention=("row", "column"), attention_last="conv")
    keys = list(model.state_dict())
    dec = model.decoder
    assert dec is model.decoder and dec.stack is model.stack and dec.head is model.head
    assert dec.tokens is model.token_embed and dec.max_len == model.seq_len
    assert list(model.state_dict()) == keys
    ids = random_stream(model, 2, seed=1)[:, :-1]  # (2, T-1)
    pos = torch.arange(3, ids.shape[1])  # rows of a continuation after 3 cached positions
    for layer, (got, pattern) in enumerate(zip(model.decoder_masks(pos, ids.shape[1]), model.config.schedule)):
        t = ids.shape[1]
        want = image_pattern_mask(pattern, model.grid, prefix=model.config.text_length)[3:t, :t]
        assert torch.equal(got, want), f"layer {layer}"
    with torch.no_grad():
        cache = dec.new_cache()
        steps = [model.stream_logits(ids[:, :3], cache), model.stream_logits(ids[:, 3:], cache)]
        torch.testing.assert_close(torch.cat(steps, 1), dec(ids), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.stream_logits(ids), dec(ids))


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
@pytest.mark.parametrize("prefix", [0, 5])
def test_guided_and_completed_sampling_with_and_without_cache_agree(digits, cfg_scale, prefix):
    """Sampling through the decoder's preallocated caches (both streams under guidance, a prompt that ends
    inside the image) draws exactly what the whole-stream reference path draws with the same seed."""
    model = make(digits, seed=3, depth=2, attention=("column",), attention_last="conv")
    given_codes = torch.randint(0, model.codebook_size, (3, prefix), generator=torch.Generator().manual_seed(2))
    kw = dict(top_p=0.9, temperature=1.1, cfg_scale=cfg_scale, prefix=given_codes if prefix else None)

    def draw(**more):
        return generate_codes(
            model, ["the digit 4", None, "a 2"], generator=torch.Generator().manual_seed(6), **kw, **more
        )

    cached = draw()
    assert torch.equal(cached, draw(use_cache=False))
    assert torch.equal(cached.flatten(1)[:, :prefix], given_codes)


@pytest.mark.slow
def test_compiled_sampling_draws_what_eager_sampling_draws(digits):
    """``prepare_inference(model, compile=True)``: the prompt runs eagerly, every later token through the
    compiled static step over the preallocated caches (both streams under guidance); same draws as eager."""
    from torch._dynamo.utils import counters

    from polymodal.models.inference import prepare_inference

    model = make(digits, seed=4, depth=2, attention=("row",), attention_last="conv")
    kw = dict(top_k=6, cfg_scale=2.0)
    eager = generate_codes(model, ["the digit 8", "a 1"], generator=torch.Generator().manual_seed(9), **kw)
    prepare_inference(model, compile=True)
    before = counters["stats"]["unique_graphs"]
    compiled = generate_codes(model, ["the digit 8", "a 1"], generator=torch.Generator().manual_seed(9), **kw)
    assert counters["stats"]["unique_graphs"] > before  # the static step really was compiled
    assert torch.equal(compiled, eager)


# -- guidance, reranking, completion ----------------------------------------------------------------


def test_cfg_scale_one_is_the_conditional_and_zero_the_unconditional(digits):
    model = make(digits, seed=2, cfg_scale=None)  # the recipe's default guidance off
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # let the text matter, so conditional and unconditional draws differ
        for p in model.stack.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        model.head.weight.mul_(20.0)

    def draw(prompt, **kw):
        return generate_codes(model, [prompt] * 4, generator=torch.Generator().manual_seed(7), **kw)

    cond, uncond = draw("the digit 2"), draw(None)
    assert torch.equal(draw("the digit 2", cfg_scale=1.0), cond)
    assert torch.equal(draw("the digit 2", cfg_scale=0.0), uncond)
    guided = draw("the digit 2", cfg_scale=4.0)
    assert guided.min() >= 0 and guided.max() < model.codebook_size
    assert not torch.equal(cond, uncond)  # so the two equalities above can fail


@pytest.fixture(scope="module")
def tiny_clip():
    clip = load_part(PartConfig(path="", variant="clip", tiny=True))
    contracts._perturb(clip, 11)
    return clip.eval()


def test_rerank_keeps_the_best_clip_candidate(model, tiny_clip, tmp_path):
    prompt, n, per = "the digit 5", 3, 4
    plain = sample_images(model, prompt, n * per, seed=2)  # the same draws as the candidates
    cos = (
        F.normalize(tiny_clip.encode_image(tiny_clip.prepare(plain)), dim=-1)
        @ F.normalize(tiny_clip.encode_text(tiny_clip.tokenize([prompt])), dim=-1).t()
    )  # (n·per, 1)
    best = cos.reshape(n, per).argmax(1) + torch.arange(n) * per
    assert not torch.equal(best, torch.arange(n) * per) or per == 1  # the test can tell choosing from not choosing
    kept = sample_images(model, prompt, n, seed=2, rerank=tiny_clip, candidates=per)
    torch.testing.assert_close(kept, plain[best])
    torch.testing.assert_close(clip_scores(tiny_clip, plain, prompt), cos[:, 0].detach())
    tiny_clip.save(tmp_path / "clip")
    torch.testing.assert_close(
        sample_images(model, prompt, n, seed=2, rerank=str(tmp_path / "clip"), candidates=per), kept
    )


def test_complete_keeps_the_top_half(model, tmp_path, digits):
    from polymodal.eval.images import save_png

    image = digits.test["image"][0]
    save_png(image, tmp_path / "d.png")
    out = sample_images(model, "the digit 0", 2, seed=0, complete=str(tmp_path / "d.png"))
    assert out.shape == (2, 1, 8, 8)
    save_png(torch.zeros(1, 16, 16), tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"8×8 image.*got 16×16"):
        sample_images(model, "the digit 0", 1, complete=str(tmp_path / "big.png"))


# -- bad inputs -----------------------------------------------------------------------------------


def test_codes_outside_the_codebook_are_refused(model):
    h, w = model.grid
    bad = torch.zeros(1, h, w, dtype=torch.long)
    bad[0, 0, 0] = model.codebook_size
    with pytest.raises(ValueError, match=rf"\[0, {model.codebook_size}\).*{model.codebook_size}"):
        model.decode_codes(bad)
    with pytest.raises(ValueError, match="codes"):
        model.decode_codes(-bad)
    with pytest.raises(ValueError, match=rf"\(B, {h}, {w}\)"):
        model.decode_codes(torch.zeros(1, h + 1, w, dtype=torch.long))
    ids = random_stream(model, 1, seed=0)
    ids[0, 2] = model.image_offset  # an image code at a text position
    with pytest.raises(ValueError, match="position 2 takes a text id"):
        model.stream_logits(ids)


def test_non_finite_logits_raise_instead_of_an_image(digits):
    model = make(digits)
    with torch.no_grad():
        model.head.bias[model.image_offset + 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sample_images(model, "the digit 3", 2)


def test_bad_sampling_options(model):
    with pytest.raises(ValueError, match="does not support guidance"):
        sample_images(model, "the digit 3", 1, guidance=2.0)
    with pytest.raises(ValueError, match="candidates needs rerank"):
        sample_images(model, "the digit 3", 1, candidates=4)
    with pytest.raises(ValueError, match="top_k"):
        sample_images(model, "the digit 3", 1, top_k=0)


# -- model folders and the CLI --------------------------------------------------------------------


def test_save_load_round_trip_carries_the_tokenizer(digits, tmp_path):
    vq = load_part(PartConfig(path="", variant="vqvae", tiny=True))
    contracts._perturb(vq, 3)
    vq.save(tmp_path / "vq")
    spec = contracts.tiny(VARIANTS["dalle"])
    torch.manual_seed(0)
    model = spec.build(digits, tokenizer=str(tmp_path / "vq")).eval()  # a string for a part field is its path
    model.save(tmp_path / "dalle")
    shutil.rmtree(tmp_path / "vq")  # the folder must not need the original tokenizer
    assert (tmp_path / "dalle" / "tokenizer" / "config.json").is_file()
    assert (tmp_path / "dalle" / "tokenizer.json").is_file()
    loaded = load(tmp_path / "dalle")
    assert loaded.config == attrs.evolve(model.config, tokenizer=attrs.evolve(model.config.tokenizer, path=""))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(loaded.encode_text("a handwritten 9"), model.encode_text("a handwritten 9"))
    ids = random_stream(model, 2, seed=4)
    torch.testing.assert_close(loaded.stream_logits(ids), model.stream_logits(ids), atol=0, rtol=0)
    assert torch.equal(sample_images(loaded, "the digit 9", 3, seed=1), sample_images(model, "the digit 9", 3, seed=1))


def test_sample_command_writes_native_size_pngs(model, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from polymodal.cli import main

    model.save(tmp_path / "m")
    out = tmp_path / "s"
    result = CliRunner().invoke(
        main,
        [
            "sample",
            str(tmp_path / "m"),
            "--prompt",
            "the digit 3",
            "-n",
            "3",
            "--seed",
            "0",
            "--out",
            str(out),
            "--cfg",
            "2",
            "--top-k",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST) == [
        "grid.png",
        "sample_000.png",
        "sample_001.png",
        "sample_002.png",
    ]
    assert Image.open(out / "sample_000.png").size == (8, 8)
    bad = CliRunner().invoke(main, ["sample", str(tmp_path / "m"), "--prompt", "the digit 3", "--candidates", "2"])
    assert bad.exit_code != 0 and "rerank" in bad.output


def test_variants_name_their_tokenizer_part():
    assert VARIANTS["dalle"].parts() == [("tokenizer", "vqvae")]
    assert VARIANTS["dalle-shapes"].parts() == [("tokenizer", "vqvae-shapes")]
    assert VARIANTS["dalle-shapes"].config.tokenizer.data == "shapes"
    assert VARIANTS["dalle-shapes"].data == "shapes"
