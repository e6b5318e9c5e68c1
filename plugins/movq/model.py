"""MoVQ (Zheng et al. 2022, "MoVQ: Modulating Quantized Vectors for High-Fidelity Image Generation"): Kandinsky 2.1's
image autoencoder.

A VQ autoencoder laid out like diffusers' ``VQModel(norm_type="spatial")``: images (B, C, S, S) in [0, 1] are mapped
to [-1, 1], encoded to continuous latents h = quant_conv(encoder(x)) (B, L, S/f, S/f), f = 2^(levels − 1),
quantised to the nearest of ``codebook_size`` codes (z_q), and decoded by a decoder whose every norm is
spatially conditioned on the latent it decodes (``norm(f)·conv_y(z_q) + conv_b(z_q)``, the core's
:class:`polymodal.nn.autoencoder.SpatialNorm`). As Kandinsky 2.1, a diffusion model works on the continuous
latents and they are decoded without quantising (``decode(latents, quantize=False)``, diffusers'
``force_not_quantize=True``): the decoder is then conditioned on the latent itself.

Training loss: the MSE of the quantised reconstruction (straight-through gradients to the encoder) plus
``commitment`` × mean((h − sg[e])²); the codebook (:class:`polymodal.nn.quantize.EMACodebook`) learns by EMA, is
initialised by k-means on the first batch and re-seeds codes left unused.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import as_tuple, config, field, in_range
from polymodal.models.autoencoder import AutoencoderTrunkConfig, ImageAutoencoder
from polymodal.nn.autoencoder import Decoder, Encoder, cpu_channels_last
from polymodal.nn.quantize import EMACodebook, nearest

_pos = in_range(1, 65536, integer=True)


@config
class MoVQConfig(AutoencoderTrunkConfig):
    """A MoVQ autoencoder: image shape, the diffusers-style trunk (:class:`AutoencoderTrunkConfig`; ``norm_groups``
    for the encoder, ``latent_channels`` also the width of a code), the decoder's spatial norms, the codebook and
    the loss."""

    decoder_norm_groups: int = field(
        8,
        "GroupNorm groups of the decoder's spatial norms (diffusers' SpatialNorm fixes 32); must divide every level "
        "width.",
        check=_pos,
    )
    level_attention: tuple[bool, ...] = field(
        (),
        "Self-attention after each residual block of the levels flagged (one flag per level, in the encoder's "
        "order; the decoder mirrors them): diffusers' AttnDownEncoderBlock2D / AttnUpDecoderBlock2D; empty: none.",
        converter=as_tuple,
    )
    codebook_size: int = field(
        256, "Number of codes K (diffusers' num_vq_embeddings).", check=in_range(2, 1 << 20, integer=True)
    )
    commitment: float = field(0.25, "Weight β of the commitment loss mean((h − sg[e])²).", check=in_range(0.0, 100.0))
    decay: float = field(0.99, "EMA decay of the codebook's counts and sums.", check=in_range(0.0, 1.0))
    dead_code_steps: int = field(
        20,
        "Re-seed a code from the batch's latents after this many training steps without use (0: never).",
        check=in_range(0, 10**9, integer=True),
    )
    kmeans_iters: int = field(
        10,
        "k-means iterations that initialise the codebook on the first training batch.",
        check=in_range(0, 1000, integer=True),
    )
    data: str = field("", "Name of the dataset the config was adapted to (``polymodal eval`` default).")

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.check_groups("decoder_norm_groups")
        flags, levels = self.level_attention, len(self.block_channels)
        if flags and (len(flags) != levels or any(not isinstance(f, bool) for f in flags)):
            raise ValueError(
                f"MoVQConfig.level_attention must be empty or one bool per level ({levels}); got {flags!r}"
            )


class MoVQ(ImageAutoencoder):
    """Images (B, C, S, S) in [0, 1] ⇄ latents (B, L, h, w) ⇄ codes (B, h, w); ``forward``: the quantised
    reconstruction."""

    family = "movq"
    config_class = MoVQConfig
    inference_fp32_modules = ("encoder", "quant_conv")  # bf16 latents would snap some positions to other codes

    def __init__(self, config: MoVQConfig) -> None:
        super().__init__(config)
        c = config
        lat = c.latent_channels
        trunk = (c.channels, c.block_channels, c.layers_per_block)
        self.encoder = Encoder(*trunk, lat, c.norm_groups, c.mid_attention, c.level_attention)
        self.quant_conv = nn.Conv2d(lat, lat, 1)
        self.codebook = EMACodebook(
            c.codebook_size,
            lat,
            decay=c.decay,
            dead_code_steps=c.dead_code_steps,
            kmeans_iters=c.kmeans_iters,
        )
        self.post_quant_conv = nn.Conv2d(lat, lat, 1)
        self.decoder = Decoder(*trunk, lat, c.decoder_norm_groups, c.mid_attention, lat, c.level_attention)

    # -- shapes and checks --------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """Number of codes K."""
        return self.config.codebook_size

    def check_codes(self, codes: Any) -> None:
        """ValueError naming expected vs given unless ``codes`` is an integer (B, h, w) grid of valid ids."""
        _, h, w = self.latent_shape
        if not isinstance(codes, Tensor) or codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"expected codes (B, {h}, {w}); got {got}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer code ids; got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"code ids must be in [0, {self.codebook_size}); got ids from {int(codes.min())} to {int(codes.max())}"
            )

    # -- the autoencoder ----------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] → continuous latents (B, L, h, w), not quantised (diffusers'
        ``VQModel.encode(...).latents``): what a latent diffusion model (Kandinsky 2.1) works on."""
        x = self.network_input(images)  # (B, C, S, S) in [-1, 1]
        return self.quant_conv(self.encoder(x)).contiguous()  # (B, L, h, w)

    def quantize(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Latents (B, L, h, w) → the nearest codes' vectors z_q (B, L, h, w) (straight-through: gradients pass to
        ``latents``), the code ids (B, h, w) and the commitment loss mean((h − sg[e])²). In training mode the
        codebook also takes its EMA step."""
        self.check_latents(latents)
        zq, codes, commitment = self.codebook(latents.permute(0, 2, 3, 1))  # (B, h, w, L), (B, h, w)
        return zq.permute(0, 3, 1, 2).contiguous(), codes, commitment  # (B, L, h, w)

    @torch.no_grad()
    def encode_codes(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] → code ids (B, h, w) (no codebook update)."""
        h = self.encode(images)  # (B, L, h, w)
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()  # (B·h·w, L)
        return nearest(flat, self.codebook.embed).view(h.shape[0], *h.shape[2:])  # (B, h, w)

    def _decode(self, z: Tensor, clamp: bool) -> Tensor:
        """z (B, L, h, w) (quantised or not) → images: the decoder on post_quant_conv(z), its norms conditioned on z."""
        z = cpu_channels_last(z)
        return self.network_output(self.decoder(self.post_quant_conv(z), z), clamp)  # (B, C, S, S)

    def decode(self, latents: Tensor, quantize: bool = True, clamp: bool = True) -> Tensor:
        """Latents (B, L, h, w) → images (B, C, S, S) in [0, 1] (``clamp=False``: not clamped). ``quantize=True``
        first snaps them to the nearest codes (diffusers' ``decode``); ``quantize=False`` decodes them as they are
        (``force_not_quantize=True``, as Kandinsky 2.1 decodes its diffusion model's latents)."""
        self.check_latents(latents)
        p = self._param()
        z = latents.to(p.device, p.dtype)  # (B, L, h, w)
        if quantize:
            z = self.quantize(z)[0]  # (B, L, h, w)
        return self._decode(z, clamp)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, clamp: bool = True) -> Tensor:
        """Code ids (B, h, w) → images (B, C, S, S) in [0, 1] (diffusers' ``lookup_from_codebook``)."""
        self.check_codes(codes)
        z = self.codebook.lookup(codes.to(self._param().device, torch.long)).permute(0, 3, 1, 2)  # (B, L, h, w)
        return self._decode(z.to(self._param().dtype), clamp)

    def encode_latents(self, images: Tensor) -> Tensor:
        """A latent diffusion model's latents (B, L, h, w): the continuous, unquantised :meth:`encode` (Kandinsky 2.1
        diffuses them unscaled)."""
        return self.encode(images)

    def decode_latents(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """A latent diffusion model's latents (B, L, h, w) → images, decoded without quantising (``force_not_quantize``)."""
        return self.decode(latents, quantize=False, clamp=clamp)

    def forward(self, images: Tensor) -> Tensor:
        """Quantised reconstruction (B, C, S, S) in [0, 1] of ``images`` (B, C, S, S) (diffusers' ``VQModel``
        forward; in training mode the codebook also takes its EMA step)."""
        return self.decode(self.encode(images))

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, config: MoVQConfig) -> MoVQConfig:
        """The same architecture at toy size (widths 8 and 16, one block per level, 16 codes), for the contract tests."""
        levels = len(config.block_channels)
        widths = tuple(8 * 2 ** min(i, 1) for i in range(levels))
        return attrs.evolve(
            config,
            block_channels=widths,
            layers_per_block=1,
            norm_groups=4,
            decoder_norm_groups=4,
            codebook_size=min(config.codebook_size, 16),
            kmeans_iters=2,
        )

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE of the quantised reconstruction + ``commitment`` × mean((h − sg[e])²) on ``batch['image']``."""
        images = batch["image"]
        self.check_images(images)
        images = images.float()  # (B, C, S, S)
        zq, codes, commitment = self.quantize(self.encode(images))  # (B, L, h, w), (B, h, w)
        recon = self._decode(zq, clamp=False)  # (B, C, S, S)
        mse = F.mse_loss(recon, images.to(recon.device))
        used = torch.bincount(codes.flatten(), minlength=self.codebook_size)  # (K,)
        metrics = {"recon_mse": mse.detach(), "commitment": commitment.detach(), "codes_in_batch": (used > 0).sum()}
        return mse + self.config.commitment * commitment, metrics  # 0-dim tensors: no host sync

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
        """Reconstruction errors (through the quantiser and without it) and codebook use on a split (see
        :func:`.evaluate.evaluate_movq`)."""
        from .evaluate import evaluate_movq

        return evaluate_movq(self, dataset, split, batch_size)

    def sample_to_folder(self, out: Any, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any) -> list:
        """Originals and quantised reconstructions of ``n`` test images (``polymodal sample``)."""
        from polymodal.eval.reconstructions import write_reconstructions

        return write_reconstructions(self, out, n=n, prompt=prompt, seed=seed, what="movq", **options)

    def card_lines(self) -> list[str]:
        """Data, architecture, codebook and loss for the model card."""
        c = self.config
        lat, h, w = self.latent_shape
        return [
            f"MoVQ autoencoder (diffusers VQModel, norm_type='spatial'): {c.image_size}×{c.image_size}×{c.channels} "
            f"images ⇄ {h}×{w}×{lat} latents, quantised to {c.codebook_size} codes; levels {list(c.block_channels)}, "
            f"{c.layers_per_block} residual block(s) per encoder level, decoder norms spatially conditioned on the "
            f"latent, middle attention {'on' if c.mid_attention else 'off'}.",
            f"Loss: quantised-reconstruction MSE + {c.commitment:g} × commitment; EMA codebook (decay {c.decay}, k-means "
            f"init, dead codes re-seeded after {c.dead_code_steps} idle steps). Data: {c.data or 'unspecified'}.",
            "",
        ]
