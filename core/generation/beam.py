"""Beam search over a causal step function (OFA's inference; any decoder with a KV cache).

    ids, scores = beam_search(step_fn, prompt, max_new_tokens=8, beams=5, eos_id=1)

Each row of ``prompt`` (B, T) keeps ``beams`` hypotheses; a step extends every live one by every allowed token and
keeps the ``beams`` best by summed log-probability (one cache per hypothesis row, reordered in place with
:meth:`~polymodal.nn.KVCache.select`). A hypothesis that emits ``eos_id`` is finished: it stays in the beam with
its score frozen, padded with ``pad_id``, and competes with the live ones until the end. The best finished (else
live) hypothesis of each row is returned, ranked by ``score / length ** length_penalty`` (fairseq's and
transformers' normalisation; ``length_penalty=0`` ranks by the raw sum). With a
:class:`~polymodal.generation.constraints.TokenTrie` mask and ``beams`` at least the number of candidates, nothing
is ever pruned, so the answer is the candidate of highest probability.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from polymodal.generation.sampling import check_prompt
from polymodal.nn import KVCache

StepFn = Callable[[Tensor, "KVCache | None"], Tensor]


@torch.no_grad()
def beam_search(
    step_fn: StepFn,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    beams: int,
    eos_id: int,
    pad_id: int | None = None,
    allowed: Tensor | Callable[[Tensor], Tensor] | None = None,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    new_cache: Callable[[int], KVCache] | None = None,
) -> tuple[Tensor, Tensor]:
    """The best of ``beams`` hypotheses per row of ``prompt_ids`` (B, T): ids (B, T + n) and scores (B,).

    ``step_fn(ids_new (B·K, n), cache) -> logits (B·K, n, V)`` as for :func:`~polymodal.generation.generate`
    (rows are hypotheses, row ``b·K + k`` the k-th of prompt row b; a context the step attends to must be
    repeated ``beams`` times per row, ``repeat_interleave``; its cross-attention keys and values are computed
    once and kept across the reorderings, as every hypothesis of a row reads the same context). ``allowed``: a bool mask (V,) / (B·K, V) or a
    callable on the hypotheses' ids (B·K, t). The score is the summed log-probability of the generated tokens
    up to and including ``eos_id``, divided by ``length ** length_penalty``; a row with no hypothesis the mask
    allows scores ``-inf``.
    """
    check_prompt(prompt_ids, max_new_tokens, least=1)
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"beams must be an integer >= 1, got {beams!r}")
    b, k = prompt_ids.shape[0], beams
    fill = eos_id if pad_id is None else pad_id
    ids = prompt_ids.repeat_interleave(k, dim=0)  # (B·K, T)
    make = new_cache or (lambda positions: KVCache())
    cache = make(prompt_ids.shape[1] + max_new_tokens) if use_cache else None
    pending = ids
    score = torch.full((b, k), float("-inf"), device=ids.device)  # (B, K): one live hypothesis to start
    score[:, 0] = 0.0
    length = torch.zeros(b, k, device=ids.device)  # (B, K) generated tokens, eos included
    done = torch.zeros(b, k, dtype=torch.bool, device=ids.device)  # (B, K)
    for _ in range(max_new_tokens):
        logits = step_fn(pending if use_cache else ids, cache)  # (B·K, n, V)
        if logits.dim() != 3 or logits.shape[0] != b * k:
            raise ValueError(f"step_fn must return logits (B·beams, n, V) = ({b * k}, n, V); got {tuple(logits.shape)}")
        logp = logits[:, -1].float().log_softmax(-1)  # (B·K, V)
        v = logp.shape[-1]
        if not (0 <= eos_id < v and 0 <= fill < v):
            raise ValueError(f"eos_id and pad_id must be token ids < the vocabulary size {v}; got {eos_id}, {pad_id}")
        if allowed is not None:
            mask = allowed(ids) if callable(allowed) else allowed
            logp = logp.masked_fill(~mask.to(logp.device, torch.bool).expand_as(logp), float("-inf"))
        # a finished hypothesis continues with the fill token only, at no cost
        finished = torch.full_like(logp, float("-inf"))
        finished[:, fill] = 0.0
        logp = torch.where(done.view(-1, 1), finished, logp)  # (B·K, V)
        total = (score.view(-1, 1) + logp).view(b, k * v)  # (B, K·V)
        score, flat = total.topk(k, dim=-1)  # (B, K) each
        origin = flat // v  # (B, K) which hypothesis each new one extends
        token = flat % v  # (B, K)
        rows = (origin + torch.arange(b, device=ids.device)[:, None] * k).view(-1)  # (B·K,) into the old rows
        was_done = done.gather(1, origin)  # (B, K)
        length = length.gather(1, origin) + (~was_done).float()
        done = was_done | (token == eos_id)
        new = token.view(-1, 1).to(ids.dtype)  # (B·K, 1)
        ids = torch.cat([ids[rows], new], dim=1)  # (B·K, t + 1)
        if cache is not None:
            cache.select(rows, keep_cross=True)  # rows stay within their prompt row: its context
        pending = new
        if bool(done.all()):
            break
    ranked = torch.where(done | ~done.any(-1, keepdim=True), score, float("-inf"))  # finished first, if any
    ranked = ranked / length.clamp(min=1) ** length_penalty  # (B, K)
    best = ranked.argmax(-1)  # (B,)
    pick = best + torch.arange(b, device=ids.device) * k  # (B,)
    return ids[pick], ranked.gather(1, best[:, None]).squeeze(1)  # (B, T + n), (B,)


__all__ = ["beam_search"]
