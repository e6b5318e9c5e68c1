"""KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

Images (B, C, S, S) in [0, 1] are mapped to [-1, 1] (as diffusers' VAEs expect), encoded to a diagonal Gaussian
posterior over latents (B, L, S/f, S/f) with f = 2^(levels − 1), and decoded back. The architecture is diffusers'
``AutoencoderKL`` (the core's :mod:`polymodal.nn.autoencoder`), so ``polymodal convert --from diffusers-vae`` maps its weights 1:1.

Training loss: the reconstruction error of a posterior sample's decoding (per-pixel mean of the squared error,
or of the absolute error with ``recon_loss='l1'``) plus ``kl_weight`` × KL(q(z|x) ‖ N(0, I)) divided by the
image's C·S·S values, so ``kl_weight`` has the LDM paper's meaning (the weight of the per-image KL sum against the
per-image sum of the reconstruction error; LDM uses 1e-6). A latent diffusion model works on
``scaling_factor`` × z (:meth:`KLVAE.encode_latents` / :meth:`KLVAE.decode_latents`); the factor is
1 / std of the training latents, computed once training ends (see :mod:`.evaluate`).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import config, field, in_range, one_of
from polymodal.models.autoencoder import AutoencoderTrunkConfig, ImageAutoencoder
from polymodal.nn.autoencoder import Decoder, Encoder, cpu_channels_last

from .nets import DiagonalGaussian


@config
class KLVAEConfig(AutoencoderTrunkConfig):
    """A KL autoencoder: image shape, the diffusers-style trunk (:class:`AutoencoderTrunkConfig`; ``norm_groups``
    for every norm), the latent and the loss."""

    recon_loss: str = field(
        "mse",
        "Reconstruction term of the loss: 'mse' (squared error) or 'l1' (absolute error).",
        check=one_of("mse", "l1"),
    )
    kl_weight: float = field(
        1e-6,
        "Weight of KL(q(z|x) ‖ N(0, I)) summed over an image's latent against the reconstruction error summed over "
        "its pixels (LDM's weighting; both are divided by the pixel count in the loss).",
        check=in_range(0.0, 1e3),
    )
    scaling_factor: float = field(
        0.0,
        "Latent scale of a latent diffusion model (it works on scaling_factor × z): 1 / std of the training "
        "latents; 0 until computed (at the end of training, by evaluate) or read from a converted VAE.",
        check=in_range(0.0, 1e6),
    )
    data: str = field("", "Name of the dataset the config was adapted to (``polymodal eval`` default).")


class KLVAE(ImageAutoencoder):
    """Images (B, C, S, S) in [0, 1] ⇄ latents (B, L, h, w); ``forward`` gives the reconstruction of the mode."""

    family = "klvae"
    config_class = KLVAEConfig

    def __init__(self, config: KLVAEConfig) -> None:
        super().__init__(config)
        c = config
        trunk = (c.channels, c.block_channels, c.layers_per_block)
        self.encoder = Encoder(*trunk, 2 * c.latent_channels, c.norm_groups, c.mid_attention)  # mean and log-variance
        self.decoder = Decoder(*trunk, c.latent_channels, c.norm_groups, c.mid_attention)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    # -- the autoencoder ----------------------------------------------------------------------------
    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images (B, C, S, S) in [0, 1] → the posterior q(z | x) over latents (B, L, h, w) (``.mean``, ``.logvar``)."""
        x = self.network_input(images)  # (B, C, S, S) in [-1, 1]
        return DiagonalGaussian(self.quant_conv(self.encoder(x)).contiguous())  # moments (B, 2L, h, w)

    def decode(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """Latents (B, L, h, w) (unscaled z) → images (B, C, S, S) in [0, 1] (``clamp=False``: not clamped)."""
        self.check_latents(latents)
        p = self._param()
        z = cpu_channels_last(latents.to(p.device, p.dtype))  # (B, L, h, w)
        return self.network_output(self.decoder(self.post_quant_conv(z)), clamp)  # (B, C, S, S)

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction (B, C, S, S) in [0, 1] of ``images`` (B, C, S, S) through the posterior's mode."""
        return self.decode(self.encode(images).mode())

    def _require_scale(self) -> float:
        scale = self.config.scaling_factor
        if scale <= 0:
            raise ValueError(
                "this KL-VAE has no scaling_factor yet (0: not computed); it is set when training ends "
                "(`polymodal train`, by evaluate) or by compute_scaling_factor(images)"
            )
        return scale

    def encode_latents(
        self, images: Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images (B, C, S, S) in [0, 1] → a latent diffusion model's latents, scaling_factor × z (B, L, h, w), z a
        posterior sample (``sample=False``: the mean). ValueError while ``scaling_factor`` is 0."""
        scale = self._require_scale()
        posterior = self.encode(images)
        return scale * (posterior.sample(generator) if sample else posterior.mode())  # (B, L, h, w)

    def decode_latents(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """A latent diffusion model's latents (B, L, h, w) → images: ``decode(latents / scaling_factor)``."""
        return self.decode(latents / self._require_scale(), clamp=clamp)

    @torch.no_grad()
    def compute_scaling_factor(self, images: Tensor, batch_size: int = 256) -> float:
        """Set ``config.scaling_factor`` to 1 / std of the posterior samples of ``images`` (N, C, S, S) (LDM's rule;
        a fixed generator, so the same weights and images give the same factor) and return it."""
        from .evaluate import latent_std

        std = latent_std(self, images, batch_size)
        if not std > 0:
            raise ValueError(f"cannot compute a scaling factor: the latents' std is {std}")
        self.config = attrs.evolve(self.config, scaling_factor=1.0 / std)
        return self.config.scaling_factor

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, config: KLVAEConfig) -> KLVAEConfig:
        """The same architecture at toy size (widths 8 and 16, one block per level), for the contract tests."""
        levels = len(config.block_channels)
        widths = tuple(8 * 2 ** min(i, 1) for i in range(levels))
        return attrs.evolve(config, block_channels=widths, layers_per_block=1, norm_groups=4)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction error of a posterior sample's decoding + ``kl_weight`` × KL / (C·S·S) on ``batch['image']``."""
        images = batch["image"]
        self.check_images(images)
        images = images.float()  # (B, C, S, S)
        posterior = self.encode(images)
        recon = self.decode(posterior.sample(), clamp=False)  # (B, C, S, S)
        images = images.to(recon.device)
        mse = F.mse_loss(recon, images)
        rec = mse if self.config.recon_loss == "mse" else F.l1_loss(recon, images)
        kl = posterior.kl().mean()  # per-image KL sum, averaged over the batch
        loss = rec + self.config.kl_weight * kl / images[0].numel()
        return loss, {"recon_mse": mse.detach(), "kl": kl.detach()}  # 0-dim tensors: no host sync

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
        """Reconstruction error and latent statistics on a split; first sets ``scaling_factor`` when it is 0 and
        training has ended (see :func:`.evaluate.evaluate_klvae`)."""
        from .evaluate import evaluate_klvae

        return evaluate_klvae(self, dataset, split, batch_size)

    def sample_to_folder(self, out: Any, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any) -> list:
        """Originals and reconstructions (the posterior's mode) of ``n`` test images (``polymodal sample``)."""
        from polymodal.eval.reconstructions import write_reconstructions

        return write_reconstructions(self, out, n=n, prompt=prompt, seed=seed, what="kl-vae", **options)

    def card_lines(self) -> list[str]:
        """Data, architecture, loss and latent scale for the model card."""
        c = self.config
        lat, h, w = self.latent_shape
        scale = f"{c.scaling_factor:.5g}" if c.scaling_factor else "not computed yet"
        return [
            f"KL autoencoder (diffusers AutoencoderKL layout): {c.image_size}×{c.image_size}×{c.channels} images ⇄ "
            f"{h}×{w}×{lat} latents; levels {list(c.block_channels)}, {c.layers_per_block} residual block(s) per "
            f"encoder level, {c.norm_groups} norm groups, middle attention {'on' if c.mid_attention else 'off'}.",
            f"Loss: {c.recon_loss} reconstruction + {c.kl_weight:g} × KL (LDM weighting). Latent scaling factor: "
            f"{scale}. Data: {c.data or 'unspecified'}.",
            "",
        ]
