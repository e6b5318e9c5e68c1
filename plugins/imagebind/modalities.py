"""ImageBind's per-modality parts: preprocessor + stem + trunk (a registered encoder), head, postprocessor.

A modality encoder is a registered ``encoder`` (kind ``encoder``, name ``imagebind-<modality>``)
that maps the raw modality (waveforms, thermal images …) to tokens (B, 1 + N, dim), with a
[CLS] token first. Its class carries what the ImageBind recipe needs to know about it:

- ``modality``: the batch field it reads (``"audio"``), also the name in ``ImageBindConfig.modalities``;
- ``logit_scale``: the fixed scale of its postprocessor (ImageBind: audio 20, depth 5, thermal 10);
- ``derive(batch, generator)``: synthesise the modality for a digits batch (labels, images) when
  the dataset does not carry it.

A plugin adds a modality by registering one more such encoder and listing it in
``--set modalities='["audio","thermal","mine"]'``. Every trunk is the core :class:`ViTEncoder`
(patch stem, learned positions, pre-norm transformer), as ImageBind uses one ViT per modality.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import config, field, in_range
from polymodal.nn import BlockConfig, make_norm
from polymodal.nn.encoders import ViTEncoder, ViTEncoderConfig
from polymodal.plugins.imagebind.audio import SAMPLE_RATE, dtmf_clips, log_mel, mel_filterbank


def check_batch(x: Any, modality: str, shape: str, dims: int) -> Tensor:
    """A non-empty floating tensor with ``dims`` dimensions, else a ValueError naming expected vs given."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{modality}: expected a tensor {shape}; got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{modality}: expected a {dims}-D batch {shape}; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{modality}: expected a non-empty batch {shape}; got batch size 0")
    if not x.is_floating_point():
        raise ValueError(f"{modality}: expected floating-point values; got dtype {x.dtype}")
    return x


def _trunk(
    size: tuple[int, int], patch: int, dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float
) -> ViTEncoder:
    """One channel ViT trunk over (height, width) inputs, without a final norm: the modality head
    normalises (ImageBind's head order)."""
    grid = (size[0] // patch, size[1] // patch) if size[0] != size[1] else None  # None: square
    block = BlockConfig(dim=dim, heads=heads, mlp_ratio=mlp_ratio, drop_path=drop_path)
    return ViTEncoder(
        ViTEncoderConfig(
            image_size=size[0],
            patch_size=patch,
            grid=grid,
            channels=1,
            block=block,
            depth=depth,
            ln_pre=True,
            final_norm=False,
        )
    )


# -- audio --------------------------------------------------------------------------------------


@config
class AudioEncoderConfig:
    """Waveform → log-mel spectrogram → patch stem → ViT trunk (ImageBind's audio encoder)."""

    sample_rate: int = field(
        SAMPLE_RATE, "Samples per second of the input waveforms.", check=in_range(1000, 192000, integer=True)
    )
    n_fft: int = field(
        256, "STFT window length in samples (shorter clips are an error).", check=in_range(16, 8192, integer=True)
    )
    hop: int = field(64, "STFT hop in samples.", check=in_range(1, 8192, integer=True))
    mels: int = field(32, "Mel bins (spectrogram height).", check=in_range(4, 512, integer=True))
    frames: int = field(
        32,
        "Spectrogram frames the trunk sees (longer clips are cropped, shorter ones padded).",
        check=in_range(1, 4096, integer=True),
    )
    fmin: float = field(300.0, "Lowest mel filter edge in Hz.", check=in_range(0.0, 96000.0))
    fmax: float = field(2000.0, "Highest mel filter edge in Hz.", check=in_range(1.0, 96000.0))
    patch: int = field(
        4, "Side of the square spectrogram patches (ImageBind: 16 with stride 10).", check=in_range(1, 64, integer=True)
    )
    dim: int = field(64, "Token width.", check=in_range(1, 4096, integer=True))
    depth: int = field(2, "Transformer blocks.", check=in_range(1, 64, integer=True))
    heads: int = field(4, "Attention heads.", check=in_range(1, 64, integer=True))
    mlp_ratio: float = field(2.0, "MLP width as a multiple of dim.", check=in_range(0.25, 16))
    drop_path: float = field(
        0.1, "Stochastic depth (ImageBind trains its audio trunk with 0.1).", check=in_range(0.0, 1.0)
    )

    def __attrs_post_init__(self) -> None:
        if self.mels % self.patch or self.frames % self.patch:
            raise ValueError(
                f"AudioEncoderConfig.patch must divide mels and frames; got mels={self.mels}, "
                f"frames={self.frames}, patch={self.patch}"
            )
        if self.fmax > self.sample_rate / 2:
            raise ValueError(
                f"AudioEncoderConfig.fmax must be at most sample_rate/2 = {self.sample_rate / 2}; got {self.fmax}"
            )


class AudioEncoder(nn.Module):
    """Waveforms (B, T) → tokens (B, 1 + (mels/p)·(frames/p), dim); the spectrogram is an image to the stem."""

    config_class = AudioEncoderConfig
    modality = "audio"
    logit_scale = 20.0

    def __init__(self, cfg: AudioEncoderConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.cfg = cfg = attrs.evolve(cfg or AudioEncoderConfig(), **overrides)
        self.out_dim = cfg.dim
        self.register_buffer(
            "filterbank", mel_filterbank(cfg.n_fft, cfg.mels, cfg.sample_rate, cfg.fmin, cfg.fmax), persistent=False
        )
        self.trunk = _trunk(
            (cfg.mels, cfg.frames), cfg.patch, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.drop_path
        )  # a mels × frames grid of patches

    def preprocess(self, wave: Tensor) -> Tensor:
        """(B, T) waveforms → (B, 1, mels, frames) normalised log-mel spectrograms."""
        check_batch(wave, "audio", "(B, T) waveforms", 2)
        c = self.cfg
        spec = log_mel(
            wave,
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            hop=c.hop,
            n_mels=c.mels,
            fmin=c.fmin,
            fmax=c.fmax,
            filterbank=self.filterbank,
        )  # (B, M, F)
        spec = spec[..., : c.frames]
        if spec.shape[-1] < c.frames:  # pad with silence (the log floor)
            spec = F.pad(spec, (0, c.frames - spec.shape[-1]), value=math.log(1e-6))
        return ((spec + 4.0) / 4.0).unsqueeze(1)  # (B, 1, M, frames), roughly zero-mean unit-scale

    def forward(self, wave: Tensor) -> Tensor:
        """(B, T) → (B, 1 + N, dim)."""
        return self.trunk(self.preprocess(wave))

    def derive(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """A DTMF clip (B, CLIP_SAMPLES) of each sample's digit ``batch['label']``."""
        return dtmf_clips(batch["label"], generator)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Random noisy waveforms long enough for ``frames`` frames."""
        t = self.cfg.n_fft + self.cfg.hop * (self.cfg.frames - 1)
        return (0.1 * torch.randn(batch_size, t, generator=generator),)


# -- thermal ------------------------------------------------------------------------------------


@config
class ThermalEncoderConfig:
    """A thermal-camera view of the scene: one channel, blurred heat, 16×16, ViT trunk (ImageBind's thermal)."""

    image_size: int = field(16, "Side of the (square) thermal images.", check=in_range(2, 1024, integer=True))
    patch: int = field(4, "Patch side of the stem.", check=in_range(1, 64, integer=True))
    dim: int = field(64, "Token width.", check=in_range(1, 4096, integer=True))
    depth: int = field(2, "Transformer blocks.", check=in_range(1, 64, integer=True))
    heads: int = field(4, "Attention heads.", check=in_range(1, 64, integer=True))
    mlp_ratio: float = field(2.0, "MLP width as a multiple of dim.", check=in_range(0.25, 16))
    drop_path: float = field(0.0, "Stochastic depth.", check=in_range(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"ThermalEncoderConfig.patch must divide image_size; got {self.image_size}, {self.patch}")


def thermal_view(images: Tensor, size: int = 16, generator: torch.Generator | None = None) -> Tensor:
    """(B, C, H, W) images in [0, 1] → (B, 1, size, size) heat maps: blurred ink, random ambient, sensor noise."""
    x = images.float().mean(1, keepdim=True)  # (B, 1, H, W)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (B, 1, S, S)
    k = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float32) / 1.5) ** 2)
    k = (k / k.sum()).to(x.device)
    x = F.conv2d(
        F.pad(x, (3, 3, 3, 3), mode="replicate"), (k[:, None] * k[None, :])[None, None]
    )  # (B, 1, S, S) heat diffuses
    b = x.shape[0]
    ambient = torch.rand(b, 1, 1, 1, generator=generator) * 0.3  # (B, 1, 1, 1)
    gain = 0.6 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    noise = 0.05 * torch.randn(x.shape, generator=generator)
    return (ambient.to(x.device) + gain.to(x.device) * x + noise.to(x.device)).clamp(0.0, 1.0)


class ThermalEncoder(nn.Module):
    """Thermal images (B, 1, S, S) → tokens (B, 1 + (S/p)², dim)."""

    config_class = ThermalEncoderConfig
    modality = "thermal"
    logit_scale = 10.0

    def __init__(self, cfg: ThermalEncoderConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.cfg = cfg = attrs.evolve(cfg or ThermalEncoderConfig(), **overrides)
        self.out_dim = cfg.dim
        self.trunk = _trunk(
            (cfg.image_size,) * 2, cfg.patch, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.drop_path
        )

    def preprocess(self, thermal: Tensor) -> Tensor:
        """Check the shape (B, 1, S, S) and centre the values."""
        s = self.cfg.image_size
        check_batch(thermal, "thermal", f"(B, 1, {s}, {s})", 4)
        if tuple(thermal.shape[1:]) != (1, s, s):
            raise ValueError(f"thermal: expected images (B, 1, {s}, {s}); got shape {tuple(thermal.shape)}")
        return (thermal - 0.5) / 0.5  # (B, 1, S, S)

    def forward(self, thermal: Tensor) -> Tensor:
        """(B, 1, S, S) → (B, 1 + N, dim)."""
        return self.trunk(self.preprocess(thermal))

    def derive(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """The thermal view (B, 1, S, S) of ``batch['image']``."""
        return thermal_view(batch["image"], self.cfg.image_size, generator)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Random thermal images."""
        s = self.cfg.image_size
        return (torch.rand(batch_size, 1, s, s, generator=generator),)


# -- head and postprocessor ---------------------------------------------------------------------


class ModalityHead(nn.Module):
    """ImageBind's head: norm → select the [CLS] (index 0) or EOS token → bias-free projection to the shared space."""

    def __init__(self, dim: int, embed_dim: int, norm: str = "layernorm", eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim, eps)
        self.proj = nn.Linear(dim, embed_dim, bias=False)
        nn.init.trunc_normal_(self.proj.weight, std=dim**-0.5)

    def forward(self, tokens: Tensor, index: Tensor | int = 0) -> Tensor:
        """(B, N, dim) → (B, embed_dim); ``index`` is 0 (CLS) or a (B,) tensor of EOS positions."""
        x = self.norm(tokens)  # (B, N, dim)
        if isinstance(index, Tensor):
            x = x[torch.arange(x.shape[0], device=x.device), index]  # (B, dim)
        else:
            x = x[:, index]  # (B, dim)
        return self.proj(x)  # (B, E)


class Postprocessor(nn.Module):
    """L2 normalisation, then a scale: a learnable log-scale (text) or a fixed one (other modalities)."""

    def __init__(self, scale: float = 1.0, learnable: bool = False, max_scale: float = 100.0) -> None:
        super().__init__()
        self.max_log = math.log(max_scale)
        init = torch.tensor(math.log(scale))
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:  # a fixed scale is a buffer: no optimiser ever sees it
            self.register_buffer("log_scale", init)

    def scale(self) -> Tensor:
        """The multiplier ``exp(min(s, ln max))``."""
        return self.log_scale.clamp(max=self.max_log).exp()

    def forward(self, x: Tensor, normalize_only: bool = False) -> Tensor:
        """(B, E) → unit-norm (B, E), times the scale unless ``normalize_only``."""
        x = F.normalize(x.float(), dim=-1)
        return x if normalize_only else x * self.scale()


MODALITY_ENCODERS = {"audio": AudioEncoder, "thermal": ThermalEncoder}
"""The modalities this plugin ships; registered as encoders ``imagebind-audio`` and ``imagebind-thermal``."""

__all__ = [
    "AudioEncoder",
    "AudioEncoderConfig",
    "MODALITY_ENCODERS",
    "ModalityHead",
    "Postprocessor",
    "ThermalEncoder",
    "ThermalEncoderConfig",
    "check_batch",
    "thermal_view",
]
