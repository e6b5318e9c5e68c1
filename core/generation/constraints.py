"""Constrained decoding: a trie over candidate token sequences, whose masks keep generation inside the candidates.

OFA answers a VQA question or a classification by generating one of a known list of answers (the reference code's
``constraint_trie``): at each step only the tokens that continue some candidate may be chosen, and end-of-text
only where a whole candidate has been written::

    trie = TokenTrie([[5, 9], [5, 7, 2], [8]], eos_id=1)
    trie.allowed([5])        # tokens 9 and 7
    trie.allowed([5, 9])     # end-of-text only
    generate(step_fn, prompt, 4, greedy=True, eos_id=1, allowed=trie.mask_fn(prompt.shape[1], vocab_size))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor


class TokenTrie:
    """The prefixes of ``candidates`` (token id sequences, each implicitly followed by ``eos_id``)."""

    def __init__(self, candidates: Iterable[Sequence[int]], eos_id: int) -> None:
        self.eos_id = int(eos_id)
        self.root: dict[int, dict] = {}
        count = 0
        for candidate in candidates:
            ids = [int(t) for t in candidate]
            if not ids or any(t < 0 for t in ids) or self.eos_id in ids:
                raise ValueError(
                    f"a candidate must be a non-empty sequence of token ids >= 0 without the end-of-text id "
                    f"{self.eos_id}; got {list(candidate)!r:.80}"
                )
            node = self.root
            for t in ids:
                node = node.setdefault(t, {})
            node[self.eos_id] = {}
            count += 1
        if not count:
            raise ValueError("TokenTrie needs at least one candidate; got none")

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """The tokens that may follow ``prefix``: those continuing a candidate (end-of-text after a whole one);
        after end-of-text, end-of-text again (a finished row); an empty list for a prefix no candidate starts."""
        node = self.root
        for i, t in enumerate(int(t) for t in prefix):
            if t == self.eos_id and self.eos_id in node:
                return [self.eos_id] if all(int(u) == self.eos_id for u in list(prefix)[i:]) else []
            if t not in node:
                return []
            node = node[t]
        return sorted(node)

    def mask(self, ids: Tensor, start: int, vocab_size: int) -> Tensor:
        """Bool (B, V): per row of ``ids`` (B, t), the tokens allowed after its generated part ``ids[:, start:]``."""
        out = torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool, device=ids.device)  # (B, V)
        for row, prefix in enumerate(ids[:, start:].tolist()):
            tokens = [t for t in self.allowed(prefix) if t < vocab_size]
            out[row, tokens] = True
        return out

    def mask_fn(self, start: int, vocab_size: int) -> Callable[[Tensor], Tensor]:
        """``ids (B, t) -> mask (B, V)`` for :func:`~polymodal.generation.sampling.generate`'s and
        :func:`~polymodal.generation.beam.beam_search`'s ``allowed``; generation starts at position ``start``."""
        return lambda ids: self.mask(ids, start, vocab_size)


__all__ = ["TokenTrie"]
