"""Transformers ``ViTMAEForPreTraining`` ↔ the ``mae`` family: config and weight translation.

Reads the naming schemes transformers has used for ViTMAE layers (``encoder.layer.i.attention.
attention.query`` … as saved files spell them, ``layers.i.attention.q_proj`` … in 5.x modules; the
decoder's list as ``decoder_layers`` or ``decoder_encoder.layer``). The fixed sin-cos tables of
ViTMAE (columns before rows in the channel layout) are copied into ``learned`` position tables, so
the converted model reproduces the source exactly; nothing is unpickled. The key maps
(:func:`mae_config_from_hf`, :func:`mae_state_from_hf`) are the core :class:`~polymodal.nn.mae.MAE`'s;
they also ride on the registered converter (``hf_config``, ``hf_state``), so PIXEL, which reads a
ViTMAE as its core MAE, reaches them through the registry (a family never imports another).
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.io.hf import activation, convert_hf_folder, hf_converter, mlp_ratio_for, square_side
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.nn.mae import MAEConfig

from .model import MAEModel, MAEModelConfig

# ours → (5.x name, 4.x name) inside one layer
_LAYER = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}
_QKV = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
)


def mae_config_from_hf(hf: dict, source: str = "hf-vitmae") -> MAEConfig:
    """Translate a transformers ``ViTMAEConfig`` dict (as in ``config.json``)."""
    dim, ddim = hf.get("hidden_size", 768), hf.get("decoder_hidden_size", 512)
    encoder = ViTEncoderConfig(
        image_size=square_side(hf, "image_size", 224, source),
        patch_size=square_side(hf, "patch_size", 16, source),
        channels=hf.get("num_channels", 3),
        depth=hf.get("num_hidden_layers", 12),
        pos_embed="learned",
        block=BlockConfig(
            dim=dim,
            heads=hf.get("num_attention_heads", 12),
            mlp_ratio=mlp_ratio_for(dim, hf.get("intermediate_size", 4 * dim), source),
            act=activation(hf, source),
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            qkv_bias=hf.get("qkv_bias", True),
        ),
    )
    return MAEConfig(
        encoder=encoder,
        decoder_dim=ddim,
        decoder_depth=hf.get("decoder_num_hidden_layers", 8),
        decoder_heads=hf.get("decoder_num_attention_heads", 16),
        decoder_mlp_ratio=mlp_ratio_for(ddim, hf.get("decoder_intermediate_size", 4 * ddim), source),
        decoder_pos_embed="learned",
        mask_ratio=hf.get("mask_ratio", 0.75),
        norm_pix_loss=hf.get("norm_pix_loss", False),
    )


def _layers(src: dict[str, torch.Tensor], theirs: str, ours: str, depth: int) -> dict[str, torch.Tensor]:
    """One stack's blocks: ``theirs`` is the layer-list prefix in the source (``vit.layers.`` …)."""
    out = {}
    for i in range(depth):
        hf, pm = f"{theirs}{i}.", f"{ours}{i}."
        scheme = 0 if hf + _QKV[0][0] + ".weight" in src else 1
        qkv = [hf + n for n in _QKV[scheme]]
        out[pm + "attn.qkv.weight"] = torch.cat([src[n + ".weight"] for n in qkv])
        if qkv[0] + ".bias" in src:
            out[pm + "attn.qkv.bias"] = torch.cat([src[n + ".bias"] for n in qkv])
        for mine, names in _LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{pm}{mine}.{kind}"] = src[f"{hf}{names[scheme]}.{kind}"]
    return out


def _prefix(src: dict[str, torch.Tensor], candidates: tuple[str, ...]) -> str:
    """The first of ``candidates`` some source key starts with (the first one when none does)."""
    return next((c for c in candidates if any(k.startswith(c) for k in src)), candidates[0])


def mae_state_from_hf(src: dict[str, torch.Tensor], depth: int, decoder_depth: int) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a ``ViTMAEForPreTraining`` state dict into :class:`MAE`'s names."""
    layers = _prefix(src, ("vit.layers.", "vit.encoder.layer."))
    decoder_layers = _prefix(src, ("decoder.decoder_layers.", "decoder.decoder_encoder.layer."))
    out = {
        "encoder.cls_token": src["vit.embeddings.cls_token"],
        "encoder.pos_embed.weight": src["vit.embeddings.position_embeddings"],
        "encoder.patch_embed.proj.weight": src["vit.embeddings.patch_embeddings.projection.weight"],
        "encoder.patch_embed.proj.bias": src["vit.embeddings.patch_embeddings.projection.bias"],
        "encoder.blocks.norm.weight": src["vit.layernorm.weight"],
        "encoder.blocks.norm.bias": src["vit.layernorm.bias"],
        "mask_token": src["decoder.mask_token"],
        "decoder_pos.weight": src["decoder.decoder_pos_embed"],
        "decoder.norm.weight": src["decoder.decoder_norm.weight"],
        "decoder.norm.bias": src["decoder.decoder_norm.bias"],
    }
    for mine, theirs in (("decoder_embed", "decoder.decoder_embed"), ("decoder_pred", "decoder.decoder_pred")):
        out[mine + ".weight"], out[mine + ".bias"] = src[theirs + ".weight"], src[theirs + ".bias"]
    out.update(_layers(src, layers, "encoder.blocks.blocks.", depth))
    out.update(_layers(src, decoder_layers, "decoder.blocks.", decoder_depth))
    return out


def build_model(hf: dict, weights: dict, source: str) -> MAEModel:
    """The :class:`MAEModel` for a ViTMAE config dict (square images only, as transformers builds them)."""
    return MAEModel(MAEModelConfig(mae=mae_config_from_hf(hf, source)))


def state_from_hf(src: dict[str, torch.Tensor], depth: int, decoder_depth: int) -> dict[str, torch.Tensor]:
    """A ``ViTMAEForPreTraining`` state dict in :class:`MAEModel`'s names (the core MAE under ``mae.``)."""
    return {f"mae.{k}": v for k, v in mae_state_from_hf(src, depth, decoder_depth).items()}


@hf_converter("vit_mae")
def convert_hf_vitmae(src: str | Path, dst: str | Path | None = None) -> MAEModel:
    """Convert the transformers ``ViTMAEForPreTraining`` folder ``src`` (``config.json`` + ``model.safetensors``)
    into an ``mae`` model; writes a model folder to ``dst`` when given."""
    return convert_hf_folder(
        src,
        dst,
        converter="hf-vitmae",
        model_type="vit_mae",
        label="ViTMAE",
        build_model=build_model,
        rename_state=lambda weights, model: state_from_hf(
            weights, model.config.mae.encoder.depth, model.config.mae.decoder_depth
        ),
    )


convert_hf_vitmae.hf_config = mae_config_from_hf  # type: ignore[attr-defined]
convert_hf_vitmae.hf_state = mae_state_from_hf  # type: ignore[attr-defined]

__all__ = ["build_model", "convert_hf_vitmae", "mae_config_from_hf", "mae_state_from_hf", "state_from_hf"]
