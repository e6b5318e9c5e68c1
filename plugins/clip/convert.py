"""``hf-clip``: a Hugging Face transformers CLIP folder → a polymodal ``clip`` model folder.

Reads ``config.json`` and ``model.safetensors`` (as ``CLIPModel.save_pretrained`` writes them)
and, when present, ``tokenizer.json`` (kept as the model's tokenizer). Nothing is unpickled.
The text tower pools at the first ``text_config.eos_token_id`` like transformers, except for
the legacy ``eos_token_id == 2`` configs, where transformers (and OpenAI) pool at the largest id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.data.tokenizers import BPETokenizer
from polymodal.io.hf import activation, convert_hf_folder, hf_converter, mlp_ratio_for, square_side
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import TextEncoderConfig, ViTEncoderConfig

from .config import CLIPConfig
from .model import CLIPModel


def config_from_hf(hf: dict, has_tokenizer: bool, source: str = "hf-clip") -> CLIPConfig:
    """Translate a transformers ``CLIPConfig`` dict."""
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    vdim, tdim = v.get("hidden_size", 768), t.get("hidden_size", 512)
    vision = ViTEncoderConfig(
        image_size=square_side(v, "image_size", 224, source),
        patch_size=square_side(v, "patch_size", 32, source),
        channels=v.get("num_channels", 3),
        depth=v.get("num_hidden_layers", 12),
        ln_pre=True,
        patch_bias=False,
        block=BlockConfig(
            dim=vdim,
            heads=v.get("num_attention_heads", 12),
            mlp_ratio=mlp_ratio_for(vdim, v.get("intermediate_size", 4 * vdim), source),
            act=activation(v, source, default="quick_gelu"),
            norm_eps=v.get("layer_norm_eps", 1e-5),
        ),
    )
    text = TextEncoderConfig(
        vocab_size=t.get("vocab_size", 49408),
        context_length=t.get("max_position_embeddings", 77),
        depth=t.get("num_hidden_layers", 12),
        causal=True,
        block=BlockConfig(
            dim=tdim,
            heads=t.get("num_attention_heads", 8),
            mlp_ratio=mlp_ratio_for(tdim, t.get("intermediate_size", 4 * tdim), source),
            act=activation(t, source, default="quick_gelu"),
            norm_eps=t.get("layer_norm_eps", 1e-5),
        ),
    )
    eos = t.get("eos_token_id", 2)
    return CLIPConfig(
        vision=vision,
        text=text,
        embed_dim=hf.get("projection_dim", 512),
        eos_id=None if eos == 2 else eos,
        tokenizer="file" if has_tokenizer else "none",
    )


def _layers(get, hf_prefix: str, pm_prefix: str, depth: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        hf, pm = f"{hf_prefix}.encoder.layers.{i}.", f"{pm_prefix}.blocks.blocks.{i}."
        for part in ("weight", "bias"):
            out[pm + "attn.qkv." + part] = torch.cat([get(hf + f"self_attn.{n}_proj.{part}") for n in ("q", "k", "v")])
            pairs = {
                "attn.proj": "self_attn.out_proj",
                "mlp.fc1": "mlp.fc1",
                "mlp.fc2": "mlp.fc2",
                "norm1": "layer_norm1",
                "norm2": "layer_norm2",
            }
            for ours, theirs in pairs.items():
                out[f"{pm}{ours}.{part}"] = get(f"{hf}{theirs}.{part}")
    return out


def state_from_hf(src: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a transformers CLIP state dict into polymodal's names."""
    get = src.__getitem__
    d = cfg.vision.dim
    out = {
        "logit_scale": get("logit_scale").reshape(()),
        "visual.encoder.cls_token": get("vision_model.embeddings.class_embedding").reshape(1, 1, d),
        "visual.encoder.pos_embed.weight": get("vision_model.embeddings.position_embedding.weight").unsqueeze(0),
        "visual.encoder.patch_embed.proj.weight": get("vision_model.embeddings.patch_embedding.weight"),
        "visual.encoder.ln_pre.weight": get("vision_model.pre_layrnorm.weight"),
        "visual.encoder.ln_pre.bias": get("vision_model.pre_layrnorm.bias"),
        "visual.encoder.blocks.norm.weight": get("vision_model.post_layernorm.weight"),
        "visual.encoder.blocks.norm.bias": get("vision_model.post_layernorm.bias"),
        "visual.proj.weight": get("visual_projection.weight"),
        "textual.encoder.token_embed.weight": get("text_model.embeddings.token_embedding.weight"),
        "textual.encoder.pos_embed.weight": get("text_model.embeddings.position_embedding.weight").unsqueeze(0),
        "textual.encoder.blocks.norm.weight": get("text_model.final_layer_norm.weight"),
        "textual.encoder.blocks.norm.bias": get("text_model.final_layer_norm.bias"),
        "textual.proj.weight": get("text_projection.weight"),
    }
    out.update(_layers(get, "vision_model", "visual.encoder", cfg.vision.depth))
    out.update(_layers(get, "text_model", "textual.encoder", cfg.text.depth))
    return out


def attach_tokenizer(folder: Path, model: CLIPModel) -> bool:
    """Give ``model`` the folder's ``tokenizer.json`` (its config says ``'file'`` when there is one)."""
    if model.config.tokenizer != "file":
        return False
    model.tokenizer = BPETokenizer.from_file(folder / "tokenizer.json")
    return True


@hf_converter("clip")
def convert_hf_clip(src: str | Path, dst: str | Path | None = None) -> CLIPModel:
    """Convert the transformers CLIP folder ``src``; writes a model folder to ``dst`` when given."""
    has_tokenizer = (Path(src) / "tokenizer.json").is_file()
    return convert_hf_folder(
        src,
        dst,
        converter="hf-clip",
        model_type="clip",
        label="CLIP",
        build_model=lambda hf, weights, source: CLIPModel(config_from_hf(hf, has_tokenizer, source)),
        rename_state=lambda weights, model: state_from_hf(weights, model.config),
        tokenizer=attach_tokenizer,
    )
