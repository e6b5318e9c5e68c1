"""Kandinsky 2.1's condition: the UNet's image-and-text conditioning (diffusers' ``text_image_proj`` /
``text_image`` layout from :mod:`polymodal.nn.conditioning`), the dropped conditions guidance contrasts against,
a per-caption cache of the frozen M-CLIP's features, and the frozen parts' features of the training images."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polymodal.nn.conditioning import TextImageProjection, TextImageTimeEmbedding

from .condition import pad_rows

Text = tuple[Tensor, Tensor, Tensor]
"""M-CLIP's (pooled (B, E), token features (B, L, Dm), mask (B, L))."""


class ImageTextCondition(nn.Module):
    """(pooled text (B, E), tokens (B, L, Dm), mask (B, L), CLIP image embedding (B, Ei)) → (additive (B, T),
    context (B, n + L, C), context mask (B, n + L)): Kandinsky 2.1's ``encoder_hid_proj`` (the image embedding
    as ``n`` always-visible tokens, then the projected text tokens) and ``add_embedding`` (image projection plus
    the normed pooled-text projection, added to the timestep embedding)."""

    def __init__(
        self, text_embed: int, text_dim: int, image_dim: int, time_dim: int, context_dim: int, image_tokens: int
    ) -> None:
        super().__init__()
        self.encoder_hid_proj = TextImageProjection(text_dim, image_dim, context_dim, image_tokens)
        self.add_embedding = TextImageTimeEmbedding(text_embed, image_dim, time_dim)

    def forward(self, text: Text, image_embed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """See the class docstring."""
        pooled, tokens, mask = text
        context = self.encoder_hid_proj(tokens, image_embed)  # (B, n + L, C)
        n = self.encoder_hid_proj.num_image_text_embeds
        visible = torch.ones(mask.shape[0], n, dtype=torch.bool, device=mask.device)  # (B, n)
        return self.add_embedding(pooled, image_embed), context, torch.cat([visible, mask.bool()], dim=1)


def drop(text: Text, image_embed: Tensor, text_rows: Tensor, image_rows: Tensor) -> tuple[Text, Tensor]:
    """The condition with the text of ``text_rows`` (B,) bool dropped (zero pooled, every token masked) and the
    image embedding of ``image_rows`` (B,) zeroed."""
    pooled, tokens, mask = text
    keep = ~text_rows[:, None]  # (B, 1)
    return (pooled * keep, tokens, mask & keep), image_embed * ~image_rows[:, None]  # (B, Ei)


def null_text(text: Text) -> Text:
    """The dropped text for one row, shaped like ``text``'s first row: ((1, E), (1, L, Dm), (1, L) all False)."""
    return torch.zeros_like(text[0][:1]), torch.zeros_like(text[1][:1]), torch.zeros_like(text[2][:1]).bool()


class TextCache:
    """M-CLIP's features of each caption seen, computed once: the frozen encoder never changes in training."""

    def __init__(self) -> None:
        self.rows: dict[str, Text] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, model: Any, captions: list[str]) -> Text:
        """(pooled (B, E), tokens (B, L, Dm), mask (B, L)) of ``captions``, encoding (truncated) only new ones."""
        new = list(dict.fromkeys(c for c in captions if c not in self.rows))
        if new:
            pooled, tokens, mask = model.encode_text(new, truncate=True)
            for i, c in enumerate(new):
                n = int(mask[i].sum())
                self.rows[c] = (pooled[i], tokens[i, :n], mask[i, :n])
        rows = [self.rows[c] for c in captions]
        tokens, mask = pad_rows([r[1] for r in rows], [r[2] for r in rows])  # (B, L, Dm), (B, L)
        return torch.stack([r[0] for r in rows]), tokens, mask


class TrainingTargets:
    """The frozen parts' view of a training split, computed once: MoVQ latents (N, 4, h, w) and CLIP image
    embeddings (N, Ei), found by the batch's split rows when the images there are exactly the batch's."""

    def __init__(self, images: Tensor, latents: Tensor, embeds: Tensor) -> None:
        self.images, self.latents, self.embeds = images, latents, embeds

    def lookup(self, batch: Any, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """(latents (B, 4, h, w), embeds (B, Ei)) of ``images`` (B, C, S, S), or None when they cannot be proven to
        be the batch's split rows (no index, other images at those rows)."""
        index = getattr(batch, "index", None)
        if index is None or index.shape != (images.shape[0],) or not len(self.images):
            return None
        rows = index.cpu()
        if int(rows.min()) < 0 or int(rows.max()) >= len(self.images):
            return None
        if not torch.equal(self.images[rows], images.cpu()):
            return None
        rows = rows.to(self.latents.device)
        return self.latents[rows].to(images.device), self.embeds[rows].to(images.device)  # (B, 4, h, w), (B, E)
