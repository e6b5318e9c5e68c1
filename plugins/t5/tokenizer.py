"""The t5 family's tokenizer: byte-level BPE learnt from a dataset's training captions, plus T5's sentinels.

Byte-level, so any UTF-8 text encodes (a script never seen in training falls back to its bytes). Special tokens:
``<pad>`` (0, also the decoder's start token, as T5), ``</s>`` (1, end of text), then the sentinels
``<extra_id_0>`` … ``<extra_id_{n-1}>`` that stand for the corrupted spans. No begin-of-text token (as T5): a
caption encodes as ``text </s>``. The merges are learnt from the training split only, so an evaluation-only
template's wording is never seen by the tokenizer either.
"""

from __future__ import annotations

import functools

from polymodal.data.tokenizers import BPETokenizer

PAD, EOS = "<pad>", "</s>"


def sentinel(i: int) -> str:
    """The ``i``-th sentinel token string (``<extra_id_0>`` …, as T5 spells them)."""
    return f"<extra_id_{i}>"


def specials(sentinels: int) -> dict[str, str]:
    """Role → token string: pad, eos (bos = eos, never added) and ``extra_id_i`` for each sentinel."""
    out = {"pad": PAD, "eos": EOS, "bos": EOS}
    out.update({f"extra_id_{i}": sentinel(i) for i in range(sentinels)})
    return out


def training_captions(data: str) -> list[str]:
    """The training-split captions of dataset ``data`` (what the BPE and the pre-training read)."""
    from polymodal.data import load_dataset

    train = load_dataset(data).split("train")
    if "caption" not in train.fields:
        raise ValueError(f"the t5 family learns from captions; dataset {data!r} has fields {sorted(train.fields)}")
    return list(train["caption"])


@functools.lru_cache(maxsize=4)
def caption_tokenizer(data: str, vocab_size: int, sentinels: int) -> BPETokenizer:
    """The byte-level BPE of ``vocab_size`` ids (specials and sentinels included) learnt from ``data``'s training
    captions, adding eos and no bos."""
    return BPETokenizer.train(
        training_captions(data), vocab_size=vocab_size, specials=specials(sentinels), add_bos=False, add_eos=True
    )


__all__ = ["EOS", "PAD", "caption_tokenizer", "sentinel", "specials", "training_captions"]
