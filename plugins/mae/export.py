"""``polymodal export DIR OUT --to hf`` for ``mae`` folders: a transformers ``ViTMAEForPreTraining``.

The reverse of :mod:`.convert`: the weights are renamed by running the converter's map backwards
(:func:`polymodal.io.export.invert_state`), and a setting transformers' ViTMAE lacks is refused by name:
the exported config must convert back to the model's own (transformers builds fixed sin-cos position
tables, which are exported as the buffers they are and read back as ``learned`` tables holding the same
values, so ``pos_embed``/``decoder_pos_embed`` are compared by value, not by kind). PIXEL's strip MAE
(``pixel-mae``) has its own exporter, which refuses it.
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

from .convert import mae_config_from_hf, state_from_hf
from .model import MAEModel

IGNORED = (
    "dropout",
    "attn_dropout",
    "drop_path",
    "mlp_ratio",
    "decoder_mlp_ratio",
    "pos_embed",
    "decoder_pos_embed",
    "norm_pix_eps",
)
"""Config fields an export leaves out: training-only, or re-derived (the MLP ratios from the MLP widths; the
position tables' kind: their values are exported, see the module docstring; ``norm_pix_eps``: checked apart)."""


def hf_config_dict(model: MAEModel) -> dict[str, Any]:
    """The transformers ``ViTMAEConfig`` fields of ``model`` (refusing what transformers' ViTMAE cannot express)."""
    m = model.config.mae
    e, b = m.encoder, m.encoder.block
    hf = {
        "hidden_size": b.dim,
        "num_hidden_layers": e.depth,
        "num_attention_heads": b.heads,
        "intermediate_size": int(b.dim * b.mlp_ratio),
        "hidden_act": hf_activation(b.act, "MAEModelConfig.mae.encoder.block.act"),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": b.norm_eps,
        "image_size": e.image_size,
        "patch_size": e.patch_size,
        "num_channels": e.channels,
        "qkv_bias": b.qkv_bias,
        "decoder_hidden_size": m.decoder_dim,
        "decoder_num_hidden_layers": m.decoder_depth,
        "decoder_num_attention_heads": m.decoder_heads,
        "decoder_intermediate_size": int(m.decoder_dim * m.decoder_mlp_ratio),
        "mask_ratio": m.mask_ratio,
        "norm_pix_loss": m.norm_pix_loss,
        "architectures": ["ViTMAEForPreTraining"],
    }
    back = mae_config_from_hf(hf, "hf-vitmae export")
    differences = config_differences(m, back, IGNORED, "mae.")
    if m.norm_pix_loss and m.norm_pix_eps != 1e-6:  # transformers' ViTMAE adds 1e-6 to the variance, fixed
        differences.append(f"mae.norm_pix_eps={m.norm_pix_eps!r} (transformers' ViTMAE adds 1e-6)")
    refuse_differences("transformers ViTMAE", "MAEModelConfig", differences)
    return hf


def write_hf_vitmae(model: MAEModel, folder: Path) -> None:
    """Write ``model`` into ``folder`` as a transformers ``ViTMAEForPreTraining`` folder."""
    try:
        import transformers
    except ImportError as exc:  # optional: only exporting to transformers needs it
        raise ExportError(NEEDS_TRANSFORMERS) from exc
    hf = hf_config_dict(model)
    config = transformers.ViTMAEConfig(**hf)
    target = hf_shapes(transformers, "ViTMAEForPreTraining", config)
    m = model.config.mae
    tables = {
        "mae.encoder.pos_embed.weight": model.mae.encoder.pos_embed,
        "mae.decoder_pos.weight": model.mae.decoder_pos,
    }
    ours = {**model.state_dict(), **{k: t.weight for k, t in tables.items()}}  # fixed sin-cos tables are buffers
    state = invert_state(lambda src: state_from_hf(src, m.encoder.depth, m.decoder_depth), target, ours, "ViTMAE")
    card = (
        "# MAE exported from polymodal\n\n"
        "An `mae` model folder written as a transformers `ViTMAEForPreTraining` by `polymodal export --to hf`; "
        "preprocessor_config.json (a `ViTImageProcessor`) prepares images as the model's `preprocess` does.\n"
    )
    write_hf_image_processor(model, folder, "ViTImageProcessor")
    write_hf_folder(folder, config, state, family=model.family, card=card)


EXPORTER = Exporter("mae", "hf", write_hf_vitmae, "transformers ViTMAEForPreTraining")
