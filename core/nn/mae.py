"""Masked autoencoding (He et al., 2021): hide most patches, encode the rest, reconstruct the hidden ones.

The pieces, usable on their own by any family (PIXEL renders text into a 1×N strip of patches;
an image MAE uses a square grid):

- :func:`patchify` / :func:`unpatchify` — images ↔ flattened patches, in ViTMAE's layout
  (patches in raster order; inside a patch, pixel rows, then columns, then channels).
- :func:`masking_from_noise` — ViTMAE's convention: ``argsort(noise)`` shuffles the patches, the
  first ``len_keep`` stay visible. Random masking passes uniform noise; a family with its own
  masking rule (PIXEL's spans) turns its boolean mask into noise with :func:`noise_from_mask`.
- :func:`masked_patch_loss` — mean squared error on the masked patches only, against per-patch
  normalised targets (``norm_pix_loss``).
- :class:`MAE` — a core :class:`~polymodal.nn.encoders.ViTEncoder` run on the visible patches (its
  ``embed(images, keep=...)`` then its stack), a light decoder (a core
  :class:`~polymodal.nn.TransformerStack`) that appends mask tokens, unshuffles and predicts
  every patch. ``valid`` (B, N) bool marks real patches: the others (PIXEL's blank padding) are
  hidden from attention as keys and never counted in the loss.

The forward pass equals transformers' ``ViTMAEForPreTraining`` given the same noise (see
``tests/test_mae.py``, which converts the weights with :func:`polymodal.plugins.pixel.convert.mae_state_from_hf`).
"""

from __future__ import annotations

from dataclasses import dataclass

import attrs
import torch
from torch import Tensor, nn

from polymodal.config import config, field, in_range, one_of
from polymodal.nn import BlockConfig, StackConfig, TransformerStack, init_weights
from polymodal.nn.embed import PositionEmbedding
from polymodal.nn.encoders import ViTEncoder, ViTEncoderConfig


@config
class MAEConfig:
    """A masked autoencoder: a ViT encoder over visible patches and a light decoder over all of them."""

    encoder: ViTEncoderConfig = field(ViTEncoderConfig(pos_embed="sincos"), "The encoder (patch size, width, depth …).")
    grid_rows: int = field(
        0,
        "Patch rows the position tables are built for (0: the encoder's patch grid).",
        check=in_range(0, 8192, integer=True),
    )
    grid_cols: int = field(
        0,
        "Patch columns the position tables are built for (0: the encoder's patch grid).",
        check=in_range(0, 8192, integer=True),
    )
    decoder_dim: int = field(64, "Decoder width.", check=in_range(1, 65536, integer=True))
    decoder_depth: int = field(2, "Decoder blocks.", check=in_range(1, 1024, integer=True))
    decoder_heads: int = field(4, "Decoder attention heads.", check=in_range(1, 1024, integer=True))
    decoder_mlp_ratio: float = field(
        4.0, "Decoder MLP width as a multiple of ``decoder_dim``.", check=in_range(0.25, 64)
    )
    decoder_pos_embed: str = field(
        "sincos", "Decoder positions: fixed 'sincos' or 'learned'.", check=one_of("learned", "sincos")
    )
    mask_ratio: float = field(0.75, "Fraction of patches hidden by random masking.", check=in_range(0.0, 0.99))
    norm_pix_loss: bool = field(True, "Normalise each target patch by its own mean and standard deviation.")
    norm_pix_eps: float = field(1e-6, "Added to the patch variance before the square root.", check=in_range(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        if (self.grid_rows == 0) != (self.grid_cols == 0):
            raise ValueError(
                f"MAEConfig.grid_rows and grid_cols must both be 0 or both be set; "
                f"got {self.grid_rows} and {self.grid_cols}"
            )
        if self.grid_rows and self.encoder.grid is not None and self.encoder.grid != self.grid:
            raise ValueError(
                f"MAEConfig.grid_rows × grid_cols ({self.grid_rows}×{self.grid_cols}) and the encoder's "
                f"grid {self.encoder.grid} disagree; set one of them"
            )
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"MAEConfig.decoder_heads must divide decoder_dim; got {self.decoder_dim}, {self.decoder_heads}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches the model is built for."""
        if self.grid_rows:
            return self.grid_rows, self.grid_cols
        return self.encoder.patch_grid

    @property
    def encoder_config(self) -> ViTEncoderConfig:
        """The encoder's config with the model's grid (a non-square one such as PIXEL's 1×N strip)."""
        return self.encoder if self.encoder.patch_grid == self.grid else attrs.evolve(self.encoder, grid=self.grid)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: ``patch_size² · channels``."""
        return self.encoder.patch_size**2 * self.encoder.channels


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) → (B, H/p · W/p, p·p·C): raster-order patches, each flattened (row, column, channel)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image height and width must be divisible by the patch size {patch}; got {h}×{w}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)  # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)  # (B, N, p·p·C)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, gh·gw, p·p·C) → (B, C, gh·p, gw·p)."""
    b, n, d = patches.shape
    gh, gw = grid
    if n != gh * gw or d != patch * patch * channels:
        raise ValueError(
            f"expected patches (B, {gh * gw}, {patch * patch * channels}) for a {gh}×{gw} grid of "
            f"{patch}×{patch}×{channels} patches; got {tuple(patches.shape)}"
        )
    x = patches.reshape(b, gh, gw, patch, patch, channels)  # (B, gh, gw, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * patch, gw * patch)


def masking_from_noise(noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """ViTMAE's masking: ``argsort(noise)`` per row, the first ``len_keep`` patches stay visible.

    Returns ``keep`` (B, len_keep) long (indices of the visible patches, in shuffled order),
    ``mask`` (B, N) float (1 = hidden, 0 = visible) and ``ids_restore`` (B, N) long (the
    permutation that puts a shuffled sequence back in patch order).
    """
    if noise.dim() != 2:
        raise ValueError(f"expected noise (B, N); got shape {tuple(noise.shape)}")
    n = noise.shape[1]
    if not 0 <= len_keep <= n:
        raise ValueError(f"len_keep must be in [0, {n}] for {n} patches; got {len_keep}")
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    keep = ids_shuffle[:, :len_keep]  # (B, K)
    mask = torch.ones_like(noise, dtype=torch.float32)  # (B, N)
    mask[:, :len_keep] = 0
    return keep, torch.gather(mask, 1, ids_restore), ids_restore


def noise_from_mask(mask: Tensor, valid: Tensor | None = None) -> tuple[Tensor, int]:
    """Noise that makes :func:`masking_from_noise` hide ``mask`` (B, N) bool; returns ``(noise, len_keep)``.

    Visible real patches sort first (in patch order), then padding (``valid`` False), then the
    masked patches. ``len_keep = N - max(masked per row)``, the same for every row, so a row with
    fewer masked patches also drops some padding (never a visible real patch, as long as it has
    enough padding; otherwise the dropped real patches count as masked in the returned mask).
    """
    if mask.dim() != 2:
        raise ValueError(f"expected a mask (B, N); got shape {tuple(mask.shape)}")
    b, n = mask.shape
    level = mask.float() * 2  # (B, N): 2 = masked
    if valid is not None:
        level = level + ((~valid.bool()) & (~mask.bool())).float()  # 1 = padding
    order = torch.arange(n, dtype=torch.float32, device=mask.device) / (2 * n)  # ties broken by position
    return level + order, n - int(mask.sum(1).max().item()) if b else n


def normalise_patches(target: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch (…, P) minus its mean, over ``sqrt(var + eps)`` (unbiased variance, as MAE)."""
    mean = target.mean(dim=-1, keepdim=True)  # (..., 1)
    var = target.var(dim=-1, keepdim=True)  # (..., 1)
    return (target - mean) / (var + eps) ** 0.5


def masked_patch_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean over weighted patches of the per-patch mean squared error; 0 when no patch is weighted.

    pred, target: (B, N, P); weight: (B, N) (the mask, possibly times a validity mask).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    weight = weight.float()
    return (per_patch * weight).sum() / weight.sum().clamp(min=1e-8)


@dataclass
class MAEOutput:
    """What :meth:`MAE.forward` returns (all batch-first)."""

    loss: Tensor
    """Scalar masked-patch loss."""
    pred: Tensor
    """(B, N, P) predicted patches (normalised space when ``norm_pix_loss``)."""
    mask: Tensor
    """(B, N) float, 1 = hidden."""
    ids_restore: Tensor
    """(B, N) long, the unshuffling permutation."""
    latent: Tensor
    """(B, prefix + K, D) encoder output on the visible patches."""
    target: Tensor
    """(B, N, P) the target patches (normalised when ``norm_pix_loss``)."""


class MAE(nn.Module):
    """Encoder on the visible patches, light decoder with mask tokens, loss on the hidden patches."""

    config_class = MAEConfig

    def __init__(self, cfg: MAEConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = attrs.evolve(cfg or MAEConfig(), **overrides)
        self.cfg = cfg
        e = cfg.encoder
        self.encoder = ViTEncoder(cfg.encoder_config)
        self.grid = cfg.grid
        self.prefix = self.encoder.prefix
        self.decoder_embed = nn.Linear(e.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos = PositionEmbedding(cfg.decoder_dim, self.grid, prefix=self.prefix, kind=cfg.decoder_pos_embed)
        block = BlockConfig(
            dim=cfg.decoder_dim,
            heads=cfg.decoder_heads,
            mlp_ratio=cfg.decoder_mlp_ratio,
            norm=e.block.norm,
            norm_eps=e.block.norm_eps,
            act=e.block.act,
            qkv_bias=e.block.qkv_bias,
        )
        self.decoder = TransformerStack(StackConfig(depth=cfg.decoder_depth, block=block, final_norm=True))
        self.decoder_pred = nn.Linear(cfg.decoder_dim, cfg.patch_dim)
        for part in (self.decoder_embed, self.decoder, self.decoder_pred):
            init_weights(part)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def num_patches(self) -> int:
        """Patches per input at the built grid."""
        return self.grid[0] * self.grid[1]

    def check(self, images: Tensor) -> None:
        """Raise a ValueError naming expected vs given when ``images`` do not fill the built grid."""
        p, (gh, gw), c = self.cfg.encoder.patch_size, self.grid, self.cfg.encoder.channels
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c, gh * p, gw * p):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"expected images (B, {c}, {gh * p}, {gw * p}) ({gh}×{gw} patches of {p}×{p}); got {shape}"
            )

    def target(self, images: Tensor) -> Tensor:
        """(B, N, P) reconstruction targets: the patches, normalised per patch when ``norm_pix_loss``."""
        patches = patchify(images.float(), self.cfg.encoder.patch_size)  # (B, N, P)
        return normalise_patches(patches, self.cfg.norm_pix_eps) if self.cfg.norm_pix_loss else patches

    def _padding(self, valid: Tensor | None, index: Tensor | None) -> Tensor | None:
        """Key-padding mask (B, prefix + len) for the tokens ``index`` of ``valid`` (None: all real)."""
        if valid is None:
            return None
        v = valid.bool() if index is None else torch.gather(valid.bool(), 1, index)  # (B, K)
        return torch.cat([v.new_ones(v.shape[0], self.prefix), v], dim=1)  # (B, prefix + K)

    def encode(
        self,
        images: Tensor,
        noise: Tensor | None = None,
        len_keep: int | None = None,
        valid: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode the visible patches; returns ``(latent (B, prefix+K, D), mask, ids_restore, keep)``.

        ``noise`` (B, N) decides the masking (uniform random when None); ``len_keep`` defaults to
        ``int(N · (1 - mask_ratio))`` as in ViTMAE.
        """
        self.check(images)
        b, n = images.shape[0], self.num_patches
        if noise is None:
            noise = torch.rand(b, n, generator=generator).to(images.device)  # (B, N)
        if tuple(noise.shape) != (b, n):
            raise ValueError(f"expected noise ({b}, {n}); got {tuple(noise.shape)}")
        len_keep = int(n * (1 - self.cfg.mask_ratio)) if len_keep is None else len_keep
        keep, mask, ids_restore = masking_from_noise(noise.to(images.device), len_keep)
        x = self.encoder.embed(images, keep)  # (B, prefix + K, D)
        latent = self.encoder.blocks(x, key_padding=self._padding(valid, keep))  # (B, prefix + K, D)
        return latent, mask, ids_restore, keep

    def decode(self, latent: Tensor, ids_restore: Tensor, valid: Tensor | None = None) -> Tensor:
        """(B, prefix + K, D) latent → (B, N, P) predicted patches (mask tokens fill the hidden places)."""
        x = self.decoder_embed(latent)  # (B, prefix + K, Dd)
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n + self.prefix - x.shape[1], -1)  # (B, N - K, Dd)
        tokens = torch.cat([x[:, self.prefix :], fill], dim=1)  # (B, N, Dd), shuffled order
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, Dd)
        x = torch.cat([x[:, : self.prefix], tokens], dim=1) + self.decoder_pos()  # (B, prefix + N, Dd)
        x = self.decoder(x, key_padding=self._padding(valid, None))  # (B, prefix + N, Dd)
        return self.decoder_pred(x)[:, self.prefix :]  # (B, N, P)

    def forward(
        self,
        images: Tensor,
        noise: Tensor | None = None,
        len_keep: int | None = None,
        valid: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode and score: the loss counts hidden patches that are ``valid``."""
        latent, mask, ids_restore, _ = self.encode(images, noise, len_keep, valid, generator)
        pred = self.decode(latent, ids_restore, valid)  # (B, N, P)
        target = self.target(images)  # (B, N, P)
        weight = mask if valid is None else mask * valid.float()  # (B, N)
        return MAEOutput(masked_patch_loss(pred, target, weight), pred, mask, ids_restore, latent, target)

    def features(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """Every patch unmasked: (B, prefix + N, D) encoder tokens (padding hidden as keys when ``valid``)."""
        self.check(images)
        return self.encoder.blocks(self.encoder.embed(images), key_padding=self._padding(valid, None))

    def reconstruct(self, pred: Tensor, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Predicted patches back in pixel space (B, C, H, W), un-normalised with each true patch's
        mean and std; with ``mask``, visible patches keep their true pixels."""
        patches = patchify(images.float(), self.cfg.encoder.patch_size)  # (B, N, P)
        out = pred.float()
        if self.cfg.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)  # (B, N, 1)
            out = out * (var + self.cfg.norm_pix_eps) ** 0.5 + mean
        if mask is not None:
            m = mask.float().unsqueeze(-1)  # (B, N, 1)
            out = m * out + (1 - m) * patches
        return unpatchify(out, self.cfg.encoder.patch_size, self.grid, self.cfg.encoder.channels).clamp(0, 1)


__all__ = [
    "MAE",
    "MAEConfig",
    "MAEOutput",
    "masked_patch_loss",
    "masking_from_noise",
    "noise_from_mask",
    "normalise_patches",
    "patchify",
    "unpatchify",
]
