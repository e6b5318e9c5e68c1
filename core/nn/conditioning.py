"""unCLIP's decoder conditioning: diffusers' ``UnCLIPTextProjModel``, the map from the CLIP embeddings to the
decoder UNet's additive time embedding and its cross-attention context (see :mod:`.decoder`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TextImageProjection(nn.Module):
    """diffusers' ``UnCLIPTextProjModel`` (same function, same parameter names): CLIP embeddings → the decoder's
    additive time embedding (B, time_dim) and context (B, extra_tokens + L, context_dim)."""

    def __init__(self, embed_dim: int, text_dim: int, time_dim: int, context_dim: int, extra_tokens: int = 4) -> None:
        super().__init__()
        self.clip_extra_context_tokens = extra_tokens
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(embed_dim))
        self.embedding_proj = nn.Linear(embed_dim, time_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(embed_dim, time_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(embed_dim, extra_tokens * context_dim)
        self.encoder_hidden_states_proj = nn.Linear(text_dim, context_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(context_dim)

    def forward(
        self, image_embed: Tensor, text_embed: Tensor, text_tokens: Tensor | None = None, *, prepend_null: bool = False
    ) -> tuple[Tensor, Tensor]:
        """image_embed (B, E), text_embed (B', E), text_tokens (B', L, Dt) or None → (context (B', n + L, C),
        additive (B', T)). ``prepend_null`` puts the null image embedding first, B' = 2B (diffusers' CFG doubling)."""
        if prepend_null:
            null = self.learned_classifier_free_guidance_embeddings[None].expand_as(image_embed)  # (B, E)
            image_embed = torch.cat([null, image_embed])  # (2B, E)
        if image_embed.shape[0] != text_embed.shape[0]:
            raise ValueError(
                f"image and text embeddings need one batch; got {image_embed.shape[0]} and {text_embed.shape[0]}"
            )
        b, n = image_embed.shape[0], self.clip_extra_context_tokens
        additive = self.clip_image_embeddings_project_to_time_embeddings(image_embed) + self.embedding_proj(text_embed)
        extra = self.clip_extra_context_tokens_proj(image_embed).view(b, -1, n).transpose(1, 2)  # (B, n, C)
        if text_tokens is None:
            return extra, additive
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_tokens))  # (B, L, C)
        return torch.cat([extra, text], dim=1), additive  # (B, n + L, C), (B, T)
