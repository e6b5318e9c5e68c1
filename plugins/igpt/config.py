"""iGPT's config: image size and palette, the decoder's shape (RMS norms, QuickGELU), training and probe options."""

from __future__ import annotations

from polymodal.config import config, field, in_range, one_of


@config
class IGPTConfig:
    """An iGPT image model: palette, decoder shape and evaluation options."""

    image_size: int = field(
        8,
        "Side of the square images the model reads and writes (inputs are resized to it).",
        check=in_range(1, 1024, integer=True),
    )
    channels: int = field(
        1,
        "Image channels: 1 (grey) or 3 (RGB); the palette's colours have this many values.",
        check=in_range(1, 3, integer=True),
    )
    palette_size: int = field(
        16, "Palette colours K (tokens 0..K-1; the start token is id K).", check=in_range(2, 65536, integer=True)
    )
    palette_seed: int = field(0, "Seed of the palette's k-means.", check=in_range(0, 2**31 - 1, integer=True))
    dim: int = field(128, "Width of the token stream.", check=in_range(1, 65536, integer=True))
    depth: int = field(4, "Decoder blocks.", check=in_range(1, 1024, integer=True))
    heads: int = field(4, "Attention heads; must divide dim.", check=in_range(1, 1024, integer=True))
    mlp_ratio: float = field(4.0, "MLP hidden width as a multiple of dim.", check=in_range(0.25, 64))
    act: str = field(
        "quick_gelu",
        "MLP activation (iGPT: quick_gelu, x·sigmoid(1.702x)).",
        check=one_of("quick_gelu", "gelu", "gelu_tanh", "relu"),
    )
    norm_eps: float = field(
        1e-5, "Epsilon of the RMS norms (transformers' ImageGPT: layer_norm_epsilon).", check=in_range(0.0, 1.0)
    )
    dropout: float = field(0.0, "Dropout on the embeddings and the residual branches.", check=in_range(0.0, 1.0))
    attn_dropout: float = field(0.0, "Dropout on the attention weights.", check=in_range(0.0, 1.0))
    augment_shift: int = field(
        0,
        "Training augmentation: random translation by up to this many pixels (zero fill).",
        check=in_range(0, 64, integer=True),
    )
    augment_prob: float = field(
        1.0, "Share of training images that get the random translation.", check=in_range(0.0, 1.0)
    )
    data: str = field("digits", "Dataset the model was adapted to (`polymodal eval` uses it by default).")
    probe_l2: float = field(
        1e-4,
        "L2 penalty of the linear probes (softmax regression on standardised features).",
        check=in_range(0.0, 10.0),
    )
    eval_samples: int = field(
        0, "Unconditional samples drawn by evaluate for fd_judge (0: skip).", check=in_range(0, 100000, integer=True)
    )

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"IGPTConfig.heads must divide dim; got dim={self.dim}, heads={self.heads}")
        if self.channels not in (1, 3):
            raise ValueError(f"IGPTConfig.channels must be 1 or 3; got {self.channels}")


__all__ = ["IGPTConfig"]
