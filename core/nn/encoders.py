"""Core encoders: the Vision Transformer trunk (ViT, CLIP's image tower, DINO, PIXEL, MAE) and a text trunk (CLIP, ImageBind)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from polymodal.config import as_tuple, config, field, in_range, one_of
from polymodal.nn import BlockConfig, PatchEmbed, PositionEmbedding, StackConfig, TransformerStack, init_weights
from polymodal.nn.norm import make_norm

BLOCK_DOC = (
    "The transformer blocks: width (``dim``), heads, MLP ratio and activation (QuickGELU for OpenAI CLIP), "
    "norm and its epsilon, biases, dropout (also applied after the embedding) and the maximum "
    "stochastic-depth rate (``drop_path``, growing linearly over the blocks); no cross-attention."
)
"""The doc of both encoder configs' ``block`` field."""

CHECKPOINTING_DOC = (
    "Gradient checkpointing of the blocks (``--set encoder.checkpointing=true``; CLIP: ``vision.`` and "
    "``text.checkpointing``): in training, recompute each block's activations in the backward pass instead "
    "of storing them (less memory, about one more forward; the same gradients). Does not change the "
    "function, so a saved config without it loads."
)
"""The doc of both encoder configs' ``checkpointing`` field."""


def _self_attention_only(instance, attribute, value: BlockConfig) -> None:
    """Validator: an encoder's blocks have no cross-attention (an encoder runs without a context)."""
    if not isinstance(value, BlockConfig) or value.cross_attention:
        got = "cross_attention=True" if isinstance(value, BlockConfig) else repr(value)
        raise ValueError(f"{type(instance).__name__}.block must be a BlockConfig without cross-attention; got {got}")


class EncoderBlocks:
    """What both encoder configs share: ``block`` (a :class:`BlockConfig`), ``depth``, ``final_norm`` and
    ``checkpointing``."""

    @property
    def dim(self) -> int:
        """Token width (``block.dim``)."""
        return self.block.dim

    def with_block(self, **changes):
        """The config with ``changes`` to its block (``cfg.with_block(dim=16, heads=2)``)."""
        return attrs.evolve(self, block=attrs.evolve(self.block, **changes))

    def stack(self) -> StackConfig:
        """The :class:`StackConfig` of the encoder's blocks."""
        return StackConfig(
            depth=self.depth, block=self.block, final_norm=self.final_norm, checkpointing=self.checkpointing
        )


def _check_grid(instance, attribute, value) -> None:
    """Validator: None or two positive integers."""
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be None or (rows, cols) of positive "
            f"integers; got {value!r}"
        )


@config
class ViTEncoderConfig(EncoderBlocks):
    """A patch-embedding transformer encoder over images."""

    image_size: int = field(
        8,
        "Side of the square images the position table is built for (unless ``grid`` is set).",
        check=in_range(1, 8192, integer=True),
    )
    patch_size: int = field(2, "Side of the square patches.", check=in_range(1, 1024, integer=True))
    grid: tuple[int, int] | None = field(
        None,
        "Patch (rows, cols) the position table is built for, for non-square "
        "inputs such as a 1×N strip of rendered text or a mels × frames "
        "spectrogram; None: image_size / patch_size per side.",
        check=_check_grid,
        converter=as_tuple,
    )
    channels: int = field(1, "Input image channels.", check=in_range(1, 64, integer=True))
    block: BlockConfig = field(BlockConfig(), BLOCK_DOC, check=_self_attention_only)
    depth: int = field(4, "Number of transformer blocks.", check=in_range(1, 1024, integer=True))
    cls_token: bool = field(True, "Prepend a learned [CLS] token.")
    pos_embed: str = field(
        "learned", "Position embedding: 'learned' or fixed 'sincos'.", check=one_of("learned", "sincos")
    )
    ln_pre: bool = field(False, "Normalise the embedded tokens before the blocks (CLIP).")
    patch_bias: bool = field(True, "Bias on the patch-embedding convolution (CLIP's has none).")
    final_norm: bool = field(True, "Normalise the output tokens.")
    checkpointing: bool = field(False, CHECKPOINTING_DOC, runtime=True)

    def __attrs_post_init__(self) -> None:
        if self.grid is None and self.image_size % self.patch_size:
            raise ValueError(
                f"ViTEncoderConfig.patch_size must divide image_size; got image_size="
                f"{self.image_size}, patch_size={self.patch_size}"
            )

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of patches the encoder is built for."""
        if self.grid is not None:
            return self.grid
        return (self.image_size // self.patch_size,) * 2

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the inputs the encoder is built for."""
        rows, cols = self.patch_grid
        return rows * self.patch_size, cols * self.patch_size


class ViTEncoder(nn.Module):
    """Images (B, C, H, W) → tokens (B, [CLS] + N, dim), patches in raster order.

    The position table covers ``cfg.patch_grid`` (square, or any ``grid`` of rows × cols); inputs of
    another size get it resized by bicubic interpolation.
    """

    config_class = ViTEncoderConfig

    def __init__(self, cfg: ViTEncoderConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or ViTEncoderConfig(), **overrides)
        self.cfg = cfg
        self.out_dim = cfg.dim
        self.patch_embed = PatchEmbed(cfg.channels, cfg.dim, cfg.patch_size, bias=cfg.patch_bias)
        self.prefix = 1 if cfg.cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        self.pos_embed = PositionEmbedding(cfg.dim, cfg.patch_grid, prefix=self.prefix, kind=cfg.pos_embed)
        self.drop = nn.Dropout(cfg.block.dropout)
        self.ln_pre = make_norm(cfg.block.norm, cfg.dim, cfg.block.norm_eps) if cfg.ln_pre else None
        self.blocks = TransformerStack(cfg.stack())
        init_weights(self)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def embed(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Patch + position embedding, [CLS] prepended; ``keep`` (B, K) selects visible patches."""
        x = self.patch_embed(images)  # (B, N, D)
        grid = (images.shape[-2] // self.cfg.patch_size, images.shape[-1] // self.cfg.patch_size)
        pos = self.pos_embed(grid)  # (1, prefix + N, D)
        x = x + pos[:, self.prefix :]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        if self.cls_token is not None:
            cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        x = self.drop(x)
        return self.ln_pre(x) if self.ln_pre is not None else x

    def forward(self, images: Tensor, keep: Tensor | None = None, return_hidden: bool = False):
        """(B, C, H, W) → (B, prefix + N, D); with ``return_hidden`` also every block's input."""
        return self.blocks(self.embed(images, keep), return_hidden=return_hidden)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """A random image batch of the configured size (B, C, H, W)."""
        return (torch.rand(batch_size, self.cfg.channels, *self.cfg.input_size, generator=generator),)


@config
class TextEncoderConfig(EncoderBlocks):
    """A token-embedding transformer encoder over text (CLIP's text tower: causal, learned positions)."""

    vocab_size: int = field(
        512, "Rows of the token-embedding table (ids must be below it).", check=in_range(1, 1 << 24, integer=True)
    )
    context_length: int = field(
        16, "Maximum sequence length (rows of the learned position table).", check=in_range(1, 1 << 16, integer=True)
    )
    block: BlockConfig = field(BlockConfig(norm_eps=1e-5), BLOCK_DOC, check=_self_attention_only)
    depth: int = field(2, "Number of transformer blocks.", check=in_range(1, 1024, integer=True))
    causal: bool = field(True, "Causal self-attention (each token sees only earlier ones), as in CLIP.")
    final_norm: bool = field(True, "Normalise the output tokens.")
    positions: str = field(
        "learned",
        "Absolute positions: 'learned' (a table added to the token embeddings, CLIP's) or 'none' (order only from "
        "a relative bias in the blocks, block.position_bias='t5', as T5; a token's features then do not shift "
        "with the words before it).",
        check=one_of("learned", "none"),
        backfill=True,
    )
    checkpointing: bool = field(False, CHECKPOINTING_DOC, runtime=True)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """The mean of the real tokens' features: tokens (B, L, D), mask (B, L) True for real tokens → (B, D); a row
    without a real token gives zeros."""
    weights = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)


class TextEncoder(nn.Module):
    """Token ids (B, L) → tokens (B, L, dim): token + learned position embedding, blocks, final norm.

    ``L`` may be shorter than ``context_length`` (positions ``0..L-1`` are used). ``key_padding``
    (B, L) bool is True for real tokens. Pooling (CLIP's end-of-text token, a mean …) is the
    recipe's choice; the encoder returns every position.
    """

    config_class = TextEncoderConfig

    def __init__(self, cfg: TextEncoderConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or TextEncoderConfig(), **overrides)
        self.cfg = cfg
        self.out_dim = cfg.dim
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        learned = cfg.positions == "learned"
        self.pos_embed = PositionEmbedding(cfg.dim, (1, cfg.context_length), kind="learned") if learned else None
        self.drop = nn.Dropout(cfg.block.dropout)
        self.blocks = TransformerStack(cfg.stack())
        init_weights(self)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def check(self, ids: Tensor) -> None:
        """Raise a ValueError naming expected vs given for a malformed id batch."""
        cfg = self.cfg
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected token ids (B, L) with L <= {cfg.context_length}; got {shape}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"expected integer token ids; got dtype {ids.dtype}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"expected a non-empty batch of token ids (B >= 1, L >= 1); got shape {tuple(ids.shape)}")
        if ids.shape[1] > cfg.context_length:
            raise ValueError(f"expected at most {cfg.context_length} tokens (the context length); got {ids.shape[1]}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"expected token ids in [0, {cfg.vocab_size}) (the vocabulary size); got ids from {lo} to {hi}"
            )

    def forward(self, ids: Tensor, key_padding: Tensor | None = None, return_hidden: bool = False):
        """(B, L) ids → (B, L, D); with ``return_hidden`` also every block's input."""
        self.check(ids)
        x = self.token_embed(ids.long())  # (B, L, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed()[:, : ids.shape[1]]  # (B, L, D)
        x = self.drop(x)
        return self.blocks(x, causal=self.cfg.causal, key_padding=key_padding, return_hidden=return_hidden)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Random ids (B, context_length) within the vocabulary."""
        return (torch.randint(0, self.cfg.vocab_size, (batch_size, self.cfg.context_length), generator=generator),)
