"""CLIP's two towers: the image tower (the core ViT encoder, its [CLS] token, a bias-free projection) and the text
tower (the core causal text encoder pooled at the end-of-text token, a bias-free projection). The end-of-text
position of a row is the *first* occurrence of ``eos_id`` (as transformers does); with ``eos_id=None`` it is the
position of the largest id (OpenAI's original rule)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.nn.encoders import TextEncoder, TextEncoderConfig, ViTEncoder, ViTEncoderConfig


class CLIPVisual(nn.Module):
    """Image tower: pixels (B, C, S, S) → unnormalised embeddings (B, embed_dim)."""

    def __init__(self, vision: ViTEncoderConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = vision
        self.encoder = ViTEncoder(vision)
        self.proj = nn.Linear(vision.dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=vision.dim**-0.5)

    def check(self, pixels: Tensor) -> None:
        """ValueError naming expected vs given for a wrong image batch."""
        c, s = self.cfg.channels, self.cfg.image_size
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (c, s, s):
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"expected images (B, {c}, {s}, {s}); got {got}")
        if pixels.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty image batch (B >= 1, {c}, {s}, {s}); got shape {tuple(pixels.shape)}"
            )
        if not pixels.is_floating_point():
            raise ValueError(f"expected floating-point images; got dtype {pixels.dtype}")

    def forward(self, pixels: Tensor) -> Tensor:
        self.check(pixels)
        tokens = self.encoder(pixels)  # (B, 1 + N, D), final norm applied
        return self.proj(tokens[:, 0])  # (B, E)


class CLIPTextual(nn.Module):
    """Text tower: ids (B, L) → unnormalised embeddings (B, embed_dim), pooled at end-of-text."""

    def __init__(self, text: TextEncoderConfig, embed_dim: int, eos_id: int | None) -> None:
        super().__init__()
        self.eos_id = eos_id
        self.encoder = TextEncoder(text)
        self.proj = nn.Linear(text.dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=text.dim**-0.5)

    def eos_positions(self, ids: Tensor) -> Tensor:
        """(B,) the first position of ``eos_id`` per row (the largest id when ``eos_id`` is None)."""
        if self.eos_id is None:
            return ids.argmax(dim=-1)
        hits = ids == self.eos_id  # (B, L)
        missing = (~hits.any(dim=-1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"expected an end-of-text token (id {self.eos_id}) in every row; rows {missing[:5]} have none"
            )
        return hits.int().argmax(dim=-1)

    def tokens(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) ids → the final-normed per-token features (B, L, D) and a mask (B, L), True up to and
        including each row's end-of-text (transformers' ``last_hidden_state`` and the tokens it pools from)."""
        self.encoder.check(ids)
        tokens = self.encoder(ids)  # (B, L, D), causal, final norm applied
        ends = self.eos_positions(ids)  # (B,)
        return tokens, torch.arange(ids.shape[1], device=ids.device)[None] <= ends[:, None]

    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """:meth:`tokens`' output → (B, E) the projected features at end-of-text."""
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), mask.sum(1) - 1]  # (B, D)
        return self.proj(pooled)  # (B, E)

    def forward(self, ids: Tensor) -> Tensor:
        return self.pool(*self.tokens(ids))  # (B, E)


__all__ = ["CLIPTextual", "CLIPVisual"]
