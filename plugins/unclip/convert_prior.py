"""diffusers ``PriorTransformer`` → :class:`~.prior.DiffusionPrior` (``polymodal convert --from diffusers-prior``).

Reads a folder as ``save_pretrained`` writes it (``config.json`` + ``diffusion_pytorch_model.safetensors``;
never a pickle): the prior's own folder, or a pipeline folder holding it in ``prior/``. A
``prior_scheduler/`` (unCLIP) or ``scheduler/`` (Kandinsky prior) config beside it sets T, the beta schedule
and the x0 clipping range. The module names mirror diffusers': the block's ``attn1.to_q/k/v`` are fused
into ``attn.qkv``, ``attn1.to_out.0`` is ``attn.proj``, ``norm3`` is ``norm2``, ``ff.net.0.proj``/``ff.net.2``
are ``mlp.fc1``/``fc2`` and ``norm_out`` is the stack's final norm; every source tensor is used.

diffusers keeps no null text condition (its pipelines guide with the empty prompt's CLIP encodings), so the
converted model's learned ``null_text_embed``/``null_text_tokens`` are zeros: pass the empty prompt's
encodings as ``sample(..., null_text=...)``. A ``clip_std`` with zeros (diffusers' untrained placeholder) is
refused: such a checkpoint carries no embedding statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from polymodal.io.folders import LoadError, load_state_strict, read_json, read_state
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

from .prior import DiffusionPrior, PriorConfig

FIXED = {  # option → the values the prior expresses (diffusers' default first)
    "additional_embeddings": (4,),
    "time_embed_act_fn": ("silu",),
    "norm_in_type": (None, "layer"),
    "embedding_proj_norm_type": (None, "layer"),
    "encoder_hid_proj_type": ("linear",),
    "added_emb_type": ("prd",),
}
_SAME = (  # ours = theirs
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "proj_in",
    "embedding_proj_norm",
    "embedding_proj",
    "encoder_hidden_states_proj",
    "norm_in",
    "proj_to_clip_embeddings",
)
_BLOCK = {  # ours → theirs inside block i (the fused attn.qkv apart)
    "norm1": "norm1",
    "attn.proj": "attn1.to_out.0",
    "norm2": "norm3",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def _refuse(option: str, value: Any, allowed: Any, source: str) -> ValueError:
    return unsupported("prior", option, value, allowed, source)


def prior_config_from_diffusers(cfg: dict, source: str = "diffusers-prior") -> dict[str, Any]:
    """:class:`PriorConfig` fields from a ``PriorTransformer`` ``config.json``; unsupported options refused by name."""
    check_diffusers_class(cfg, "PriorTransformer", FIXED, converter="diffusers-prior", model="prior", source=source)
    heads, head_dim = int(cfg.get("num_attention_heads", 32)), int(cfg.get("attention_head_dim", 64))
    width, embed = heads * head_dim, int(cfg.get("embedding_dim", 768))
    for option, same in (("time_embed_dim", width), ("embedding_proj_dim", embed), ("clip_embed_dim", embed)):
        if cfg.get(option) not in (None, same):
            raise _refuse(option, cfg.get(option), f"None or {same}", source)
    return {
        "embed_dim": embed,
        "text_dim": embed,
        "text_len": int(cfg.get("num_embeddings", 77)),
        "width": width,
        "depth": int(cfg.get("num_layers", 20)),
        "heads": heads,
        "norm_in": cfg.get("norm_in_type") == "layer",
        "embed_norm": cfg.get("embedding_proj_norm_type") == "layer",
        "dropout": float(cfg.get("dropout", 0.0)),
    }


def prior_state_from_diffusers(src: dict[str, torch.Tensor], model: DiffusionPrior) -> dict[str, torch.Tensor]:
    """A ``PriorTransformer`` state dict in the names of ``model`` (a missing source key raises ``KeyError``)."""
    out: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    for key in own:
        prefix, _, kind = key.rpartition(".")
        if key.startswith("transformer.blocks."):
            _, _, i, sub = prefix.split(".", 3)
            base = f"transformer_blocks.{i}."
            if sub == "attn.qkv":
                parts = [src[f"{base}attn1.{p}.{kind}"] for p in ("to_q", "to_k", "to_v")]
                out[key] = torch.cat(parts)  # (3W, W) / (3W,)
            else:
                out[key] = src[f"{base}{_BLOCK[sub]}.{kind}"]
        elif prefix == "transformer.norm":
            out[key] = src[f"norm_out.{kind}"]
        elif prefix in _SAME or key in ("positional_embedding", "prd_embedding"):
            out[key] = src[key]
        elif key in ("clip_mean", "clip_std"):
            out[key] = src[key].reshape(-1)  # (E,) from (1, E)
        elif key == "stats_fitted":
            out[key] = torch.ones((), dtype=torch.bool)
        elif key in ("null_text_embed", "null_text_tokens"):
            out[key] = torch.zeros_like(own[key])  # diffusers has none: its pipelines pass the empty prompt
        else:  # pragma: no cover - a module added to the prior without a mapping
            raise KeyError(key)
    return out


def _prior_folder(src: Path) -> Path:
    """The folder holding the prior: ``src`` itself, or ``src/prior`` of a pipeline folder."""
    if not (src / "config.json").is_file() and (src / "prior" / "config.json").is_file():
        return src / "prior"
    return src


def _schedule_changes(src: Path, folder: Path, base: PriorConfig) -> dict[str, Any]:
    """Schedule and sampler fields from a scheduler config beside the prior (none: the defaults)."""
    for root in (src, folder.parent):
        for name in ("prior_scheduler", "scheduler"):
            path = root / name / "scheduler_config.json"
            if not path.is_file():
                continue
            sched, label = read_json(path), f"diffusers-prior ({path})"
            if not isinstance(sched, dict):
                raise LoadError(f"{path} is not a scheduler config (expected a JSON object)")
            kind, pred = sched.get("beta_schedule", "squaredcos_cap_v2"), sched.get("prediction_type", "sample")
            if kind not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
                raise _refuse("scheduler beta_schedule", kind, "linear, scaled_linear, squaredcos_cap_v2", label)
            if pred != "sample":
                raise _refuse("scheduler prediction_type", pred, "'sample' (x0)", label)
            schedule = attrs.evolve(
                base.schedule,
                kind=kind,
                timesteps=int(sched.get("num_train_timesteps", 1000)),
                beta_start=float(sched.get("beta_start", base.schedule.beta_start)),
                beta_end=float(sched.get("beta_end", base.schedule.beta_end)),
            )
            steps = min(base.sampler.steps, schedule.timesteps)
            sampler = attrs.evolve(
                base.sampler,
                steps=steps,
                clip_sample=bool(sched.get("clip_sample", True)),
                clip_range=float(sched.get("clip_sample_range", base.sampler.clip_range)),
            )
            return {"schedule": schedule, "sampler": sampler}
    return {}


def load_diffusers_prior(src: str | Path) -> DiffusionPrior:
    """The :class:`DiffusionPrior` holding the weights of the diffusers ``PriorTransformer`` folder ``src``."""
    src = Path(src)
    folder = _prior_folder(src)
    cfg, path = read_diffusers_folder(folder, "diffusers-prior")
    base = PriorConfig()
    fields = prior_config_from_diffusers(cfg, f"diffusers-prior ({folder / 'config.json'})")
    config = attrs.evolve(base, **fields, **_schedule_changes(src, folder, base))
    weights = TrackedState(read_state(path))
    model = DiffusionPrior(config)
    state = mapped_state(weights, model, prior_state_from_diffusers, path, "PriorTransformer")
    if not bool((state["clip_std"] != 0).all()):
        raise LoadError(
            f"{path}: clip_std has zeros (diffusers' untrained placeholder); expected the training set's std of "
            "the CLIP image embeddings (set them, e.g. prior.clip_std.data.fill_(1), before save_pretrained)"
        )
    load_state_strict(model, state, f"{folder} (converted from the diffusers PriorTransformer)")
    return model.eval()


@hf_converter("PriorTransformer", files=("config.json", DIFFUSERS_WEIGHTS, "prior_scheduler/scheduler_config.json"))
def convert_diffusers_prior(src: str | Path, dst: str | Path | None = None) -> DiffusionPrior:
    """Convert the diffusers ``PriorTransformer`` folder ``src`` into an ``unclip-prior`` model; writes a model
    folder to ``dst`` when given."""
    if dst is not None:
        check_output(dst, overwrite=True, flag="dst")
    model = load_diffusers_prior(src)
    if dst is not None:
        model.save(
            dst,
            source=f"converted from the diffusers PriorTransformer {src} with `polymodal convert --from diffusers-prior`",
        )
    return model


__all__ = [
    "convert_diffusers_prior",
    "load_diffusers_prior",
    "prior_config_from_diffusers",
    "prior_state_from_diffusers",
]
