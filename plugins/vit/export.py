"""``polymodal export DIR OUT --to hf`` for ``vit`` folders: a transformers ``ViTForImageClassification``.

The reverse of :mod:`.convert`: the weights are renamed by running the converter's map backwards
(:func:`polymodal.io.export.invert_state`), and a setting transformers' ViT lacks (a non-square grid,
mean pooling, no [CLS] token, fixed sin-cos positions, CLIP's pre-norm, an RMS norm, SwiGLU …) is refused
by name: the exported config must convert back to the model's own. Training-only settings (dropout,
stochastic depth, label smoothing, augmentation) are not part of the export.
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
)

from .convert import config_from_hf, state_from_hf
from .model import ViTClassifier

TRAINING_ONLY = (
    "head_dropout",
    "label_smoothing",
    "augment_shift",
    "dropout",
    "attn_dropout",
    "drop_path",
    "mlp_ratio",
)
"""Config fields an export leaves out: training-only, or re-derived (``mlp_ratio`` from the MLP width)."""


def hf_config_dict(model: ViTClassifier) -> dict[str, Any]:
    """The transformers ``ViTConfig`` fields of ``model`` (refusing what transformers' ViT cannot express)."""
    c, e = model.config, model.config.encoder
    b = e.block
    hf = {
        "hidden_size": b.dim,
        "num_hidden_layers": e.depth,
        "num_attention_heads": b.heads,
        "intermediate_size": int(b.dim * b.mlp_ratio),
        "hidden_act": hf_activation(b.act, "ViTConfig.encoder.block.act"),
        "hidden_dropout_prob": b.dropout,
        "attention_probs_dropout_prob": b.attn_dropout,
        "layer_norm_eps": b.norm_eps,
        "image_size": e.image_size,
        "patch_size": e.patch_size,
        "num_channels": e.channels,
        "qkv_bias": b.qkv_bias,
        "num_labels": c.num_classes,
        "architectures": ["ViTForImageClassification"],
    }
    back = config_from_hf(hf, c.num_classes)
    refuse_differences("transformers ViT", "ViTConfig", config_differences(c, back, TRAINING_ONLY))
    return hf


def write_hf_vit(model: ViTClassifier, folder: Path) -> None:
    """Write ``model`` into ``folder`` as a transformers ``ViTForImageClassification`` folder."""
    try:
        import transformers
    except ImportError as exc:  # optional: only exporting to transformers needs it
        raise ExportError(NEEDS_TRANSFORMERS) from exc
    hf = hf_config_dict(model)
    config = transformers.ViTConfig(**hf)
    target = hf_shapes(transformers, "ViTForImageClassification", config)
    depth = model.config.encoder.depth
    state = invert_state(lambda src: state_from_hf(src, depth), target, model.state_dict(), "ViT")
    card = (
        "# ViT exported from polymodal\n\n"
        "A `vit` model folder written as a transformers "
        "`ViTForImageClassification` by `polymodal export --to hf`; preprocessor_config.json (a "
        "`ViTImageProcessor`) prepares images as the model's `preprocess` does.\n"
    )
    write_hf_image_processor(model, folder, "ViTImageProcessor")
    write_hf_folder(folder, config, state, family=model.family, card=card)


EXPORTER = Exporter("vit", "hf", write_hf_vit, "transformers ViTForImageClassification")
