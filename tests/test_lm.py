"""Language model: the interface Flamingo and FROMAGe build on, the KV cache, input checks, sampling,
and parity with transformers' GPT-2 through ``polymodal convert --from hf-gpt2``.

Every transformers model here is built from a small config with random weights (nothing is
downloaded), saved with ``save_pretrained`` (safetensors), converted and loaded back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polymodal
from polymodal.cli import main
from polymodal.generation.sampling import generate
from polymodal.io import LoadError
from polymodal.nn import KVCache
from polymodal.plugins.lm import LMConfig, LMModel
from polymodal.plugins.lm.convert import convert_hf_gpt2
from polymodal.registry import get_registry
from polymodal.testing import contracts

ATOL = 1e-5


def small(**overrides) -> LMModel:
    """A seeded small model in eval mode, with visibly non-zero weights everywhere."""
    torch.manual_seed(0)
    cfg = LMConfig(dim=32, depth=2, heads=4, max_len=40, eval_samples=0, **overrides)
    model = LMModel(cfg)
    contracts._perturb(model, 1)
    return model.eval()


@pytest.fixture(scope="module")
def lm() -> LMModel:
    return small()


# -- the interface ------------------------------------------------------------------------------


def test_registered_with_text_data_and_contracts_pass():
    spec = get_registry().get("model", "lm")
    assert spec.data == "text" and spec.model_class is LMModel
    contracts.check_all_model_contracts("lm")


def test_interface_attributes(lm):
    assert (lm.vocab_size, lm.dim, lm.max_len, len(lm.stack.blocks)) == (512, 32, 40, 2)
    assert lm.tokenizer.vocab_size <= lm.vocab_size
    assert lm.token_embed.weight.shape == (lm.vocab_size, lm.dim)
    assert set(lm.tokenizer.special_tokens) >= {"bos", "eos", "pad"}


def test_digit_words_are_single_tokens(lm):
    tok = lm.tokenizer
    for word in polymodal.data.DIGIT_WORDS:
        assert len(tok.encode(" " + word, add_bos=False, add_eos=False)) == 1, word
    ids = tok.encode("This is a seven.", add_bos=False, add_eos=False)
    assert tok.decode(ids) == "This is a seven."


def test_forward_is_embeddings_run_logits(lm):
    ids = lm.example_inputs(3, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        direct = lm(ids)
        parts = lm.logits(lm.run(lm.token_embeddings(ids)))
    assert direct.shape == (3, ids.shape[1], lm.vocab_size)
    torch.testing.assert_close(parts, direct, atol=0, rtol=0)


def test_head_is_tied_to_the_embedding(lm):
    h = torch.randn(2, 5, lm.dim)
    torch.testing.assert_close(lm.logits(h), h @ lm.token_embed.weight.T)
    assert not any("head" in k for k in lm.state_dict())


def test_run_return_hidden_and_positions_shift_with_the_cache(lm):
    ids = torch.tensor([lm.prompt_ids("There are three cats in the box.")])
    x = lm.token_embeddings(ids)
    with torch.no_grad():
        out, hidden = lm.run(x, return_hidden=True)
        assert len(hidden) == len(lm.stack.blocks) + 1
        torch.testing.assert_close(hidden[-1], out)
        cache = KVCache()
        first = lm.run(x[:, :4], cache=cache)
        rest = lm.run(x[:, 4:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), out, atol=ATOL, rtol=0)
    with torch.no_grad():
        alone = lm.run(x[:, 4:])  # without the cache the same embeddings sit at positions 0…
    assert (alone - rest).abs().max() > 1e-3


def test_injected_module_runs_with_inject_kwargs():
    model = small()
    seen = []
    direction = torch.randn(
        model.dim, generator=torch.Generator().manual_seed(0)
    )  # a constant shift would vanish in LN

    class Shift(nn.Module):
        def forward(self, x, *, media=None, scale=1.0):
            seen.append(media)
            return x + scale * direction

    ids = model.example_inputs(2)[0]
    with torch.no_grad():
        before = model(ids)
        model.stack.inject(1, Shift())
        after = model.logits(model.run(model.token_embeddings(ids), inject_kwargs={"media": "m", "scale": 0.5}))
        neutral = model.logits(model.run(model.token_embeddings(ids), inject_kwargs={"scale": 0.0}))
    assert seen == ["m", None] and (after - before).abs().max() > 1e-3
    torch.testing.assert_close(neutral, before, atol=ATOL, rtol=0)


def test_key_padding_hides_padded_keys(lm):
    ids = torch.tensor([lm.prompt_ids("a handwritten 7")])  # (1, n)
    n = ids.shape[1]
    keep = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)], 1)  # left padding
    outs, leaks = [], []
    for filler in ([2, 2, 2], [5, 60, 300]):  # whatever sits at masked positions must not matter
        padded = torch.cat([torch.tensor([filler]), ids], 1)  # (1, 3 + n)
        with torch.no_grad():
            outs.append(lm.run(lm.token_embeddings(padded), key_padding=keep)[:, 3:])
            leaks.append(lm.run(lm.token_embeddings(padded))[:, 3:])
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    assert (leaks[0] - leaks[1]).abs().max() > 1e-3
    cache = KVCache()  # with a cache, key_padding covers the cached keys too
    with torch.no_grad():
        lm.run(lm.token_embeddings(padded[:, :5]), cache=cache, key_padding=keep[:, :5])
        step = lm.run(lm.token_embeddings(padded[:, 5:]), cache=cache, key_padding=keep)
    torch.testing.assert_close(step, outs[1][:, 2:], atol=ATOL, rtol=0)


# -- KV cache --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(length=st.integers(2, 30), split=st.integers(1, 29), batch=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_cache_matches_the_full_forward(lm, length, split, batch, seed):
    split = min(split, length - 1)
    ids = torch.randint(0, lm.tokenizer.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = lm(ids)
        cache = KVCache()
        parts = [lm(ids[:, :split], cache=cache)] + [lm(ids[:, i : i + 1], cache=cache) for i in range(split, length)]
    assert cache.length == length
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), temperature=st.sampled_from([0.7, 1.0, 1.5]), top_k=st.sampled_from([None, 5]))
def test_sampling_with_and_without_cache_is_identical(lm, seed, temperature, top_k):
    prompt = torch.tensor([lm.prompt_ids("This is a")] * 2)
    kw = dict(seed=seed, temperature=temperature, top_k=top_k)
    a = lm.generate_ids(prompt, 12, use_cache=True, **kw)
    b = lm.generate_ids(prompt, 12, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_step_fn_drives_the_core_generate(lm):
    prompt = torch.tensor([lm.prompt_ids("I counted")])
    ids = generate(lm.step_fn(), prompt, 6, greedy=True)
    with torch.no_grad():
        for t in range(prompt.shape[1], ids.shape[1]):
            assert ids[0, t] == lm(ids[:, :t])[0, -1].argmax()


def test_generation_stops_at_max_len_and_never_draws_pad_or_bos(lm):
    prompt = torch.tensor([lm.prompt_ids("a")] * 4)
    ids = lm.generate_ids(prompt, 500, seed=3, temperature=2.0, stop_at_eos=False)
    assert ids.shape == (4, lm.max_len)
    new = ids[:, prompt.shape[1] :]
    specials = lm.tokenizer.special_tokens
    assert not ((new == specials["pad"]) | (new == specials["bos"])).any()
    assert new.max() < lm.tokenizer.vocab_size


def test_generate_text_and_sample_to_folder(lm, tmp_path):
    text = lm.generate_text("This is a", 5, greedy=True)
    assert isinstance(text, str)
    assert lm.generate_text("This is a", 5, greedy=True, include_prompt=True) == "This is a" + text
    paths = lm.sample_to_folder(tmp_path / "s", n=3, prompt="The number is", seed=1, temperature=0.8, top_k=20)
    assert [p.name for p in paths] == ["samples.txt"]
    lines = paths[0].read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("The number is") for line in lines)
    again = lm.sample_to_folder(
        tmp_path / "t", n=3, prompt="The number is", seed=1, temperature=0.8, top_k=20, use_cache=False
    )
    assert again[0].read_text() == paths[0].read_text()


def test_cli_sample_writes_text(lm, tmp_path):
    lm.save(tmp_path / "m")
    result = CliRunner().invoke(
        main, ["sample", str(tmp_path / "m"), "-n", "2", "--prompt", "a", "--seed", "0", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "out" / "samples.txt").read_text().splitlines()) == 2
    bad = CliRunner().invoke(main, ["sample", str(tmp_path / "m"), "--cfg", "2", "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "cfg_scale" in bad.output


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, needle",
    [
        (torch.zeros(2, 3), "integer token ids (B, T)"),
        (torch.zeros(3, dtype=torch.long), "integer token ids (B, T)"),
        (torch.full((1, 3), 512), "[0, 512)"),
        (torch.full((1, 3), -1), "[0, 512)"),
        (torch.zeros(1, 41, dtype=torch.long), "max_len=40"),
    ],
)
def test_bad_ids_raise_naming_expected_and_given(lm, bad, needle):
    with pytest.raises(ValueError, match=None) as exc:
        lm(bad)
    assert needle in str(exc.value)


def test_bad_embeddings_and_cache_overflow(lm):
    with pytest.raises(ValueError, match=r"\(B, T, 32\); got \(2, 3, 16\)"):
        lm.run(torch.zeros(2, 3, 16))
    cache = KVCache()
    lm(torch.zeros(1, 39, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="39 cached \\+ 2 new"):
        lm(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_bad_sampling_options(lm, tmp_path):
    with pytest.raises(ValueError, match="rerank"):
        lm.sample_to_folder(tmp_path, n=1, rerank="x")
    with pytest.raises(ValueError, match="n must be"):
        lm.sample_texts(0)
    with pytest.raises(ValueError, match="more than max_len"):
        lm.generate_ids(torch.zeros(1, 41, dtype=torch.long), 1)


def test_tokenizer_larger_than_the_embedding_is_refused():
    with pytest.raises(ValueError, match="259 ids but the model embeds only vocab_size=100"):
        LMModel(LMConfig(vocab_size=100, tokenizer="bytes", dim=16, depth=1, heads=2))


def test_loss_ignores_padding_and_packs_sentences():
    model = small()
    ids, targets = model.encode_texts([["a seven"], ["the digit two", "This is a one."]])
    assert ids.shape == targets.shape
    eos, pad = model.tokenizer.special_tokens["eos"], model.tokenizer.special_tokens["pad"]
    words = model.tokenizer.encode("a seven", add_bos=False, add_eos=False)
    assert ids[0, : len(words) + 1].tolist() == [model.tokenizer.special_tokens["bos"]] + words
    assert targets[0, : len(words) + 1].tolist() == words + [eos]  # shifted by one, eos predicted
    assert ids[0, len(words) + 1] == eos and (ids[0, len(words) + 2 :] == pad).all()
    assert (targets[0, len(words) + 1 :] == -100).all()  # nothing is learnt from padding
    assert (targets[1] == eos).sum() == 2 and (targets[1] != -100).all()
    model.train()
    loss, metrics = model.loss({"text": ["a seven", "the digit two", "This is a one."]})
    assert loss.requires_grad and metrics["bits_per_token"] > 0
    with pytest.raises(ValueError, match="'text' or 'caption'"):
        model.loss({"image": torch.zeros(1)})


def test_byte_tokenizer_variant_round_trips(tmp_path):
    model = small(vocab_size=300, tokenizer="bytes")
    model.save(tmp_path / "m")
    loaded = polymodal.load(tmp_path / "m")
    assert type(loaded.tokenizer).__name__ == "ByteTokenizer"
    ids = model.example_inputs(2)[0]
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


# -- parity with transformers GPT-2 ------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

HF_SMALL = dict(
    vocab_size=300, n_positions=48, n_embd=48, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


def gpt2_folder(root: Path, seed: int = 1, tokenizer: str = "", **extra) -> tuple:
    """A random GPT2LMHeadModel saved to ``root/hf`` (with a tokenizer in the form asked for)."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**HF_SMALL, **extra})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # visible values everywhere (norms and biases too)
        for name, p in hf.named_parameters():
            base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(root / "hf")
    if tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=HF_SMALL["vocab_size"],
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([s for s, _ in polymodal.data.text.corpus()], trainer)
        if tokenizer == "json":
            tok.save(str(root / "hf" / "tokenizer.json"))
        else:
            tok.model.save(str(root / "hf"))  # vocab.json + merges.txt
    return hf, root / "hf"


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    hf, src = gpt2_folder(root, tokenizer="files")
    result = CliRunner().invoke(main, ["convert", "--from", "hf-gpt2", str(src), str(root / "pm")])
    assert result.exit_code == 0, result.output
    return hf, polymodal.load(root / "pm"), src


def test_logits_match_transformers(parity):
    hf, pm, _ = parity
    ids = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got = pm(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_cached_logits_match_transformers(parity):
    hf, pm, _ = parity
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        cache = KVCache()
        got = torch.cat([pm(ids[:, :7], cache=cache), pm(ids[:, 7:], cache=cache)], 1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(parity):
    hf, pm, _ = parity
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(2))
    want = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=15,
        min_new_tokens=15,
        pad_token_id=0,
        eos_token_id=None,
    )
    got = pm.generate_ids(prompt, 15, greedy=True, stop_at_eos=False)
    assert torch.equal(got, want)


def test_tokenizer_matches_transformers(parity):
    _, pm, src = parity
    theirs = transformers.GPT2Tokenizer.from_pretrained(src)  # reads vocab.json + merges.txt
    for text in ("I counted seven apples on the table.", "a handwritten 7", "héllo  wörld\n"):
        assert pm.tokenizer.encode(text, add_bos=False, add_eos=False) == theirs(text)["input_ids"]
        assert pm.tokenizer.decode(theirs(text)["input_ids"]) == text
    eot = theirs.convert_tokens_to_ids("<|endoftext|>")
    assert pm.tokenizer.special_tokens == {"bos": eot, "eos": eot, "pad": eot}


def test_converted_config_mirrors_the_source(parity):
    _, pm, _ = parity
    c = pm.config
    assert (c.vocab_size, c.max_len, c.dim, c.depth, c.heads, c.act, c.norm_eps, c.tokenizer) == (
        300,
        48,
        48,
        3,
        4,
        "gelu_tanh",
        1e-5,
        "file",
    )


def test_tokenizer_json_and_no_tokenizer(tmp_path):
    _, src = gpt2_folder(tmp_path / "a", seed=2, tokenizer="json")
    model = convert_hf_gpt2(src)
    assert model.tokenizer.decode(model.tokenizer.encode("There are two cats.", add_bos=False)) == "There are two cats."
    _, bare = gpt2_folder(tmp_path / "b", seed=3)
    model = convert_hf_gpt2(bare, tmp_path / "out")
    assert model.tokenizer is None and polymodal.load(tmp_path / "out").tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate_text("a")


@pytest.mark.parametrize(
    "field, value",
    [
        ("scale_attn_weights", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("add_cross_attention", True),
        ("tie_word_embeddings", False),
        ("activation_function", "silu"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, field, value):
    _, src = gpt2_folder(tmp_path, seed=4)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(main, ["convert", "--from", "hf-gpt2", str(src), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert (field if field != "activation_function" else "'silu'") in result.output
    assert not (tmp_path / "out").exists()


def test_non_gpt2_folder_and_missing_weight_are_named(tmp_path):
    _, src = gpt2_folder(tmp_path, seed=5)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(LoadError, match="model_type 'gpt2'"):
        convert_hf_gpt2(src)
    (src / "config.json").write_text(json.dumps({**cfg, "n_layer": 4}))
    with pytest.raises(LoadError, match="h.3"):
        convert_hf_gpt2(src)
