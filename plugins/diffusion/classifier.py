"""The noisy, time-conditioned classifier of ADM's classifier guidance (Dhariwal & Nichol 2021).

``p(y | x_t, t)``: the UNet's encoder half (core residual blocks conditioned on the sinusoidal time
embedding, downsampling between levels), GroupNorm-SiLU, global average pooling and a linear head.
It trains on ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε`` at uniform timesteps of the same schedule as
the diffusion model it guides; its gradient ``∇ₓ log p(y | x_t)`` then steers an unconditional
model (``polymodal sample runs/ddpm --classifier runs/ddpm-classifier --label 7 --guidance-scale S``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.diffusion.schedule import NoiseSchedule
from polymodal.models import PolymodalModel
from polymodal.models.base import ImageSpec
from polymodal.nn.unet import ResBlock, TimeEmbedding, timestep_embedding

from .config import ClassifierConfig


class NoisyClassifier(PolymodalModel):
    """``forward(x_t (B, C, H, W) in [-1, 1], t (B,))`` → class logits (B, K)."""

    family = "diffusion-classifier"
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__(config)
        u = config.unet
        self.schedule = NoiseSchedule(config.schedule)
        self.conv_in = nn.Conv2d(u.in_channels, u.channels[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(u.channels[0], u.time_dim)
        blocks, cin = [], u.channels[0]
        for i, width in enumerate(u.channels):
            for _ in range(u.layers_per_block):
                blocks.append(ResBlock(cin, width, u))
                cin = width
            blocks.append(nn.AvgPool2d(2) if i < len(u.channels) - 1 else nn.Identity())
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(u.norm_groups, cin, eps=u.norm_eps)
        self.head = nn.Linear(cin, config.num_classes)

    @classmethod
    def config_for_data(cls, config: ClassifierConfig, dataset: Any, fixed: Collection[str] = ()) -> ClassifierConfig:
        """The data's channels, image size and class count."""
        meta = dataset.meta
        classes = int(meta.get("num_classes", 0))
        if classes < 2:
            raise ValueError(f"a noisy classifier needs a dataset with ≥ 2 classes; {dataset.name} has {classes}")
        unet = config.unet
        changes: dict[str, Any] = {}
        if "unet.in_channels" not in fixed:
            changes["in_channels"] = int(meta.get("channels", unet.in_channels))
        if "unet.sample_size" not in fixed:
            changes["sample_size"] = int(meta.get("image_size", unet.sample_size))
        return attrs.evolve(config, unet=attrs.evolve(unet, **changes), num_classes=classes, data=dataset.name)

    @classmethod
    def tiny_config(cls, config: ClassifierConfig) -> ClassifierConfig:
        """Widths 8/16, one block per level, a 100-step schedule."""
        unet = attrs.evolve(config.unet, channels=(8, 16), attention_levels=(False, False), norm_groups=4)
        return attrs.evolve(config, unet=unet, schedule=attrs.evolve(config.schedule, timesteps=100))

    def image_spec(self) -> ImageSpec:
        """Square images of ``unet.sample_size`` with ``unet.in_channels`` channels, in [0, 1]."""
        return ImageSpec(size=int(self.config.unet.sample_size), channels=int(self.config.unet.in_channels))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits (B, K) of noisy images x_t (B, C, S, S) in [-1, 1] at timesteps t (B,) or a number."""
        u = self.config.unet
        want = (u.in_channels, u.sample_size, u.sample_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"the noisy classifier expects x_t (B, {', '.join(map(str, want))}); got {got}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        temb = timestep_embedding(t, u.channels[0], flip_sin_to_cos=u.flip_sin_to_cos, freq_shift=u.freq_shift)
        emb_act = F.silu(self.time_embedding(temb.to(x.dtype)))  # (B, T)
        h = self.conv_in(x)  # (B, C0, S, S)
        for block in self.blocks:
            h = block(h, emb_act) if isinstance(block, ResBlock) else block(h)  # (B, Ci, S_i, S_i)
        h = F.silu(self.norm_out(h)).mean((2, 3))  # (B, C_last)
        return self.head(h)  # (B, K)

    def noisy(self, images: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t (B, C, S, S) of [0, 1] images at timesteps t (B,)."""
        x0 = images.float() * 2 - 1  # (B, C, S, S)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)  # (B, C, S, S)
        return self.schedule.add_noise(x0, noise, t.to(x0.device))

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Cross-entropy of the labels from x_t at uniform timesteps t ∈ [0, T)."""
        images = batch["image"].to(self.head.weight.device)
        labels = batch["label"].to(images.device).long()  # (B,)
        t = torch.randint(0, self.schedule.T, (len(images),), device=images.device)  # (B,)
        logits = self(self.noisy(images, t), t)  # (B, K)
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(-1) == labels).float().mean()}  # 0-dim: no host sync

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Accuracy on the split at t = 0 and at t = T/4, T/2, 3T/4 (seeded noise), and averaged over uniform t."""
        data = dataset.split(split)
        images, labels = data.batch(list(range(len(data))))["image"], data.batch(list(range(len(data))))["label"]
        g = torch.Generator().manual_seed(self.config.eval_seed)
        T, out = self.schedule.T, {}
        self.eval()
        for name, frac in (("t0", 0.0), ("t_quarter", 0.25), ("t_half", 0.5), ("t_three_quarters", 0.75)):
            t = torch.full((len(images),), int(frac * T), dtype=torch.long)  # (N,)
            pred = self(self.noisy(images, t, g), t.to(self.head.weight.device)).argmax(-1).cpu()  # (N,)
            out[f"accuracy_{name}"] = (pred == labels).float().mean().item()
        t = torch.randint(0, T, (len(images),), generator=g)  # (N,)
        pred = self(self.noisy(images, t, g), t.to(self.head.weight.device)).argmax(-1).cpu()
        out["accuracy_uniform_t"] = (pred == labels).float().mean().item()
        return out

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random x_t and timesteps."""
        u = self.config.unet
        x = torch.randn(batch_size, u.in_channels, u.sample_size, u.sample_size, generator=generator)
        return x, torch.randint(0, self.schedule.T, (batch_size,), generator=generator)

    def card_lines(self) -> list[str]:
        """Architecture and schedule."""
        u, s = self.config.unet, self.config.schedule
        return [
            f"Noisy classifier (ADM): encoder widths {u.channels}, {u.layers_per_block} blocks per level, "
            f"{self.config.num_classes} classes; trained on x_t of the {s.kind} schedule with T = {s.timesteps}.",
            "",
        ]


def check_classifier(classifier: Any, model: Any) -> None:
    """ValueError naming expected vs given unless ``classifier`` is a noisy classifier for ``model``'s
    images (size, channels), schedule and classes."""
    if not isinstance(classifier, NoisyClassifier):
        raise ValueError(f"classifier guidance needs a diffusion-classifier model; got {type(classifier).__name__}")
    want, got = model.image_shape, (classifier.config.unet.in_channels, *(classifier.config.unet.sample_size,) * 2)
    if tuple(want) != tuple(got):
        raise ValueError(
            f"the classifier reads images of another size: expected {want[1]}×{want[2]}×{want[0]} (the diffusion "
            f"model's), got a classifier of {got[1]}×{got[2]}×{got[0]}"
        )
    if classifier.config.schedule != model.config.schedule:
        raise ValueError(
            f"the classifier was trained on another noise schedule: expected {model.config.schedule}, "
            f"got {classifier.config.schedule}"
        )
    labels = model.config.labels
    if labels and classifier.config.num_classes != labels:
        raise ValueError(f"the classifier has {classifier.config.num_classes} classes; the model has {labels}")
