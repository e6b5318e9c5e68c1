"""``polymodal export DIR OUT --to hf`` for ``clip`` folders: a transformers ``CLIPModel``.

The reverse of :mod:`.convert`: the weights are renamed by running the converter's map backwards
(:func:`polymodal.io.export.invert_state`); the tokenizer, when the model has one, is written as
``tokenizer.json`` with a ``tokenizer_config.json`` (``PreTrainedTokenizerFast``). A setting transformers'
CLIP lacks is refused by name (the exported config must convert back to the model's own): an image tower
without CLIP's pre-norm or with a patch bias, a non-causal text tower, an end-of-text id of 2 (transformers
then pools at the largest id), RMS norms, SwiGLU … Training-only settings (dropout, the caption curriculum,
templates, augmentation, the logit-scale bounds) are not part of the export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polymodal.io.export import (
    NEEDS_TRANSFORMERS,
    Exporter,
    ExportError,
    config_differences,
    hf_activation,
    hf_shapes,
    invert_state,
    refuse_differences,
    write_hf_folder,
    write_hf_image_processor,
    write_hf_tokenizer,
)

from .convert import config_from_hf, state_from_hf
from .model import CLIPModel

TRAINING_ONLY = (
    "init_temperature",
    "max_logit_scale",
    "tokenizer",
    "augment_shift",
    "captioner",
    "caption_dropout",
    "multi_positive",
    "caption_views",
    "first_views",
    "first_view_steps",
    "templates",
    "heldout_templates",
    "class_names",
    "data",
    "dropout",
    "attn_dropout",
    "drop_path",
    "mlp_ratio",
)
"""Config fields an export leaves out: training-only, or re-derived (``mlp_ratio`` from the MLP width)."""


def _tower(block: Any, depth: int, name: str) -> dict[str, Any]:
    return {
        "hidden_size": block.dim,
        "intermediate_size": int(block.dim * block.mlp_ratio),
        "num_hidden_layers": depth,
        "num_attention_heads": block.heads,
        "hidden_act": hf_activation(block.act, f"CLIPConfig.{name}.block.act"),
        "layer_norm_eps": block.norm_eps,
        "attention_dropout": block.attn_dropout,
    }


def hf_config_dict(model: CLIPModel) -> dict[str, Any]:
    """The transformers ``CLIPConfig`` fields of ``model`` (refusing what transformers' CLIP cannot express)."""
    c = model.config
    vision = {
        **_tower(c.vision.block, c.vision.depth, "vision"),
        "image_size": c.vision.image_size,
        "patch_size": c.vision.patch_size,
        "num_channels": c.vision.channels,
    }
    text = {
        **_tower(c.text.block, c.text.depth, "text"),
        "vocab_size": c.text.vocab_size,
        "max_position_embeddings": c.text.context_length,
        "eos_token_id": 2 if c.eos_id is None else c.eos_id,
    }
    tokenizer = model.tokenizer
    special = getattr(tokenizer, "special_tokens", None) or {}
    for role in ("bos", "pad"):  # None without a tokenizer: transformers' defaults lie outside a small vocabulary
        text[f"{role}_token_id"] = special.get(role)
    hf = {
        "text_config": text,
        "vision_config": vision,
        "projection_dim": c.embed_dim,
        "logit_scale_init_value": float(model.logit_scale.detach()),
        "architectures": ["CLIPModel"],
    }
    back = config_from_hf(hf, tokenizer is not None)
    refuse_differences("transformers CLIP", "CLIPConfig", config_differences(c, back, TRAINING_ONLY))
    return hf


def write_hf_clip(model: CLIPModel, folder: Path) -> None:
    """Write ``model`` into ``folder`` as a transformers ``CLIPModel`` folder (with its tokenizer)."""
    try:
        import transformers
    except ImportError as exc:  # optional: only exporting to transformers needs it
        raise ExportError(NEEDS_TRANSFORMERS) from exc
    config = transformers.CLIPConfig(**hf_config_dict(model))
    target = hf_shapes(transformers, "CLIPModel", config)
    state = invert_state(lambda src: state_from_hf(src, model.config), target, model.state_dict(), "CLIP")
    write_hf_tokenizer(model.tokenizer, folder, model.config.text.context_length)
    card = (
        "# CLIP exported from polymodal\n\n"
        "A `clip` model folder written as a transformers `CLIPModel` by `polymodal export --to hf`. "
        "preprocessor_config.json (a `CLIPImageProcessor`) prepares images as the model's `preprocess` does; "
        "texts are token ids "
        + (
            "pooled at their largest id"
            if model.config.eos_id is None
            else f"ending in the end-of-text id {model.config.eos_id}"
        )
        + (" (tokenizer.json holds the tokenizer).\n" if model.tokenizer is not None else " (no tokenizer).\n")
    )
    write_hf_image_processor(model, folder, "CLIPImageProcessor")
    write_hf_folder(folder, config, state, family=model.family, card=card)


EXPORTER = Exporter("clip", "hf", write_hf_clip, "transformers CLIPModel")
