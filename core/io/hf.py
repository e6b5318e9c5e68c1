"""Helpers shared by converters that read Hugging Face transformers folders."""

from __future__ import annotations

import math

from polymodal.io import LoadError

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "quick_gelu": "quick_gelu", "relu": "relu"}
"""transformers ``hidden_act`` names → the core MLP's activation names."""


def activation(hf: dict, source: str, default: str = "gelu") -> str:
    """The core activation for a config's ``hidden_act``; unsupported ones raise naming ``source``."""
    act = hf.get("hidden_act", default)
    if act not in ACTIVATIONS:
        raise LoadError(f"{source}: unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def mlp_ratio_for(dim: int, hidden: int, source: str = "converter") -> float:
    """The ``mlp_ratio`` whose MLP width ``int(dim * ratio)`` is exactly ``hidden``.

    ``hidden / dim`` alone can land one ulp low (``int(11 * (30 / 11)) == 29``), so step it up.
    """
    for name, value in (("hidden_size", dim), ("intermediate_size", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoadError(f"{source}: {name} must be a positive integer; got {value!r}")
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def square_side(hf: dict, key: str, default: int, source: str = "converter") -> int:
    """``image_size``/``patch_size`` as one int (transformers also accepts a square [h, w] pair)."""
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise LoadError(f"{source} supports square {key} only; got {value!r}")
        value = value[0]
    return value


def gpt2_state(src: dict, depth: int, stack: str, *, norm_bias: bool = True) -> dict:
    """A transformers GPT-2-style decoder (GPT-2, ImageGPT) renamed into core names.

    ``src`` is the transformers state dict (with or without the ``transformer.`` prefix);
    ``stack`` is the model's attribute holding the core :class:`~polymodal.nn.TransformerStack`
    (``"stack."``, ``"blocks."``). Conv1D weights, stored (in, out), are transposed into
    ``nn.Linear``'s (out, in); ``c_attn`` is the fused query/key/value projection. Norm biases
    are read when ``norm_bias`` (ImageGPT's RMS-style norms have none).
    """
    prefix = "transformer." if any(k.startswith("transformer.") for k in src) else ""

    def get(key: str):
        return src[prefix + key]

    out = {"token_embed.weight": get("wte.weight"),
           "pos_embed.weight": get("wpe.weight").unsqueeze(0),  # (1, N, D)
           f"{stack}norm.weight": get("ln_f.weight")}
    if norm_bias:
        out[f"{stack}norm.bias"] = get("ln_f.bias")
    for i in range(depth):
        theirs_block, ours_block = f"h.{i}.", f"{stack}blocks.{i}."
        for ours, theirs in {"norm1": "ln_1", "norm2": "ln_2"}.items():
            out[ours_block + ours + ".weight"] = get(theirs_block + theirs + ".weight")
            if norm_bias:
                out[ours_block + ours + ".bias"] = get(theirs_block + theirs + ".bias")
        for ours, theirs in {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc1": "mlp.c_fc",
                             "mlp.fc2": "mlp.c_proj"}.items():
            out[ours_block + ours + ".weight"] = get(theirs_block + theirs + ".weight").t().contiguous()  # (out, in)
            out[ours_block + ours + ".bias"] = get(theirs_block + theirs + ".bias")
    return out
