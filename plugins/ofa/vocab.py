"""OFA's unified vocabulary: text BPE tokens, image codes and location bins in one id space, one embedding table.

    [0, T)              text: a byte-level BPE learnt from the training tasks' text (instructions, captions,
                        questions, answers, the ``text`` corpus); ``<s>`` starts the decoder, ``</s>`` ends a target
    [T, T + K)          image codes of the frozen VQ image tokenizer (``<code_k>``)
    [T + K, T + K + B)  location bins (``<bin_i>``): a box is four of them, its quantised corners x0 y0 x1 y1

The instructions are OFA's wording (the reference code's task prompts), with the shapes' own nouns.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from polymodal.data.tokenizers import BPETokenizer

SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}

CAPTION = " what does the image describe?"
GROUND = ' which region does the text " {text} " describe?'
REGION = " what {attribute} is the object in the region? region:"
TEXT_TO_IMAGE = " what is the complete image? caption: {caption}"
INFILL = " what is the image in the middle part?"
CLASSIFY = ' what digit does the sentence " {text} " name?'
REGION_ATTRIBUTES = {"colour": "color", "kind": "shape"}
"""Region question: the shapes field it asks about → the word OFA's instruction uses."""


def corpus(shapes_train: dict, text_train: dict) -> list[str]:
    """Every training text the model reads or writes: the instructions filled from the train splits, captions,
    questions, answers and the ``text`` corpus's sentences (the evaluation-only caption templates never)."""
    from polymodal.data import shapes

    names = [f"{c} {k}" for c in shapes.COLOURS for k in shapes.KINDS]
    texts = [CAPTION, INFILL, *(REGION.format(attribute=a) for a in REGION_ATTRIBUTES.values())]
    texts += [GROUND.format(text=n) for n in names]
    texts += list(shapes_train["caption"]) + [TEXT_TO_IMAGE.format(caption=c) for c in shapes_train["caption"][:200]]
    texts += [f" {q}" for qa in shapes_train["qa"] for q, _ in qa] + [a for qa in shapes_train["qa"] for _, a in qa]
    texts += [CLASSIFY.format(text=t) for t in text_train["text"]]
    from polymodal.data.digits import DIGIT_WORDS

    return texts + list(DIGIT_WORDS)


@functools.lru_cache(maxsize=4)
def train_text_tokenizer(data: str, text_data: str, vocab_size: int) -> BPETokenizer:
    """The BPE of at most ``vocab_size`` ids learnt from :func:`corpus` of the two datasets' train splits."""
    from polymodal.data import load_dataset

    shapes_train, text_train = load_dataset(data).split("train"), load_dataset(text_data).split("train")
    texts = corpus(shapes_train, text_train)
    return BPETokenizer.train(texts, vocab_size=vocab_size, specials=SPECIALS, add_bos=False, add_eos=False)


class Vocabulary:
    """Ids of the three token kinds and the conversions between them (holds the text tokenizer, no weights)."""

    def __init__(self, tokenizer: BPETokenizer, text_size: int, codes: int, bins: int) -> None:
        if tokenizer.vocab_size > text_size:
            raise ValueError(f"the text tokenizer has {tokenizer.vocab_size} ids; OFAConfig.text_vocab is {text_size}")
        self.tokenizer, self.text_size, self.codes, self.bins = tokenizer, text_size, codes, bins
        self.code_offset, self.bin_offset = text_size, text_size + codes
        self.size = text_size + codes + bins
        ids = tokenizer.special_tokens
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]

    def text(self, text: str) -> list[int]:
        """The BPE ids of ``text`` (no bos / eos)."""
        return self.tokenizer.encode(text)

    def decode_text(self, ids: list[int] | Tensor) -> str:
        """Text of the text ids among ``ids`` (specials, codes and bins dropped)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode([i for i in ids if i < self.text_size]).strip()

    def code_ids(self, codes: Tensor) -> Tensor:
        """Image codes (…) in [0, K) → their vocabulary ids."""
        return codes.long() + self.code_offset

    def bin_ids(self, bins: Tensor) -> Tensor:
        """Location bins (…) in [0, B) → their vocabulary ids."""
        return bins.long() + self.bin_offset

    def kind_mask(self, kind: str, device: torch.device | str = "cpu") -> Tensor:
        """Bool (V,): the ids of ``kind`` ('text' without bos/pad, 'code', 'bin'), plus eos for 'text'."""
        mask = torch.zeros(self.size, dtype=torch.bool, device=device)
        if kind == "text":
            mask[: self.tokenizer.vocab_size] = True
            mask[[self.bos, self.pad]] = False
        elif kind == "code":
            mask[self.code_offset : self.bin_offset] = True
        elif kind == "bin":
            mask[self.bin_offset :] = True
        else:
            raise ValueError(f"kind must be 'text', 'code' or 'bin'; got {kind!r}")
        return mask


__all__ = [
    "CAPTION",
    "CLASSIFY",
    "GROUND",
    "INFILL",
    "REGION",
    "REGION_ATTRIBUTES",
    "SPECIALS",
    "TEXT_TO_IMAGE",
    "Vocabulary",
    "corpus",
    "train_text_tokenizer",
]
