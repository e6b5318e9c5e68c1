"""The language model's config (GPT-2's sizes, tokenizer, dropouts, data) and the tokenizer it names."""

from __future__ import annotations

from polymodal.config import config, field, in_range, one_of
from polymodal.data.tokenizers import BPETokenizer, ByteTokenizer

from . import corpus


@config
class LMConfig:
    """A GPT-2 style language model: vocabulary, decoder shape, dropout and training options."""

    vocab_size: int = field(
        512,
        "Rows of the token embedding (= columns of the logits); the tokenizer may use fewer.",
        check=in_range(2, 10**7, integer=True),
    )
    max_len: int = field(
        96,
        "Learned positions: the longest sequence (prompt + generation) the model reads.",
        check=in_range(1, 10**6, integer=True),
    )
    dim: int = field(128, "Width of the token stream.", check=in_range(1, 65536, integer=True))
    depth: int = field(4, "Decoder blocks.", check=in_range(1, 1024, integer=True))
    heads: int = field(4, "Attention heads; must divide dim.", check=in_range(1, 1024, integer=True))
    mlp_ratio: float = field(4.0, "MLP hidden width as a multiple of dim (GPT-2: 4).", check=in_range(0.25, 64))
    act: str = field(
        "gelu_tanh",
        "MLP activation (GPT-2: gelu_tanh, transformers' gelu_new).",
        check=one_of("gelu_tanh", "gelu", "quick_gelu", "relu"),
    )
    norm_eps: float = field(
        1e-5, "Epsilon of every LayerNorm (transformers: layer_norm_epsilon).", check=in_range(0.0, 1.0)
    )
    embed_dropout: float = field(
        0.1, "Dropout on the summed token and position embeddings (embd_pdrop).", check=in_range(0.0, 1.0)
    )
    dropout: float = field(0.1, "Dropout on the residual branches (resid_pdrop).", check=in_range(0.0, 1.0))
    attn_dropout: float = field(0.1, "Dropout on the attention weights (attn_pdrop).", check=in_range(0.0, 1.0))
    tokenizer: str = field(
        "text",
        "'text': byte-level BPE of vocab_size ids learnt from the embedded sentences and "
        "digits captions; 'bytes': UTF-8 bytes; 'file': tokenizer.json in the model folder "
        "(converted models).",
        check=one_of("text", "bytes", "file"),
    )
    pack: int = field(
        6,
        "Training packs 1..pack sentences (eos-separated) into one sequence, so every position "
        "up to max_len is trained.",
        check=in_range(1, 1024, integer=True),
    )
    caption_mix: float = field(
        0.25, "Share of the training sentences replaced by random digits training captions.", check=in_range(0.0, 1.0)
    )
    data: str = field("text", "Dataset the model was adapted to (`polymodal eval` uses it by default).")
    eval_samples: int = field(
        64,
        "Unconditional samples drawn by evaluate to score sample_valid_rate (0: skip).",
        check=in_range(0, 100000, integer=True),
    )

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"LMConfig.heads must divide dim; got dim={self.dim}, heads={self.heads}")


def make_tokenizer(cfg: LMConfig) -> BPETokenizer | ByteTokenizer | None:
    """The tokenizer the config names (None for ``'file'`` until a folder or converter provides it)."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "text":
        return corpus.text_tokenizer(cfg.vocab_size)
    return None


__all__ = ["LMConfig", "make_tokenizer"]
