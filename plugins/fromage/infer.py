"""FROMAGe inference: captioning, text generation that may emit [RET], retrieval (evaluation: :mod:`.evaluate`;
sample folders: :mod:`.samples`).

model = polymodal.load("runs/fromage")
captions = caption(model, images)                       # ["a seven", …]
out = generate(model, "a photo of the number seven", gallery=test_images, k=5)
out = generate(model, "<image> is a picture of a", images=one_image)  # interleaved prompt
out["text"], out["retrieved"], out["emitted_ret"]        # text, (k,) gallery indices, bool
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polymodal.generation.options import check_sample_values
from polymodal.generation.sampling import generate as core_generate
from polymodal.nn import KVCache


def _step_fn(model: Any, before: Tensor | None, after: Tensor | None, t0: int, keep: dict | None = None):
    """A :func:`polymodal.generation.sampling.generate` step over the extended vocabulary.

    The first call (or every call without a cache) reads ``before``, the first ``t0`` ids,
    ``after`` and the ids after them; later calls read only the new ids. ``keep["cache"]``
    receives the generation's cache (the [RET] query reads on from it).
    """

    def step(ids: Tensor, cache: Any) -> Tensor:
        if keep is not None:
            keep["cache"] = cache
        if cache is not None and cache.length > 0:
            x = model.embed_ids(ids)  # (B, n, D)
        else:
            parts = [before, model.embed_ids(ids[:, :t0]), after, model.embed_ids(ids[:, t0:])]
            x = torch.cat([p for p in parts if p is not None and p.shape[1]], dim=1)  # (B, L, D)
        return model.logits(model.lm.run(x, cache=cache)[:, -1:])  # (B, 1, V + 1)

    return step


def _cut(model: Any, row: list[int]) -> tuple[list[int], bool]:
    """Generated ids up to the first end-of-text or [RET]; and whether [RET] ended them."""
    eos = model.tokenizer.special_tokens["eos"]
    for i, t in enumerate(row):
        if t in (eos, model.ret_id):
            return row[:i], t == model.ret_id
    return row, False


def _sampling(options: dict[str, Any], seed: int) -> dict[str, Any]:
    """Greedy unless temperature / top_k / top_p is given; then seeded sampling."""
    picked = {k: options[k] for k in ("temperature", "top_k", "top_p") if options.get(k) is not None}
    if not picked:
        return {"greedy": True}
    return {**picked, "generator": torch.Generator().manual_seed(seed)}


def new_tokens(model: Any, max_new_tokens: Any, room: int) -> int:
    """``max_new_tokens`` checked to be an integer in [1, ``room``] (what the LM's context leaves);
    None gives the model's ``max_caption_tokens`` (at most ``room``)."""
    if max_new_tokens is None:
        return min(model.config.max_caption_tokens, room)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= room:
        raise ValueError(
            f"max_new_tokens must be an integer in [1, {room}] (the LM holds {model.lm.max_len} positions); "
            f"got {max_new_tokens!r}"
        )
    return max_new_tokens


@torch.no_grad()
def caption(
    model: Any,
    images: Tensor,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    use_cache: bool = True,
    **sampling: Any,
) -> list[str]:
    """(B, C, S, S) images → one caption each: bos and the prefix (in training order), then greedy
    (or sampled) tokens until [RET] or end-of-text."""
    model.check_images(images)
    n = new_tokens(model, max_new_tokens, model.lm.max_len - model.config.prefix_tokens)  # bos + prefix + n − 1
    bos = model.tokenizer.special_tokens["bos"]
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prefix = model.prefix(chunk)  # (b, k, D)
        prompt = torch.full((len(chunk), 1), bos, dtype=torch.long, device=prefix.device)  # (b, 1)
        before, after = (None, prefix) if model.config.bos_first else (prefix, None)
        ids = core_generate(
            _step_fn(model, before, after, 1),
            prompt,
            n,
            eos_id=model.ret_id,
            use_cache=use_cache,
            new_cache=lambda positions, k=prefix.shape[1]: KVCache(capacity=positions + k),  # + the k prefix rows
            **_sampling(sampling, seed + start),
        )  # (b, 1 + n')
        out += [model.tokenizer.decode(_cut(model, row)[0]).strip() for row in ids[:, 1:].tolist()]
    return out


@torch.no_grad()
def embed_texts(model: Any, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """(N, S) unit query embeddings of texts read alone with [RET] appended."""
    if isinstance(texts, str) or not texts:
        raise ValueError(f"expected a non-empty list of texts; got {texts!r}")
    return torch.cat(
        [
            model.text_embeddings(
                model.encode_captions(list(texts[i : i + batch_size])).to(model.ret_token_embed.device)
            )
            for i in range(0, len(texts), batch_size)
        ]
    )


@torch.no_grad()
def embed_images(model: Any, images: Tensor, batch_size: int = 512) -> Tensor:
    """(N, S) unit retrieval embeddings of a gallery of images."""
    return torch.cat([model.image_embeddings(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


IMAGE_TOKEN = "<image>"
"""Marks where an image's k prefix embeddings go in an interleaved prompt."""


def interleave(model: Any, prompt: str, images: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """An interleaved prompt → (embeddings before (1, P, D) or None, the last text ids (1, T >= 1),
    the image embeddings after them (1, A, D) or None).

    The sequence is built as in training: with ``bos_first`` it starts with bos and each
    ``<image>`` becomes that image's k prefix embeddings; otherwise each image is followed by
    bos and a prompt that starts with text starts with bos.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"expected a text prompt (str); got {type(prompt).__name__}")
    pieces = [p.strip() for p in prompt.split(IMAGE_TOKEN)]
    given = 0 if images is None else len(images)
    if len(pieces) - 1 != given:
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} token(s) but {given} image(s) were given; "
            f"put one {IMAGE_TOKEN} where each image goes"
        )
    tok, device = model.tokenizer, model.ret_token_embed.device
    prefixes = model.prefix(images) if given else None  # (N, k, D)
    bos, first = [tok.special_tokens["bos"]], model.config.bos_first
    segments: list[list[int] | Tensor] = []  # token ids or (1, k, D) image prefixes, in order
    head = tok.encode(pieces[0], add_bos=False, add_eos=False)
    segments.append(bos + head if first or head or not given else [])
    for i, text in enumerate(pieces[1:]):
        segments += [prefixes[i : i + 1], ([] if first else bos) + tok.encode(text, add_bos=False, add_eos=False)]
    segments = [s for s in segments if len(s)]
    last = max(i for i, s in enumerate(segments) if isinstance(s, list))

    def embed(group: list) -> Tensor | None:
        x = [s if isinstance(s, Tensor) else model.embed_ids(torch.tensor([s], device=device)) for s in group]
        return torch.cat(x, dim=1) if x else None  # (1, L, D)

    return embed(segments[:last]), torch.tensor([segments[last]], device=device), embed(segments[last + 1 :])


@torch.no_grad()
def generate(
    model: Any,
    prompt: str,
    *,
    images: Tensor | None = None,
    gallery: Tensor | None = None,
    k: int = 5,
    max_new_tokens: int | None = None,
    force_ret: bool = True,
    seed: int = 0,
    use_cache: bool = True,
    **sampling: Any,
) -> dict[str, Any]:
    """Continue an (interleaved) ``prompt`` until [RET] or end-of-text; retrieve the ``k`` nearest gallery images at [RET].

    ``images`` (N, C, S, S) fill the prompt's N ``<image>`` tokens. Returns ``text`` (the
    continuation), ``emitted_ret`` (whether the model emitted [RET]) and, with a ``gallery``
    (M, C, S, S), ``retrieved`` (k,) indices and ``scores`` (k,) cosines. When the model ends
    without [RET] and ``force_ret``, [RET] is appended (as FROMAGe's retrieval evaluation does).
    """
    before, prompt_ids, after = interleave(model, prompt, images)
    used = prompt_ids.shape[1] + sum(0 if x is None else x.shape[1] for x in (before, after))
    room = model.lm.max_len - used - 1  # the prompt, n new tokens, [RET]
    if room < 1:
        raise ValueError(
            f"the prompt's {used} positions + [RET] fill the LM's {model.lm.max_len}; no room for a new token"
        )
    n = model.config.max_caption_tokens if max_new_tokens is None else new_tokens(model, max_new_tokens, room)
    if used + n + 1 > model.lm.max_len:
        raise ValueError(f"the prompt's {used} positions + {n} new tokens + [RET] exceed the LM's {model.lm.max_len}")
    if gallery is not None and not 0 < k <= len(gallery):
        raise ValueError(f"k must be in [1, {len(gallery)}] (the gallery size); got {k}")
    t0, keep = prompt_ids.shape[1], {}
    ids = core_generate(
        _step_fn(model, before, after, t0, keep),
        prompt_ids,
        n,
        eos_id=model.ret_id,
        use_cache=use_cache,
        new_cache=lambda positions: KVCache(capacity=used + n + 1),  # the prompt, n new tokens, [RET]: preallocated
        **_sampling(sampling, seed),
    )  # (1, T + n')
    new, emitted = _cut(model, ids[0, t0:].tolist())
    out: dict[str, Any] = {"prompt": prompt, "text": model.tokenizer.decode(new).strip(), "emitted_ret": emitted}
    if gallery is not None and (emitted or force_ret):
        q = _ret_query(model, keep.get("cache"), (before, prompt_ids, after), new, used)  # (1, S)
        scores = embed_images(model, gallery) @ q[0]  # (M,)
        top = scores.topk(k)
        out.update(retrieved=top.indices.cpu(), scores=top.values.cpu())
    return out


def _ret_query(model: Any, cache: Any, prompt: tuple, new: list[int], used: int) -> Tensor:
    """(1, S) the retrieval query at ``[RET]`` after the prompt (``used`` positions) and the kept ``new`` ids.

    When the generation's ``cache`` holds the prompt and a prefix of ``new`` (the ids up to the first
    end-of-text or [RET]), only the rest and [RET] run through the LM; otherwise (no cache, or ids
    past an end-of-text were fed) the whole sequence runs again.
    """
    before, prompt_ids, after = prompt
    tail = new + [model.ret_id]
    fed = cache.length - used if cache is not None else -1  # generated ids the cache holds
    if 0 <= fed <= len(new):
        x = model.embed_ids(torch.tensor([tail[fed:]], device=prompt_ids.device))  # (1, n'' + 1 − fed, D)
        return model.query_embeddings(model.retrieval_hidden(x, cache)[1][:, -1])  # (1, S)
    parts = [
        before,
        model.embed_ids(prompt_ids),
        after,
        model.embed_ids(torch.tensor([tail], device=prompt_ids.device)),
    ]
    x = torch.cat([p for p in parts if p is not None], dim=1)  # (1, L, D)
    return model.query_embeddings(model.retrieval_hidden(x)[1][:, -1])  # (1, S)


def generate_text(
    model: Any,
    prompt: str = "",
    images: Any = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """``Fromage.generate``: the text FROMAGe writes after ``prompt`` (up to [RET] or end-of-text).

    ``images`` (one or a list: paths, PIL images, arrays or tensors, prepared by ``model.preprocess``)
    fill the prompt's ``<image>`` tokens; a prompt without them gets one ``<image>`` per image in
    front, so an image alone is captioned. Greedy unless ``temperature`` (> 0), ``top_k`` (>= 1) or
    ``top_p`` (in (0, 1]) is given, then sampled with ``seed``; ``max_new_tokens`` defaults to the
    config's ``max_caption_tokens``. Bad values raise a ValueError naming them.
    """
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    check_sample_values(sampling, ())
    if not isinstance(prompt, str):
        raise ValueError(f"expected a text prompt (str); got {type(prompt).__name__}")
    batch = None if images is None else model.preprocess_images(images)  # (N, C, S, S)
    if batch is not None and IMAGE_TOKEN not in prompt:
        prompt = IMAGE_TOKEN * len(batch) + prompt
    return generate(model, prompt, images=batch, max_new_tokens=max_new_tokens, seed=seed, **sampling)["text"]


__all__ = [
    "caption",
    "embed_images",
    "embed_texts",
    "generate",
    "interleave",
    "new_tokens",
]
