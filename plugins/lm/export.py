"""``polymodal export DIR OUT --to hf`` for ``lm`` folders: a transformers ``GPT2LMHeadModel``.

The reverse of :mod:`.convert`: the weights are renamed by running the converter's map backwards
(:func:`polymodal.io.export.invert_state`; the head stays tied to ``wte``, so ``lm_head.weight`` is not
written, as ``save_pretrained`` leaves it out too). A byte-level BPE tokenizer is written as
``tokenizer.json`` + ``tokenizer_config.json`` and its end-of-text id becomes the config's ``bos``/``eos``;
the byte tokenizer (``tokenizer='bytes'``) has no transformers form, so that export holds token ids only.
A setting GPT-2 cannot express is refused by name (the exported config must convert back to the
model's own): a SwiGLU MLP, for one.
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
    write_hf_tokenizer,
)
from polymodal.io.hf import CAUSAL_MASK_BUFFERS

from .convert import config_from_hf, state_from_hf
from .model import LMModel

TRAINING_ONLY = ("tokenizer", "pack", "caption_mix", "data", "eval_samples", "mlp_ratio")
"""Config fields an export leaves out: training-only, or re-derived (``mlp_ratio`` from the MLP width)."""


def hf_config_dict(model: LMModel) -> dict[str, Any]:
    """The transformers ``GPT2Config`` fields of ``model`` (refusing what GPT-2 cannot express)."""
    c = model.config
    hf = {
        "vocab_size": c.vocab_size,
        "n_positions": c.max_len,
        "n_embd": c.dim,
        "n_layer": c.depth,
        "n_head": c.heads,
        "n_inner": int(c.dim * c.mlp_ratio),
        "activation_function": hf_activation(c.act, "LMConfig.act"),
        "layer_norm_epsilon": c.norm_eps,
        "embd_pdrop": c.embed_dropout,
        "resid_pdrop": c.dropout,
        "attn_pdrop": c.attn_dropout,
        "tie_word_embeddings": True,
        "architectures": ["GPT2LMHeadModel"],
    }
    special = getattr(model.tokenizer, "special_tokens", None) or {}
    for role in ("bos", "eos", "pad"):
        hf[f"{role}_token_id"] = special.get(role)
    back = config_from_hf(hf)
    refuse_differences("transformers GPT-2", "LMConfig", config_differences(c, back, TRAINING_ONLY))
    return hf


def write_hf_gpt2(model: LMModel, folder: Path) -> None:
    """Write ``model`` into ``folder`` as a transformers ``GPT2LMHeadModel`` folder (with its tokenizer)."""
    try:
        import transformers
    except ImportError as exc:  # optional: only exporting to transformers needs it
        raise ExportError(NEEDS_TRANSFORMERS) from exc
    config = transformers.GPT2Config(**hf_config_dict(model))
    target = hf_shapes(transformers, "GPT2LMHeadModel", config, ignore=(CAUSAL_MASK_BUFFERS, r"^lm_head\.weight$"))
    state = invert_state(lambda src: state_from_hf(src, model.config.depth), target, model.state_dict(), "GPT-2")
    has_tokenizer = write_hf_tokenizer(model.tokenizer, folder, model.config.max_len, add_eos=False)
    card = (
        "# Language model exported from polymodal\n\n"
        "An `lm` model folder written as a transformers `GPT2LMHeadModel` by `polymodal export --to hf`"
        + (" (tokenizer.json holds its tokenizer).\n" if has_tokenizer else "; it takes token ids (no tokenizer).\n")
    )
    write_hf_folder(folder, config, state, family=model.family, card=card)


EXPORTER = Exporter("lm", "hf", write_hf_gpt2, "transformers GPT2LMHeadModel")
