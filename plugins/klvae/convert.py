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

from pathlib import Path
from typing import Any

import torch

from polymodal.io.diffusers_autoencoder import autoencoder_state, pipeline_folder, trunk_fields
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
    return KLVAEConfig(
        **trunk_fields(cfg, source, _refuse),
        latent_channels=int(cfg.get("latent_channels", 4)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
    )


_RENAMES = ((r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.group_norm."),)  # after the trunk's


def vae_state_from_diffusers(src: TrackedState, model: KLVAE) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict in the names of ``model`` (built by :func:`vae_config_from_diffusers`):
    :func:`polymodal.io.diffusers_autoencoder.autoencoder_state` (a missing key raises ``KeyError`` naming it)."""
    return autoencoder_state(src, model.state_dict(), _RENAMES)


def load_diffusers_vae(src: str | Path) -> KLVAE:
    """A ``KLVAE`` holding the weights of the diffusers ``AutoencoderKL`` folder ``src`` (or ``src/vae``), in eval mode."""
    folder = pipeline_folder(Path(src), "vae")
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
        folder = pipeline_folder(src, "vae")
        model.save(
            dst,
            source=f"converted from the diffusers AutoencoderKL {folder} with `polymodal convert --from diffusers-vae`",
        )
    return model


__all__ = ["convert_diffusers_vae", "load_diffusers_vae", "vae_config_from_diffusers", "vae_state_from_diffusers"]
