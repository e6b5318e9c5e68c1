"""How a diffusion UNet is conditioned on embeddings, laid out as diffusers' modules (same functions, same parameter
names, so converters map them 1:1): each maps embeddings to the UNet's additive time embedding (B, T) or its
cross-attention context (B, N, C), the inputs of :class:`polymodal.nn.unet.UNet`'s ``additive_embedding`` and
``context``.

* :class:`UnCLIPProjection` (diffusers' ``UnCLIPTextProjModel``): a CLIP image and text embedding → the additive
  embedding, and 4 extra context tokens beside the projected, normed text tokens (DALL·E 2's decoder).
* :class:`TextImageProjection` (diffusers' ``encoder_hid_dim_type="text_image_proj"``) and
  :class:`TextImageTimeEmbedding` (``addition_embed_type="text_image"``): Kandinsky 2.1's UNet — an image embedding
  as 10 context tokens beside the projected text token features, and the image embedding plus the normed pooled
  text embedding added to the time embedding.
* :class:`AttentionPooling`: token features → one vector by a learned multi-head attention (Kandinsky 2.0's pooled
  mT5 feature in its ``Text2ImUNet``), for an encoder that has no pooled output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.attention import attention
from polymodal.nn.encoders import masked_mean


class UnCLIPProjection(nn.Module):
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


class TextImageProjection(nn.Module):
    """diffusers' ``TextImageProjection`` (Kandinsky 2.1's ``encoder_hid_proj``): token features (B, L, Dt) and an
    image embedding (B, E) → the context (B, n + L, C): the image embedding as ``n`` tokens, then the projected
    text tokens."""

    def __init__(self, text_dim: int, image_dim: int, context_dim: int, image_tokens: int = 10) -> None:
        super().__init__()
        self.num_image_text_embeds = image_tokens
        self.image_embeds = nn.Linear(image_dim, image_tokens * context_dim)
        self.text_proj = nn.Linear(text_dim, context_dim)

    def forward(self, text_tokens: Tensor, image_embed: Tensor) -> Tensor:
        """text_tokens (B, L, Dt), image_embed (B, E) → context (B, n + L, C)."""
        b = text_tokens.shape[0]
        if image_embed.shape[0] != b:
            raise ValueError(f"text tokens and image embeddings need one batch; got {b} and {image_embed.shape[0]}")
        image = self.image_embeds(image_embed).reshape(b, self.num_image_text_embeds, -1)  # (B, n, C)
        return torch.cat([image, self.text_proj(text_tokens)], dim=1)  # (B, n + L, C)


class TextImageTimeEmbedding(nn.Module):
    """diffusers' ``TextImageTimeEmbedding`` (Kandinsky 2.1's ``add_embedding``): a pooled text embedding (B, Dt) and
    an image embedding (B, E) → the additive time embedding (B, T) = image_proj(image) + LayerNorm(text_proj(text))."""

    def __init__(self, text_dim: int, image_dim: int, time_dim: int) -> None:
        super().__init__()
        self.text_proj = nn.Linear(text_dim, time_dim)
        self.text_norm = nn.LayerNorm(time_dim)
        self.image_proj = nn.Linear(image_dim, time_dim)

    def forward(self, text_embed: Tensor, image_embed: Tensor) -> Tensor:
        """text_embed (B, Dt), image_embed (B, E) → (B, T)."""
        if image_embed.shape[0] != text_embed.shape[0]:
            raise ValueError(
                f"text and image embeddings need one batch; got {text_embed.shape[0]} and {image_embed.shape[0]}"
            )
        return self.image_proj(image_embed) + self.text_norm(self.text_proj(text_embed))  # (B, T)


class AttentionPooling(nn.Module):
    """Token features (B, L, D) with a mask (B, L, True for real tokens) → one vector (B, out_dim): a query made
    from the real tokens' mean attends to them with ``heads`` heads, then a linear projection (in the manner of
    diffusers' / DeepFloyd IF's ``AttentionPooling``, which also lets the query attend to itself, adds a learned
    position to it and attends to padding; not the same function). A row with no real token (a dropped text) pools to zeros
    before the projection, so it gives the projection's bias."""

    def __init__(self, dim: int, out_dim: int, heads: int = 4) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"AttentionPooling: heads must divide dim={dim}; got {heads}")
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, out_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """tokens (B, L, D), mask (B, L) → (B, out_dim)."""
        dim = self.q_proj.in_features
        if tokens.dim() != 3 or tokens.shape[-1] != dim or tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(
                f"AttentionPooling: expected tokens (B, L, {dim}) and a mask (B, L); got {tuple(tokens.shape)} and "
                f"{tuple(mask.shape)}"
            )
        b, n, d = tokens.shape
        real = mask.bool()  # (B, L)
        q = self.q_proj(masked_mean(tokens, real)).view(b, 1, self.heads, -1).transpose(1, 2)  # (B, H, 1, Dh)
        k = self.k_proj(tokens).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        v = self.v_proj(tokens).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        any_real = real.any(1, keepdim=True)  # (B, 1)
        visible = real | ~any_real  # (B, L): an empty row attends everywhere, then is zeroed
        pooled = attention(q, k, v, key_padding=visible).reshape(b, d)  # (B, D)
        return self.out(pooled * any_real)  # (B, out_dim)


__all__ = ["AttentionPooling", "TextImageProjection", "TextImageTimeEmbedding", "UnCLIPProjection"]
