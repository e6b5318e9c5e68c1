"""``hf-vit``: a Hugging Face transformers ViT folder → a polymodal ``vit`` model folder.

Reads ``config.json`` and ``model.safetensors`` (as ``save_pretrained`` writes them) from a
``ViTForImageClassification`` (with a classifier) or a ``ViTModel`` (without; the pooler,
which the classification path never uses, is dropped). Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.io.hf import activation, convert_hf_folder, hf_converter, mlp_ratio_for, square_side
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import ViTEncoderConfig

from .model import ViTClassifier, ViTConfig


def config_from_hf(hf: dict, num_classes: int, source: str = "hf-vit") -> ViTConfig:
    """Translate a transformers ``ViTConfig`` dict; eps and activation come from the source."""
    dim = hf.get("hidden_size", 768)
    encoder = ViTEncoderConfig(
        image_size=square_side(hf, "image_size", 224, source),
        patch_size=square_side(hf, "patch_size", 16, source),
        channels=hf.get("num_channels", 3),
        depth=hf.get("num_hidden_layers", 12),
        block=BlockConfig(
            dim=dim,
            heads=hf.get("num_attention_heads", 12),
            mlp_ratio=mlp_ratio_for(dim, hf.get("intermediate_size", 4 * dim), source),
            act=activation(hf, source),
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            qkv_bias=hf.get("qkv_bias", True),
        ),
    )
    return ViTConfig(encoder=encoder, num_classes=num_classes)


def state_from_hf(src: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a transformers ViT state dict into polymodal's names."""
    prefix = "vit." if any(k.startswith("vit.") for k in src) else ""
    get = lambda k: src[prefix + k]  # noqa: E731
    out = {
        "encoder.cls_token": get("embeddings.cls_token"),
        "encoder.pos_embed.weight": get("embeddings.position_embeddings"),
        "encoder.patch_embed.proj.weight": get("embeddings.patch_embeddings.projection.weight"),
        "encoder.patch_embed.proj.bias": get("embeddings.patch_embeddings.projection.bias"),
        "encoder.blocks.norm.weight": get("layernorm.weight"),
        "encoder.blocks.norm.bias": get("layernorm.bias"),
    }
    for i in range(depth):
        hf, pm = f"encoder.layer.{i}.", f"encoder.blocks.blocks.{i}."
        att = hf + "attention.attention."
        out[pm + "attn.qkv.weight"] = torch.cat([get(att + n + ".weight") for n in ("query", "key", "value")])
        if prefix + att + "query.bias" in src:
            out[pm + "attn.qkv.bias"] = torch.cat([get(att + n + ".bias") for n in ("query", "key", "value")])
        pairs = {
            "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
        }
        for ours, theirs in pairs.items():
            out[pm + ours + ".weight"] = get(hf + theirs + ".weight")
            out[pm + ours + ".bias"] = get(hf + theirs + ".bias")
    if "classifier.weight" in src:
        out["head.weight"], out["head.bias"] = src["classifier.weight"], src["classifier.bias"]
    return out


def build_model(hf: dict, weights: dict[str, torch.Tensor], source: str) -> ViTClassifier:
    """The classifier for ``hf``, with as many classes as the source's classifier has rows (0 without one)."""
    num_classes = weights["classifier.weight"].shape[0] if "classifier.weight" in weights else 0
    return ViTClassifier(config_from_hf(hf, num_classes, source))


@hf_converter("vit")
def convert_hf_vit(src: str | Path, dst: str | Path | None = None) -> ViTClassifier:
    """Convert the transformers ViT folder ``src``; writes a model folder to ``dst`` when given."""
    return convert_hf_folder(
        src,
        dst,
        converter="hf-vit",
        model_type="vit",
        label="ViT",
        build_model=build_model,
        rename_state=lambda weights, model: state_from_hf(weights, model.config.encoder.depth),
        ignore=(r"^(vit\.)?pooler\.",),  # ViTModel's pooler: the classification path never uses it
    )
