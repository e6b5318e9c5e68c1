"""Hypothesis strategies for plugin authors: image and token batches, attention calls, configs.

Tensors are drawn as a shape plus a seed and filled with ``torch`` (fast, and shrinking
goes to small shapes), not element by element::

    from hypothesis import given
    from polymodal.testing.strategies import attention_inputs, configs, image_batches

    @given(image_batches(channels=1, size=8, max_batch=4))
    def test_encoder_shapes(images):            # (B, 1, 8, 8) float32 in [0, 1)
        ...

    @given(attention_inputs(masks=("causal", "padding")))
    def test_matches_math(call):                # dict of q, k, v and mask arguments
        out = attention(**call)

    @given(configs(ViTEncoderConfig))
    def test_any_config_builds(cfg):            # a valid variant of the defaults
        ViTEncoder(cfg)
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from hypothesis import strategies as st

__all__ = ["attention_inputs", "configs", "field_strategy", "image_batches", "token_batches"]

IntLike = int | st.SearchStrategy


def _ints(value: IntLike) -> st.SearchStrategy:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_seeds = st.integers(0, 2**31 - 1)


@st.composite
def image_batches(
    draw: Callable, channels: IntLike = 1, size: IntLike = 8, max_batch: int = 4, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Image batches (B, C, S, S) in [0, 1), 1 <= B <= ``max_batch``.

    ``channels`` and ``size`` are ints or strategies of ints (e.g. ``st.sampled_from([8, 16])``).
    """
    b = draw(st.integers(1, max_batch))
    c, s = draw(_ints(channels)), draw(_ints(size))
    return torch.rand(b, c, s, s, generator=_generator(draw(_seeds))).to(dtype)  # (B, C, S, S)


@st.composite
def token_batches(
    draw: Callable, vocab: int = 256, max_len: int = 16, max_batch: int = 4, min_len: int = 1
) -> torch.Tensor:
    """Token-id batches (B, L) int64 in ``[0, vocab)``, ``min_len <= L <= max_len``."""
    b, n = draw(st.integers(1, max_batch)), draw(st.integers(min_len, max_len))
    return torch.randint(0, vocab, (b, n), generator=_generator(draw(_seeds)))  # (B, L)


MASKS = ("none", "causal", "padding", "block", "bool", "additive")


@st.composite
def attention_inputs(
    draw: Callable,
    *,
    max_batch: int = 3,
    max_heads: int = 3,
    max_len: int = 12,
    head_dims: Sequence[int] = (4, 8, 16),
    masks: Sequence[str] = MASKS,
    dtype: torch.dtype = torch.float32,
    cross: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for :func:`polymodal.attention.attention`: ``q, k, v`` and one mask kind.

    q (B, H, Nq, D), k and v (B, H, Nk, D). The mask kind is drawn from ``masks``:
    ``none``; ``causal`` (may be combined with padding); ``padding`` (``key_padding`` (B, Nk)
    bool, at least one real key per row); ``block`` (packed ``seqlens``, B = 1, Nq = Nk);
    ``bool`` / ``additive`` (a dense (B, 1, Nq, Nk) mask). With ``cross`` Nq may differ from Nk.
    The drawn kind is also returned under ``"kind"``; pop it before calling.
    """
    kind = draw(st.sampled_from(list(masks)))
    h, d = draw(st.integers(1, max_heads)), draw(st.sampled_from(list(head_dims)))
    g = _generator(draw(_seeds))
    out: dict[str, Any] = {"kind": kind}
    if kind == "block":
        seqlens = draw(st.lists(st.integers(1, max(1, max_len // 2)), min_size=1, max_size=4))
        b, nq = 1, sum(seqlens)
        nk = nq
        out["seqlens"] = seqlens
        out["causal"] = draw(st.booleans())
    else:
        b, nq = draw(st.integers(1, max_batch)), draw(st.integers(1, max_len))
        nk = draw(st.integers(1, max_len)) if cross else nq
    q = torch.randn(b, h, nq, d, generator=g).to(dtype)  # (B, H, Nq, D)
    k = torch.randn(b, h, nk, d, generator=g).to(dtype)  # (B, H, Nk, D)
    v = torch.randn(b, h, nk, d, generator=g).to(dtype)  # (B, H, Nk, D)
    out.update(q=q, k=k, v=v)
    if kind == "causal":
        out["causal"] = True
    if kind == "padding" or (kind == "causal" and "padding" in masks and draw(st.booleans())):
        lengths = torch.randint(1, nk + 1, (b,), generator=g)  # (B,)
        out["key_padding"] = torch.arange(nk).unsqueeze(0) < lengths.unsqueeze(1)  # (B, Nk)
    if kind in ("bool", "additive"):
        keep = torch.rand(b, 1, nq, nk, generator=g) < 0.7  # (B, 1, Nq, Nk)
        keep[..., 0] = True  # every query sees at least one key
        if kind == "bool":
            out["mask"] = keep
        else:
            bias = torch.randn(b, 1, nq, nk, generator=g)
            out["mask"] = bias.masked_fill(~keep, float("-inf")).to(dtype)
    return out


# -- configs ------------------------------------------------------------------------------------


def _closure(fn: Callable) -> dict[str, Any]:
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells))) if cells else {}


def _from_validator(validator: Any, default: Any) -> st.SearchStrategy | None:
    """A strategy for the values ``validator`` accepts, when it is one we can read."""
    if validator is None:
        return None
    inner = getattr(validator, "_validators", None)  # attrs.validators.and_
    if inner:
        for v in inner:
            found = _from_validator(v, default)
            if found is not None:  # the others are checked when the config is built
                return found
        return None
    options = getattr(validator, "options", None)  # attrs.validators.in_
    if options is not None:
        return st.sampled_from(list(options))
    qualname = getattr(validator, "__qualname__", "")
    env = _closure(validator) if callable(validator) and hasattr(validator, "__code__") else {}
    if qualname.startswith("one_of.") and "allowed" in env:
        return st.sampled_from(list(env["allowed"]))
    if qualname.startswith("in_range.") and {"lo", "hi", "integer"} <= set(env):
        lo, hi = env["lo"], env["hi"]
        if env["integer"] or (isinstance(default, int) and not isinstance(default, bool)):
            return st.integers(None if lo is None else math.ceil(lo), None if hi is None else math.floor(hi))
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    return None


def field_strategy(cls: type, attribute: attrs.Attribute, default: Any) -> st.SearchStrategy:
    """Values for one config field: from its validator, its type (bools), a nested config, else the default."""
    if attrs.has(type(default)):
        return configs(type(default), base=default)
    found = _from_validator(attribute.validator, default)
    if found is not None:
        return found
    try:
        tp = typing.get_type_hints(cls).get(attribute.name)
    except Exception:
        tp = attribute.type
    if tp is bool or tp == "bool" or isinstance(default, bool):
        return st.booleans()
    return st.just(default)


@st.composite
def configs(
    draw: Callable,
    config_class: type,
    base: Any = None,
    vary: Sequence[str] | None = None,
    fields: dict[str, st.SearchStrategy] | None = None,
) -> Any:
    """Valid variants of an attrs config: each field is kept or redrawn from its validator.

    Ints and floats come from ``in_range`` bounds, strings from ``one_of`` choices, bools
    from both values, nested configs recursively; other fields keep their value. ``base``
    (default: ``config_class()``) is the starting point; ``vary`` limits which fields change;
    ``fields`` gives the strategy of some fields (e.g. ``{"dim": st.sampled_from([16, 32])}``
    to keep models small).
    Changes are applied one at a time and any that would make the config invalid (a
    cross-field check such as "patch_size must divide image_size") is dropped, so every
    drawn config is valid and nothing is rejected.
    """
    cfg = base if base is not None else config_class()
    for a in attrs.fields(config_class):
        if (vary is not None and a.name not in vary) or not a.init or not draw(st.booleans()):
            continue
        given = (fields or {}).get(a.name)
        value = draw(given if given is not None else field_strategy(config_class, a, getattr(cfg, a.name)))
        try:
            cfg = attrs.evolve(cfg, **{a.name: value})
        except (ValueError, TypeError):
            continue
    return cfg
