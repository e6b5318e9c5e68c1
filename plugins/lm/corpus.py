"""The text the default language model learns from: the embedded sentences and the digits' captions.

* :func:`tokenizer_texts` — every sentence of the embedded ``text`` corpus plus every digits
  caption (training and held-out templates, word and numeral forms). The BPE learns its merges
  from these, so each digit word after a space (``" seven"``) is one token.
* :func:`caption_texts` — the digits' training-template captions (``"a handwritten 7"``,
  ``"a photo of the number seven"`` …), what FROMAGe and Flamingo generate; a share of every
  training batch is drawn from them.
* :func:`valid_texts` — every sentence the generators can produce (all wordings of both
  corpora), used to score samples.
"""

from __future__ import annotations

import functools

from polymodal.data import digits as digits_data
from polymodal.data import text as text_data
from polymodal.data.tokenizers import BPETokenizer


def caption_texts() -> list[str]:
    """Every digits training-template caption (10 digits × the training templates)."""
    return [digits_data.caption(t, d) for t in digits_data.TRAIN_TEMPLATES for d in range(10)]


def tokenizer_texts() -> list[str]:
    """What the default BPE learns from: all embedded sentences and all digits captions."""
    held = [digits_data.caption(t, d) for t in digits_data.HELDOUT_TEMPLATES for d in range(10)]
    return [s for s, _ in text_data.corpus()] + caption_texts() + held


@functools.lru_cache(maxsize=1)
def valid_texts() -> frozenset[str]:
    """Every sentence or caption the embedded generators can produce."""
    return frozenset(tokenizer_texts())


@functools.lru_cache(maxsize=4)
def text_tokenizer(vocab_size: int) -> BPETokenizer:
    """The byte-level BPE of at most ``vocab_size`` ids learnt from :func:`tokenizer_texts`
    (bos ``<|startoftext|>`` = 0, eos ``<|endoftext|>`` = 1, pad ``<|pad|>`` = 2)."""
    return BPETokenizer.train(tokenizer_texts(), vocab_size=vocab_size)


__all__ = ["caption_texts", "text_tokenizer", "tokenizer_texts", "valid_texts"]
