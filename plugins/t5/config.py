"""T5's config (sizes, relative position buckets, span corruption) and the core block config of its encoder and decoder."""

from __future__ import annotations

from polymodal.config import config, field, in_range, one_of
from polymodal.nn import BlockConfig

_pos = in_range(1, 65536, integer=True)


@config
class T5Config:
    """A T5 encoder–decoder: vocabulary, shape, relative position buckets and the span-corruption recipe."""

    vocab_size: int = field(512, "Rows of the shared token table (and columns of the logits).", check=_pos)
    sentinels: int = field(
        16, "Sentinel tokens <extra_id_0> … of the tokenizer.", check=in_range(2, 1000, integer=True)
    )
    max_len: int = field(128, "Longest token sequence (eos included) tokenize accepts.", check=_pos)
    dim: int = field(128, "Width of the token stream (T5's d_model).", check=_pos)
    heads: int = field(
        4, "Attention heads; must divide dim (head width dim // heads).", check=in_range(1, 1024, integer=True)
    )
    depth: int = field(4, "Encoder blocks.", check=in_range(1, 1024, integer=True))
    decoder_depth: int = field(
        2, "Decoder blocks; 0 for an encoder alone (a converted T5EncoderModel).", check=in_range(0, 1024, integer=True)
    )
    mlp_ratio: float = field(2.0, "MLP hidden width (d_ff) as a multiple of dim.", check=in_range(0.25, 64))
    act: str = field(
        "geglu_tanh",
        "MLP activation: T5 v1.1 / mT5's gated GELU ('geglu_tanh') or T5's 'relu'.",
        check=one_of("geglu_tanh", "relu"),
    )
    relative_buckets: int = field(
        32, "Relative position buckets per stack (T5: 32).", check=in_range(4, 4096, integer=True)
    )
    relative_max_distance: int = field(128, "Offsets beyond this share the last bucket (T5: 128).", check=_pos)
    norm_eps: float = field(1e-6, "Epsilon of every RMSNorm.", check=in_range(0.0, 1.0))
    dropout: float = field(0.0, "Dropout on the residual branches and attention weights.", check=in_range(0.0, 1.0))
    tie_head: bool = field(False, "Logits from the shared token table instead of a separate head (original T5).")
    scale_head: bool = field(False, "Scale the decoder states by dim ** -0.5 before the head (original T5).")
    noise_density: float = field(0.15, "Share of a caption's tokens corrupted (T5: 0.15).", check=in_range(0.01, 0.9))
    mean_span: float = field(3.0, "Mean corrupted span length in tokens (T5: 3).", check=in_range(1.0, 64.0))
    recaption: bool = field(
        True,
        "In training on a multilingual dataset, re-caption each scene every step in a random language with a random "
        "training template (training pairs only) before corrupting it.",
    )
    tokenizer: str = field(
        "captions",
        "'captions': byte-level BPE of vocab_size ids learnt from the data's training captions, plus the sentinels; "
        "'file': tokenizer.json in the model folder (converted models; none until given).",
        check=one_of("captions", "file"),
    )
    data: str = field("shapes-multilingual", "Dataset whose captions the model learnt from (and is evaluated on).")

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"T5Config.heads must divide dim; got dim={self.dim}, heads={self.heads}")


def block_config(c: T5Config, decoder: bool) -> BlockConfig:
    """The core block of the encoder (bidirectional buckets) or the decoder (causal buckets, cross-attention)."""
    return BlockConfig(
        dim=c.dim,
        heads=c.heads,
        mlp_ratio=c.mlp_ratio,
        norm="rmsnorm",
        norm_eps=c.norm_eps,
        act=c.act,
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        dropout=c.dropout,
        attn_dropout=c.dropout,
        attn_scale=1.0,
        position_bias="t5",
        relative_buckets=c.relative_buckets,
        relative_max_distance=c.relative_max_distance,
        relative_bidirectional=not decoder,
        cross_attention=decoder,
    )


__all__ = ["T5Config", "block_config"]
