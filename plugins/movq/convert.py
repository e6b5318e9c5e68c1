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

from pathlib import Path
from typing import Any

import torch

from polymodal.io.diffusers_autoencoder import autoencoder_state, lookup, pipeline_folder, trunk_fields
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
    trunk = trunk_fields(cfg, source, _refuse, attention_blocks=True)
    latent = int(cfg.get("latent_channels", 3))
    dim = cfg.get("vq_embed_dim")
    if dim is not None and dim != latent:
        raise _refuse("vq_embed_dim", dim, f"None or latent_channels={latent}", source)
    return MoVQConfig(
        **trunk,
        latent_channels=latent,
        decoder_norm_groups=SPATIAL_NORM_GROUPS,
        codebook_size=int(cfg.get("num_vq_embeddings", 256)),
    )


_RENAMES = (  # after the trunk's: the encoder's attention norms, the decoder's spatial ones and their GroupNorms
    (r"^encoder\.(.*)\.attentions\.(\d+)\.norm\.", r"encoder.\1.attentions.\2.group_norm."),
    (r"^decoder\.(.*)\.attentions\.(\d+)\.norm\.", r"decoder.\1.attentions.\2.spatial_norm."),
    (r"^decoder\.(.*)\.norm\.(weight|bias)$", r"decoder.\1.norm_layer.\2"),
)


def movq_state_from_diffusers(src: TrackedState, model: MoVQ) -> dict[str, torch.Tensor]:
    """A ``VQModel`` state dict in the names of ``model`` (built by :func:`movq_config_from_diffusers`).

    Every key of ``model`` is looked up in ``src`` (a missing one raises ``KeyError`` naming it); the attention's
    ``to_q``, ``to_k`` and ``to_v`` are concatenated into ``qkv``; the codebook's codes (and EMA sums) are
    ``quantize.embedding.weight``, its counts one each, no step idle and initialised.
    """
    codes = lookup(src, "quantize.embedding.weight")  # (K, L)
    book = {
        "codebook.embed": codes,
        "codebook.embed_sum": codes.clone(),
        "codebook.cluster_size": torch.ones(codes.shape[0]),
        "codebook.idle": torch.zeros(codes.shape[0], dtype=torch.long),
        "codebook.initted": torch.ones((), dtype=torch.bool),
    }
    return autoencoder_state(src, model.state_dict(), _RENAMES, given=book)


def load_diffusers_movq(src: str | Path) -> MoVQ:
    """A ``MoVQ`` holding the weights of the diffusers ``VQModel`` folder ``src`` (or ``src/movq``), in eval mode."""
    folder = pipeline_folder(Path(src), "movq")
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
        folder = pipeline_folder(src, "movq")
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
