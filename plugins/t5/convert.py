"""``transformers-t5`` (and ``transformers-mt5``, the same for ``model_type`` ``mt5`` folders): a transformers T5 / T5 v1.1 / mT5 folder → a ``t5`` model folder.

Reads ``config.json`` and ``model.safetensors`` (as ``save_pretrained`` writes them; nothing is unpickled) of a
``T5EncoderModel``, ``T5ForConditionalGeneration``, ``MT5EncoderModel`` or ``MT5ForConditionalGeneration``
(``model_type`` ``t5`` or ``mt5``). The stacks map through :func:`polymodal.io.hf.t5_stack_state`; ``shared.weight``
is the token table; a folder without decoder weights becomes an encoder alone (``decoder_depth=0``). The head is
``lm_head.weight`` when the file holds one that differs from ``shared.weight``, else the shared table; the decoder
states are scaled by ``d_model ** -0.5`` before it as transformers does (T5: ``scale_decoder_outputs``, or
``tie_word_embeddings`` not false in older configs; mT5 never). A ``tokenizer.json`` in the folder becomes the
model's tokenizer (``<pad>``, ``</s>`` and the ``<extra_id_i>`` sentinels it has).

Refused by name: ``num_heads * d_kv != d_model`` (mT5-small's 6 × 64 vs 512: the core head width is
``dim // heads``), a ``feed_forward_proj`` other than ``relu`` / ``gated-gelu``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polymodal.data.tokenizers import BPETokenizer
from polymodal.io import LoadError
from polymodal.io.folders import read_json
from polymodal.io.hf import convert_hf_folder, hf_converter, mlp_ratio_for, t5_stack_state

from .config import T5Config
from .model import T5Model

FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu_tanh"}
"""transformers ``feed_forward_proj`` → the core MLP activation."""

TIED_COPIES = (r"^(encoder|decoder)\.embed_tokens\.weight$",)
"""Copies of ``shared.weight`` some folders hold (checked equal to it, then left out)."""


def _positive(hf: dict, key: str, default: int, source: str) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoadError(f"{source}: {key} must be a positive integer; got {value!r}")
    return value


def config_from_hf(hf: dict, weights: Any, source: str = "transformers-t5") -> T5Config:
    """Translate a transformers T5 / mT5 config dict (``weights`` say whether a decoder and a head are present)."""
    dim, heads = _positive(hf, "d_model", 512, source), _positive(hf, "num_heads", 8, source)
    d_kv = _positive(hf, "d_kv", 64, source)
    if heads * d_kv != dim:
        raise LoadError(
            f"{source}: num_heads * d_kv must equal d_model (the core head width is dim // heads); got "
            f"num_heads={heads} × d_kv={d_kv} = {heads * d_kv}, d_model={dim}"
        )
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD:
        raise LoadError(f"{source}: feed_forward_proj must be one of {', '.join(FEED_FORWARD)}; got {proj!r}")
    decoder = any(k.startswith("decoder.") for k in weights)
    head = weights.get("lm_head.weight") if decoder else None
    untied = head is not None and not torch.equal(head, weights["shared.weight"])
    if hf.get("model_type") == "mt5":
        scale = False
    else:
        scale = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))
    vocab = int(weights["shared.weight"].shape[0])
    return T5Config(
        vocab_size=vocab,
        sentinels=2,
        max_len=max(512, _positive(hf, "n_positions", 512, source)),
        dim=dim,
        heads=heads,
        depth=_positive(hf, "num_layers", 6, source),
        decoder_depth=int(hf.get("num_decoder_layers") or hf.get("num_layers", 6)) if decoder else 0,
        mlp_ratio=mlp_ratio_for(dim, _positive(hf, "d_ff", 2048, source), source),
        act=FEED_FORWARD[proj],
        relative_buckets=_positive(hf, "relative_attention_num_buckets", 32, source),
        relative_max_distance=_positive(hf, "relative_attention_max_distance", 128, source),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        tie_head=decoder and not untied,
        scale_head=decoder and scale,
        tokenizer="file",
        data="",
    )


def state_from_hf(weights: Any, model: T5Model) -> dict[str, torch.Tensor]:
    """The transformers state dict in ``model``'s names (tied copies of the token table checked and left out)."""
    c = model.config
    shared = weights["shared.weight"]
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if key in weights and not torch.equal(weights[key], shared):
            raise LoadError(f"{key} differs from shared.weight; the t5 family embeds both stacks with one table")
    state = {"shared.weight": shared, **t5_stack_state(weights, c.depth, "encoder.", prefix="encoder.")}
    if c.decoder_depth:
        state.update(t5_stack_state(weights, c.decoder_depth, "decoder.", prefix="decoder."))
        if "lm_head.weight" in weights:
            head = weights["lm_head.weight"]  # read either way: a tied copy is not dropped silently
            if not c.tie_head:
                state["lm_head.weight"] = head
    return state


def attach_tokenizer(folder: Path, model: T5Model) -> bool:
    """The folder's ``tokenizer.json`` as the model's tokenizer (no bos, eos added); False without one."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    tok = BPETokenizer.from_file(path, {"pad": "<pad>", "eos": "</s>", "bos": "</s>"}, add_bos=False, add_eos=True)
    extra = {
        f"extra_id_{i}": f"<extra_id_{i}>"
        for i in range(1000)
        if tok.tokenizer.token_to_id(f"<extra_id_{i}>") is not None
    }
    if extra:
        tok = BPETokenizer.from_file(
            path, {"pad": "<pad>", "eos": "</s>", "bos": "</s>", **extra}, add_bos=False, add_eos=True
        )
    model.set_tokenizer(tok)
    return True


@hf_converter("t5")
def convert_transformers_t5(src: str | Path, dst: str | Path | None = None) -> T5Model:
    """Convert the transformers T5 or mT5 folder ``src``; writes a model folder to ``dst`` when given."""
    path = Path(src) / "config.json"
    found = read_json(path) if path.is_file() else {}
    model_type = "mt5" if isinstance(found, dict) and found.get("model_type") == "mt5" else "t5"
    return convert_hf_folder(
        src,
        dst,
        converter="transformers-t5",
        model_type=model_type,
        label="mT5" if model_type == "mt5" else "T5",
        build_model=lambda hf, weights, source: T5Model(config_from_hf(hf, weights, source)),
        rename_state=state_from_hf,
        tokenizer=attach_tokenizer,
        ignore=TIED_COPIES,
    )


@hf_converter("mt5")
def convert_transformers_mt5(src: str | Path, dst: str | Path | None = None) -> T5Model:
    """Convert the transformers mT5 folder ``src`` (``model_type`` ``mt5``; as :func:`convert_transformers_t5`)."""
    return convert_transformers_t5(src, dst)


__all__ = ["attach_tokenizer", "config_from_hf", "convert_transformers_mt5", "convert_transformers_t5", "state_from_hf"]
