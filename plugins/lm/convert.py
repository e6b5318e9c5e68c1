"""``hf-gpt2``: a Hugging Face transformers GPT-2 folder → a polymodal ``lm`` model folder.

Reads ``config.json`` and ``model.safetensors`` (as ``save_pretrained`` writes them) of a
``GPT2LMHeadModel`` or a ``GPT2Model``, and the tokenizer when the folder has one
(``tokenizer.json``, else ``vocab.json`` + ``merges.txt``), which becomes a core
:class:`~polymodal.data.tokenizers.BPETokenizer` (GPT-2's ``<|endoftext|>`` is bos, eos and pad).
Nothing is unpickled. transformers' details and how they map:

* ``Conv1D`` stores weights as (in, out): transposed into ``nn.Linear``'s (out, in);
  ``c_attn`` is the fused query/key/value projection in that order (the core's ``qkv``);
* ``wpe`` (n_positions, D) is the learned position table, ``ln_f`` the stack's final norm;
* the head is tied to ``wte``; an ``lm_head.weight`` that differs from ``wte`` is refused.

Options the core blocks cannot express are refused with the config field that asks for them:
``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``, ``add_cross_attention=True``,
``tie_word_embeddings=False``, and an activation the core MLP lacks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.data.tokenizers import BPETokenizer
from polymodal.io import LoadError
from polymodal.io.hf import (
    CAUSAL_MASK_BUFFERS,
    activation,
    convert_hf_folder,
    gpt2_state,
    hf_converter,
    mlp_ratio_for,
)

from .config import LMConfig
from .model import LMModel

EOT = "<|endoftext|>"
"""GPT-2's only special token: start, end and padding at once."""

REFUSED = {
    "scale_attn_weights": (
        False,
        "an attention-scale option on polymodal.nn.BlockConfig (scale 1 instead of 1/sqrt(head_dim))",
    ),
    "scale_attn_by_inverse_layer_idx": (True, "a per-layer attention scale 1/(layer+1) on BlockConfig"),
    "add_cross_attention": (True, "cross-attention into an encoder's states (inject it instead)"),
    "tie_word_embeddings": (False, "an untied output head (the lm family ties it to the token embedding)"),
}
"""transformers GPT-2 config fields whose non-default value the core cannot run: value, what it would need."""


def config_from_hf(hf: dict, source: str = "hf-gpt2") -> LMConfig:
    """Translate a transformers ``GPT2Config`` dict, refusing the fields in :data:`REFUSED` by name."""
    for key, (bad, need) in REFUSED.items():
        if key in hf and hf[key] == bad:
            raise LoadError(f"{source}: {key}={bad} is not supported; the core would need {need}")
    dim, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    if not isinstance(dim, int) or not isinstance(heads, int) or heads < 1 or dim % heads:
        raise LoadError(f"{source}: n_head must divide n_embd; got n_embd={dim!r}, n_head={heads!r}")
    act = activation({"hidden_act": hf.get("activation_function", "gelu_new")}, source)
    inner = hf.get("n_inner") or 4 * dim
    try:
        return LMConfig(
            vocab_size=hf.get("vocab_size", 50257),
            max_len=hf.get("n_positions", 1024),
            dim=dim,
            depth=hf.get("n_layer", 12),
            heads=heads,
            mlp_ratio=mlp_ratio_for(dim, inner, source),
            act=act,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            embed_dropout=float(hf.get("embd_pdrop", 0.1)),
            dropout=float(hf.get("resid_pdrop", 0.1)),
            attn_dropout=float(hf.get("attn_pdrop", 0.1)),
            tokenizer="file",
            data="text",
            eval_samples=16,
        )
    except (ValueError, TypeError) as exc:
        raise LoadError(f"{source}: {exc}") from exc


def state_from_hf(src: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename a transformers GPT-2 state dict into polymodal's names (see :func:`polymodal.io.hf.gpt2_state`)."""
    return gpt2_state(src, depth, "stack.", norm_bias=True)


def tokenizer_from_folder(folder: Path) -> BPETokenizer | None:
    """GPT-2's byte-level BPE from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``; None without either."""
    if (folder / "tokenizer.json").is_file():
        return BPETokenizer.from_file(folder / "tokenizer.json", add_eos=False)
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOT) is None:
        raise LoadError(f"{folder / 'vocab.json'} has no {EOT!r} token (GPT-2's end of text)")
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return BPETokenizer(tok, add_eos=False)


def attach_tokenizer(folder: Path, model: LMModel) -> bool:
    """Give ``model`` the folder's tokenizer (see :func:`tokenizer_from_folder`); False without one."""
    tokenizer = tokenizer_from_folder(folder)
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    return tokenizer is not None


@hf_converter("gpt2")
def convert_hf_gpt2(src: str | Path, dst: str | Path | None = None) -> LMModel:
    """Convert the transformers GPT-2 folder ``src``; writes a model folder to ``dst`` when given."""

    def tied_head(model: LMModel, state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str:
        """Refuse an ``lm_head`` that is not the token embedding (the lm family ties them)."""
        head = weights.get("lm_head.weight")
        if head is not None and not torch.equal(head, state["token_embed.weight"]):
            raise LoadError(
                f"{src}: lm_head.weight differs from transformer.wte.weight (tie_word_embeddings=False); "
                "the lm family has a tied head only"
            )
        return ""

    return convert_hf_folder(
        src,
        dst,
        converter="hf-gpt2",
        model_type="gpt2",
        label="GPT-2",
        build_model=lambda hf, weights, source: LMModel(config_from_hf(hf, source)),
        rename_state=lambda weights, model: state_from_hf(weights, model.config.depth),
        extras=tied_head,
        tokenizer=attach_tokenizer,
        ignore=(CAUSAL_MASK_BUFFERS,),
    )


__all__ = ["REFUSED", "attach_tokenizer", "config_from_hf", "convert_hf_gpt2", "state_from_hf", "tokenizer_from_folder"]
