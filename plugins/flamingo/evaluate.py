"""Few-shot digit classification: ``accuracy_by_shots`` for k = 0, 2, 4 …

A k-shot prompt is k interleaved training examples in the evaluation format, then the test
image and the format's text before the word::

    <image>This is a three.<|endofchunk|><image>This is a zero.<|endofchunk|><image>This is a

Two scores per prompt, as OpenFlamingo reports open-ended and closed-set tasks:

* ``accuracy_by_shots`` (open-ended, like the ``caption`` command): the greedy continuation of
  the prompt is the test digit's word (``" seven"``), chosen from the whole vocabulary, so the
  model must also answer in the examples' format;
* ``ranked_accuracy_by_shots`` (closed-set): the digit word the model finds most likely after
  the prompt, among the ten words only.

The examples are drawn at random from the training split (seeded by ``eval_seed`` and k),
independently for every test image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polymodal.data.digits import DIGIT_WORDS
from polymodal.nn import eval_mode

from . import interleave as il


class EvalMixin:
    """Evaluation for :class:`~polymodal.plugins.flamingo.model.Flamingo`."""

    def word_candidates(self, words: Sequence[str] = DIGIT_WORDS) -> list[list[int]]:
        """Token ids of each word as it continues the query (``" seven"``), checked to extend the query's ids."""
        head, _, _ = self.config.eval_template.partition("{word}")
        query = head.rstrip()
        base = self.tokenizer.encode(query, add_bos=False, add_eos=False)
        out = []
        for w in words:
            full = self.tokenizer.encode(head + w, add_bos=False, add_eos=False)
            if full[: len(base)] != base or len(full) == len(base):
                raise ValueError(
                    f"the query {query!r} does not tokenize as a prefix of {head + w!r}; "
                    "choose an eval_template whose word starts a new token"
                )
            out.append(full[len(base) :])
        return out

    @torch.no_grad()
    def score_candidates(
        self, rows: list[list[int]], media: list[Tensor], candidates: list[list[int]]
    ) -> tuple[Tensor, Tensor]:
        """Closed-set and open-ended predictions after each prompt row: (N, K) summed log-probabilities
        of each candidate continuation, and (N, K) bool: the greedy continuation (whole vocabulary but
        ``<image>``, bos and padding) spells that candidate."""
        device = self.special.weight.device
        n, width = len(rows), max(len(c) for c in candidates)
        banned = [self.image_id, *(self.tokenizer.special_tokens[k] for k in ("bos", "pad"))]
        greedy = [list(r) for r in rows]
        for step in range(width):  # greedy decoding; the first pass also scores single-token candidates
            logp = self(il.pad_rows(greedy, self.pad_id()).to(device), media).log_softmax(-1)  # (N, T, V + 2)
            last = logp[
                torch.arange(n, device=device), torch.tensor([len(g) - 1 for g in greedy], device=device)
            ]  # (N, V + 2)
            if step == 0:
                first = last.clone()  # (N, V + 2)
            last[:, banned] = float("-inf")
            for g, t in zip(greedy, last.argmax(-1).tolist()):
                g.append(t)
        said = [g[len(r) :] for g, r in zip(greedy, rows)]
        spelled = torch.tensor([[s[: len(c)] == c for c in candidates] for s in said])  # (N, K)
        if width == 1:
            return first[:, [c[0] for c in candidates]].cpu(), spelled  # (N, K)
        scores = []
        for cand in candidates:  # multi-token words: one pass per candidate
            full = [r + cand for r in rows]
            logp = self(il.pad_rows(full, self.pad_id()).to(device), media).log_softmax(-1)  # (N, T, V + 2)
            s = torch.zeros(n, device=device)
            for j, tok in enumerate(cand):
                pos = torch.tensor([len(r) - 1 + j for r in rows], device=device)
                s += logp[torch.arange(n, device=device), pos, tok]
            scores.append(s)
        return torch.stack(scores, dim=1).cpu(), spelled  # (N, K)

    @torch.no_grad()
    def few_shot_accuracy(
        self, dataset: Any, shots: int, split: str = "test", batch_size: int = 90
    ) -> tuple[float, float]:
        """(open-ended, closed-set) accuracy of k-shot prompts on ``split`` (first ``eval_limit`` images when set)."""
        data, train = dataset.split(split), dataset.train
        n = len(data) if not self.config.eval_limit else min(len(data), self.config.eval_limit)
        g = torch.Generator().manual_seed(self.config.eval_seed * 1009 + shots)
        candidates = self.word_candidates(dataset.meta.get("class_names", DIGIT_WORDS))
        said, ranked = 0, 0
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            rows, media = [], []
            for i in idx:
                ex = torch.randperm(len(train), generator=g)[:shots]
                rows.append(self.encode_text(self.few_shot_text(train["label"][ex].tolist())))
                media.append(torch.cat([train["image"][ex], data["image"][i : i + 1]]))  # (k + 1, C, H, W)
            scores, spelled = self.score_candidates(rows, media, candidates)  # (N, K), (N, K)
            labels = data["label"][start : start + len(rows)]  # (N,)
            ranked += int((scores.argmax(-1) == labels).sum())
            said += int(spelled[torch.arange(len(rows)), labels].sum())
        return said / max(n, 1), ranked / max(n, 1)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, Any]:
        """``accuracy_by_shots`` (open-ended) and ``ranked_accuracy_by_shots`` (closed-set), {k: accuracy} each
        (also flat as ``accuracy_{k}_shot`` / ``ranked_accuracy_{k}_shot``), trainable and total parameters."""
        with eval_mode(self):
            scores = {str(k): self.few_shot_accuracy(dataset, k, split) for k in self.config.eval_shots}
        n = len(dataset.split(split))
        metrics: dict[str, Any] = {
            "accuracy_by_shots": {k: v[0] for k, v in scores.items()},
            "ranked_accuracy_by_shots": {k: v[1] for k, v in scores.items()},
        }
        metrics.update({f"accuracy_{k}_shot": v[0] for k, v in scores.items()})
        metrics.update({f"ranked_accuracy_{k}_shot": v[1] for k, v in scores.items()})
        metrics["samples"] = n if not self.config.eval_limit else min(n, self.config.eval_limit)
        metrics["trainable_parameters"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        metrics["total_parameters"] = sum(p.numel() for p in self.parameters())
        return metrics


__all__ = ["EvalMixin"]
