"""What the diffusers autoencoder converters (``diffusers-vae``: AutoencoderKL; ``diffusers-movq``: VQModel) share.

Both read a trunk laid out as :mod:`polymodal.nn.autoencoder` lays it out, so a config translates by the same rules
(:func:`trunk_fields`) and weights by the same renaming (:func:`autoencoder_state`): ``down_blocks.i`` → ``down.i``,
``downsamplers.0.conv`` → ``downsample``, attention ``to_q/k/v`` fused into ``attn.qkv`` (the pre-0.14 names
``query``/``key``/``value``/``proj_attn`` read too), plus a converter's own renames.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from polymodal.io.hf import TrackedState

TRUNK_RENAMES: tuple[tuple[str, str], ...] = (  # ours → theirs, applied in order to one of our parameter names
    (r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1."),
    (r"^decoder\.up\.(\d+)\.", r"decoder.up_blocks.\1."),
    (r"^(encoder|decoder)\.mid\.", r"\1.mid_block."),
    (r"\.downsample\.", ".downsamplers.0.conv."),
    (r"\.upsample\.", ".upsamplers.0.conv."),
)
"""The trunk's renames, before a converter's own (its attention norms, a spatial norm's inner GroupNorm)."""

ATTENTION_OUT = (r"\.attentions\.(\d+)\.attn\.proj\.", r".attentions.\1.to_out.0.")
"""The attention output projection's rename, applied after a converter's own."""

DEPRECATED = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
"""diffusers' attention names before 0.14 (``_from_deprecated_attn_block``), read when the current ones are absent."""

_FUSED = re.compile(r"(.*\.attentions\.\d+\.)attn\.qkv\.(weight|bias)$")


def pipeline_folder(src: Path, sub: str) -> Path:
    """The folder holding the model: ``src`` itself, or ``src/sub`` of a pipeline folder (``vae``, ``movq``)."""
    if not (src / "config.json").is_file() and (src / sub / "config.json").is_file():
        return src / sub
    return src


def trunk_fields(cfg: dict, source: str, refuse: Callable[..., ValueError], attention_blocks: bool = False) -> dict:
    """The :class:`~polymodal.models.autoencoder.AutoencoderTrunkConfig` fields of a diffusers autoencoder config
    (image_size, channels, block_channels, layers_per_block, norm_groups, mid_attention) and, with
    ``attention_blocks``, the encoder's ``level_attention`` flags (``Attn…`` block types, the decoder mirroring
    them). Other block types, unequal input and output channels and a non-square size are refused through
    ``refuse(option, value, allowed, source)``."""
    widths = tuple(cfg.get("block_out_channels", (64,)))
    flags = {}
    for option, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(option, (kind,)))
        allowed = (kind, f"Attn{kind}") if attention_blocks else (kind,)
        for found in types:
            if found not in allowed:
                raise refuse(
                    f"{option} entry", found, ", ".join(map(repr, allowed)) if attention_blocks else kind, source
                )
        if len(types) != len(widths):
            raise ValueError(f"{source}: {option} {types} needs one entry per block_out_channels {widths}")
        flags[option] = tuple(t.startswith("Attn") for t in types)
    attention = flags["down_block_types"]
    if flags["up_block_types"] != attention[::-1]:  # the decoder mirrors the encoder's attention levels
        mirrored = [("Attn" if a else "") + "UpDecoderBlock2D" for a in attention[::-1]]
        raise refuse("up_block_types", list(cfg["up_block_types"]), f"the down blocks mirrored, {mirrored}", source)
    cin, cout = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if cin != cout:
        raise refuse("out_channels", cout, f"in_channels={cin}", source)
    size = cfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise refuse("sample_size", size, "a square size", source)
        size = size[0]
    fields = dict(
        image_size=int(size),
        channels=int(cin),
        block_channels=widths,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        mid_attention=bool(cfg.get("mid_block_add_attention", True)),
    )
    if attention_blocks:
        fields["level_attention"] = attention if any(attention) else ()
    return fields


def lookup(src: TrackedState, key: str) -> torch.Tensor:
    """``src[key]``, else the same attention tensor under its pre-0.14 name; KeyError naming ``key``."""
    if key in src:
        return src[key]
    for new, old in DEPRECATED.items():
        alt = key.replace(f".{new}.", f".{old}.")
        if alt != key and alt in src:
            return src[alt]
    raise KeyError(key)


def autoencoder_state(
    src: TrackedState, keys: Iterable[str], renames: Iterable[tuple[str, str]] = (), given: dict | None = None
) -> dict[str, torch.Tensor]:
    """A diffusers autoencoder's state dict in our names ``keys``: each key renamed by :data:`TRUNK_RENAMES`, then
    ``renames``, then :data:`ATTENTION_OUT`, and looked up in ``src`` (a missing one raises ``KeyError`` naming it);
    the attention's ``to_q``, ``to_k`` and ``to_v`` concatenated into ``qkv``. Keys in ``given`` take its tensors."""
    rules = (*TRUNK_RENAMES, *renames, ATTENTION_OUT)
    given = given or {}
    out: dict[str, Any] = {}
    for key in keys:
        if key in given:
            out[key] = given[key]
            continue
        theirs = key
        for pattern, repl in rules:
            theirs = re.sub(pattern, repl, theirs)
        fused = _FUSED.match(theirs)
        if fused:
            base, kind = fused.groups()
            out[key] = torch.cat([lookup(src, f"{base}{p}.{kind}") for p in ("to_q", "to_k", "to_v")])  # (3C, C)
        else:
            out[key] = lookup(src, theirs)
    return out


__all__ = ["DEPRECATED", "TRUNK_RENAMES", "autoencoder_state", "lookup", "pipeline_folder", "trunk_fields"]
