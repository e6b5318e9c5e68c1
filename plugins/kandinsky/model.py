"""Kandinsky 2.0 (ai-forever 2022): multilingual latent diffusion, a composite of registered frozen parts.

    image ──KL-VAE──▶ scaled latents (4, 8, 8) ──÷ range──▶ x0 ──UNet(ε; t + pooled text, context = text tokens)
    text ──M-CLIP──▶ pooled (B, E) + tokens (B, Lm, Dm)      text ──T5──▶ pooled (B, D5) + tokens (B, Lt, D5)

The VAE (``kl-vae-shapes``), the multilingual CLIP text tower (``mclip-shapes``) and the span-corruption encoder
(``t5-multilingual``) are frozen; only the UNet and the text projection (:class:`.condition.TextProjection`)
train. The UNet denoises the VAE's scaled latents (unit variance). Dynamic thresholding is Imagen's with the
latents' range in place of the pixels' 1: ``latent_range`` is the largest per-sample 99.5th percentile of |z|
over the training latents (fitted once when training starts), so thresholding leaves data-like predictions
alone and pulls saturated ones (strong guidance) back into range (:mod:`.sample`). Training draws, per scene and step,
a caption in a training (language, template) pair and drops the text (both encoders) with ``text_dropout``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from polymodal.data import languages as lang
from polymodal.diffusion import NoiseSchedule, diffusion_loss
from polymodal.models import PolymodalModel
from polymodal.models.interfaces import LatentAutoencoder, require
from polymodal.models.parts import follow_data, load_part
from polymodal.nn import UNet

from . import condition as cond
from .config import Kandinsky2Config
from .sample import SAMPLE_OPTIONS


class Kandinsky2(PolymodalModel):
    """``forward(x_t (B, 4, 8, 8), t (B,), clip_ids (B, Lm), t5_ids (B, Lt))`` → ε (B, 4, 8, 8)."""

    family = "kandinsky"
    config_class = Kandinsky2Config
    frozen: ClassVar[tuple[str, ...]] = ("vae", "text", "t5")
    part_attributes: ClassVar[dict[str, str]] = {"vae": "vae", "text": "text", "t5": "t5"}
    sample_options = SAMPLE_OPTIONS
    progress_metrics = ("loss",)

    def __init__(self, config: Kandinsky2Config, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        parts = dict(parts or {})
        for name in self.part_attributes:
            if name not in parts:
                parts[name] = load_part(getattr(config, name), name=f"Kandinsky2Config.{name}")
        vae = require(parts["vae"], LatentAutoencoder, what="Kandinsky2Config.vae")
        u = config.unet
        cond.check_vae_latents(vae, u, "Kandinsky2Config.vae")
        for name in ("text", "t5"):
            missing = [a for a in ("tokenize", "encode_text_and_tokens") if not callable(getattr(parts[name], a, None))]
            if missing:
                raise ValueError(
                    f"Kandinsky2Config.{name} must be a text encoder; {type(parts[name]).__name__} lacks {missing}"
                )
        text, t5 = parts["text"], parts["t5"]
        dims = (int(text.embed_dim), int(text.config.text.dim), int(t5.config.dim), u.time_dim, u.context_dim)
        self.proj = cond.TextProjection(*dims, pooling=config.pooling)
        self.unet = UNet(u)
        self.schedule = NoiseSchedule(config.schedule)
        self.register_buffer("latent_range", torch.ones(()))  # () the fitted bound of |latents|
        self.register_buffer("range_fitted", torch.zeros((), dtype=torch.bool))
        for name, part in self.attach_parts(parts).items():
            setattr(self, self.part_attributes[name], part)
        self.freeze()
        self.features = cond.FeatureCache()
        self.targets: cond.TrainingTargets | None = None  # the frozen VAE's latents of the training split

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: Kandinsky2Config, dataset: Any, fixed: Any = ()) -> Kandinsky2Config:
        """The 'auto' text encoders train on the multilingual data, the VAE on its English images."""
        name = getattr(dataset, "name", "")
        if name not in ("shapes-multilingual",):
            raise ValueError(
                f"kandinsky2 trains on captioned multilingual shapes: expected shapes-multilingual; got {name!r}"
            )
        for part in ("text", "t5"):
            config = follow_data(config, dataset, part, family=cls.family, what=part)[0]
        return attrs.evolve(config, data=name, vae=attrs.evolve(config.vae, data=lang.base_dataset(name)))

    @classmethod
    def tiny_config(cls, config: Kandinsky2Config) -> Kandinsky2Config:
        """Fresh tiny parts, a UNet of widths 8/16, T = 100, few sampling steps and evaluation samples."""
        tiny = dict(path="", tiny=True)
        unet = attrs.evolve(config.unet, channels=(8, 16), norm_groups=4, attention_head_dim=8, context_dim=16)
        return attrs.evolve(
            config, unet=unet, steps=5, eval_per_class=1, schedule=attrs.evolve(config.schedule, timesteps=100),
            **{n: attrs.evolve(getattr(config, n), **tiny) for n in ("vae", "text", "t5")},
        )  # fmt: skip

    # -- the condition and the latent space ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are."""
        return self.unet.conv_in.weight.device

    def tokenize(self, prompts: Any, truncate: bool = False) -> tuple[Tensor, Tensor]:
        """Prompts → (M-CLIP ids (B, Lm), T5 ids (B, Lt)); any valid UTF-8 encodes, invalid text or a prompt
        over a context (unless ``truncate``, which warns) is a ValueError naming expected vs given."""
        prompts = cond.check_prompts(prompts)
        return (
            cond.tokenize(self.text, prompts, truncate, "the M-CLIP tokenizer"),
            cond.tokenize(self.t5, prompts, truncate, "the T5 tokenizer"),
        )

    @torch.no_grad()
    def text_features(self, clip_ids: Tensor, t5_ids: Tensor) -> tuple[Tensor, ...]:
        """Both frozen encoders' (pooled, tokens, mask) of the ids, as float32 on the model's device."""
        cp, ct, cm = self.text.encode_text_and_tokens(clip_ids.to(self.device))  # (B, E), (B, Lm, Dm), (B, Lm)
        tp, tt, tm = self.t5.encode_text_and_tokens(t5_ids.to(self.device))  # (B, D5), (B, Lt, D5), (B, Lt)
        return cp.float(), ct.float(), cm.bool(), tp.float(), tt.float(), tm.bool()

    def encode_text(self, prompts: Any, truncate: bool = False) -> tuple[Tensor, ...]:
        """Prompts → :meth:`text_features`."""
        return self.text_features(*self.tokenize(prompts, truncate))

    def check_latents(self, x: Any, name: str = "latents") -> Tensor:
        """``x`` if it is (B, C, h, w) with the UNet's latent channels and size, else a ValueError naming both."""
        return cond.check_latents(x, self.config.unet, name)

    @torch.no_grad()
    def to_latents(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] → the diffusion space (B, 4, h, w): the VAE's scaled mean latents."""
        if not self.vae.config.scaling_factor:  # a fresh (untrained) VAE: LDM's scale from these images
            self.vae.compute_scaling_factor(images.to(self.device))
        return self.vae.encode_latents(images.to(self.device).float(), sample=False)  # (B, 4, h, w)

    @torch.no_grad()
    def from_latents(self, x: Tensor) -> Tensor:
        """The diffusion space (B, 4, h, w) → images (B, C, S, S) in [0, 1]."""
        return self.vae.decode_latents(self.check_latents(x)).clamp(0, 1)

    @torch.no_grad()
    def fit_latent_range(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Set ``latent_range`` to the largest per-sample ``threshold_ratio`` percentile of |latents| of ``images``
        (N, C, S, S): the bound every training latent keeps, as every image keeps |x| ≤ 1; returns their latents
        (N, 4, h, w)."""
        z = torch.cat([self.to_latents(x) for x in images.split(batch_size)])  # (N, 4, h, w)
        per_sample = torch.quantile(z.abs().flatten(1), self.config.threshold_ratio, dim=1)  # (N,)
        self.latent_range.fill_(max(1.0, float(per_sample.max())))
        self.range_fitted.fill_(True)
        return z

    def begin_step(self, step: int, total: int) -> None:
        """The trainer's hook: before the first step, fit ``latent_range`` on the training split (a resumed run
        brings it back) and cache the frozen VAE's latents of the training images."""
        super().begin_step(step, total)
        if self.targets is None and self.default_data:
            from polymodal.data import load_dataset

            images = load_dataset(self.default_data).train["image"]
            if bool(self.range_fitted):
                latents = torch.cat([self.to_latents(x) for x in images.split(500)])  # (N, 4, h, w)
            else:
                latents = self.fit_latent_range(images)  # (N, 4, h, w)
            self.targets = cond.TrainingTargets(images, latents)

    def _batch_latents(self, batch: Any, images: Tensor) -> Tensor:
        """The cached latents of the batch's split rows when they are exactly these images, else encoded now."""
        found = self.targets.lookup(batch, images) if self.training and self.targets is not None else None
        return found[0] if found is not None else self.to_latents(images)  # (B, 4, h, w)

    # -- training ---------------------------------------------------------------------------------
    def denoise(self, x_t: Tensor, t: Tensor, text: tuple[Tensor, ...]) -> Tensor:
        """ε (B, 4, h, w) for x_t at t (B,) under the text condition of :meth:`text_features`."""
        additive, context, mask = self.proj(text)  # (B, T), (B, M, C), (B, M)
        return self.unet(x_t, t, context=context, context_mask=mask, additive_embedding=additive)

    def forward(self, x_t: Tensor, t: Tensor, clip_ids: Tensor, t5_ids: Tensor) -> Tensor:
        """ε (B, 4, h, w) for latents x_t (B, 4, h, w) at t (B,) conditioned on both encoders' ids."""
        return self.denoise(self.check_latents(x_t, "x_t"), t, self.text_features(clip_ids, t5_ids))

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """ε MSE on the batch's latents; in training a fresh caption per scene and the text dropout."""
        images = batch["image"].to(self.device).float()  # (B, C, S, S) in [0, 1]
        if self.training and not bool(self.range_fitted):  # a folder of images: fit on the first batch
            self.fit_latent_range(images)
        x0 = self._batch_latents(batch, images)  # (B, 4, h, w)
        captions = cond.training_captions(self, batch, images.shape[-1])
        text = self.features.get(self, captions)
        metrics: dict[str, Any] = {}
        if self.training:
            drop = torch.rand(len(captions), device=self.device) < self.config.text_dropout  # (B,)
            text = cond.drop_text(text, drop)
            metrics["text_dropped"] = drop.float().mean()
        loss, more = diffusion_loss(
            self.schedule, lambda x, t: self.denoise(x, t, text), x0, weighting=self.config.loss_weighting
        )
        return loss, {"loss": loss.detach(), **more, **metrics}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Random latents, timesteps and the ids of a few shapes captions in several languages."""
        u = self.config.unet
        x = torch.randn(batch_size, u.in_channels, u.sample_size, u.sample_size, generator=generator)
        t = torch.randint(0, self.schedule.T, (batch_size,), generator=generator)  # (B,)
        prompts = [lang.evaluation_prompts("shapes", lang.LANGUAGES[i % 4])[i % 24] for i in range(batch_size)]
        return (x, t, *self.tokenize(prompts))

    # -- sampling and evaluation ----------------------------------------------------------------------
    def generate(self, prompts: Any, **options: Any) -> Tensor:
        """Text → images (B, C, S, S) in [0, 1]; see :func:`.sample.generate`."""
        from .sample import generate

        return generate(self, prompts, **options)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Per-language judged samples with and without thresholding, and FD; see :mod:`.evaluate`."""
        from .evaluate import evaluate_kandinsky

        return evaluate_kandinsky(self, dataset, split)

    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``polymodal eval --generative``: ``n`` samples for the evaluation prompts, languages cycled."""
        from .evaluate import generative_samples

        return generative_samples(self, dataset, n, seed)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """``polymodal sample``: text → images; see :mod:`.sample`."""
        from .sample import sample_to_folder

        return sample_to_folder(self, out, n=n, prompt=prompt, seed=seed, **options)

    def card_lines(self) -> list[str]:
        """The composition, each part's source, the data."""
        u = self.config.unet
        return [
            f"Kandinsky 2.0: UNet (widths {list(u.channels)}) on {u.sample_size}×{u.sample_size}×{u.in_channels} "
            "KL-VAE latents, conditioned on M-CLIP and T5 (pooled → timestep embedding, tokens → cross-attention); "
            f"latent range {float(self.latent_range):.4g}.",
            "",
            *(f"- `{k}`: {v}" for k, v in self.part_sources.items()),
            "",
            f"Data: {self.config.data or 'unspecified'}.",
            "",
        ]
