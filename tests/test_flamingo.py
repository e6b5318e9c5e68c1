"""Flamingo: resampler, media masking, interleaved parsing, frozen parts, the init property, errors, KV cache."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polymodal.plugins.flamingo import interleave as il
from polymodal.plugins.flamingo.resampler import PerceiverResampler
from polymodal.testing.contracts import build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny Flamingo with fresh parts, exactly at initialisation (gates 0)."""
    return build("flamingo", perturb=False).eval()


def frozen_reference(model) -> nn.Module:
    """A copy of the frozen LM: Flamingo leaves it as it was (its cross-attention blocks are its own)."""
    return copy.deepcopy(model.lm).eval()


def open_gates(model, attn: float = 1.0, mlp: float = 0.0):
    """A copy of ``model`` whose cross-attention gates are open (so images change the output)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for block in m.xattn_blocks():
            block.attn_gate.fill_(attn)
            block.mlp_gate.fill_(mlp)
    return m.eval()


def images_for(model, n: int, seed: int = 0) -> torch.Tensor:
    v = model.vision.config.vision
    return torch.rand(n, v.channels, v.image_size, v.image_size, generator=torch.Generator().manual_seed(seed))


def text_ids(model, text: str) -> torch.Tensor:
    return torch.tensor([model.encode_text(text)])


# -- resampler ----------------------------------------------------------------------------------


def test_resampler_fixed_number_of_tokens_for_any_input_length():
    r = PerceiverResampler(16, num_latents=3, depth=2, heads=2).eval()
    for n in (1, 5, 17):
        assert r(torch.randn(2, n, 16)).shape == (2, 3, 16)


def test_resampler_latents_read_the_media():
    r = PerceiverResampler(16, num_latents=3, depth=1, heads=2).eval()
    media = torch.randn(1, 5, 16)
    out = r(media)
    assert not torch.allclose(out, r(media + torch.randn_like(media)))
    with pytest.raises(ValueError, match=r"D=16.*\(1, 5, 8\)"):
        r(torch.randn(1, 5, 8))


# -- interleaved parsing and masks --------------------------------------------------------------


def test_encode_interleaved_text(model):
    ids = model.encode_text("<image>This is a seven.<|endofchunk|><image>This is a")
    tok = model.tokenizer
    assert ids[0] == tok.special_tokens["bos"] and ids[1] == model.image_id
    assert ids.count(model.image_id) == 2 and ids.count(model.eoc_id) == 1
    text = [i for i in ids[1:] if i < model.lm.vocab_size]
    assert tok.decode(text) == "This is a seven.This is a"


def test_media_index_latest_image_before_each_token():
    ids = torch.tensor([[0, 5, 9, 9, 7, 9, 9]])  # image id 9
    index = il.media_index(ids, 9)
    assert index.tolist() == [[-1, -1, 0, 1, 1, 2, 3]]
    mask = il.media_mask(index, num_images=4, tokens_per_image=2)  # (1, 7, 8)
    assert not mask[0, :2].any()
    assert mask[0, 4].tolist() == [False, False, True, True, False, False, False, False]
    assert (il.media_index(ids, 9, offset=torch.tensor([2])) == index + 2).all()


def test_training_sequences_use_every_image_once():
    seqs = il.training_sequences(list(range(10)) * 3, il.CAPTION_TEMPLATES, 2, 4, 0.0, random.Random(0))
    used = sorted(i for idx, _ in seqs for i in idx)
    assert used == list(range(30))
    for idx, captions in seqs:
        text = il.chunk_text(captions)
        assert text.count(il.IMAGE) == len(idx) == text.count(il.END_OF_CHUNK)
        assert len(idx) <= 4


# -- the init property and frozen parts ---------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_init_logits_equal_the_frozen_lm(model, data):
    """At initialisation the logits equal the frozen LM's on the same input embeddings, on any interleaving."""
    v = model.lm.vocab_size
    n = data.draw(st.integers(1, 20))
    tokens = data.draw(
        st.lists(
            st.one_of(st.integers(3, v - 1), st.sampled_from([model.image_id, model.eoc_id])), min_size=n, max_size=n
        )
    )
    ids = torch.tensor([[0] + tokens])
    images = [images_for(model, int((ids == model.image_id).sum()), seed=n)]
    ref = frozen_reference(model)
    with torch.no_grad():
        got = model(ids, images)
        want = ref.logits(ref.run(model.embed(ids)))
    assert got.shape == (1, n + 1, v + 2)
    assert torch.equal(got[..., :v], want)


def test_the_frozen_lm_is_not_changed(model):
    """The cross-attention blocks are Flamingo's own: none sits inside the LM, whose modules, weights
    and outputs are those of the LM alone (it could be saved or shared as it is)."""
    from polymodal.nn.fusion import CrossAttentionFusion

    assert model.xattn_blocks() and not len(model.lm.stack.injected)
    assert not any(isinstance(m, CrossAttentionFusion) for m in model.lm.modules())
    assert not any(k.startswith("lm.") and "injected" in k for k in model.state_dict())
    m = open_gates(model, attn=1.0, mlp=1.0)
    text = torch.tensor([m.tokenizer.encode("a three")])
    with torch.no_grad():
        m(*m.example_inputs(2, torch.Generator().manual_seed(0)))  # an open-gated pass through the LM ...
        torch.testing.assert_close(m.lm(text), frozen_reference(model)(text), rtol=0, atol=0)  # ... leaves it the LM


def test_text_only_logits_equal_the_frozen_lm(model):
    ids = text_ids(model, "I counted seven apples on the table.")
    with torch.no_grad():
        assert torch.equal(model(ids, [images_for(model, 0)])[..., : model.lm.vocab_size], frozen_reference(model)(ids))


def test_only_resampler_blocks_and_special_rows_train():
    from polymodal.data import load_dataset
    from polymodal.train import TrainConfig, train

    m = build("flamingo", perturb=False)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("resampler.", "xattn.", "special.")) for n in trainable)
    assert any(n.startswith("xattn.") for n in trainable) and "special.weight" in trainable
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(
        m,
        load_dataset("digits"),
        TrainConfig(steps=2, batch_size=16, lr=1e-2, warmup_steps=0, checkpoint_every=0),
        progress=False,
    )
    after = m.state_dict()
    frozen = [k for k in before if k not in trainable]
    assert any(k.startswith("lm.token_embed") for k in frozen) and any(k.startswith("vision.") for k in frozen)
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"
    assert any(not torch.equal(before[k], after[k]) for k in trainable)
    assert not m.lm.training and not m.vision.training  # kept in eval mode while training


# -- media masking in the cross-attention -------------------------------------------------------


def first_block_outputs(model, ids, images):
    """Input and output of the first injected cross-attention block."""
    seen = {}
    block = model.xattn_blocks()[0]
    hook = block.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].clone(), y=out.clone()))
    try:
        with torch.no_grad():
            model(ids, images)
    finally:
        hook.remove()
    return seen["x"], seen["y"]


def test_tokens_before_any_image_get_exactly_zero_cross_attention(model):
    m = open_gates(model)
    ids = text_ids(m, "This is<image>This is a seven.")
    x, y = first_block_outputs(m, ids, [images_for(m, 1)])
    first = int((ids[0] == m.image_id).nonzero()[0])
    assert torch.isfinite(y).all()
    assert torch.equal(y[0, :first], x[0, :first])  # exactly unchanged: zero output, not NaN
    assert not torch.allclose(y[0, first:], x[0, first:])


def test_each_token_sees_only_the_latest_image(model):
    m = open_gates(model)
    ids = text_ids(m, "<image>This is a one.<|endofchunk|><image>This is a")
    second = int((ids[0] == m.image_id).nonzero()[1])
    a, b = images_for(m, 2, seed=1), images_for(m, 2, seed=2)
    _, ya = first_block_outputs(m, ids, [a])
    _, yb = first_block_outputs(m, ids, [torch.stack([b[0], a[1]])])  # only the first image differs
    assert not torch.allclose(ya[0, 1:second], yb[0, 1:second])
    assert torch.equal(ya[0, second:], yb[0, second:])


# -- bad input ----------------------------------------------------------------------------------


def test_more_image_tokens_than_images(model):
    ids = text_ids(model, "<image>a one<|endofchunk|><image>a two")
    with pytest.raises(ValueError, match=r"2 <image> tokens but 1 images"):
        model(ids, [images_for(model, 1)])


def test_images_without_an_image_token(model):
    ids = text_ids(model, "<image>a one")
    with pytest.raises(ValueError, match=r"3 images were given but only 1 <image>"):
        model(ids, [images_for(model, 3)])


@pytest.mark.parametrize("part", ["lm", "vision"])
def test_frozen_component_of_mismatched_width(part):
    with pytest.raises(ValueError, match=rf"{part}_dim=40.*width 16"):
        build("flamingo", perturb=False, **{f"{part}_dim": 40})


def test_token_ids_out_of_range(model):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, "):
        model(torch.tensor([[0, model.eoc_id + 1]]), [images_for(model, 0)])


# -- generation ---------------------------------------------------------------------------------


def test_kv_cache_steps_match_the_full_pass(model):
    """Feeding an interleaved prompt piece by piece through the cache gives the full pass's logits."""
    from polymodal.nn import KVCache

    m = open_gates(model, attn=0.7, mlp=0.5)
    ids = text_ids(m, "<image>This is a one.<|endofchunk|><image>This is a")
    context, _ = m.media([images_for(m, 2)], 1)
    with torch.no_grad():
        full = m.logits(m.hidden(ids, context))
        step, cache, parts = m.step_fn(context), KVCache(), []
        for lo, hi in ((0, 3), (3, 9), (9, ids.shape[1])):
            parts.append(step(ids[:, lo:hi], cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_generation_with_and_without_cache_agree(model):
    m = open_gates(model, attn=0.7, mlp=0.5)
    images = images_for(m, 2)
    text = "<image>This is a one.<|endofchunk|><image>This is a"
    assert m.continue_text(text, images, use_cache=True) == m.continue_text(text, images, use_cache=False)


def test_sample_to_folder_writes_a_readable_transcript(model, tmp_path):
    paths = model.sample_to_folder(tmp_path, n=2, seed=0)
    transcript = (tmp_path / "transcript.txt").read_text()
    assert tmp_path / "transcript.txt" in paths and (tmp_path / "sample_000.png").is_file()
    assert transcript.count("[image: sample_00") == 2 and transcript.count("This is a ⟶") == 2
    assert "[image: examples/sample_000_example_0.png] This is a" in transcript
    with pytest.raises(ValueError, match="cfg_scale"):
        model.sample_to_folder(tmp_path, n=1, cfg_scale=2.0)


def test_caption_command_and_eval(model, tmp_path):
    from click.testing import CliRunner

    from polymodal.cli import main
    from polymodal.eval.images import save_png

    folder = tmp_path / "flamingo"
    model.save(folder)
    assert (folder / "lm" / "config.json").is_file() and (folder / "vision" / "config.json").is_file()
    image = save_png(images_for(model, 1)[0], tmp_path / "digit.png")
    result = CliRunner().invoke(
        main, ["flamingo", "caption", str(folder), str(image), "--shots", "2", "--out", str(tmp_path / "t.txt")]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("[image:") == 3 and "digit.png] This is a" in result.output
    assert (tmp_path / "t.txt").read_text().strip() == result.output.strip()
    (tmp_path / "mine.txt").write_text("the user's")  # an existing file is refused before any work
    args = ["flamingo", "caption", str(folder), str(image), "--shots", "0"]
    for taken in ("mine.txt", "t.txt"):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / taken)])
        assert result.exit_code != 0 and "already exists" in result.output and "[image:" not in result.output
    assert (tmp_path / "mine.txt").read_text() == "the user's"
    result = CliRunner().invoke(main, ["flamingo", "caption", str(folder), str(image), "--shots", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"[image: {image}] This is a ⟶") and result.output.count("[image:") == 1
    result = CliRunner().invoke(main, ["eval", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    import json

    metrics = json.loads(result.output)
    assert set(metrics["accuracy_by_shots"]) == {"0", "2", "4"} and metrics["samples"] == 20


def test_sentence_formats_and_captions():
    formats = il.sentence_formats()
    assert "There are {word} cats in the box." in formats
    assert il.fill_caption("There are {word} boxes in the box.", 1) == "There are one box in the box."
    assert il.fill_caption("a handwritten {numeral}", 7) == "a handwritten 7"
    seqs = il.training_sequences([3] * 12, ("a {word}",), 3, 3, 0.0, random.Random(0), sentence_rate=1.0)
    assert all(c != "a three" and "three" in c for _, caps in seqs for c in caps)


def test_special_rows_start_as_the_lm_sentence_boundaries(model):
    tok = model.tokenizer.special_tokens
    rows = model.lm.token_embeddings(torch.tensor([[tok["bos"], tok["eos"]]]))[0]
    assert torch.equal(model.special.weight, rows)
    assert model.special.weight.requires_grad
    assert not any(p.requires_grad for p in model.lm.parameters())


def test_open_ended_and_ranked_scores_read_the_same_forward_pass(model):
    """Ranked scores are the log-probabilities of the candidate words; a row is 'said' exactly when the
    greedy next token over the whole vocabulary (but <image>, bos, pad) is that candidate."""
    m = open_gates(model, attn=1.0, mlp=1.0)
    candidates = m.word_candidates()
    rows = [m.encode_text(m.few_shot_text(labels)) for labels in ([], [3, 1], [7, 0, 2, 9])]
    media = [images_for(m, k + 1, seed=k) for k in (0, 2, 4)]
    assert all(len(c) == 1 for c in candidates)  # the default BPE keeps " seven" one token
    scores, spelled = m.score_candidates(rows, media, candidates)
    assert scores.shape == spelled.shape == (3, 10)
    for i, (row, images) in enumerate(zip(rows, media)):
        logp = m(torch.tensor([row]), [images]).log_softmax(-1)[0, -1]  # (V + 2,)
        assert torch.allclose(scores[i], logp[[c[0] for c in candidates]], atol=1e-5)
        tok = m.tokenizer.special_tokens
        logp[[m.image_id, tok["bos"], tok["pad"]]] = float("-inf")
        greedy = int(logp.argmax())
        assert spelled[i].tolist() == [c[0] == greedy for c in candidates]


def test_the_few_shot_format_is_one_of_several_trained_sentences():
    """'This is a {word}.' is trained, but as one of several 'This is a …' formats, so the words after
    'This is a' are not fixed by training: only a prompt's examples can say which format is asked for."""
    head = il.EVAL_TEMPLATE.split("{word}")[0]
    assert il.EVAL_TEMPLATE in il.CAPTION_TEMPLATES
    siblings = [t for t in il.CAPTION_TEMPLATES if t.startswith(head) and t != il.EVAL_TEMPLATE]
    assert len(siblings) >= 3 and any("{numeral}" in t for t in siblings), siblings
    assert all(t.endswith(".") and t[len("This is ") : -1] in il.SHORT_TEMPLATES for t in il.SENTENCE_TEMPLATES)
