"""VQ-VAE (van den Oord et al., 2017): a convolutional autoencoder with a discrete EMA codebook.

The model is also the library's image tokenizer: ``encode(images) -> codes (B, h, w)`` and
``decode(codes) -> images (B, C, H, W)`` in [0, 1]. The loss is the reconstruction MSE plus
``commitment`` × ``mean((z_e − sg[e])²)``; the codebook learns by EMA (see :mod:`polymodal.nn.quantize`).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.config import config, field, in_range
from polymodal.models import PolymodalModel, interfaces
from polymodal.nn.quantize import EMACodebook, nearest

from .nets import Decoder, Encoder


@config
class VQVAEConfig:
    """A VQ-VAE image tokenizer."""

    image_size: int = field(8, "Side of the square input images, in pixels.", check=in_range(2, 4096, integer=True))
    channels: int = field(1, "Image channels (1 grey, 3 RGB).", check=in_range(1, 4, integer=True))
    stages: int = field(
        1,
        "Stride-2 down-sampling stages: the code grid is image_size / 2^stages per side.",
        check=in_range(1, 8, integer=True),
    )
    hidden: int = field(
        64,
        "Channel width of the encoder/decoder trunk (earlier stages are narrower).",
        check=in_range(1, 4096, integer=True),
    )
    res_blocks: int = field(
        2, "Residual blocks in the encoder and in the decoder.", check=in_range(0, 64, integer=True)
    )
    res_hidden: int = field(32, "Bottleneck width inside a residual block.", check=in_range(1, 4096, integer=True))
    dim: int = field(32, "Width of a code vector (the latent channels).", check=in_range(1, 4096, integer=True))
    codebook_size: int = field(
        64, "Number of codes K; code ids are 0 … K − 1.", check=in_range(2, 1 << 20, integer=True)
    )
    decay: float = field(0.99, "EMA decay of the codebook's counts and sums.", check=in_range(0.0, 1.0))
    commitment: float = field(0.25, "Weight β of the commitment loss mean((z_e − sg[e])²).", check=in_range(0.0, 100.0))
    eps: float = field(1e-5, "Laplace smoothing of the EMA code counts.", check=in_range(0.0, 1.0))
    dead_code_steps: int = field(
        20,
        "Re-seed a code from the batch's encoder outputs after this many training steps without use (0: never).",
        check=in_range(0, 10**9, integer=True),
    )
    kmeans_iters: int = field(
        10,
        "k-means iterations that initialise the codebook on the first training batch.",
        check=in_range(0, 1000, integer=True),
    )
    augment_flip: bool = field(False, "Training augmentation: random horizontal flips (for data without handedness).")
    data: str = field("", "Name of the dataset the config was adapted to (``polymodal eval`` default).")

    def __attrs_post_init__(self) -> None:
        if self.image_size % (1 << self.stages):
            raise ValueError(
                f"VQVAEConfig.image_size must be divisible by 2^stages = {1 << self.stages}; "
                f"got image_size={self.image_size}"
            )


class VQVAE(PolymodalModel):
    """Images (B, C, H, W) in [0, 1] ⇄ codes (B, h, w); ``forward`` gives the reconstruction."""

    family = "vqvae"
    image_fields = "config"  # image_size and channels: what preprocess() prepares
    implements = (interfaces.ImageTokenizer, interfaces.Tokenizer)
    config_class = VQVAEConfig

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = Encoder(c.channels, c.hidden, c.stages, c.res_blocks, c.res_hidden, c.dim)
        self.codebook = EMACodebook(
            c.codebook_size,
            c.dim,
            decay=c.decay,
            eps=c.eps,
            dead_code_steps=c.dead_code_steps,
            kmeans_iters=c.kmeans_iters,
        )
        self.decoder = Decoder(c.channels, c.hidden, c.stages, c.res_blocks, c.res_hidden, c.dim)

    # -- tokenizer contract ------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """Number of codes K."""
        return self.config.codebook_size

    @property
    def vocab_size(self) -> int:
        """Same as :attr:`codebook_size` (the :class:`polymodal.models.interfaces.Tokenizer` name)."""
        return self.config.codebook_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """None: every id is a code."""
        return {}

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid for the configured image size."""
        side = self.config.image_size >> self.config.stages
        return side, side

    def check_images(self, images: Any) -> None:
        """ValueError naming expected vs given unless ``images`` is a float (B, C, S, S) batch of the configured size."""
        c, s = self.config.channels, self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images (B, {c}, {s}, {s}); got {got}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images in [0, 1]; got dtype {images.dtype}")

    def check_codes(self, codes: Any) -> None:
        """ValueError naming expected vs given unless ``codes`` is an integer (B, h, w) grid of valid ids."""
        h, w = self.grid
        if not isinstance(codes, Tensor) or codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"expected codes (B, {h}, {w}); got {got}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer code ids; got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"code ids must be in [0, {self.codebook_size}) (codebook size {self.codebook_size}); "
                f"got ids from {int(codes.min())} to {int(codes.max())}"
            )

    def _device(self) -> torch.device:
        return self.codebook.embed.device

    def quantize(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, C, S, S) → latents z_e (B, D, h, w), straight-through z_q (B, D, h, w), codes (B, h, w), commitment.

        ``images`` must be a float batch of the configured channels and size (:meth:`check_images`).
        """
        self.check_images(images)
        z = self.encoder(images)  # (B, D, h, w)
        zq, codes, commitment = self.codebook(z.permute(0, 2, 3, 1))  # (B, h, w, D), (B, h, w)
        return z, zq.permute(0, 3, 1, 2), codes, commitment

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) float in [0, 1] → codes (B, h, w) long (no codebook update)."""
        self.check_images(images)
        z = self.encoder(images.to(self._device(), torch.float32))  # (B, D, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.config.dim)  # (B·h·w, D)
        return nearest(flat.float(), self.codebook.embed).view(z.shape[0], z.shape[2], z.shape[3])  # (B, h, w)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) integer → images (B, C, H, W) float in [0, 1]."""
        self.check_codes(codes)
        latents = self.codebook.lookup(codes.to(self._device(), torch.long)).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decoder(latents).clamp(0.0, 1.0)  # (B, C, H, W)

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction (B, C, S, S) in [0, 1] (in training mode the codebook also takes an EMA step).

        ``images`` must be a float (B, C, S, S) batch of the configured channels and ``image_size``;
        anything else raises a ValueError naming the expected and the given shape (:meth:`check_images`).
        """
        _, zq, _, _ = self.quantize(images)
        return self.decoder(zq).clamp(0.0, 1.0)  # (B, C, H, W)

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: VQVAEConfig, dataset: Any) -> VQVAEConfig:
        """Image size and channels from the dataset's meta; remembers the dataset's name."""
        meta = dataset.meta
        size = meta.get("image_size", config.image_size)
        if size != config.image_size:  # fully convolutional: it trains at the images' own size
            side = size >> config.stages
            print(f"vqvae: images are {size}×{size}×{meta.get('channels')}; image_size {size} → {side}×{side} codes")
        return attrs.evolve(config, image_size=size, channels=meta.get("channels", config.channels), data=dataset.name)

    @classmethod
    def tiny_config(cls, config: VQVAEConfig) -> VQVAEConfig:
        """The same architecture at toy size, for the contract tests."""
        return attrs.evolve(
            config,
            hidden=16,
            res_blocks=1,
            res_hidden=8,
            dim=8,
            codebook_size=min(config.codebook_size, 16),
            kmeans_iters=2,
        )

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Reconstruction MSE + commitment × ‖z_e − sg[e]‖² on ``batch['image']`` (EMA step when training)."""
        images = batch["image"].float()  # (B, C, H, W)
        self.check_images(images)
        if self.training and self.config.augment_flip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5  # (B,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        _, zq, codes, commitment = self.quantize(images)
        recon = self.decoder(zq)  # (B, C, H, W)
        mse = F.mse_loss(recon, images)
        loss = mse + self.config.commitment * commitment
        used = torch.bincount(codes.flatten(), minlength=self.codebook_size)
        metrics = {"recon_mse": mse.detach(), "commitment": commitment.detach(), "codes_in_batch": (used > 0).sum()}
        return loss, metrics  # 0-dim tensors: no host sync

    def after_step(self) -> None:
        """Nothing: the codebook's EMA step and dead-code reset run inside the training forward."""

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
        """Reconstruction error and codebook use on a split (see :func:`.evaluate.evaluate_vqvae`)."""
        from .evaluate import evaluate_vqvae

        return evaluate_vqvae(self, dataset, split, batch_size)

    def sample_to_folder(self, out: Any, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any) -> list:
        """Originals and reconstructions of ``n`` test images (``polymodal sample``)."""
        from polymodal.eval.reconstructions import write_reconstructions

        return write_reconstructions(
            self,
            out,
            n=n,
            prompt=prompt,
            seed=seed,
            what="vqvae",
            reconstruct=lambda x: self.decode(self.encode(x)),
            **options,
        )

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """A random image batch (B, C, S, S) in [0, 1]."""
        c, s = self.config.channels, self.config.image_size
        return (torch.rand(batch_size, c, s, s, generator=generator),)

    def card_lines(self) -> list[str]:
        """Data, architecture and codebook for the model card."""
        c = self.config
        h, w = self.grid
        return [
            f"VQ-VAE image tokenizer: {c.image_size}×{c.image_size}×{c.channels} images ⇄ {h}×{w} codes "
            f"from a {c.codebook_size}-code book of width {c.dim} (EMA decay {c.decay}, commitment {c.commitment}, "
            f"k-means init, dead codes re-seeded after {c.dead_code_steps} idle steps).",
            f"Trunk: {c.stages} stride-2 stage(s), width {c.hidden}, {c.res_blocks} residual block(s) each side. "
            f"Data: {c.data or 'unspecified'}.",
            "",
        ]
