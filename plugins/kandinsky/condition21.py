"""Kandinsky 2.1's condition: the UNet's image-and-text conditioning (diffusers' ``text_image_proj`` /
``text_image`` layout from :mod:`polymodal.nn.conditioning`), and the dropped conditions guidance contrasts against (the caches
are :mod:`.condition`'s)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.nn.conditioning import TextImageProjection, TextImageTimeEmbedding

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
