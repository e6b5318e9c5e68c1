"""Embedding arithmetic in ImageBind's joint space: compose modalities, retrieve neighbours."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def compose(model: Any, inputs: dict[str, Any]) -> Tensor:
    """Embedding arithmetic: the renormalised sum of the unit embeddings of several modalities (B, E)."""
    if not inputs:
        raise ValueError("compose needs at least one modality input; got none")
    return F.normalize(sum(model.embed(m, x, normalize_only=True) for m, x in inputs.items()), dim=-1)


def retrieve(query: Tensor, gallery: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """Cosine top-``k`` of each query (B, E) in a gallery (N, E): scores (B, k) and indices (B, k)."""
    sims = F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).t()  # (B, N)
    return sims.topk(min(k, gallery.shape[0]), dim=1)
