"""diffusers ``AutoencoderKL`` → a ``klvae`` model folder.

``polymodal convert --from diffusers-vae SRC DST`` reads a folder as ``save_pretrained`` writes it
(``config.json`` + ``diffusion_pytorch_model.safetensors``; never a pickle): the VAE's own folder, or a pipeline
folder holding it in ``vae/``. Supported: ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` levels, SiLU, the 1×1
``quant_conv`` / ``post_quant_conv``, with or without the middle attention, square ``sample_size`` (the model's
image size) and equal input and output channels; anything else (a ``shift_factor``, per-channel latent
statistics, other block types) is refused by name. ``scaling_factor`` is carried over. The model's module names
mirror diffusers' (``down_blocks.i`` → ``down.i``, ``downsamplers.0.conv`` → ``downsample``, attention
``to_q/k/v`` fused into ``attn.qkv``; the pre-0.14 names ``query``/``key``/``value``/``proj_attn`` are read
too), so the conversion is a renaming and every source tensor must be used.
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

from .model import KLVAE, KLVAEConfig

FIXED = {  # option → the values the model expresses (diffusers' default first)
    "act_fn": ("silu", "swish"),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "shift_factor": (None, 0, 0.0),
    "latents_mean": (None,),
    "latents_std": (None,),
}


def _refuse(option: str, value: Any, allowed: Any, source: str) -> ValueError:
    return unsupported("KL-VAE", option, value, allowed, source)


def vae_config_from_diffusers(cfg: dict, source: str = "diffusers-vae") -> KLVAEConfig:
    """Translate a diffusers ``AutoencoderKL`` config dict (``config.json``); unsupported options are refused by name."""
    check_diffusers_class(cfg, "AutoencoderKL", FIXED, converter="diffusers-vae", model="KL-VAE", source=source)
    widths = tuple(cfg.get("block_out_channels", (64,)))
    for option, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(option, (kind,)))
        for found in types:
            if found != kind:
                raise _refuse(f"{option} entry", found, kind, source)
        if len(types) != len(widths):
            raise ValueError(f"{source}: {option} {types} needs one entry per block_out_channels {widths}")
    cin, cout = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if cin != cout:
        raise _refuse("out_channels", cout, f"in_channels={cin}", source)
    size = cfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse("sample_size", size, "a square size", source)
        size = size[0]
    return KLVAEConfig(
        image_size=int(size),
        channels=int(cin),
        block_channels=widths,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        mid_attention=bool(cfg.get("mid_block_add_attention", True)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
    )


_RENAMES = (  # ours → theirs, applied in order to one of our parameter names
    (r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1."),
    (r"^decoder\.up\.(\d+)\.", r"decoder.up_blocks.\1."),
    (r"^(encoder|decoder)\.mid\.", r"\1.mid_block."),
    (r"\.downsample\.", ".downsamplers.0.conv."),
    (r"\.upsample\.", ".upsamplers.0.conv."),
    (r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.group_norm."),
    (r"\.attentions\.(\d+)\.attn\.proj\.", r".attentions.\1.to_out.0."),
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


def vae_state_from_diffusers(src: TrackedState, model: KLVAE) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict in the names of ``model`` (built by :func:`vae_config_from_diffusers`).

    Every key of ``model`` is looked up in ``src`` (a missing one raises ``KeyError`` naming it); the attention's
    ``to_q``, ``to_k`` and ``to_v`` are concatenated into ``qkv``.
    """
    out = {}
    for key in model.state_dict():
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


def _vae_folder(src: Path) -> Path:
    """The folder holding the VAE: ``src`` itself, or ``src/vae`` of a pipeline folder."""
    if not (src / "config.json").is_file() and (src / "vae" / "config.json").is_file():
        return src / "vae"
    return src


def load_diffusers_vae(src: str | Path) -> KLVAE:
    """A ``KLVAE`` holding the weights of the diffusers ``AutoencoderKL`` folder ``src`` (or ``src/vae``), in eval mode."""
    folder = _vae_folder(Path(src))
    cfg, path = read_diffusers_folder(folder, "diffusers-vae")
    weights = TrackedState(read_state(path))
    model = KLVAE(vae_config_from_diffusers(cfg, f"diffusers-vae ({folder / 'config.json'})"))
    state = mapped_state(weights, model, vae_state_from_diffusers, path, "AutoencoderKL")
    load_state_strict(model, state, f"{folder} (converted from the diffusers AutoencoderKL)")
    return model.eval()


@hf_converter("AutoencoderKL", files=("config.json", DIFFUSERS_WEIGHTS))
def convert_diffusers_vae(src: str | Path, dst: str | Path | None = None) -> KLVAE:
    """Convert the diffusers ``AutoencoderKL`` folder ``src`` (or a pipeline's ``src/vae``) into a ``klvae`` model
    with the same encode mean / log-variance and decode output (images mapped from [-1, 1] to [0, 1]) and the
    same ``scaling_factor``; writes a model folder to ``dst`` when given."""
    src = Path(src)
    if dst is not None:
        check_output(dst, overwrite=True, flag="dst")
    model = load_diffusers_vae(src)
    if dst is not None:
        folder = _vae_folder(src)
        model.save(
            dst,
            source=f"converted from the diffusers AutoencoderKL {folder} with `polymodal convert --from diffusers-vae`",
        )
    return model


__all__ = ["convert_diffusers_vae", "load_diffusers_vae", "vae_config_from_diffusers", "vae_state_from_diffusers"]
