"""``hf-vit``: a Hugging Face transformers ViT folder → a polymodal ``vit`` model folder.

Reads ``config.json`` and ``model.safetensors`` (as ``save_pretrained`` writes them) from a
``ViTForImageClassification`` (with a classifier) or a ``ViTModel`` (without; the pooler,
which the classification path never uses, is dropped). Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.io.hf import activation, mlp_ratio_for, square_side
from polymodal.io import LoadError, load_state_strict, read_json, read_state

from .model import ViTClassifier, ViTConfig

def config_from_hf(hf: dict, num_classes: int) -> ViTConfig:
    """Translate a transformers ``ViTConfig`` dict; eps and activation come from the source."""
    act = activation(hf, "hf-vit")
    dim = hf.get("hidden_size", 768)
    encoder = ViTEncoderConfig(
        image_size=square_side(hf, "image_size", 224, "hf-vit"), patch_size=square_side(hf, "patch_size", 16, "hf-vit"),
        channels=hf.get("num_channels", 3), dim=dim, depth=hf.get("num_hidden_layers", 12),
        heads=hf.get("num_attention_heads", 12), mlp_ratio=mlp_ratio_for(dim, hf.get("intermediate_size", 4 * dim), "hf-vit"),
        act=act, norm_eps=hf.get("layer_norm_eps", 1e-12), qkv_bias=hf.get("qkv_bias", True),
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
        pairs = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                 "mlp.fc2": "output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after"}
        for ours, theirs in pairs.items():
            out[pm + ours + ".weight"] = get(hf + theirs + ".weight")
            out[pm + ours + ".bias"] = get(hf + theirs + ".bias")
    if "classifier.weight" in src:
        out["head.weight"], out["head.bias"] = src["classifier.weight"], src["classifier.bias"]
    return out


def convert_hf_vit(src: str | Path, dst: str | Path | None = None) -> ViTClassifier:
    """Convert the transformers ViT folder ``src``; writes a model folder to ``dst`` when given."""
    src = Path(src)
    hf = read_json(src / "config.json")
    if not isinstance(hf, dict):
        raise LoadError(f"{src / 'config.json'} is not a transformers config (expected a JSON object)")
    if hf.get("model_type") not in (None, "vit"):
        raise LoadError(f"hf-vit expects a ViT config (model_type 'vit'); {src / 'config.json'} has {hf.get('model_type')!r}")
    weights = read_state(src / "model.safetensors")
    num_classes = weights["classifier.weight"].shape[0] if "classifier.weight" in weights else 0
    model = ViTClassifier(config_from_hf(hf, num_classes))
    try:
        state = state_from_hf(weights, model.config.encoder.depth)
    except KeyError as exc:
        raise LoadError(f"{src / 'model.safetensors'} lacks the ViT weight {exc.args[0]!r}") from exc
    load_state_strict(model, state, f"{src} (converted from transformers ViT)")
    model.eval()
    if dst is not None:
        model.save(dst, source=f"converted from the transformers ViT folder {src.name} with `polymodal convert --from hf-vit`")
    return model
