"""The frozen CLIP's features of the training data, computed once when training starts.

The CLIP never changes while unCLIP trains, so its image embedding of a training image and its text
condition of a caption are the same at every step. :class:`TrainingFeatures` computes them once — every
training image's embedding (which also fits the prior's normalisation) and, for labelled data, the condition
of every template × class caption (a small finite set) — and a step looks them up instead of running the
CLIP again (on the digits that was a seventh of the step). A lookup that cannot be proven to be the batch's
(streamed data without split rows, other images at those rows, a caption outside the set) returns None and
the caller computes the features as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .condition import fill_label


class TrainingFeatures:
    """CLIP image embeddings of a training split's images (N, E), found by the batch's split rows, and the text
    conditions (embedding, token features, mask) of a finite caption set, found by the caption."""

    def __init__(self, images: Tensor, embeds: Tensor, captions: list[str], text: tuple[Tensor, Tensor, Tensor]):
        self.images, self.embeds = images, embeds  # (N, C, H, W), (N, E)
        self.rows = {caption: i for i, caption in enumerate(captions)}
        self.text = text  # (K, E), (K, n, Dt), (K, n)

    @classmethod
    @torch.no_grad()
    def build(cls, model: Any, images: Tensor) -> TrainingFeatures:
        """The features of ``model``'s frozen CLIP for the training ``images`` (N, C, H, W) and, when its config
        re-draws labelled captions from templates (the digits), every template × class caption."""
        c = model.config
        embeds = model.image_embeddings(images)  # (N, E)
        captions: list[str] = []
        if c.resample_captions and c.templates and c.class_names and c.data != "shapes":
            captions = [fill_label(t, k, c.class_names) for t in c.templates for k in range(len(c.class_names))]
            captions = list(dict.fromkeys(captions))
        text = model.text_condition(model.clip.tokenize(captions, truncate=True)) if captions else ()
        return cls(images, embeds, captions, text)

    def image_embeddings(self, batch: Any, images: Tensor) -> Tensor | None:
        """The stored embeddings (B, E) of the batch's ``images`` (B, C, H, W), or None unless the batch names
        its split rows and the images at those rows are exactly ``images``."""
        index = getattr(batch, "index", None)
        if index is None or index.shape != (images.shape[0],) or not len(self.images):
            return None
        rows = index.to(self.images.device)
        if int(rows.min()) < 0 or int(rows.max()) >= len(self.images):
            return None
        if not torch.equal(self.images[rows].to(images.device, images.dtype), images):
            return None
        return self.embeds[rows.to(self.embeds.device)]  # (B, E)

    def text_condition(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor] | None:
        """The stored (embedding (B, E), token features (B, n, Dt), mask (B, n)) of ``captions``, or None when
        one of them is not in the set."""
        if not self.rows or any(caption not in self.rows for caption in captions):
            return None
        index = torch.tensor([self.rows[caption] for caption in captions], device=self.text[0].device)  # (B,)
        return tuple(part[index] for part in self.text)  # type: ignore[return-value]
