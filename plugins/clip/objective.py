"""Symmetric InfoNCE with several positives per row (captions that are true of more than one image).

With re-sampled shapes captions the same text (``"a circle"``) is often true of several
images in a batch; plain InfoNCE would push those images away from it. Here every row and
every column spreads its target evenly over its positives (as in UniCL / SupCon-style
contrastive learning); with one positive per row (the identity matrix) it equals the core
:func:`polymodal.objectives.info_nce`.

On several ranks (``gather=True``) the positives of the global batch are needed, and a rank
knows only its own captions and scenes. :class:`PositiveKeys` holds them as tensors (each scene
as the set of objects it shows, each caption as its clauses, every set over all possible
objects), so they are gathered like features and the global positives rebuilt from them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.data import shapes as shapes_data
from polymodal.nn.collectives import gather, is_distributed
from polymodal.objectives import gathered_logits, similarity_logits

SIZES = (len(shapes_data.COLOURS), len(shapes_data.KINDS), len(shapes_data.POSITIONS))
"""(colours, kinds, cells): an object is one of ``V = prod(SIZES)`` (colour, kind, cell) combinations."""
MAX_CLAUSES = len(shapes_data.POSITIONS)
"""At most one object per cell, so a caption has at most this many clauses."""


class PositiveKeys(NamedTuple):
    """Which captions are true of which scenes, per sample, as tensors that can be gathered across ranks.

    ``scenes`` (B, V) bool: the (colour, kind, cell) combinations scene ``i`` shows; ``clauses``
    (B, K, V) bool: clause ``k`` of caption ``j`` as the set of combinations it fits (a left-out
    attribute fits every value); ``valid`` (B, K) bool: which clauses exist. Caption ``j`` is true
    of scene ``i`` when every clause meets the scene (what :func:`.captions.positives` computes).
    """

    scenes: Tensor
    clauses: Tensor
    valid: Tensor

    def to(self, device: torch.device | str) -> PositiveKeys:
        """The keys on ``device``."""
        return PositiveKeys(*(t.to(device) for t in self))

    def matrix(self) -> Tensor:
        """(B, B) bool positives of this batch: ``[i, j]`` when caption ``j`` is true of scene ``i``, or ``i == j``."""
        n = self.scenes.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=self.scenes.device)  # (B, B)
        return positives_from_keys(self.scenes, self.clauses, self.valid) | eye

    def gathered(self) -> PositiveKeys:
        """Every rank's keys in rank order (one collective); these keys in one process."""
        b, k, v = self.clauses.shape
        flat = torch.cat([self.scenes, self.clauses.reshape(b, k * v), self.valid], dim=1)  # (B, V + K·V + K)
        flat = gather(flat)  # (W·B, V + K·V + K)
        n = flat.shape[0]
        return PositiveKeys(flat[:, :v], flat[:, v : v + k * v].reshape(n, k, v), flat[:, v + k * v :])


def positive_keys(claims: list[list[tuple]], scenes: list[list[tuple[int, int, int]]]) -> PositiveKeys:
    """Keys of a batch from the captions' clauses ``(colour | None, kind | None, cell | None)`` and the
    scenes' objects ``(colour, kind, cell)`` (as :func:`.captions.shapes_captions` returns them)."""
    if len(claims) != len(scenes):
        raise ValueError(f"expected one caption per scene; got {len(claims)} captions and {len(scenes)} scenes")
    n, (_, nk, npos) = len(scenes), SIZES
    grid = torch.cartesian_prod(*(torch.arange(s) for s in SIZES))  # (V, 3)
    stride = torch.tensor([nk * npos, npos, 1])  # (3,)
    present = torch.zeros(n, len(grid), dtype=torch.bool)  # (B, V)
    for i, objects in enumerate(scenes):
        if objects:
            present[i, (torch.tensor(objects) * stride).sum(-1)] = True
    clauses = torch.zeros(n, MAX_CLAUSES, len(grid), dtype=torch.bool)  # (B, K, V)
    valid = torch.zeros(n, MAX_CLAUSES, dtype=torch.bool)  # (B, K)
    for j, cs in enumerate(claims):
        if len(cs) > MAX_CLAUSES:
            raise ValueError(f"a caption has at most {MAX_CLAUSES} clauses (one per cell); got {len(cs)}")
        if cs:
            flat = torch.tensor([[-1 if a is None else a for a in c] for c in cs])  # (C, 3)
            clauses[j, : len(cs)] = ((flat[:, None] == -1) | (flat[:, None] == grid)).all(-1)  # (C, V)
            valid[j, : len(cs)] = True
    return PositiveKeys(present, clauses, valid)


def positives_from_keys(scenes: Tensor, clauses: Tensor, valid: Tensor) -> Tensor:
    """(S, C) bool: ``[i, j]`` when every valid clause of caption ``j`` (``clauses`` (C, K, V), ``valid`` (C, K))
    meets scene ``i`` (``scenes`` (S, V)). No diagonal is added."""
    meets = torch.einsum("sv,ckv->sck", scenes.float(), clauses.float()) > 0  # (S, C, K)
    return (meets | ~valid.unsqueeze(0)).all(-1)  # (S, C)


def _soft_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows of the cross-entropy of ``logits`` (B, N) against each row's positives (B, N) spread evenly."""
    pos = positives.float()  # (B, N)
    return F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))


def multi_positive_info_nce(
    a: Tensor, b: Tensor, logit_scale: float | Tensor, positives: Tensor | PositiveKeys, *, gather: bool = False
) -> Tensor:
    """Mean of the a→b and b→a soft-target cross-entropies; ``positives`` (B, B') bool, ``[i, j]``: b_j fits a_i,
    or the batch's :class:`PositiveKeys` (the diagonal is then always a positive).

    Every row and every column needs at least one positive (ValueError otherwise).

    ``gather=True`` with a process group is the "local loss" over the global batch: this rank's
    rows of ``a`` (images) against every rank's ``b`` (captions) and its rows of ``b`` against
    every rank's ``a`` (gathered with gradients), the positives rebuilt from every rank's keys,
    so ``positives`` must be :class:`PositiveKeys`. The mean over ranks is the one-process loss on
    the global batch, and so are the rank-averaged gradients. Identical to ``gather=False`` in one
    process.
    """
    if gather and is_distributed():
        if not isinstance(positives, PositiveKeys):
            raise ValueError(
                "the gathered multi-positive InfoNCE needs PositiveKeys (positive_keys(claims, scenes)) "
                f"to rebuild the global batch's positives; got {type(positives).__name__}"
            )
        if positives.scenes.shape[0] != a.shape[0]:
            raise ValueError(f"expected keys for {a.shape[0]} samples; got {positives.scenes.shape[0]}")
        logits_ab, logits_ba, offset = gathered_logits(a, b, logit_scale)  # (B, N) ×2
        mine = positives.to(logits_ab.device)
        every = mine.gathered()  # keys of the N samples of the global batch
        n, rows = logits_ab.shape[1], torch.arange(a.shape[0], device=logits_ab.device)  # N, (B,)
        eye = torch.zeros(a.shape[0], n, dtype=torch.bool, device=logits_ab.device)  # (B, N)
        eye[rows, rows + offset] = True
        pos_ab = positives_from_keys(mine.scenes, every.clauses, every.valid) | eye  # (B, N) my scenes, all captions
        pos_ba = positives_from_keys(every.scenes, mine.clauses, mine.valid).t() | eye  # (B, N) my captions, all scenes
        return (_soft_cross_entropy(logits_ab, pos_ab) + _soft_cross_entropy(logits_ba, pos_ba)) / 2
    if isinstance(positives, PositiveKeys):
        positives = positives.matrix()  # (B, B)
    logits = similarity_logits(a, b, logit_scale)  # (B, B')
    if positives.shape != logits.shape or positives.dtype != torch.bool:
        raise ValueError(
            f"expected a bool positives matrix of shape {tuple(logits.shape)}; "
            f"got {positives.dtype} {tuple(positives.shape)}"
        )
    pos = positives.to(logits.device).float()  # (B, B')
    rows, cols = pos.sum(1, keepdim=True), pos.sum(0, keepdim=True)  # (B, 1), (1, B')
    if bool((rows == 0).any()) or bool((cols == 0).any()):
        raise ValueError("every image and every text needs at least one positive")
    a_to_b = F.cross_entropy(logits, pos / rows)
    b_to_a = F.cross_entropy(logits.t(), (pos / cols).t())
    return (a_to_b + b_to_a) / 2


__all__ = ["MAX_CLAUSES", "PositiveKeys", "multi_positive_info_nce", "positive_keys", "positives_from_keys"]
