"""RuDolph: layout, position tables, per-layer sparse masks, 1/7/1 loss, KV cache, tasks, bad inputs, folders."""

from __future__ import annotations

import shutil

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polymodal.api import load
from polymodal.attention import image_pattern_mask
from polymodal.config import evolve
from polymodal.generation.sampling import generate
from polymodal.models.parts import PartConfig, load_part
from polymodal.nn import KVCache
from polymodal.plugins.rudolph import RuDolph, RudolphConfig
from polymodal.plugins.rudolph import text as tx

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = RudolphConfig(tokenizer=PartConfig(path="", variant="vqvae", tiny=True), dim=16, depth=4, heads=2)


def tiny_vq():
    """A fresh tiny VQ-VAE whose codes are spread over its encoder outputs (untrained, images would share one code)."""
    torch.manual_seed(0)
    vq = load_part(TINY.tokenizer)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # codes = encoder outputs of random images, as k-means initialisation would pick
        z = vq.encoder(torch.rand(8, 1, 8, 8, generator=g)).permute(0, 2, 3, 1).flatten(0, 2)  # (128, D)
        vq.codebook.embed.copy_(z[torch.randperm(len(z), generator=g)[: vq.codebook_size]])
    return vq


def build(**changes) -> RuDolph:
    """A tiny RuDolph (fresh tiny VQ-VAE) with noisy weights, so every input matters to the logits."""
    vq = tiny_vq()
    torch.manual_seed(0)
    model = RuDolph(attrs.evolve(TINY, **changes), parts={"tokenizer": vq}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model() -> RuDolph:
    return build()


def spy_stream(model: RuDolph, seen: dict) -> None:
    """Record the codes, layouts and stream of the model's next training batch in ``seen``."""
    real = model.stream

    def stream(captions, codes_, t2i, **kw):
        seen.update(codes=codes_, t2i=t2i, ids=real(captions, codes_, t2i, **kw))
        return seen["ids"]

    model.stream = stream


def random_stream(model: RuDolph, batch: int, seed: int = 0) -> torch.Tensor:
    return model.example_inputs(batch, torch.Generator().manual_seed(seed))[0]


def codes(model: RuDolph, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.codebook_size, (batch, *model.grid), generator=torch.Generator().manual_seed(seed))


# -- layout and position embeddings ----------------------------------------------------------------


def test_stream_layout_and_task_tokens(model):
    c, sp, L, n_img = model.config, model.text.special_tokens, model.config.left_len, model.image_len
    grid = codes(model, 2)
    ids = model.stream(["the digit seven", "a 3"], grid, torch.tensor([True, False]))
    assert ids.shape == (2, model.seq_len) == (2, c.left_len + n_img + c.right_len)
    caption = model.text.encode("the digit seven", add_bos=False, add_eos=True)
    assert ids[0, :L].tolist() == [sp["lt_t2i"], *caption] + [sp["pad"]] * (L - 1 - len(caption))
    assert ids[0, L + n_img :].tolist() == [sp["pad"]] * c.right_len  # text→image: no right text
    assert ids[1, :L].tolist() == [sp["lt_i2t"]] + [sp["pad"]] * (L - 1)  # image→text: empty left text
    right = model.text.encode("a 3", add_bos=False, add_eos=True)
    assert ids[1, L + n_img : L + n_img + 1 + len(right)].tolist() == [sp["rt_i2t"], *right]
    assert torch.equal(ids[:, L : L + n_img] - c.text_vocab_size, grid.flatten(1))


def test_training_alternates_the_two_layouts(model):
    batch = model.example_batch(6, torch.Generator().manual_seed(0))
    sp, L = model.text.special_tokens, model.config.left_len
    for frac, left_task in ((1.0, "lt_t2i"), (0.0, "lt_i2t")):
        m = build(t2i_fraction=frac)
        seen = {}
        spy_stream(m, seen)
        m.loss(batch)
        assert (seen["ids"][:, 0] == sp[left_task]).all()
        right_first = seen["ids"][:, L + m.image_len]
        assert (right_first == (sp["pad"] if frac == 1.0 else sp["rt_i2t"])).all()


def test_image_positions_are_row_plus_column(model):
    pos, (h, w), L = model.positions(), model.grid, model.config.left_len
    assert pos.shape == (model.seq_len, model.config.dim)
    for r in range(h):
        for col in range(w):
            torch.testing.assert_close(pos[L + r * w + col], model.row_pos_embed[r] + model.col_pos_embed[col])
    torch.testing.assert_close(pos[:L], model.left_pos_embed)
    torch.testing.assert_close(pos[L + h * w :], model.right_pos_embed)


def test_left_and_right_text_have_separate_position_tables(model):
    ids = random_stream(model, 2)
    before = model(ids)
    start = model.config.left_len + model.image_len
    m = build()
    with torch.no_grad():
        m.right_pos_embed.add_(torch.randn(m.right_pos_embed.shape))
    after = m(ids)
    torch.testing.assert_close(after[:, :start], before[:, :start], atol=0, rtol=0)  # left text and image untouched
    assert (after[:, start:] - before[:, start:]).abs().amax() > 1e-3
    m = build()
    with torch.no_grad():
        m.left_pos_embed[-1].add_(torch.randn(m.config.dim))
    after = m(ids)
    torch.testing.assert_close(
        after[:, : model.config.left_len - 1], before[:, : model.config.left_len - 1], atol=0, rtol=0
    )
    assert (after[:, start:] - before[:, start:]).abs().amax() > 1e-3


# -- per-layer masks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth,expected",
    [
        (3, ["row", "column", "conv"]),
        (4, ["row", "column", "conv", "conv"]),
        (7, ["row", "column", "conv", "row", "column", "conv", "conv"]),
    ],
)
def test_layer_masks_follow_rudolphs_schedule(depth, expected):
    m = RuDolph(attrs.evolve(TINY, depth=depth))
    assert m.patterns == expected
    L, R = m.config.left_len, m.config.right_len
    for i, p in enumerate(expected):
        assert torch.equal(m.layer_masks[i], image_pattern_mask(p, m.grid, prefix=L, suffix=R, kernel=3))


@pytest.mark.parametrize(
    "pattern,seen,unseen",
    [
        ("row", (1, 0), (0, 2)),  # same row earlier: seen; an earlier row: not
        ("column", (0, 1), (1, 0)),  # same column above: seen; same row, other column: not
        ("conv", (0, 0), (0, 3)),  # inside the 3×3 window: seen; outside: not
        ("full", (0, 3), None),  # dense: every earlier image token
    ],
)
def test_sparse_mask_reaches_attention(pattern, seen, unseen):
    m = build(depth=1, cycle=(pattern,), last=pattern)
    ids = random_stream(m, 1)
    L, w, k = m.config.left_len, m.grid[1], m.codebook_size
    query = L + 1 * w + 1  # image token (1, 1)
    base = m(ids)[0, query]

    def changed(cell):
        other = ids.clone()
        p = L + cell[0] * w + cell[1]
        other[0, p] = m.config.text_vocab_size + (other[0, p] - m.config.text_vocab_size + 1) % k
        return (m(other)[0, query] - base).abs().amax().item()

    assert changed(seen) > 1e-4
    if unseen is not None:
        assert changed(unseen) == 0.0


# -- the loss -----------------------------------------------------------------------------------------


def test_loss_weights_1_7_1_by_hand(model):
    ids = model.stream(["a 3", "the digit seven", "a 5"], codes(model, 3), torch.tensor([True, False, False]))
    loss, metrics = model.stream_loss(ids)
    logits = model(ids[:, :-1])
    L, n_img, vt = model.config.left_len, model.image_len, model.config.text_vocab_size
    ignored = set(tx.conditions(model.text))
    parts = {0: [], 1: [], 2: []}
    for b in range(ids.shape[0]):
        for j in range(1, ids.shape[1]):
            target = int(ids[b, j])
            if target in ignored:
                continue
            seg = 0 if j < L else (1 if j < L + n_img else 2)
            row = logits[b, j - 1]
            if seg == 1:
                ce = -F.log_softmax(row[vt:], -1)[target - vt]
            else:
                allowed = [i for i in range(model.text.vocab_size) if i not in ignored]
                ce = -F.log_softmax(row[allowed], -1)[allowed.index(target)]
            parts[seg].append(ce)
    means = [torch.stack(parts[s]).mean() for s in range(3)]
    n_tokens = [len(model.text.encode(t, add_bos=False, add_eos=True)) for t in ("a 3", "the digit seven", "a 5")]
    assert [len(parts[0]), len(parts[1]), len(parts[2])] == [n_tokens[0], 3 * n_img, n_tokens[1] + n_tokens[2]]
    torch.testing.assert_close(loss, 1 * means[0] + 7 * means[1] + 1 * means[2], atol=1e-5, rtol=1e-5)
    for s, name in enumerate(("ce_segment_0", "ce_segment_1", "ce_segment_2")):
        assert metrics[name] == pytest.approx(means[s].item(), abs=1e-5)


def test_loss_backward_reaches_the_decoder_not_the_frozen_tokenizer():
    m = build().train()
    loss, metrics = m.loss(m.example_batch(4, torch.Generator().manual_seed(0)))
    loss.backward()
    assert {"ce_left", "ce_image", "ce_right"} <= set(metrics)
    assert m.head.weight.grad is not None and m.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.vq.parameters())


# -- KV cache ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def by_masks() -> dict[bool, RuDolph]:
    """RuDolph with the sparse schedule (True) and with dense causal image attention (False)."""
    return {True: build(), False: build(cycle=("full",), last="full")}


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_kv_cache_incremental_equals_full_forward(by_masks, sparse, data):
    m = by_masks[sparse]
    n = data.draw(st.integers(1, m.seq_len), label="length")
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=4), label="cuts"))) if n > 1 else []
    ids = random_stream(m, 2, seed=data.draw(st.integers(0, 10**6), label="seed"))[:, :n]
    full = m(ids)
    cache, outs = KVCache(), []
    for a, b in zip([0, *cuts], [*cuts, n]):
        outs.append(m(ids[:, a:b], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_sampling_with_and_without_cache_agree(model):
    a = model.generate_codes(["a 3", None], generator=torch.Generator().manual_seed(5))
    b = model.generate_codes(["a 3", None], generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a, b)
    assert model.caption_codes(codes(model, 2)) == model.caption_codes(codes(model, 2), use_cache=False)


def test_forward_runs_through_the_core_decoder_rebuilt_with_the_layers():
    """The trunk is the core CausalDecoder over RuDolph's own modules and per-layer masks (no weights of its
    own); rebuilding the layers (as loading a folder's tokenizer does) rebuilds it over the new ones."""
    m = build()
    keys = list(m.state_dict())
    dec = m.decoder
    assert dec.stack is m.stack and dec.head is m.head and dec.tokens is m.token_embed and dec.max_len == m.seq_len
    assert list(m.state_dict()) == keys
    ids = random_stream(m, 2, seed=4)  # (2, N)
    pos = torch.arange(5, m.seq_len)
    for layer, got in enumerate(m.decoder_masks(pos, m.seq_len)):
        assert torch.equal(got, m.layer_masks[layer, 5:]), f"layer {layer}"
    assert torch.equal(m(ids), dec(ids))
    m._build(m.vq)
    assert m.decoder is not dec and m.decoder.stack is m.stack and m.decoder.head is m.head


def test_sampled_captions_and_filtered_images_agree_with_and_without_cache(model):
    """Sampled (not greedy) captioning and top-k/top-p image sampling through the decoder's preallocated
    caches draw exactly what the whole-stream reference draws with the same seed."""
    grid = codes(model, 3, seed=8)

    def caption(**kw):
        return model.caption_codes(
            grid, greedy=False, temperature=1.5, generator=torch.Generator().manual_seed(3), **kw
        )

    assert caption() == caption(use_cache=False)
    assert caption() != model.caption_codes(grid)  # drawn, not the greedy captions

    def images(**kw):
        prompts = ["a 3", None, "the digit 7"]
        return model.generate_codes(prompts, generator=torch.Generator().manual_seed(4), top_k=4, top_p=0.8, **kw)

    assert torch.equal(images(), images(use_cache=False))


@pytest.mark.slow
def test_compiled_captioning_and_sampling_equal_eager(model):
    """``prepare_inference(model, compile=True)``: the static decoding step compiled over the preallocated cache
    (keys bucketed, so no recompilation per token) writes the same captions and draws the same codes."""
    from torch._dynamo.utils import counters

    from polymodal.models.inference import prepare_inference

    m = build(depth=2)
    grid = codes(m, 2, seed=9)
    want_captions = m.caption_codes(grid)
    want_codes = m.generate_codes(["a 5", None], generator=torch.Generator().manual_seed(2))
    prepare_inference(m, compile=True)
    before = counters["stats"]["unique_graphs"]
    assert m.caption_codes(grid) == want_captions
    assert counters["stats"]["unique_graphs"] > before  # the static step really was compiled
    assert torch.equal(m.generate_codes(["a 5", None], generator=torch.Generator().manual_seed(2)), want_codes)


# -- vocabulary restriction and sampling errors -----------------------------------------------------------


def test_vocabulary_is_restricted_per_part():
    m = build()
    vt = m.config.text_vocab_size
    hook = m.head.register_forward_hook(lambda mod, inp, out: out + 50.0 * (torch.arange(out.shape[-1]) < vt))
    try:
        ids = m.left_text(["a 3"])
        assert m(ids)[0, -1].argmax() < vt  # unrestricted, the next token would be text
        grid = m.generate_codes(["a 3", "a 4"], generator=torch.Generator().manual_seed(0))
        assert grid.shape == (2, *m.grid) and grid.min() >= 0 and grid.max() < m.codebook_size
    finally:
        hook.remove()
    hook = m.head.register_forward_hook(lambda mod, inp, out: out + 50.0 * (torch.arange(out.shape[-1]) >= vt))
    try:
        text = m.caption_codes(codes(m, 2))  # decodes: every sampled id is a text id
        assert all(isinstance(t, str) for t in text)
        sp = m.text.special_tokens
        prefix = torch.cat(
            [m.left_text(["", ""], "lt_i2t"), m.codes_to_ids(codes(m, 2)), m.right_text(["", ""])[:, :1]], 1
        )
        out = generate(m._step, prefix, 5, greedy=True, allowed=m.vocab_masks[2])
        new = out[:, prefix.shape[1] :]
        assert (new < m.text.vocab_size).all() and not torch.isin(new, torch.tensor(tx.conditions(m.text))).any()
        assert (new != sp["pad"]).all()
    finally:
        hook.remove()


def test_non_finite_logits_raise_instead_of_sampling():
    m = build()
    hook = m.head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    try:
        with pytest.raises(ValueError, match="non-finite"):
            m.generate_codes(["a 3"])
        with pytest.raises(ValueError, match="non-finite"):
            m.caption_codes(codes(m, 1))
    finally:
        hook.remove()


# -- zero-shot and reranking ------------------------------------------------------------------------------


def naive_nll(m: RuDolph, grid: torch.Tensor, caption: str) -> torch.Tensor:
    """Mean NLL of ``caption`` as right text of each image, from one full forward per stream (no cache tricks)."""
    ids = m.stream([caption] * grid.shape[0], grid, torch.zeros(grid.shape[0], dtype=torch.bool))
    logits = m(ids[:, :-1])[:, -(m.config.right_len - 1) :]  # (B, R-1, V) predicting right tokens 1..
    logits = logits.masked_fill(~m.vocab_masks[2], float("-inf"))
    tgt = m.targets(ids)[:, -(m.config.right_len - 1) :]
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    counted = (tgt != -100).float()
    return (ce * counted).sum(1) / counted.sum(1)


def test_zero_shot_picks_the_caption_with_lowest_perplexity(model):
    grid = codes(model, 5, seed=3)
    class_captions = [["a 0", "the digit zero"], ["a 1"], ["the digit two", "a small picture of two"]]
    flat = [t for texts in class_captions for t in texts]
    owner = torch.tensor([0, 0, 1, 2, 2])
    expected = torch.stack([naive_nll(model, grid, t) for t in flat], 1)  # (B, K)
    torch.testing.assert_close(model.caption_nll(grid, flat, chunk=2), expected, atol=1e-5, rtol=1e-5)
    model.encode_images = lambda images: grid  # score exactly these codes
    try:
        pred = model.zero_shot(torch.zeros(5, 1, 8, 8), class_captions)
    finally:
        del model.encode_images
    assert torch.equal(pred, owner[expected.argmin(1)])


def test_self_reranking_keeps_the_candidate_whose_caption_is_likeliest(model):
    cands = codes(model, 2 * 4, seed=7).view(2, 4, *model.grid)
    best = model.rerank(cands, ["a 3", "the digit seven"])
    for i, prompt in enumerate(["a 3", "the digit seven"]):
        scores = naive_nll(model, cands[i], prompt)
        assert torch.equal(best[i], cands[i, scores.argmin()])


def test_sample_to_folder_writes_pngs_and_is_seeded(model, tmp_path):
    paths = model.sample_to_folder(tmp_path / "a", n=3, prompt="a 3", seed=1, temperature=0.9, top_k=5)
    assert [p.name for p in paths] == ["sample_000.png", "sample_001.png", "sample_002.png", "grid.png"]
    again = model.sample_to_folder(tmp_path / "b", n=3, prompt="a 3", seed=1, temperature=0.9, top_k=5)
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(paths, again))
    ranked = model.sample_to_folder(tmp_path / "c", n=2, prompt="a 3", seed=1, candidates=3, use_cache=False)
    assert len(ranked) == 3
    with pytest.raises(ValueError, match="does not support cfg_scale"):
        model.sample_to_folder(tmp_path / "d", n=1, prompt="a 3", cfg_scale=2.0)
    with pytest.raises(ValueError, match="give a prompt"):
        model.sample_to_folder(tmp_path / "e", n=1, prompt=None, candidates=2)


def test_caption_parsing_names_one_digit():
    assert tx.caption_label("an 8x8 image of a 3") == 3
    assert tx.caption_label("the digit seven") == 7
    assert tx.caption_label("the number 0 written by hand") == 0
    assert tx.caption_label("a 3 and a five") == -1
    assert tx.caption_label("an 8x8 image of a") == -1


# -- bad inputs ----------------------------------------------------------------------------------------------


def test_bad_inputs_name_expected_and_given(model):
    with pytest.raises(ValueError, match=r"encodes to \d+ tokens .* longer than the 9"):
        model.generate_codes(["the number 7 written by hand on a sheet of paper"])
    bad = codes(model, 1)
    bad[0, 0, 0] = model.codebook_size
    with pytest.raises(ValueError, match=rf"\[0, {model.codebook_size}\).*got ids in \[\d+, {model.codebook_size}\]"):
        model.caption_codes(bad)
    with pytest.raises(ValueError, match=r"expected integer codes \(B, 4, 4\); got \(1, 3, 3\)"):
        model.caption_codes(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected float images \(B, 1, 8, 8\) in \[0, 1\]; got \(2, 1, 7, 7\)"):
        model.caption(torch.rand(2, 1, 7, 7))
    ids = random_stream(model, 1)
    ids[0, model.config.left_len] = 5  # a text id where an image code belongs
    with pytest.raises(ValueError, match="in the image"):
        model(ids)
    with pytest.raises(ValueError, match=f"holds {model.seq_len} tokens"):
        model(torch.cat([random_stream(model, 1), random_stream(model, 1)[:, :1]], 1))


# -- model folders ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_carries_the_frozen_tokenizer(tmp_path):
    from polymodal.api import spec
    from polymodal.testing.contracts import tiny_config

    torch.manual_seed(0)
    vq_spec = spec("vqvae")
    vq = vq_spec.model_class(tiny_config(vq_spec.model_class, vq_spec.config))
    with torch.no_grad():
        vq.codebook.embed.normal_()
    vq.save(tmp_path / "vq")
    m = RuDolph(evolve(TINY, tokenizer=str(tmp_path / "vq"))).eval()  # a string for a part field is its path
    m.save(tmp_path / "rudolph")
    shutil.rmtree(tmp_path / "vq")  # the model folder must not need the original tokenizer folder
    assert (tmp_path / "rudolph" / "tokenizer" / "config.json").is_file()
    assert (tmp_path / "rudolph" / "text" / "tokenizer.json").is_file()
    back = load(tmp_path / "rudolph")
    assert back.config.tokenizer.path == "" and back.config == evolve(m.config, tokenizer="")
    for key, value in m.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.encode_images(images), m.encode_images(images))
    ids = random_stream(m, 2)
    torch.testing.assert_close(back(ids), m(ids), atol=0, rtol=0)
    assert back.caption(images) == m.caption(images)


def test_training_loss_equals_the_full_stream_loss():
    m = build(t2i_fraction=0.5)
    seen = {}
    spy_stream(m, seen)
    torch.manual_seed(3)
    loss, _ = m.loss(m.example_batch(8, torch.Generator().manual_seed(0)))
    ids = seen["ids"]
    assert len(set(ids[:, 0].tolist())) == 2  # both layouts in the batch
    full, _ = m.stream_loss(ids)  # right contexts of text→image rows are padding: nothing to score
    torch.testing.assert_close(loss, full, atol=1e-5, rtol=1e-5)


def test_pixel_noise_only_touches_image_to_text_rows():
    m = build(t2i_fraction=0.5, augment_noise=0.3).train()
    seen = {}
    spy_stream(m, seen)
    batch = m.example_batch(16, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m.loss(batch)
    noisy, t2i = seen["codes"], seen["t2i"]
    clean = m.encode_images(batch["image"])
    assert t2i.any() and (~t2i).any()
    assert torch.equal(noisy[t2i], clean[t2i])
    assert not torch.equal(noisy[~t2i], clean[~t2i])


def test_image_codes_start_with_embeddings_of_their_decoded_look():
    from polymodal.plugins.rudolph.model import decoded_code_embeddings

    m = build(dim=128)
    k, vt = m.codebook_size, m.config.text_vocab_size
    codes_ = torch.arange(k)[:, None, None].expand(k, *m.grid).contiguous()
    look = m.vq.decode(codes_).flatten(1)
    look = (look - look.mean(0)) / look.std(0).clamp(min=1e-6)
    emb = decoded_code_embeddings(m.vq, m.grid, 128)
    iu = torch.triu_indices(k, k, 1)
    d_look, d_emb = torch.cdist(look, look)[iu[0], iu[1]], torch.cdist(emb, emb)[iu[0], iu[1]]
    assert torch.corrcoef(torch.stack([d_look, d_emb]))[0, 1] > 0.8  # distances kept by the random projection
    fresh = RuDolph(attrs.evolve(TINY, dim=128), parts={"tokenizer": tiny_vq()})
    random = RuDolph(attrs.evolve(TINY, dim=128, image_embed_init="random"), parts={"tokenizer": tiny_vq()})
    assert fresh.token_embed.weight[vt:].std().item() == pytest.approx(0.02, rel=0.5)
    assert not torch.allclose(fresh.token_embed.weight[vt:], random.token_embed.weight[vt:])


def test_scene_captions_train_as_bytes_and_evaluate_by_perplexity():
    from polymodal.data import load_dataset
    from polymodal.data.base import Dataset

    shapes = load_dataset("shapes")
    small = Dataset("shapes", shapes.train.subset(list(range(6))), shapes.test.subset(list(range(3))), shapes.meta)
    cfg = RuDolph.config_for_data(attrs.evolve(TINY, depth=1), small)
    assert (cfg.text_tokenizer, cfg.templates, cfg.tokenizer.variant) == ("bytes", (), "vqvae-shapes")
    assert cfg.left_len >= 91 and cfg.right_len >= 91  # the longest scene caption (89 bytes), task token, eos
    digits_cfg = RuDolph.config_for_data(TINY, load_dataset("digits"))
    assert digits_cfg.text_tokenizer == "bpe" and digits_cfg.class_names[7] == "seven"
    torch.manual_seed(0)
    m = RuDolph(attrs.evolve(cfg, left_len=24, right_len=24)).train()  # shorter contexts: captions get cut
    loss, _ = m.loss(small.train.batch(list(range(6))))
    assert torch.isfinite(loss)
    metrics = m.eval().evaluate(small)
    assert set(metrics) == {"caption_nll", "samples"} and metrics["samples"] == 3
    assert 0 < metrics["caption_nll"] < 20
