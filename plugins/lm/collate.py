"""The language model's data-pipeline step: caption mixing, random packing and tokenising.

:class:`LMCollate` does the CPU work of :meth:`LanguageModel.loss` before the network runs,
with the same draws from torch's global generator in the same order (the caption swaps, then
one pack size per group), so ``loss(collate(batch, step))`` equals ``loss(batch)`` under one
seed. It holds the config and the tokenizer, never the weights (it pickles for DataLoader workers).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from . import corpus


def batch_texts(config: Any, batch: dict[str, Any], training: bool) -> list[str]:
    """The batch's sentences (``text``, else ``caption``), a ``caption_mix`` share swapped for captions in training."""
    texts = batch.get("text", batch.get("caption"))
    if texts is None:
        raise ValueError(f"a language-model batch needs a 'text' or 'caption' field; got {sorted(batch)}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if training and config.caption_mix > 0:
        pool = corpus.caption_texts()
        swap = (torch.rand(len(texts)) < config.caption_mix).tolist()
        picks = torch.randint(len(pool), (len(texts),)).tolist()
        texts = [pool[p] if s else t for t, s, p in zip(texts, swap, picks)]
    return texts


def pack(texts: list[str], most: int, training: bool) -> list[list[str]]:
    """Consecutive groups of 1 to ``most`` texts (uniform sizes in training, one text each otherwise)."""
    groups, i = [], 0
    while i < len(texts):
        k = int(torch.randint(1, most + 1, ())) if training else 1
        groups.append(texts[i : i + k])
        i += k
    return groups


def encode_texts(tokenizer: Any, max_len: int, groups: list[list[str]]) -> tuple[Tensor, Tensor]:
    """Token streams ``bos s_1 eos s_2 eos …`` per group, right-padded: ids (B, L), targets (B, L).

    Inputs are the stream without its last token, targets the stream shifted by one with
    padding set to -100; streams are cut to ``max_len + 1`` tokens.
    """
    bos, eos, pad = (tokenizer.special_tokens[k] for k in ("bos", "eos", "pad"))
    rows = []
    for group in groups:
        row = [bos]
        for text in group:
            row += tokenizer.encode(text, add_bos=False, add_eos=False) + [eos]
        rows.append(row[: max_len + 1])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)  # (B, L + 1)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)  # (B, L + 1)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        targets[i, : len(row)] = torch.tensor(row)
    return ids[:, :-1], targets[:, 1:]


class LMCollate:
    """``collate(batch, step) -> batch`` for language-model training: ``ids`` (G, L) and ``targets`` (G, L)
    of the packed groups (G ≤ B rows; padding targets are -100). ``training=False`` packs one text per
    row and swaps no captions (the loss of a raw batch in eval mode)."""

    def __init__(self, config: Any, tokenizer: Any, training: bool = True) -> None:
        self.config, self.tokenizer, self.training = config, tokenizer, training

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch of global step ``step`` (unused: no curriculum) with its token ids and targets."""
        groups = pack(batch_texts(self.config, batch, self.training), self.config.pack, self.training)
        ids, targets = encode_texts(self.tokenizer, self.config.max_len, groups)  # (G, L), (G, L)
        out = copy.copy(batch)  # a Batch stays a Batch (its missing-field errors name the dataset)
        out.update(ids=ids, targets=targets)
        return out
