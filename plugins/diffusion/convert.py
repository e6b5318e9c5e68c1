"""diffusers ``UNet2DModel`` → the core :class:`~polymodal.nn.UNet` and a ``diffusion`` model folder.

``polymodal convert --from diffusers-unet SRC DST`` reads a folder as ``save_pretrained`` writes it
(``config.json`` + ``diffusion_pytorch_model.safetensors``; never a pickle): the UNet's own folder
(of a pipeline: ``polymodal convert --from diffusers-unet PIPELINE/unet DST``; the Python functions
also take the pipeline folder itself). A ``scheduler/scheduler_config.json`` beside the UNet sets the
noise schedule (beta schedule, T, betas, prediction type); a class-embedding UNet becomes a
``condition='label'`` model. Supported: the block types ``DownBlock2D``, ``AttnDownBlock2D``, ``UpBlock2D``,
``AttnUpBlock2D`` (mirrored), ``UNetMidBlock2D``, positional time embeddings, class embeddings
(``num_class_embeds``) and both ``resnet_time_scale_shift`` modes; anything else is refused by name.
The UNet names mirror diffusers' (``down_blocks.i`` → ``down.i``, attention ``to_q/k/v`` fused into
``attn.qkv``), so the conversion is a renaming and every source tensor must be used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from polymodal.io.folders import load_state_strict, read_json, read_state
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
from polymodal.nn import UNet, UNetConfig

DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# option → the only value(s) the core UNet expresses (diffusers' default first)
FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_padding": (1,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
}


def _refuse(option: str, value: Any, allowed: Any, source: str) -> ValueError:
    return unsupported("core UNet", option, value, allowed, source)


def unet_config_from_diffusers(cfg: dict, source: str = "diffusers-unet") -> UNetConfig:
    """Translate a diffusers ``UNet2DModel`` config dict (``config.json``); unsupported options are refused by name."""
    check_diffusers_class(cfg, "UNet2DModel", FIXED, converter="diffusers-unet", model="core UNet", source=source)
    down = list(cfg.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up = list(cfg.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    for option, types, known in (("down_block_types", down, DOWN), ("up_block_types", up, UP)):
        for kind in types:
            if kind not in known:
                raise _refuse(f"{option} entry", kind, ", ".join(known), source)
    attend = [DOWN[k] for k in down]
    if [UP[k] for k in reversed(up)] != attend:
        raise _refuse("up_block_types", up, "the mirror of down_block_types (attention at the same levels)", source)
    channels = tuple(cfg.get("block_out_channels", (224, 448, 672, 896)))
    if len(channels) != len(down) or len(up) != len(down):
        raise ValueError(
            f"{source}: block_out_channels {channels}, down_block_types {down} and up_block_types {up} "
            "must have one entry per level"
        )
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise _refuse("norm_num_groups", None, "an integer", source)
    attn_groups = cfg.get("attn_norm_num_groups")
    scale_shift = cfg.get("resnet_time_scale_shift", "default") == "scale_shift"
    # diffusers' middle attention has no GroupNorm with scale_shift unless attn_norm_num_groups is given
    if attn_groups not in ((None, groups) if not scale_shift else (groups,)):
        need = f"None or norm_num_groups={groups}" if not scale_shift else f"norm_num_groups={groups} with scale_shift"
        raise _refuse("attn_norm_num_groups", attn_groups, need, source)
    time_dim = cfg.get("time_embedding_dim")
    if time_dim not in (None, 4 * channels[0]):
        raise _refuse("time_embedding_dim", time_dim, f"None or 4 × block_out_channels[0] = {4 * channels[0]}", source)
    head_dim = cfg.get("attention_head_dim", 8)
    if head_dim is None:  # diffusers: one head as wide as the level; the core has one head width for all sites
        widths = {c for c, a in zip(channels, attend, strict=True) if a} | {channels[-1]}
        if len(widths) != 1:
            raise _refuse("attention_head_dim", None, "an integer (or attention sites of one width)", source)
        head_dim = widths.pop()
    freq_shift = cfg.get("freq_shift", 0)
    if freq_shift not in (0, 1):
        raise _refuse("freq_shift", freq_shift, "0 or 1", source)
    size = cfg.get("sample_size") or 32
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse("sample_size", size, "a square size", source)
        size = size[0]
    return UNetConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        sample_size=int(size),
        channels=channels,
        layers_per_block=cfg.get("layers_per_block", 2),
        attention_levels=tuple(attend),
        attention_head_dim=head_dim,
        norm_groups=groups,
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=int(freq_shift),
        scale_shift=scale_shift,
        num_classes=cfg.get("num_class_embeds") or 0,
        dropout=float(cfg.get("dropout", 0.0)),
    )


_RENAMES = (  # ours → theirs, applied in order to one of our parameter names
    (r"^down\.(\d+)\.", r"down_blocks.\1."),
    (r"^up\.(\d+)\.", r"up_blocks.\1."),
    (r"^mid\.", "mid_block."),
    (r"^down_blocks\.(\d+)\.sampler\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^up_blocks\.(\d+)\.sampler\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.group_norm."),
    (r"\.attentions\.(\d+)\.attn\.proj\.", r".attentions.\1.to_out.0."),
)


def _theirs(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def unet_state_from_diffusers(src: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict in the names of ``model`` (built by :func:`unet_config_from_diffusers`).

    Every key of ``model`` is looked up in ``src`` (a missing one raises ``KeyError`` naming it);
    the attention's ``to_q``, ``to_k`` and ``to_v`` are concatenated into ``qkv``.
    """
    out = {}
    for key in model.state_dict():
        theirs = _theirs(key)
        fused = re.match(r"(.*\.attentions\.\d+\.)attn\.qkv\.(weight|bias)$", theirs)
        if fused:
            base, kind = fused.groups()
            out[key] = torch.cat([src[f"{base}{p}.{kind}"] for p in ("to_q", "to_k", "to_v")])  # (3C, C) / (3C,)
        else:
            out[key] = src[theirs]
    return out


def _unet_folder(src: Path) -> Path:
    """The folder holding the UNet: ``src`` itself, or ``src/unet`` of a pipeline folder."""
    if not (src / "config.json").is_file() and (src / "unet" / "config.json").is_file():
        return src / "unet"
    return src


def load_diffusers_unet(src: str | Path) -> tuple[UNet, dict[str, Any]]:
    """The core UNet holding the weights of the diffusers ``UNet2DModel`` folder ``src``, and its config dict."""
    folder = _unet_folder(Path(src))
    cfg, path = read_diffusers_folder(folder, "diffusers-unet")
    weights = TrackedState(read_state(path))
    unet = UNet(unet_config_from_diffusers(cfg, f"diffusers-unet ({folder / 'config.json'})"))
    state = mapped_state(weights, unet, unet_state_from_diffusers, path, "UNet2DModel")
    load_state_strict(unet, state, f"{folder} (converted from the diffusers UNet2DModel)")
    return unet.eval(), cfg


def schedule_overrides_from_diffusers(sched: dict, source: str = "diffusers-unet") -> dict[str, Any]:
    """ScheduleConfig fields from a diffusers DDPM/DDIM ``scheduler_config.json`` (unsupported ones refused)."""
    kinds = ("linear", "scaled_linear", "squaredcos_cap_v2")
    kind = sched.get("beta_schedule", "linear")
    if kind not in kinds:
        raise _refuse("scheduler beta_schedule", kind, ", ".join(kinds), source)
    if sched.get("trained_betas") is not None:
        raise _refuse("scheduler trained_betas", "a list", "None", source)
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction"):
        raise _refuse("scheduler prediction_type", prediction, "epsilon, sample, v_prediction", source)
    return {
        "kind": kind,
        "timesteps": int(sched.get("num_train_timesteps", 1000)),
        "beta_start": float(sched.get("beta_start", 1e-4)),
        "beta_end": float(sched.get("beta_end", 0.02)),
        "prediction": prediction,
    }


def _scheduler_config(src: Path, folder: Path) -> dict | None:
    for path in (src / "scheduler" / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if path.is_file():
            found = read_json(path)
            return found if isinstance(found, dict) else None
    return None


@hf_converter("UNet2DModel", files=("config.json", DIFFUSERS_WEIGHTS, "scheduler/scheduler_config.json"))
def convert_diffusers_unet(src: str | Path, dst: str | Path | None = None):
    """Convert the diffusers ``UNet2DModel`` folder ``src`` into a ``diffusion`` model (an unconditional
    DDPM whose UNet holds the weights; a ``scheduler/`` config next to it sets the noise schedule);
    writes a model folder to ``dst`` when given."""
    import attrs

    from .config import DiffusionConfig
    from .model import DiffusionModel

    src = Path(src)
    if dst is not None:
        check_output(dst, overwrite=True, flag="dst")
    unet, cfg = load_diffusers_unet(src)
    folder = _unet_folder(src)
    base = DiffusionConfig()
    changes: dict[str, Any] = {"unet": unet.cfg}
    sched = _scheduler_config(src, folder)
    if sched is not None:
        overrides = schedule_overrides_from_diffusers(sched, f"diffusers-unet ({folder.parent / 'scheduler'})")
        changes["schedule"] = attrs.evolve(base.schedule, **overrides)
    if unet.cfg.num_classes and "condition" in attrs.fields_dict(type(base)):
        changes["condition"] = "label"
    model = DiffusionModel(attrs.evolve(base, **changes))
    load_state_strict(model.unet, unet.state_dict(), f"{folder} (converted from the diffusers UNet2DModel)")
    model.eval()
    if dst is not None:
        model.save(
            dst,
            source=f"converted from the diffusers UNet2DModel {folder} with `polymodal convert --from diffusers-unet`",
        )
    return model


__all__ = [
    "convert_diffusers_unet",
    "load_diffusers_unet",
    "schedule_overrides_from_diffusers",
    "unet_config_from_diffusers",
    "unet_state_from_diffusers",
]
