"""Kandinsky 2.0's text condition: prompts checked and tokenized by both frozen encoders, their features projected
into the UNet (pooled → added to the timestep embedding, tokens → the cross-attention context), the training
captions drawn from the training (language, template) pairs, and a per-caption cache of the frozen features."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from polymodal.data import languages as lang
from polymodal.data.multilingual import scene_objects
from polymodal.nn.conditioning import AttentionPooling


class TextProjection(nn.Module):
    """Both encoders' features → (additive (B, T), context (B, 1 + Lm + Lt, C), mask (B, 1 + Lm + Lt)).

    Pooled features are each projected and summed into the timestep embedding: with ``pooling="mean"`` M-CLIP's
    pooled embedding and T5's mean token feature each linearly; with ``"attention"`` (the reference
    ``Text2ImUNet``'s layout) T5's by a learned :class:`~polymodal.nn.conditioning.AttentionPooling` over its
    tokens, and each pooled projection layer-normed before the sum. Token features are each projected to the
    context width and layer-normed, and concatenated along the sequence after one learned always-visible token
    (so a fully dropped text still has a context to attend to)."""

    def __init__(
        self, clip_embed: int, clip_dim: int, t5_dim: int, time_dim: int, context_dim: int, pooling: str = "mean",
        heads: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.pooling = pooling
        self.clip_pooled = nn.Linear(clip_embed, time_dim)
        if pooling == "attention":
            self.t5_pooled: nn.Module = AttentionPooling(t5_dim, time_dim, heads)
            self.pooled_norms = nn.ModuleList(nn.LayerNorm(time_dim) for _ in range(2))
        else:
            self.t5_pooled = nn.Linear(t5_dim, time_dim)
        self.clip_tokens = nn.Sequential(nn.Linear(clip_dim, context_dim), nn.LayerNorm(context_dim))
        self.t5_tokens = nn.Sequential(nn.Linear(t5_dim, context_dim), nn.LayerNorm(context_dim))
        self.null_token = nn.Parameter(torch.zeros(1, 1, context_dim))

    def forward(self, text: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """``text`` = (clip pooled (B, E), clip tokens (B, Lm, Dm), clip mask (B, Lm), t5 pooled (B, D5),
        t5 tokens (B, Lt, D5), t5 mask (B, Lt))."""
        cp, ct, cm, tp, tt, tm = text
        if self.pooling == "attention":
            clip_norm, t5_norm = self.pooled_norms
            additive = clip_norm(self.clip_pooled(cp)) + t5_norm(self.t5_pooled(tt, tm))  # (B, T)
        else:
            additive = self.clip_pooled(cp) + self.t5_pooled(tp)  # (B, T)
        b = cp.shape[0]
        null = self.null_token.expand(b, -1, -1)  # (B, 1, C)
        context = torch.cat([null, self.clip_tokens(ct), self.t5_tokens(tt)], dim=1)  # (B, 1 + Lm + Lt, C)
        visible = torch.ones(b, 1, dtype=torch.bool, device=cm.device)  # (B, 1)
        return additive, context, torch.cat([visible, cm.bool(), tm.bool()], dim=1)  # mask (B, 1 + Lm + Lt)


def drop_text(text: tuple[Tensor, ...], drop: Tensor) -> tuple[Tensor, ...]:
    """The text condition with the rows ``drop`` (B,) bool emptied: zero pooled features, every token masked."""
    cp, ct, cm, tp, tt, tm = text
    keep = ~drop[:, None]  # (B, 1)
    return (cp * keep, ct, cm & keep, tp * keep, tt, tm & keep)


def check_vae_latents(vae: Any, unet: Any, what: str) -> None:
    """A ValueError naming both unless ``vae``'s latent shape is the UNet config's (channels, side, side)."""
    want, got = (unet.in_channels, unet.sample_size, unet.sample_size), tuple(int(v) for v in vae.latent_shape)
    if got != want:
        raise ValueError(
            f"{what}: the UNet expects latents (channels, height, width) = {want}; the VAE gives {got} (give a "
            "VAE of that latent size or set unet.in_channels/out_channels/sample_size)"
        )


def check_latents(x: Any, unet: Any, name: str = "latents") -> Tensor:
    """``x`` if it is (B, C, h, w) with the UNet config's latent channels and size, else a ValueError naming both."""
    want = (unet.in_channels, unet.sample_size, unet.sample_size)
    if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be (B, channels, h, w) = (B, {', '.join(map(str, want))}); got {got}")
    return x


def check_prompts(prompts: Any) -> list[str]:
    """A non-empty list of non-empty strings that are valid Unicode (encodable as UTF-8), else a ValueError."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"expected a prompt (str) or a non-empty list of prompts; got {prompts!r:.80}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i}: expected a non-empty str; got {p!r:.80}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"prompt {i}: expected text the tokenizers can encode (any valid UTF-8); got {p!r:.80}, which is "
                f"not valid Unicode ({exc.reason} at character {exc.start})"
            ) from None
    return list(prompts)


def tokenize(encoder: Any, prompts: list[str], truncate: bool, name: str) -> Tensor:
    """``encoder.tokenize(prompts)`` (B, L); a prompt over its context is a ValueError unless ``truncate``, when
    it is cut with a warning that says so."""
    try:
        return encoder.tokenize(prompts, truncate=False)
    except ValueError as exc:
        if not truncate:
            raise ValueError(f"{name}: {exc} (pass truncate=True / --truncate to cut it)") from None
        warnings.warn(f"{name}: a prompt was truncated to the tokenizer's context ({exc})", stacklevel=3)
        return encoder.tokenize(prompts, truncate=True)


def pad_rows(rows: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Token features (L_i, D) and masks (L_i,) of varying length → (B, L, D), (B, L) padded (mask False)."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[1])  # (B, L, D)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)  # (B, L)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        out[i, : r.shape[0]], mask[i, : r.shape[0]] = r, m
    return out, mask


class FeatureCache:
    """The frozen encoders' features of each caption seen, computed once: the encoders never change in training.

    ``model.encode_text`` gives one or more (pooled (B, E), tokens (B, L, D), mask (B, L)) groups, flattened
    (Kandinsky 2.0: M-CLIP's then T5's; 2.1: M-CLIP's); each caption keeps its unpadded rows."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, model: Any, captions: list[str]) -> tuple[Tensor, ...]:
        """The groups of ``captions``, padded to the batch's longest row, computing (truncated) only those not
        seen before."""
        new = list(dict.fromkeys(c for c in captions if c not in self.rows))
        if new:
            feats = model.encode_text(new, truncate=True)
            for i, c in enumerate(new):
                row: list[Tensor] = []
                for pooled, tokens, mask in zip(feats[0::3], feats[1::3], feats[2::3], strict=True):
                    n = int(mask[i].sum())
                    row += [pooled[i], tokens[i, :n], mask[i, :n]]
                self.rows[c] = tuple(row)
        rows = [self.rows[c] for c in captions]
        out: list[Tensor] = []
        for g in range(0, len(rows[0]), 3):
            tokens, mask = pad_rows([r[g + 1] for r in rows], [r[g + 2] for r in rows])  # (B, L, D), (B, L)
            out += [torch.stack([r[g] for r in rows]), tokens, mask]  # pooled (B, E)
        return tuple(out)


class TrainingTargets:
    """Frozen parts' features of a training split, computed once (latents (N, 4, h, w), CLIP embeddings (N, E)
    …), found by the batch's split rows when the images there are exactly the batch's."""

    def __init__(self, images: Tensor, *features: Tensor) -> None:
        self.images, self.features = images, features

    def lookup(self, batch: Any, images: Tensor) -> tuple[Tensor, ...] | None:
        """Each feature's rows (B, …) for ``images`` (B, C, S, S), or None when they cannot be proven to be the
        batch's split rows (no index, rows out of range, other images at those rows)."""
        index = getattr(batch, "index", None)
        if index is None or index.shape != (images.shape[0],) or not len(self.images):
            return None
        rows = index.cpu()
        if int(rows.min()) < 0 or int(rows.max()) >= len(self.images):
            return None
        if not torch.equal(self.images[rows], images.cpu()):
            return None
        return tuple(f[rows.to(f.device)].to(images.device) for f in self.features)


def training_pairs(dataset: str) -> list[tuple[str, int]]:
    """Every (language, template id) pair ``dataset`` trains on (never an evaluation-only pair)."""
    return [(code, t) for code in lang.LANGUAGES for t in lang.template_ids(dataset, code, heldout=False)]


def draw_captions(dataset: str, objects: list[list[tuple[int, int, int]]], unplaced: float = 0.0) -> list[str]:
    """Per scene (its (colour, kind, position) objects), a caption in a (language, template) pair drawn
    uniformly from the training pairs with the global RNG; with probability ``unplaced`` the scene is captioned
    in that language without positions instead (:func:`polymodal.data.languages.unplaced_caption`)."""
    pairs = training_pairs(dataset)
    picks = torch.randint(0, len(pairs), (len(objects),)).tolist()  # (B,)
    # drawn only when asked: the default keeps the RNG stream of a run without it
    short = (torch.rand(len(objects)) < unplaced).tolist() if unplaced > 0 else [False] * len(objects)  # (B,)
    return [
        lang.unplaced_caption(pairs[k][0], obj) if s else lang.shapes_caption(pairs[k][0], pairs[k][1], obj)
        for k, s, obj in zip(picks, short, objects, strict=True)
    ]


def training_captions(model: nn.Module, batch: dict[str, Any], size: int) -> list[str]:
    """The captions a Kandinsky variant's loss encodes: the batch's own, or in training on scenes with boxes a fresh
    one per scene by :func:`draw_captions` (the config's dataset and ``unplaced_captions``; images ``size`` px)."""
    config = model.config
    if model.training and "boxes" in batch and config.data:
        return draw_captions(config.data, scene_objects(batch, size), config.unplaced_captions)
    return list(batch["caption"])
