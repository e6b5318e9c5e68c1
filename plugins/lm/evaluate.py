"""Evaluation of the language model: perplexity, the digit-word slot, and whether samples are sentences.

* ``test_nll_bits_per_token`` / ``test_perplexity`` — next-token NLL of ``bos sentence eos`` over the
  test sentences (every token after ``bos``, ``eos`` included), beside the add-one unigram baseline
  of the training tokens (``unigram_bits_per_token``).
* ``digit_slot_mass`` — for every test sentence, cut just before its digit word: the probability
  the model gives to the ten digit words (each word's full token sequence) as the next word,
  averaged. A model that learnt the corpus knows a digit word goes there (ideal 1.0);
  ``digit_slot_entropy_bits`` is the entropy of the ten words' renormalised distribution (the
  corpus is uniform: ideal log2(10) ≈ 3.32 bits; far lower means a collapsed prior).
* ``sample_valid_rate`` — share of ``eval_samples`` unconditional samples (temperature 1) that
  are exactly a sentence or caption the embedded generators can produce.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.data import DIGIT_WORDS
from polymodal.nn import eval_mode

from . import corpus


class EvalMixin:
    """Evaluation methods of :class:`~polymodal.plugins.lm.model.LMModel`."""

    @torch.no_grad()
    def sequence_nll(self, rows: list[list[int]], batch_size: int = 256) -> Tensor:
        """Summed next-token NLL (nats) of every token after the first, per row; returns (N,)."""
        pad = self.require_tokenizer().special_tokens["pad"]
        device = self.token_embed.weight.device
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            length = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)  # (b, L)
            targets = torch.full((len(chunk), length), -100, dtype=torch.long)  # (b, L)
            for j, r in enumerate(chunk):
                ids[j, : len(r)] = torch.tensor(r)
                targets[j, : len(r)] = torch.tensor(r)
            logits = self(ids[:, :-1].to(device)).float()  # (b, L-1, V)
            nll = F.cross_entropy(
                logits.transpose(1, 2), targets[:, 1:].to(device), ignore_index=-100, reduction="none"
            )  # (b, L-1)
            out.append(nll.sum(1).cpu())
        return torch.cat(out)  # (N,)

    def sentence_rows(self, texts: list[str]) -> list[list[int]]:
        """``bos text eos`` token rows (cut to ``max_len + 1`` tokens)."""
        tok = self.require_tokenizer()
        return [tok.encode(t, add_bos=True, add_eos=True)[: self.max_len + 1] for t in texts]

    @torch.no_grad()
    def digit_slot(self, texts: list[str], labels: list[int]) -> tuple[float, float]:
        """Mean probability of the ten digit words at each sentence's digit slot, and the mean
        entropy (bits) of their renormalised distribution."""
        tok = self.require_tokenizer()
        prefixes, words = [], []
        for text, label in zip(texts, labels):
            m = re.search(rf"\b{DIGIT_WORDS[label]}\b", text)
            if m is None:
                continue
            prefix = text[: m.start()].rstrip(" ")
            space = " " if m.start() > 0 and text[m.start() - 1] == " " else ""
            prefixes.append(prefix)
            words.append([space + w for w in DIGIT_WORDS])
        if not prefixes:
            return float("nan"), float("nan")
        rows, base = [], []
        for prefix, cands in zip(prefixes, words):
            head = tok.encode(prefix, add_bos=True, add_eos=False)
            for w in cands:
                rows.append(tok.encode(prefix + w, add_bos=True, add_eos=False)[: self.max_len + 1])
            base.append(head)
        cand_nll = self.sequence_nll(rows).view(len(prefixes), len(DIGIT_WORDS))  # (S, 10)
        head_nll = self.sequence_nll(base).unsqueeze(1)  # (S, 1)
        logp = -(cand_nll - head_nll)  # (S, 10) log P(word | prefix)
        mass = logp.exp().sum(1)  # (S,)
        p = logp.softmax(1)  # (S, 10)
        entropy = -(p * p.clamp_min(1e-12).log2()).sum(1)  # (S,)
        return mass.mean().item(), entropy.mean().item()

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, Any]:
        """Perplexity, the unigram baseline, the digit-word slot and the sample validity (see the module)."""
        with eval_mode(self):
            tok = self.require_tokenizer()
            test, train = dataset.split(split), dataset.train
            field_name = "text" if "text" in test else "caption"
            texts = list(test[field_name])
            rows = self.sentence_rows(texts)
            tokens = sum(len(r) - 1 for r in rows)
            nats = self.sequence_nll(rows).sum().item() / tokens
            counts = torch.ones(tok.vocab_size)  # add-one smoothing
            for r in self.sentence_rows(list(train[field_name])):
                counts += torch.bincount(torch.tensor(r[1:]), minlength=tok.vocab_size)[: tok.vocab_size].float()
            logq = (counts / counts.sum()).log()  # (V_tok,)
            unigram = -sum(logq[torch.tensor(r[1:])].sum().item() for r in rows) / tokens
            metrics: dict[str, Any] = {
                "test_nll_bits_per_token": nats / math.log(2),
                "test_perplexity": math.exp(nats),
                "unigram_bits_per_token": unigram / math.log(2),
            }
            if "label" in test:
                mass, entropy = self.digit_slot(texts, test["label"].tolist())
                metrics.update(digit_slot_mass=mass, digit_slot_entropy_bits=entropy)
            if self.config.eval_samples:
                samples = self.sample_texts(self.config.eval_samples, "", self.max_len, seed=0)
                valid = corpus.valid_texts() | set(train[field_name]) | set(texts)
                metrics["sample_valid_rate"] = sum(s.strip() in valid for s in samples) / len(samples)
                metrics["sample_examples"] = samples[:5]
        return metrics


__all__ = ["EvalMixin"]
