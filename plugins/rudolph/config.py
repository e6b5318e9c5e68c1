"""RuDolph's configuration: the frozen image tokenizer, the text contexts, the decoder, the mask schedule, sampling."""

from __future__ import annotations

from polymodal.attention import IMAGE_PATTERNS
from polymodal.config import config, field, in_range, one_of
from polymodal.data.digits import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES
from polymodal.generation.options import TOKEN_SAMPLING, SampleOption, keywords
from polymodal.models.parts import PartConfig, part_field

CANDIDATES = SampleOption(
    "candidates",
    "--candidates",
    "Images drawn per kept sample, self-reranked by the caption's right-text perplexity.",
    type="int",
)

SAMPLE_OPTIONS = keywords((*TOKEN_SAMPLING, CANDIDATES))
"""Options of ``polymodal sample`` this family supports."""


@config
class RudolphConfig:
    """RuDolph: a decoder over [left text][image codes][right text] with a frozen VQ-VAE image tokenizer."""

    tokenizer: PartConfig = part_field(
        PartConfig(variant="vqvae", data="digits"),
        "The frozen image tokenizer (a VQ-VAE); its variant and data follow --data.",
    )
    text_tokenizer: str = field(
        "bpe",
        "'bpe': byte-level BPE learnt from the caption templates; 'bytes': UTF-8 bytes.",
        check=one_of("bpe", "bytes"),
    )
    text_vocab_size: int = field(
        400,
        "Rows of the text part of the vocabulary (the BPE learns at most this many ids).",
        check=in_range(262, 1 << 20, integer=True),
    )
    left_len: int = field(
        10,
        "Tokens of the left text context (task token, caption, end-of-text, padding).",
        check=in_range(2, 4096, integer=True),
    )
    right_len: int = field(
        10,
        "Tokens of the right text context (task token, caption, end-of-text, padding).",
        check=in_range(2, 4096, integer=True),
    )
    dim: int = field(128, "Width of the token stream.", check=in_range(1, 65536, integer=True))
    depth: int = field(4, "Transformer blocks.", check=in_range(1, 1024, integer=True))
    heads: int = field(4, "Attention heads; must divide dim.", check=in_range(1, 1024, integer=True))
    mlp_ratio: float = field(4.0, "MLP hidden width as a multiple of dim.", check=in_range(0.25, 64))
    dropout: float = field(0.0, "Dropout after attention and MLP projections.", check=in_range(0.0, 1.0))
    cycle: tuple[str, ...] = field(
        ("row", "column", "conv"),
        "Image-to-image attention pattern per layer, repeated (" + ", ".join(IMAGE_PATTERNS) + ").",
    )
    last: str = field("conv", "Pattern of the last layer (RuDolph: convolutional).", check=one_of(*IMAGE_PATTERNS))
    kernel: int = field(3, "Window of the convolutional pattern (odd).", check=in_range(1, 99, integer=True))
    loss_weights: tuple[float, ...] = field(
        (1.0, 7.0, 1.0), "Weights of the mean cross-entropies of left text, image and right text."
    )
    image_embed_init: str = field(
        "decoded",
        "Initial image-code embeddings: 'decoded' projects what each code looks like "
        "(the tokenizer's decoding of a grid of that code) so similar codes start close; "
        "'random': N(0, 0.02).",
        check=one_of("decoded", "random"),
    )
    augment_noise: float = field(
        0.0,
        "Training augmentation for image→text rows: Gaussian pixel noise of this std "
        "before tokenizing (text→image rows stay clean, so samples do too).",
        check=in_range(0.0, 10.0),
    )
    t2i_fraction: float = field(
        0.5, "Share of training samples in the text→image layout (the rest image→text).", check=in_range(0.0, 1.0)
    )
    templates: tuple[str, ...] = field(
        tuple(TRAIN_TEMPLATES),
        "Caption templates re-sampled per training step ({numeral}, {word}); empty: use the dataset's captions.",
    )
    heldout_templates: tuple[str, ...] = field(tuple(HELDOUT_TEMPLATES), "Held-out templates (never trained on).")
    class_names: tuple[str, ...] = field(tuple(DIGIT_WORDS), "Class names filling {word}; index fills {numeral}.")
    data: str = field("digits", "Name of the dataset the config was adapted to.")
    temperature: float = field(1.0, "Default sampling temperature for images.", check=in_range(1e-6, 100.0))
    top_k: int | None = field(8, "Default top-k for image sampling (None: off).")
    top_p: float | None = field(None, "Default nucleus mass for image sampling (None: off).")
    eval_prompt: str = field("the digit {word}", "Prompt template of the samples `evaluate` judges.")
    eval_samples: int = field(10, "Samples per class that `evaluate` judges.", check=in_range(1, 10000, integer=True))
    eval_candidates: int = field(
        4,
        "Candidates per sample for the self-reranked sample accuracy (1: skip it).",
        check=in_range(1, 1000, integer=True),
    )
    eval_seed: int = field(0, "Seed of evaluation sampling.", check=in_range(0, 2**31, integer=True))

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"RudolphConfig.heads must divide dim; got dim={self.dim}, heads={self.heads}")
        bad = [p for p in self.cycle if p not in IMAGE_PATTERNS]
        if bad or not self.cycle:
            raise ValueError(
                f"RudolphConfig.cycle must be a non-empty list of {', '.join(IMAGE_PATTERNS)}; got {self.cycle!r}"
            )
        if self.kernel % 2 == 0:
            raise ValueError(f"RudolphConfig.kernel must be odd; got {self.kernel}")
        if len(self.loss_weights) != 3 or any(w < 0 for w in self.loss_weights):
            raise ValueError(
                f"RudolphConfig.loss_weights must be 3 weights >= 0 (left, image, right); got {self.loss_weights!r}"
            )
        for name in ("top_k",):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"RudolphConfig.top_k must be an integer >= 1 or None; got {v!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"RudolphConfig.top_p must be in (0, 1] or None; got {self.top_p!r}")


__all__ = ["CANDIDATES", "SAMPLE_OPTIONS", "RudolphConfig"]
