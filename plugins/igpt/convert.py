"""``hf-imagegpt``: a Hugging Face transformers ImageGPT folder → a polymodal ``igpt`` model folder.

Reads ``config.json`` and ``model.safetensors`` (as ``save_pretrained`` writes them) of an
``ImageGPTForCausalImageModeling`` (or an ``ImageGPTModel``, whose missing output layer stays
zero). transformers' details and how they map:

* ``ImageGPTLayerNorm`` divides by the root mean square and multiplies by a weight, with no
  centring and no bias: the core ``"rmsnorm"`` with ``layer_norm_epsilon``;
* ``Conv1D`` stores weights as (in, out): transposed into ``nn.Linear``'s (out, in);
  ``c_attn`` is the fused query/key/value projection in that order (the core's ``qkv``);
* the start token is the last vocabulary id (``vocab_size - 1`` = our ``palette_size``), and
  ``lm_head`` (no bias) scores the ``vocab_size - 1`` colours;
* the palette lives in the image processor: ``preprocessor_config.json``'s ``clusters``
  (RGB in [-1, 1]) when the folder has one, mapped to [0, 1].

Options the core blocks cannot express are refused with the option they would need:
``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True`` and cross-attention.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from polymodal.io import LoadError, read_json
from polymodal.io.hf import (
    CAUSAL_MASK_BUFFERS,
    activation,
    convert_hf_folder,
    gpt2_state,
    hf_converter,
    mlp_ratio_for,
)

from .config import IGPTConfig
from .model import IGPT


def config_from_hf(hf: dict, source: str = "hf-imagegpt") -> IGPTConfig:
    """Translate a transformers ``ImageGPTConfig`` dict (refusing what the core cannot run)."""
    refuse = {
        "scale_attn_weights": (
            False,
            "an attention-scale option on polymodal.nn.BlockConfig (scale 1 instead of 1/sqrt(head_dim))",
        ),
        "scale_attn_by_inverse_layer_idx": (True, "a per-layer attention scale 1/(layer+1) on BlockConfig"),
        "add_cross_attention": (True, "cross-attention into an encoder's states (not part of iGPT)"),
    }
    for key, (bad, need) in refuse.items():
        if hf.get(key, not bad) == bad:
            raise LoadError(f"{source}: {key}={bad} is not supported; the core would need {need}")
    dim, n_pos = hf.get("n_embd", 512), hf.get("n_positions", 1024)
    side = math.isqrt(n_pos) if isinstance(n_pos, int) and n_pos > 0 else 0
    if side * side != n_pos:
        raise LoadError(f"{source}: n_positions must be a square number of pixels (side²); got {n_pos!r}")
    vocab = hf.get("vocab_size", 513)
    if not isinstance(vocab, int) or vocab < 3:
        raise LoadError(f"{source}: vocab_size must be an integer >= 3 (colours + start token); got {vocab!r}")
    act = activation({"hidden_act": hf.get("activation_function", "quick_gelu")}, source)
    inner = hf.get("n_inner") or 4 * dim
    return IGPTConfig(
        image_size=side,
        channels=3,
        palette_size=vocab - 1,
        dim=dim,
        depth=hf.get("n_layer", 24),
        heads=hf.get("n_head", 8),
        act=act,
        mlp_ratio=mlp_ratio_for(dim, inner, source),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=float(hf.get("resid_pdrop", 0.0)),
        attn_dropout=float(hf.get("attn_pdrop", 0.0)),
        data="",
    )


def state_from_hf(src: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename a transformers ImageGPT state dict into polymodal's names (see :func:`polymodal.io.hf.gpt2_state`)."""
    return gpt2_state(src, depth, "blocks.", norm_bias=False)


def palette_from_processor(folder: Path, size: int) -> torch.Tensor | None:
    """The palette (size, 3) in [0, 1] from ``preprocessor_config.json``'s clusters, or None without one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    clusters = read_json(path).get("clusters")
    if clusters is None:
        return None
    palette = torch.as_tensor(clusters, dtype=torch.float32)
    if palette.shape != (size, 3):
        raise LoadError(f"{path}: clusters must be ({size}, 3) for vocab_size {size + 1}; got {tuple(palette.shape)}")
    return ((palette + 1) / 2).clamp(0, 1)


@hf_converter("imagegpt")
def convert_hf_imagegpt(src: str | Path, dst: str | Path | None = None) -> IGPT:
    """Convert the transformers ImageGPT folder ``src``; writes a model folder to ``dst`` when given."""

    def extras(model: IGPT, state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str:
        """The output layer (an ``ImageGPTModel`` has none: it stays zero) and the processor's palette."""
        state["head.weight"] = weights.get("lm_head.weight", model.head.weight.detach())
        palette = palette_from_processor(Path(src), model.config.palette_size)
        state["palette"] = palette if palette is not None else model.palette
        state["palette_fitted"] = torch.tensor(palette is not None)
        return "" if palette is not None else " (no preprocessor_config.json clusters: the palette is a placeholder)"

    return convert_hf_folder(
        src,
        dst,
        converter="hf-imagegpt",
        model_type="imagegpt",
        label="ImageGPT",
        build_model=lambda hf, weights, source: IGPT(config_from_hf(hf, source)),
        rename_state=lambda weights, model: state_from_hf(weights, model.config.depth),
        extras=extras,
        ignore=(CAUSAL_MASK_BUFFERS,),
    )
