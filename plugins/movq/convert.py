"""diffusers ``VQModel(norm_type="spatial")`` → a ``movq`` model folder.

``polymodal convert --from diffusers-movq SRC DST`` reads a folder as ``save_pretrained`` writes it
(``config.json`` + ``diffusion_pytorch_model.safetensors``; never a pickle): the model's own folder, or a pipeline
folder holding it in ``movq/`` (as Kandinsky 2.1's). Supported: ``norm_type="spatial"``, ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` levels or their ``Attn`` forms (the decoder's mirroring the encoder's, as Kandinsky 2.1's),
SiLU, a codebook as wide as the latent (``vq_embed_dim`` unset or equal to ``latent_channels``: the spatial norms
are conditioned on it), with or without the middle attention, a square ``sample_size`` and equal input and output
channels; anything else (``norm_type="group"``, other block types, unmirrored attention levels,
``lookup_from_codebook``) is refused by name. The decoder's spatial norms have diffusers' fixed 32 groups
(``decoder_norm_groups=32``). ``scaling_factor`` is not carried: Kandinsky 2.1's pipelines decode the latents as
they are. The codebook ``quantize.embedding.weight`` becomes the EMA codebook's codes (counts of one each, as
initialised). Module names mirror diffusers' (``down_blocks.i`` → ``down.i``, ``SpatialNorm.norm_layer`` → ``norm``,
attention ``to_q/k/v`` fused into ``attn.qkv``), so every source tensor must be used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from polymodal.io.folders import load_state_strict, read_state
from polymodal.io.hf import (
    DIFFUSERS_WEIGHTS,
    TrackedState,
    check_diffusers_class,
    hf_converter,
    mapped_state,
    read_diffusers_folder,
    unsupported,
)
from polymodal.io.output import check_output

from .model import MoVQ, MoVQConfig

SPATIAL_NORM_GROUPS = 32
"""GroupNorm groups of diffusers' ``SpatialNorm`` (fixed there, whatever ``norm_num_groups`` says)."""

FIXED = {  # option → the values the model expresses (diffusers' default first)
    "act_fn": ("silu", "swish"),
    "lookup_from_codebook": (False,),
}


def _refuse(option: str, value: Any, allowed: Any, source: str) -> ValueError:
    return unsupported("MoVQ", option, value, allowed, source)


def movq_config_from_diffusers(cfg: dict, source: str = "diffusers-movq") -> MoVQConfig:
    """Translate a diffusers ``VQModel`` config dict (``config.json``); unsupported options are refused by name."""
    check_diffusers_class(cfg, "VQModel", FIXED, converter="diffusers-movq", model="MoVQ", source=source)
    norm = cfg.get("norm_type", "group")  # diffusers' default: a plain VQ-GAN decoder, not a MoVQ
    if norm != "spatial":
        raise _refuse("norm_type", norm, "'spatial'", source)
    widths = tuple(cfg.get("block_out_channels", (64,)))
    flags = {}
    for option, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(option, (kind,)))
        for found in types:
            if found not in (kind, f"Attn{kind}"):
                raise _refuse(f"{option} entry", found, f"{kind!r}, 'Attn{kind}'", source)
        if len(types) != len(widths):
            raise ValueError(f"{source}: {option} {types} needs one entry per block_out_channels {widths}")
        flags[option] = tuple(t.startswith("Attn") for t in types)
    attention = flags["down_block_types"]
    if flags["up_block_types"] != attention[::-1]:  # the decoder mirrors the encoder's attention levels
        mirrored = [("Attn" if a else "") + "UpDecoderBlock2D" for a in attention[::-1]]
        raise _refuse("up_block_types", list(cfg["up_block_types"]), f"the down blocks mirrored, {mirrored}", source)
    latent = int(cfg.get("latent_channels", 3))
    dim = cfg.get("vq_embed_dim")
    if dim is not None and dim != latent:
        raise _refuse("vq_embed_dim", dim, f"None or latent_channels={latent}", source)
    cin, cout = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if cin != cout:
        raise _refuse("out_channels", cout, f"in_channels={cin}", source)
    size = cfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse("sample_size", size, "a square size", source)
        size = size[0]
    return MoVQConfig(
        image_size=int(size),
        channels=int(cin),
        block_channels=widths,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        latent_channels=latent,
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        decoder_norm_groups=SPATIAL_NORM_GROUPS,
        mid_attention=bool(cfg.get("mid_block_add_attention", True)),
        level_attention=attention if any(attention) else (),
        codebook_size=int(cfg.get("num_vq_embeddings", 256)),
    )


_RENAMES = (  # ours → theirs, applied in order to one of our parameter names
    (r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1."),
    (r"^decoder\.up\.(\d+)\.", r"decoder.up_blocks.\1."),
    (r"^(encoder|decoder)\.mid\.", r"\1.mid_block."),
    (r"\.downsample\.", ".downsamplers.0.conv."),
    (r"\.upsample\.", ".upsamplers.0.conv."),
    (r"^encoder\.(.*)\.attentions\.(\d+)\.norm\.", r"encoder.\1.attentions.\2.group_norm."),
    (r"^decoder\.(.*)\.attentions\.(\d+)\.norm\.", r"decoder.\1.attentions.\2.spatial_norm."),
    (r"\.attentions\.(\d+)\.attn\.proj\.", r".attentions.\1.to_out.0."),
    (r"^decoder\.(.*)\.norm\.(weight|bias)$", r"decoder.\1.norm_layer.\2"),  # a SpatialNorm's GroupNorm
)
_DEPRECATED = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
"""diffusers' attention names before 0.14 (``_from_deprecated_attn_block``), read when the current ones are absent."""


def _theirs(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _lookup(src: TrackedState, key: str) -> torch.Tensor:
    """``src[key]``, else the same attention tensor under its pre-0.14 name; KeyError naming ``key``."""
    if key in src:
        return src[key]
    for new, old in _DEPRECATED.items():
        alt = key.replace(f".{new}.", f".{old}.")
        if alt != key and alt in src:
            return src[alt]
    raise KeyError(key)


def movq_state_from_diffusers(src: TrackedState, model: MoVQ) -> dict[str, torch.Tensor]:
    """A ``VQModel`` state dict in the names of ``model`` (built by :func:`movq_config_from_diffusers`).

    Every key of ``model`` is looked up in ``src`` (a missing one raises ``KeyError`` naming it); the attention's
    ``to_q``, ``to_k`` and ``to_v`` are concatenated into ``qkv``; the codebook's codes (and EMA sums) are
    ``quantize.embedding.weight``, its counts one each, no step idle and initialised.
    """
    codes = _lookup(src, "quantize.embedding.weight")  # (K, L)
    book = {
        "codebook.embed": codes,
        "codebook.embed_sum": codes.clone(),
        "codebook.cluster_size": torch.ones(codes.shape[0]),
        "codebook.idle": torch.zeros(codes.shape[0], dtype=torch.long),
        "codebook.initted": torch.ones((), dtype=torch.bool),
    }
    out = {}
    for key in model.state_dict():
        if key in book:
            out[key] = book[key]
            continue
        theirs = _theirs(key)
        fused = re.match(r"(.*\.attentions\.\d+\.)attn\.qkv\.(weight|bias)$", theirs)
        if fused:
            base, kind = fused.groups()
            out[key] = torch.cat(
                [_lookup(src, f"{base}{p}.{kind}") for p in ("to_q", "to_k", "to_v")]
            )  # (3C, C) / (3C,)
        else:
            out[key] = _lookup(src, theirs)
    return out


def _movq_folder(src: Path) -> Path:
    """The folder holding the MoVQ: ``src`` itself, or ``src/movq`` of a pipeline folder."""
    if not (src / "config.json").is_file() and (src / "movq" / "config.json").is_file():
        return src / "movq"
    return src


def load_diffusers_movq(src: str | Path) -> MoVQ:
    """A ``MoVQ`` holding the weights of the diffusers ``VQModel`` folder ``src`` (or ``src/movq``), in eval mode."""
    folder = _movq_folder(Path(src))
    cfg, path = read_diffusers_folder(folder, "diffusers-movq")
    weights = TrackedState(read_state(path))
    model = MoVQ(movq_config_from_diffusers(cfg, f"diffusers-movq ({folder / 'config.json'})"))
    state = mapped_state(weights, model, movq_state_from_diffusers, path, "VQModel")
    load_state_strict(model, state, f"{folder} (converted from the diffusers VQModel)")
    return model.eval()


@hf_converter("VQModel", files=("config.json", DIFFUSERS_WEIGHTS))
def convert_diffusers_movq(src: str | Path, dst: str | Path | None = None) -> MoVQ:
    """Convert the diffusers ``VQModel(norm_type="spatial")`` folder ``src`` (or a pipeline's ``src/movq``) into a
    ``movq`` model with the same latents, codes and decoded images (mapped from [-1, 1] to [0, 1]), quantised or
    not; writes a model folder to ``dst`` when given."""
    src = Path(src)
    if dst is not None:
        check_output(dst, overwrite=True, flag="dst")
    model = load_diffusers_movq(src)
    if dst is not None:
        folder = _movq_folder(src)
        model.save(
            dst,
            source=f"converted from the diffusers VQModel {folder} with `polymodal convert --from diffusers-movq`",
        )
    return model


__all__ = [
    "convert_diffusers_movq",
    "load_diffusers_movq",
    "movq_config_from_diffusers",
    "movq_state_from_diffusers",
]
