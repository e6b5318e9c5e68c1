"""Vector quantisation: a codebook with nearest-code lookup, EMA updates, k-means initialisation and dead-code reset.

The quantiser of the VQ autoencoders (the VQ-VAE image tokenizer, the MoVQ decoder's latents).

Everything the codebook learns lives in buffers (``embed``, ``cluster_size``, ``embed_sum``,
``idle``, ``initted``), so a model folder or a trainer checkpoint carries it and a resumed
run continues bit for bit. Updates happen only in training mode, inside :meth:`forward`:

* **initialisation** — the first training batch seeds the codes with a few k-means
  iterations over its encoder outputs (van den Oord et al. 2017 leave the init open;
  vector-quantize-pytorch's ``kmeans_init`` does this);
* **EMA** (van den Oord et al. 2017, appendix; Razavi et al. 2019) — with counts ``n_k``
  and sums ``s_k`` of the encoder outputs assigned to code ``k`` in the batch::

      N_k ← d·N_k + (1 − d)·n_k        m_k ← d·m_k + (1 − d)·s_k        e_k = m_k / Ñ_k

  where ``Ñ`` is ``N`` with Laplace smoothing ``(N_k + ε) / (ΣN + K·ε) · ΣN``;
* **dead-code reset** — a code no batch has used for ``dead_code_steps`` training steps is
  re-seeded from a random encoder output of the current batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def nearest(z: Tensor, embed: Tensor) -> Tensor:
    """Index of the nearest code (squared Euclidean) for each row: z (N, D), embed (K, D) → (N,) long."""
    dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ embed.t() + embed.pow(2).sum(1)[None]  # (N, K)
    return dist.argmin(dim=1)


def kmeans(z: Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` centroids (k, D) of the rows of z (N, D): random rows, then ``iters`` Lloyd steps.

    Rows are drawn without replacement when there are at least ``k``; an empty cluster keeps
    its previous centroid.
    """
    n = z.shape[0]
    pick = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(0, n, (k,), generator=generator)
    centroids = z[pick].clone()  # (k, D)
    for _ in range(iters):
        assign = nearest(z, centroids)  # (N,)
        counts = torch.bincount(assign, minlength=k).to(z.dtype)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, z)  # (k, D)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class EMACodebook(nn.Module):
    """``codebook_size`` codes of width ``dim``; quantises channel-last vectors (…, dim).

    ``forward(z)`` returns ``(quantized_st, codes, commitment)``: the straight-through
    quantisation ``z + (e − z).detach()`` (gradients pass to the encoder unchanged), the code
    ids (…) and the commitment loss ``mean((z − sg[e])²)`` (unweighted). The codebook itself
    gets no gradient: it moves by EMA in training mode.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_steps: int = 20,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.eps = decay, eps
        self.dead_code_steps, self.kmeans_iters = dead_code_steps, kmeans_iters
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embed", embed)  # (K, D) the codes
        self.register_buffer("embed_sum", embed.clone())  # (K, D) EMA of assigned sums
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,) EMA of assigned counts
        self.register_buffer("idle", torch.zeros(codebook_size, dtype=torch.long))  # (K,) steps since last use
        self.register_buffer("initted", torch.zeros((), dtype=torch.bool))  # set by the first training batch

    @torch.no_grad()
    def init_from(self, z: Tensor) -> None:
        """Seed the codes from encoder outputs z (N, D) by k-means; counts start at one each."""
        self.embed.copy_(kmeans(z, self.codebook_size, self.kmeans_iters))
        self.embed_sum.copy_(self.embed)
        self.cluster_size.fill_(1.0)
        self.idle.zero_()
        self.initted.fill_(True)

    @torch.no_grad()
    def ema_update(self, z: Tensor, codes: Tensor) -> None:
        """One EMA step from encoder outputs z (N, D) assigned to ``codes`` (N,)."""
        d = self.decay
        counts = torch.bincount(codes, minlength=self.codebook_size).to(z.dtype)  # (K,)
        sums = torch.zeros_like(self.embed).index_add_(0, codes, z)  # (K, D)
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total  # (K,)
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        self.idle.add_(1)
        self.idle[counts > 0] = 0

    @torch.no_grad()
    def reset_dead(self, z: Tensor) -> int:
        """Re-seed codes idle for ``dead_code_steps`` steps from random rows of z (N, D); returns how many."""
        if self.dead_code_steps <= 0:
            return 0
        dead = (self.idle >= self.dead_code_steps).nonzero().flatten()  # (M,)
        if dead.numel() == 0:
            return 0
        picks = z[torch.randint(0, z.shape[0], (dead.numel(),), device=z.device)]  # (M, D)
        self.embed[dead] = picks
        self.embed_sum[dead] = picks
        self.cluster_size[dead] = 1.0
        self.idle[dead] = 0
        return int(dead.numel())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (…, D) → straight-through quantisation (…, D), codes (…) long, commitment loss (scalar)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of width {self.dim} (last dim); got shape {tuple(z.shape)}")
        flat = z.reshape(-1, self.dim)  # (N, D)
        if self.training and not bool(self.initted):
            self.init_from(flat.detach().float())
        codes = nearest(flat.detach().float(), self.embed)  # (N,)
        quantized = self.embed[codes].to(z.dtype).view_as(z)  # (…, D)
        commitment = F.mse_loss(z, quantized.detach())
        if self.training:
            self.ema_update(flat.detach().float(), codes)
            self.reset_dead(flat.detach().float())
        quantized_st = z + (quantized - z).detach()  # (…, D) straight-through
        return quantized_st, codes.view(z.shape[:-1]), commitment

    def lookup(self, codes: Tensor) -> Tensor:
        """Code ids (…) long → code vectors (…, D)."""
        return F.embedding(codes, self.embed)
