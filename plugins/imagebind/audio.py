"""Audio for the digits: the telephone (DTMF) dual tone of each digit, and a torch log-mel spectrogram.

Each digit sounds as on a telephone keypad: the sum of one row tone (697, 770, 852 or
941 Hz) and one column tone (1209, 1336 or 1477 Hz); ``0`` is 941 + 1336 Hz. A clip is
:data:`CLIP_SAMPLES` samples at :data:`SAMPLE_RATE` Hz; the tone starts at a random onset,
lasts a random duration, has random phases, amplitude and twist (row/column level
difference) and sits in white noise of random level. Everything is drawn from a
``torch.Generator``, so a seed fixes every clip::

    wave = dtmf_clips(torch.tensor([3, 0]), generator=torch.Generator().manual_seed(0))  # (2, 2240)
    spec = log_mel(wave)                                                               # (2, 32, 32)
    data = load_digits_audio()             # digits + an "audio" waveform field, same split, same labels

No torchaudio: the spectrogram is ``torch.stft`` (Hann window) → power → a triangular
mel filterbank built here (HTK mel scale) → ``log``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polymodal.data.base import Dataset, Split

SAMPLE_RATE = 8000
"""Samples per second of the embedded clips (telephone quality)."""

CLIP_SAMPLES = 2240
"""Samples per clip (0.28 s): with ``n_fft=256``, ``hop=64`` that is exactly 32 STFT frames."""

DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
"""Row (low-group) frequencies of the keypad, in Hz."""

DTMF_COLS = (1209.0, 1336.0, 1477.0)
"""Column (high-group) frequencies of the keypad, in Hz."""

KEYPAD = {1: (0, 0), 2: (0, 1), 3: (0, 2), 4: (1, 0), 5: (1, 1), 6: (1, 2), 7: (2, 0), 8: (2, 1), 9: (2, 2), 0: (3, 1)}
"""Digit → (row, column) on the standard telephone keypad."""


def dtmf_frequencies(digit: int) -> tuple[float, float]:
    """The (row, column) frequencies in Hz of ``digit`` (0–9)."""
    if digit not in KEYPAD:
        raise ValueError(f"DTMF digits are 0..9; got {digit!r}")
    r, c = KEYPAD[digit]
    return DTMF_ROWS[r], DTMF_COLS[c]


_FREQS = torch.tensor([dtmf_frequencies(d) for d in range(10)], dtype=torch.float64)  # (10, 2)


def dtmf_clips(
    labels: Tensor,
    generator: torch.Generator | None = None,
    *,
    sample_rate: int = SAMPLE_RATE,
    samples: int = CLIP_SAMPLES,
    min_duration: float = 0.07,
    max_duration: float = 0.25,
    noise: tuple[float, float] = (0.01, 0.15),
) -> Tensor:
    """One noisy DTMF clip per label: (N,) int digits → (N, samples) float32 waveforms."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"DTMF labels must be digits 0..9; got values in [{labels.min()}, {labels.max()}]")
    n, g = labels.shape[0], generator

    def uniform(lo: float, hi: float, k: int = 1) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, k, generator=g, dtype=torch.float64)  # (N, k)

    max_len = min(int(max_duration * sample_rate), samples)
    length = (uniform(min_duration, max_duration) * sample_rate).clamp(max=max_len).round()  # (N, 1)
    onset = (uniform(0.0, 1.0) * (samples - length)).floor()  # (N, 1)
    t = torch.arange(samples, dtype=torch.float64).unsqueeze(0)  # (1, T)
    on = ((t >= onset) & (t < onset + length)).double()  # (N, T)
    freqs = _FREQS[labels]  # (N, 2)
    phase = uniform(0.0, 2 * math.pi, 2)  # (N, 2)
    twist = 10 ** (uniform(-3.0, 3.0) / 20)  # (N, 1) column level relative to the row tone
    amp = uniform(0.2, 1.0)  # (N, 1)
    tones = torch.sin(
        2 * math.pi * freqs.unsqueeze(-1) * t.unsqueeze(0) / sample_rate + phase.unsqueeze(-1)
    )  # (N, 2, T)
    wave = amp * on * (tones[:, 0] + twist * tones[:, 1]) / 2  # (N, T)
    sigma = uniform(*noise)  # (N, 1)
    wave = wave + sigma * torch.randn(n, samples, generator=g, dtype=torch.float64)  # (N, T)
    return wave.float()


def hz_to_mel(hz: Tensor | float) -> Tensor:
    """HTK mel scale: ``2595 · log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters, equally spaced on the mel scale, peak 1."""
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(
            f"mel filterbank needs 0 <= fmin < fmax <= sample_rate/2 = {sample_rate / 2}; got fmin={fmin}, fmax={fmax}"
        )
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    edges = mel_to_hz(
        torch.linspace(float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2, dtype=torch.float64)
    )  # (M + 2,)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # (M,) each
    up = (freqs.unsqueeze(1) - lo) / (mid - lo)  # (F, M)
    down = (hi - freqs.unsqueeze(1)) / (hi - mid)  # (F, M)
    return up.minimum(down).clamp(min=0).float()


def log_mel(
    wave: Tensor,
    *,
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = 256,
    hop: int = 64,
    n_mels: int = 32,
    fmin: float = 300.0,
    fmax: float = 2000.0,
    floor: float = 1e-6,
    filterbank: Tensor | None = None,
) -> Tensor:
    """Waveforms (B, T) → log-mel spectrograms (B, n_mels, frames), ``frames = 1 + (T − n_fft) // hop``.

    A clip shorter than one STFT window raises a ValueError naming both lengths.
    """
    if wave.dim() != 2:
        raise ValueError(f"expected waveforms (B, T); got shape {tuple(wave.shape)}")
    if wave.shape[-1] < n_fft:
        raise ValueError(
            f"audio too short for one STFT frame: expected at least n_fft={n_fft} samples, got {wave.shape[-1]}"
        )
    fb = mel_filterbank(n_fft, n_mels, sample_rate, fmin, fmax) if filterbank is None else filterbank
    window = torch.hann_window(n_fft, dtype=torch.float32, device=wave.device)
    spec = torch.stft(
        wave.float(), n_fft, hop_length=hop, window=window, center=False, return_complex=True
    )  # (B, F, frames)
    power = spec.abs().pow(2)  # (B, F, frames)
    mel = torch.einsum("bft,fm->bmt", power, fb.to(power.device))  # (B, M, frames)
    return torch.log(mel + floor)


def with_audio(dataset: Dataset, seed: int = 0, field: str = "audio") -> Dataset:
    """``dataset`` with a DTMF waveform (N, CLIP_SAMPLES) per sample, of the sample's label.

    Train and test clips come from separate generators seeded by ``seed``, so both are
    fixed by the seed and each image is paired with a clip of its own digit.
    """
    splits = []
    for offset, split in enumerate((dataset.train, dataset.test)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + offset)
        fields = dict(split.fields)
        fields[field] = dtmf_clips(split["label"], g)
        splits.append(Split(fields))
    meta = {**dataset.meta, "sample_rate": SAMPLE_RATE, "audio_samples": CLIP_SAMPLES}
    return Dataset(f"{dataset.name}-audio", splits[0], splits[1], meta)


def load_digits_audio(root: str | None = None, seed: int = 0) -> Dataset:
    """The digits (same fixed split and captions) with a DTMF clip of each sample's digit."""
    from polymodal.data.digits import load_digits

    return with_audio(load_digits(root, seed=seed), seed=seed)


__all__ = [
    "CLIP_SAMPLES",
    "DTMF_COLS",
    "DTMF_ROWS",
    "KEYPAD",
    "SAMPLE_RATE",
    "dtmf_clips",
    "dtmf_frequencies",
    "hz_to_mel",
    "load_digits_audio",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "with_audio",
]
