"""The KL autoencoder's posterior: a diagonal Gaussian over the latent, from the encoder's moments.

The encoder and decoder are the core's (:mod:`polymodal.nn.autoencoder`, diffusers' ``AutoencoderKL`` layout);
the model adds diffusers' 1×1 ``quant_conv`` / ``post_quant_conv`` around the latent (see :mod:`.model`).
"""

from __future__ import annotations

import torch
from torch import Tensor

LOGVAR_RANGE = (-30.0, 20.0)
"""The posterior's log-variance is clamped to this range (as diffusers' DiagonalGaussianDistribution)."""


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), diagonal, from its moments (B, 2·L, h, w).

    ``logvar`` is clamped to :data:`LOGVAR_RANGE`. ``sample(generator)`` draws z = mean + std·ε,
    ``mode()`` is the mean and ``kl()`` the closed-form KL(q ‖ N(0, I)) per sample,
    ½ Σ (mean² + var − 1 − logvar) over (L, h, w).
    """

    def __init__(self, moments: Tensor) -> None:
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"expected posterior moments (B, 2·L, h, w); got {tuple(moments.shape)}")
        mean, logvar = moments.chunk(2, dim=1)  # (B, L, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)  # (B, L, h, w)

    @property
    def std(self) -> Tensor:
        """exp(logvar / 2), (B, L, h, w)."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        """exp(logvar), (B, L, h, w)."""
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std·ε, ε ~ N(0, I) drawn from ``generator`` (on its device; default: torch's global one)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # (B, L, h, w)

    def mode(self) -> Tensor:
        """The mean (B, L, h, w): the posterior's most likely latent."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) per sample (B,), summed over the latent's (L, h, w) elements."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))
