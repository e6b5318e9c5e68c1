"""``RuDolph.generate``: the text RuDolph writes about an image (image→text, in the right text context).

The stream is ``[lt_i2t] pad… | the image's codes | [rt_i2t] prompt…``; the core
:func:`polymodal.generation.sampling.generate` continues it with a KV cache, restricted to the text
vocabulary, up to end-of-text or the end of the right context. Greedy unless a sampling option is
given, as ``lm``'s, Flamingo's and FROMAGe's ``generate``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polymodal.generation.options import check_sample_values
from polymodal.generation.sampling import generate
from polymodal.nn import eval_mode


def _single(images: Any) -> bool:
    """Whether ``images`` is one image (not a list, tuple or (N > 1, C, H, W) tensor)."""
    if isinstance(images, (list, tuple)):
        return False
    return not (isinstance(images, Tensor) and images.dim() == 4 and len(images) > 1)


@torch.no_grad()
def generate_caption(
    model: Any,
    prompt: str | None = None,
    images: Any = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str | list[str]:
    """The text after ``prompt`` (the caption's start; none: a whole caption) for each of ``images``.

    ``images``: one image or a list (paths, PIL images, arrays or tensors, prepared by
    ``model.preprocess``); one image gives a string, several a list. Greedy unless ``temperature``
    (> 0), ``top_k`` (>= 1) or ``top_p`` (in (0, 1]) is given, then sampled reproducibly for ``seed``;
    ``max_new_tokens`` (>= 1) caps the new tokens (default: what the right context has room for). Bad
    values raise a ValueError naming them.
    """
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    check_sample_values(sampling, ())
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"expected a text prompt (str) or None; got {type(prompt).__name__}")
    if images is None:
        raise ValueError(
            "RuDolph.generate writes text about an image: pass images= (a path, PIL image, array or tensor, or a "
            "list of them); got none (text→image is model.generate_images)"
        )
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 1 or None; got {max_new_tokens!r}")
    c, sp = model.config, model.text.special_tokens
    body = model.text.encode(prompt, add_bos=False, add_eos=False) if prompt else []
    room = c.right_len - 1 - len(body)
    if room < 1:
        raise ValueError(
            f"prompt {prompt!r} encodes to {len(body)} tokens; the {c.right_len}-token right context has room "
            f"for at most {c.right_len - 2} after its task token, leaving one to generate"
        )
    single = _single(images)
    batch = model.preprocess_images(images)  # (N, C, S, S)
    with eval_mode(model):
        codes = model.encode_images(batch)  # (N, h, w)
        n = codes.shape[0]
        start = torch.tensor([sp["rt_i2t"], *body], dtype=torch.long, device=codes.device).expand(n, -1)
        prefix = torch.cat([model.left_text([""] * n, "lt_i2t"), model.codes_to_ids(codes), start], dim=1)
        g = torch.Generator(device=prefix.device).manual_seed(int(seed))
        ids = generate(
            model._step,
            prefix,
            room if max_new_tokens is None else min(max_new_tokens, room),
            greedy=all(v is None for v in sampling.values()),
            temperature=1.0 if temperature is None else temperature,
            top_k=top_k,
            top_p=top_p,
            generator=g,
            allowed=model.vocab_masks[2],
            eos_id=sp["eos"],
            pad_id=sp["pad"],
        )  # (N, P + new)
    texts = [t.rstrip() if prompt else t.strip() for t in model.text.decode_batch(ids[:, prefix.shape[1] :])]
    return texts[0] if single else texts


__all__ = ["generate_caption"]
