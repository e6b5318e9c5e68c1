"""T5's span corruption (Raffel et al. 2020, §3.1.4; mT5 pre-trains the same way) and the training collator.

A caption's ids (no eos) are split into noise and non-noise tokens as T5's ``random_spans_noise_mask`` does:
``num_noise = clamp(round(L · noise_density), 1, L − 1)`` tokens in ``num_spans = max(1, round(num_noise /
mean_span))`` spans, the noise and non-noise tokens each cut into ``num_spans`` non-empty segments at random,
interleaved non-noise first. The input keeps the non-noise tokens with each noise span replaced by one sentinel
(``<extra_id_0>``, ``<extra_id_1>`` … in order) and ends with eos; the target is each sentinel followed by the span
it replaced, then the final sentinel and eos::

    "a red circle at the top"  →  input  "a red <extra_id_0> the top </s>"
                                   target "<extra_id_0> circle at <extra_id_1> </s>"

On these captions (6–40 tokens) T5's values (density 0.15, mean span 3) give 1–6 noise tokens in one or two
spans: the clamp keeps at least one span (and one kept token) per caption of two tokens or more, so every
caption trains, and we keep T5's values rather than raise them. Randomness comes from torch's global generator
(or a given one), so every training step draws a fresh corruption.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polymodal.data import languages


def noise_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) of a ``length``-token sequence, as T5 (``length`` ≥ 2)."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens; got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return num_noise, max(round(num_noise / mean_span), 1)


def _segments(total: int, parts: int, generator: torch.Generator | None) -> list[int]:
    """Random lengths (each ≥ 1) of ``parts`` segments summing to ``total`` (T5's ``_random_segmentation``)."""
    cuts = (torch.randperm(total - 1, generator=generator)[: parts - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


def noise_mask(
    length: int, noise_density: float, mean_span: float, generator: torch.Generator | None = None
) -> list[bool]:
    """T5's random spans noise mask of ``length`` tokens: True marks a noise token; starts with non-noise."""
    num_noise, spans = noise_counts(length, noise_density, mean_span)
    spans = min(spans, length - num_noise)  # each span needs a kept segment before it
    noise = _segments(num_noise, spans, generator)
    kept = _segments(length - num_noise, spans, generator)
    mask: list[bool] = []
    for k, n in zip(kept, noise):
        mask += [False] * k + [True] * n
    return mask


def corrupt(
    ids: Sequence[int],
    sentinels: Sequence[int],
    eos: int,
    *,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one caption's ``ids`` (without eos); see the module docs."""
    mask = noise_mask(len(ids), noise_density, mean_span, generator)
    inputs: list[int] = []
    target: list[int] = []
    span = -1
    for i, (token, noisy) in enumerate(zip(ids, mask)):
        if noisy and (i == 0 or not mask[i - 1]):
            span += 1
            if span + 1 >= len(sentinels):
                raise ValueError(f"a caption needs {span + 2} sentinels; the tokenizer has {len(sentinels)}")
            inputs.append(sentinels[span])
            target.append(sentinels[span])
        (target if noisy else inputs).append(token)
    return inputs + [eos], target + [sentinels[span + 1], eos]


def pad_rows(rows: list[list[int]], value: int) -> Tensor:
    """Right-padded LongTensor (B, L) of ``rows``, L the longest."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)  # (B, L)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def corrupt_batch(
    tokenizer: Any,
    texts: Sequence[str],
    max_len: int,
    *,
    noise_density: float,
    mean_span: float,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Span-corrupt ``texts``: ``input_ids`` (B, Le) padded, ``decoder_ids`` (B, Lt) (pad as start token, the target
    shifted right) and ``targets`` (B, Lt) with -100 on padding. A caption longer than ``max_len`` raises."""
    pad, eos = tokenizer.special_tokens["pad"], tokenizer.special_tokens["eos"]
    sentinels = sentinel_ids(tokenizer)
    inputs, targets = [], []
    for text in texts:
        ids = tokenizer.encode(text, max_len, add_bos=False, add_eos=True)[:-1]  # body; raises if too long
        x, y = corrupt(ids, sentinels, eos, noise_density=noise_density, mean_span=mean_span, generator=generator)
        inputs.append(x)
        targets.append(y)
    target = pad_rows(targets, -100)  # (B, Lt)
    decoder = torch.cat([torch.full((len(texts), 1), pad), target[:, :-1]], 1)  # (B, Lt): shifted right
    return {"input_ids": pad_rows(inputs, pad), "decoder_ids": decoder.masked_fill(decoder < 0, pad), "targets": target}


def sentinel_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's sentinels ``<extra_id_0>``, ``<extra_id_1>`` … in order."""
    out, i = [], 0
    while f"extra_id_{i}" in tokenizer.special_tokens:
        out.append(tokenizer.special_tokens[f"extra_id_{i}"])
        i += 1
    if len(out) < 2:
        raise ValueError(f"span corruption needs a tokenizer with at least 2 sentinels; got {len(out)}")
    return out


def check_training_pairs(batch: dict[str, Any], data: str) -> None:
    """Refuse a batch holding an evaluation-only (template, language) pair of ``data``'s captions."""
    if "template" not in batch or "language" not in batch:
        return
    held = set(languages.heldout_pairs(languages.base_dataset(data)))
    found = sorted({(int(t), c) for t, c in zip(batch["template"], batch["language"]) if (int(t), c) in held})
    if found:
        raise ValueError(
            f"span-corruption training takes training captions only; got evaluation-only (template, language) "
            f"pairs {found[:4]} of {data}"
        )


def recaption(
    batch: dict[str, Any], data: str, generator: torch.Generator | None = None, language: str | None = None
) -> list[str]:
    """Fresh captions of the batch's scenes: each in a random language with a random *training* template of that
    language (torch's global generator), so the model reads every training wording of every scene, never an
    evaluation-only (template, language) pair. Shapes scenes are described from ``boxes`` (their grid cells from
    the image side), digits from ``label``. ``language`` fixes the language of every caption."""
    base = languages.base_dataset(data)
    n = len(batch["caption"])
    codes = torch.randint(len(languages.LANGUAGES), (n,), generator=generator).tolist()
    if language is not None:
        codes = [languages.LANGUAGES.index(language)] * n
    picks = torch.rand(n, generator=generator).tolist()
    if base == "shapes":
        from polymodal.data.multilingual import scene_objects

        scenes = scene_objects({"boxes": batch["boxes"]}, int(batch["image"].shape[-1]))  # type: ignore[arg-type]
    out = []
    for i, (code, u) in enumerate(zip(codes, picks)):
        language = languages.LANGUAGES[code]
        ids = languages.template_ids(base, language)
        template = ids[int(u * len(ids))]
        if base == "shapes":
            out.append(languages.shapes_caption(language, template, scenes[i]))
        else:
            out.append(languages.digit_caption(language, template, int(batch["label"][i])))
    return out


class SpanCorruptionCollate:
    """``collate(batch, step) -> batch``: a fresh span corruption of the batch's captions (torch's global generator),
    adding ``input_ids``, ``decoder_ids`` and ``targets`` (and ``texts``, what was corrupted). In training, refuses
    evaluation-only caption pairs and, with ``config.recaption`` on a multilingual dataset, first re-captions
    the scenes (:func:`recaption`). Holds the config and the tokenizer, never the weights."""

    def __init__(self, config: Any, tokenizer: Any, training: bool = True) -> None:
        self.config, self.tokenizer, self.training = config, tokenizer, training

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch of global step ``step`` (unused) with its corrupted ids."""
        texts = batch.get("caption")
        if texts is None:
            raise ValueError(f"a t5 batch needs a 'caption' field; got {sorted(batch)}")
        c = self.config
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.training and languages_known(c.data):
            check_training_pairs(batch, c.data)
            if c.recaption:
                texts = recaption(batch, c.data)
        out = copy.copy(batch)
        out.update(
            corrupt_batch(self.tokenizer, texts, c.max_len, noise_density=c.noise_density, mean_span=c.mean_span)
        )
        out["texts"] = texts
        return out


def languages_known(data: str) -> bool:
    """Whether ``data`` is one of the multilingual datasets (whose evaluation-only pairs are known)."""
    try:
        languages.base_dataset(data)
    except ValueError:
        return False
    return True


__all__ = [
    "SpanCorruptionCollate",
    "check_training_pairs",
    "corrupt",
    "corrupt_batch",
    "noise_counts",
    "noise_mask",
    "recaption",
    "sentinel_ids",
]
