"""``polymodal export DIR OUT --to hf`` for ``igpt`` folders: a transformers ``ImageGPTForCausalImageModeling``.

The reverse of :mod:`.convert`: the weights are renamed by running the converter's map (and its
output layer) backwards (:func:`polymodal.io.export.invert_state`), and the palette becomes the image
processor's ``clusters`` in ``preprocessor_config.json`` (RGB in [-1, 1]; a grey palette is written as
three equal channels, which quantises grey images to the same ids). The start token is the last id
(``vocab_size - 1``), as in both libraries. Training-only settings (augmentation, the probe, the
palette's k-means seed) are not part of the export.
"""

from __future__ import annotations

import json
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
)
from polymodal.io.hf import CAUSAL_MASK_BUFFERS

from .convert import config_from_hf, state_from_hf
from .model import IGPT

TRAINING_ONLY = (
    "channels",
    "palette_seed",
    "augment_shift",
    "augment_prob",
    "data",
    "probe_l2",
    "eval_samples",
    "mlp_ratio",
)
"""Config fields an export leaves out: training-only, carried by the palette (``channels``), or re-derived
(``mlp_ratio`` from the MLP width)."""


def hf_config_dict(model: IGPT) -> dict[str, Any]:
    """The transformers ``ImageGPTConfig`` fields of ``model`` (refusing what ImageGPT cannot express)."""
    c = model.config
    hf = {
        "vocab_size": c.palette_size + 1,
        "n_positions": c.image_size**2,
        "n_embd": c.dim,
        "n_layer": c.depth,
        "n_head": c.heads,
        "n_inner": int(c.dim * c.mlp_ratio),
        "activation_function": hf_activation(c.act, "IGPTConfig.act"),
        "layer_norm_epsilon": c.norm_eps,
        "embd_pdrop": c.dropout,
        "resid_pdrop": c.dropout,
        "attn_pdrop": c.attn_dropout,
        "tie_word_embeddings": False,
        "architectures": ["ImageGPTForCausalImageModeling"],
    }
    back = config_from_hf(hf)
    refuse_differences("transformers ImageGPT", "IGPTConfig", config_differences(c, back, TRAINING_ONLY))
    return hf


def processor_config(model: IGPT) -> dict[str, Any]:
    """``preprocessor_config.json`` of an ``ImageGPTImageProcessor`` with the model's palette as clusters."""
    palette = model.palette.detach().cpu().float()  # (K, C) in [0, 1]
    rgb = palette.expand(-1, 3) if palette.shape[1] == 1 else palette  # (K, 3)
    side = model.config.image_size
    return {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": (rgb * 2 - 1).tolist(),
        "do_color_quantize": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 2,
        "size": {"height": side, "width": side},
    }


def write_hf_imagegpt(model: IGPT, folder: Path) -> None:
    """Write ``model`` into ``folder`` as a transformers ``ImageGPTForCausalImageModeling`` folder."""
    try:
        import transformers
    except ImportError as exc:  # optional: only exporting to transformers needs it
        raise ExportError(NEEDS_TRANSFORMERS) from exc
    config = transformers.ImageGPTConfig(**hf_config_dict(model))
    target = hf_shapes(transformers, "ImageGPTForCausalImageModeling", config, ignore=(CAUSAL_MASK_BUFFERS,))
    depth = model.config.depth
    state = {k: v for k, v in model.state_dict().items() if k not in ("palette", "palette_fitted")}
    weights = invert_state(
        lambda src: {**state_from_hf(src, depth), "head.weight": src["lm_head.weight"]}, target, state, "ImageGPT"
    )
    (folder / "preprocessor_config.json").write_text(json.dumps(processor_config(model), indent=2) + "\n")
    fitted = bool(model.palette_fitted)
    card = (
        "# iGPT exported from polymodal\n\n"
        "An `igpt` model folder written as a transformers `ImageGPTForCausalImageModeling` by "
        "`polymodal export --to hf`; preprocessor_config.json holds its palette as clusters"
        + ("" if fitted else " (a placeholder: the palette was never fitted)")
        + ".\n"
    )
    write_hf_folder(folder, config, weights, family=model.family, card=card)


EXPORTER = Exporter("igpt", "hf", write_hf_imagegpt, "transformers ImageGPTForCausalImageModeling")
