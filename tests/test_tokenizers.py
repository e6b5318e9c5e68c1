"""Byte and BPE tokenizers: round trips, truncation, errors, save/load, library files."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer
from polymodal.models.interfaces import Tokenizer

CORPUS = [
    "a small red circle next to a blue square",
    "the handwritten digit seven, written quickly",
    "a photo of the number three on a white background",
    "two green triangles above a yellow circle",
    "the quick brown fox jumps over the lazy dog",
] * 40


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


def test_protocol_and_specials(bpe):
    for tok in (ByteTokenizer(), bpe, BPETokenizer()):
        assert isinstance(tok, Tokenizer)
        assert set(tok.special_tokens) >= {"bos", "eos", "pad"}
        assert len(set(tok.special_tokens.values())) == 3
        assert all(0 <= i < tok.vocab_size for i in tok.special_tokens.values())
    assert ByteTokenizer().vocab_size == 259


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.special_tokens["bos"] and ids[-1] == tok.special_tokens["eos"]
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_special_strings_in_text_are_plain_text(bpe):
    text = "before <|endoftext|> after"
    ids = bpe.encode(text, add_bos=False, add_eos=False)
    assert bpe.special_tokens["eos"] not in ids
    assert bpe.decode(ids) == text


def test_bpe_compresses_and_round_trips(bpe):
    text = "a small red circle next to a yellow square"
    body = bpe.encode(text, add_bos=False, add_eos=False)
    assert len(body) < len(text.encode("utf-8")) / 2
    assert bpe.decode(body) == text


ZH = ["一个红色的正方形在中间", "一个蓝色的圆形在左上方", "在中间可以看到一个绿色的三角形"] * 40


def test_cjk_ideographs_are_words_of_their_own(bpe):
    isolated = BPETokenizer.train(ZH + CORPUS, vocab_size=400)
    joined = BPETokenizer.train(ZH + CORPUS, vocab_size=400, isolate_cjk=False)
    text = "中间有一个红色的圆形"  # a new order of known ideographs (有 was never seen)
    ids = isolated.encode(text, add_bos=False, add_eos=False)
    assert isolated.decode(ids) == text
    pieces = [isolated.decode([i]) for i in ids]  # 有's three bytes decode apart as replacement characters
    assert len(ids) == len(text) + 2 and all(len(p) == 1 for p in pieces), pieces  # one token per known ideograph
    # without the split an unspaced sentence is one word and the merges swallow whole phrases
    assert len(joined.encode(ZH[0], add_bos=False, add_eos=False)) < len(ZH[0])
    plain = BPETokenizer.train(CORPUS, vocab_size=400, isolate_cjk=False)
    for english in CORPUS[:5]:  # a corpus without CJK trains the same tokenizer either way
        assert bpe.encode(english) == plain.encode(english)


def test_untrained_bpe_is_byte_level():
    tok = BPETokenizer()
    assert tok.vocab_size == 256 + 3
    assert len(tok.encode("héllo", add_bos=False, add_eos=False)) == len("héllo".encode())


@pytest.mark.parametrize("make", [ByteTokenizer, lambda: BPETokenizer.train(CORPUS, 400)])
def test_truncation_keeps_eot_and_overlong_raises(make):
    tok = make()
    text = "the quick brown fox jumps over the lazy dog " * 5
    ids = tok.encode(text, max_length=10, truncate=True)
    assert len(ids) == 10
    assert ids[0] == tok.special_tokens["bos"] and ids[-1] == tok.special_tokens["eos"]
    with pytest.raises(ValueError, match=r"\b10\b") as err:
        tok.encode(text, max_length=10)
    assert str(len(tok.encode(text))) in str(err.value)
    batch, mask = tok.encode_batch([text, "a dog"], context_length=10, truncate=True)
    assert batch.shape == (2, 10) and (batch[0, -1] == tok.special_tokens["eos"]).item()
    with pytest.raises(ValueError, match="limit of 10"):
        tok.encode_batch([text], context_length=10)


def test_byte_truncation_keeps_whole_characters():
    tok = ByteTokenizer()
    ids = tok.encode("aé" * 10, max_length=5, truncate=True)  # bos a é(2 bytes) eos would be 5
    assert tok.decode(ids) == "aé"
    ids = tok.encode("aé" * 10, max_length=4, truncate=True)  # room 2: "a" + half of é → just "a"
    assert tok.decode(ids) == "a" and ids[-1] == tok.special_tokens["eos"]


def test_encode_batch_padding_and_mask():
    tok = ByteTokenizer()
    ids, mask = tok.encode_batch(["ab", "abcd"], context_length=8)
    assert ids.dtype == torch.long and ids.shape == (2, 8) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 6]
    assert (ids[~mask] == tok.special_tokens["pad"]).all()
    ids, mask = tok.encode_batch(["ab", "abcd"])  # longest
    assert ids.shape == (2, 6)
    assert tok.decode_batch(ids) == ["ab", "abcd"]


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ByteTokenizer().decode([300])


def test_bad_max_length():
    with pytest.raises(ValueError, match="no room"):
        ByteTokenizer().encode("abc", max_length=1, truncate=True)


@pytest.mark.parametrize("make", [ByteTokenizer, lambda: BPETokenizer.train(CORPUS, 400)])
def test_save_load_identical_ids(tmp_path, make):
    tok = make()
    tok.save(tmp_path)
    for loaded in (type(tok).load(tmp_path), load_tokenizer(tmp_path)):
        assert type(loaded) is type(tok)
        assert loaded.special_tokens == tok.special_tokens and loaded.vocab_size == tok.vocab_size
        for text in CORPUS[:5] + ["ünïcödé ✓ 文字"]:
            assert loaded.encode(text) == tok.encode(text)


def test_bpe_loads_library_written_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS, trainer)
    raw.save(str(tmp_path / "tokenizer.json"))

    tok = BPETokenizer.from_file(tmp_path / "tokenizer.json")  # GPT-2 style: one special token
    eot = raw.token_to_id("<|endoftext|>")
    assert tok.special_tokens == {"bos": eot, "eos": eot, "pad": eot}
    text = "the lazy dog jumps"
    assert tok.encode(text, add_bos=False, add_eos=False) == raw.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    assert isinstance(load_tokenizer(tmp_path), BPETokenizer)


def test_bpe_train_validates_vocab_size():
    with pytest.raises(ValueError, match="at least 259"):
        BPETokenizer.train(CORPUS, vocab_size=100)


def test_missing_special_raises(tmp_path):
    with pytest.raises(ValueError, match="not in the tokenizer"):
        BPETokenizer(BPETokenizer().tokenizer, {"eos": "<nope>"})
