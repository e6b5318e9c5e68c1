"""Kandinsky 2.1 (ai-forever 2023): multilingual latent diffusion through a CLIP image embedding (unCLIP-style).

    text ──M-CLIP──▶ pooled (B, E) + tokens (B, L, Dm) ──prior──▶ CLIP image embedding (B, E)
    image ──MoVQ──▶ latents (4, 8, 8) = x0 ──UNet(ε; t + image/text embedding, context = 10 image tokens + text)

The MoVQ (``movq-shapes``) and the multilingual CLIP text tower (``mclip-shapes``) are frozen; the M-CLIP's frozen
teacher CLIP gives the image embeddings (its image tower, in the space M-CLIP's pooled text embedding was matched
to). A fresh diffusion prior (the registered ``unclip-prior``, sized to the CLIP's widths and built through the
registry) and the UNet with its conditioning (:class:`.condition21.ImageTextCondition`) train together: the loss
is the prior's x0 MSE on normalised image embeddings plus the UNet's ε MSE. The training images' latents and
image embeddings are computed once when training starts (:class:`.condition.TrainingTargets`), which also fits
the prior's normalisation and the latents' range for dynamic thresholding. Sampling (text, variations, mixing) is
in :mod:`.sample21`, evaluation in :mod:`.evaluate21`.
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
from polymodal.models.interfaces import ImageEncoder, LatentAutoencoder, require
from polymodal.models.parts import follow_data, load_part
from polymodal.nn import UNet
from polymodal.registry import get_registry

from . import condition as cond
from . import condition21 as c21
from .config21 import Kandinsky21Config
from .sample21 import SAMPLE_OPTIONS


class Kandinsky21(PolymodalModel):
    """``forward(x_t (B, 4, 8, 8), t (B,), ids (B, L), image_embed (B, E), noisy_embed (B, E), t_prior (B,))`` →
    (the UNet's ε (B, 4, 8, 8), the prior's x0 (B, E) in its normalised space)."""

    family = "kandinsky21"  # a folder's header names its family, and the core maps a family to one class
    config_class = Kandinsky21Config
    frozen: ClassVar[tuple[str, ...]] = ("vae", "text")
    part_attributes: ClassVar[dict[str, str]] = {"vae": "vae", "text": "text"}
    sample_options = SAMPLE_OPTIONS
    progress_metrics = ("loss_prior", "loss_unet")

    def __init__(self, config: Kandinsky21Config, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        parts = dict(parts or {})
        for name in self.part_attributes:
            if name not in parts:
                parts[name] = load_part(getattr(config, name), name=f"Kandinsky21Config.{name}")
        vae = require(parts["vae"], LatentAutoencoder, what="Kandinsky21Config.vae")
        u = config.unet
        cond.check_vae_latents(vae, u, "Kandinsky21Config.vae")
        text = parts["text"]
        missing = [a for a in ("tokenize", "encode_text_and_tokens") if not callable(getattr(text, a, None))]
        if missing or not hasattr(text, "teacher"):
            lacks = missing or ["teacher (the CLIP whose image tower gives the image embeddings)"]
            raise ValueError(
                f"Kandinsky21Config.text must be an M-CLIP text tower; {type(text).__name__} lacks {lacks}"
            )
        require(text.teacher, ImageEncoder, what="Kandinsky21Config.text.teacher")
        e, dm = int(text.embed_dim), int(text.config.text.dim)
        self.prior = self._fresh_prior(e, dm, int(text.config.text.context_length))
        self.condition = c21.ImageTextCondition(e, dm, e, u.time_dim, u.context_dim, config.image_tokens)
        self.unet = UNet(u)
        self.schedule = NoiseSchedule(config.schedule)
        self.register_buffer("latent_scale", torch.ones(()))  # () 1 / the training latents' std (or 1)
        self.register_buffer("latent_range", torch.ones(()))  # () the fitted bound of |latents|
        self.register_buffer("range_fitted", torch.zeros((), dtype=torch.bool))
        for name, part in self.attach_parts(parts).items():
            setattr(self, self.part_attributes[name], part)
        self.freeze()
        self.features = cond.FeatureCache()
        self.targets: cond.TrainingTargets | None = None  # the frozen parts' view of the training split

    def _fresh_prior(self, embed_dim: int, text_dim: int, text_len: int) -> PolymodalModel:
        """The registered ``unclip-prior`` built fresh for the CLIP's widths and this config's sizes."""
        c, registry = self.config, get_registry()
        if ("model", "unclip-prior") not in registry:
            raise ValueError("kandinsky21 builds its prior from the registered `unclip-prior` variant; it is missing")
        spec = registry.get("model", "unclip-prior")
        base = spec.config
        prior = attrs.evolve(
            base, embed_dim=embed_dim, text_dim=text_dim, text_len=text_len, width=c.prior_width,
            depth=c.prior_depth, heads=c.prior_heads, text_dropout=c.prior_dropout, candidates=c.prior_candidates,
            guidance_scale=c.prior_guidance_scale, sampler=attrs.evolve(base.sampler, steps=c.prior_steps),
        )  # fmt: skip
        return spec.instantiate(prior)

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: Kandinsky21Config, dataset: Any, fixed: Any = ()) -> Kandinsky21Config:
        """The 'auto' text tower trains on the multilingual data, the MoVQ on its English images."""
        name = getattr(dataset, "name", "")
        if name not in ("shapes-multilingual",):
            raise ValueError(
                f"kandinsky21 trains on captioned multilingual shapes: expected shapes-multilingual; got {name!r}"
            )
        config = follow_data(config, dataset, "text", family=cls.family, what="text")[0]
        return attrs.evolve(config, data=name, vae=attrs.evolve(config.vae, data=lang.base_dataset(name)))

    @classmethod
    def tiny_config(cls, config: Kandinsky21Config) -> Kandinsky21Config:
        """Fresh tiny parts, a UNet of widths 8/16, a one-block prior of width 16, few steps and samples."""
        tiny = dict(path="", tiny=True)
        unet = attrs.evolve(config.unet, channels=(8, 16), norm_groups=4, attention_head_dim=8, context_dim=16)
        return attrs.evolve(
            config, unet=unet, steps=5, eval_per_class=1, schedule=attrs.evolve(config.schedule, timesteps=100),
            prior_width=16, prior_depth=1, prior_heads=2, prior_steps=4, image_tokens=2,
            **{n: attrs.evolve(getattr(config, n), **tiny) for n in ("vae", "text")},
        )  # fmt: skip

    # -- the condition and the latent space ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are."""
        return self.unet.conv_in.weight.device

    def tokenize(self, prompts: Any, truncate: bool = False) -> Tensor:
        """Prompts → M-CLIP ids (B, L); invalid text or a prompt over the context (unless ``truncate``, which
        warns) is a ValueError naming expected vs given."""
        return cond.tokenize(self.text, cond.check_prompts(prompts), truncate, "the M-CLIP tokenizer")

    @torch.no_grad()
    def text_features(self, ids: Tensor) -> c21.Text:
        """M-CLIP's (pooled (B, E), tokens (B, L, Dm), mask (B, L)) of ``ids``, float32 on the model's device."""
        pooled, tokens, mask = self.text.encode_text_and_tokens(ids.to(self.device))
        return pooled.float(), tokens.float(), mask.bool()

    def encode_text(self, prompts: Any, truncate: bool = False) -> c21.Text:
        """Prompts → :meth:`text_features`."""
        return self.text_features(self.tokenize(prompts, truncate))

    @torch.no_grad()
    def image_embeddings(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """The teacher CLIP's image embeddings (N, E), unnormalised, of images (N, 3, S, S) in [0, 1]."""
        clip = self.text.teacher
        out = [clip.encode_image(clip.prepare(x.to(self.device).float())) for x in images.split(batch_size)]
        return torch.cat(out).float()  # (N, E)

    def check_latents(self, x: Any, name: str = "latents") -> Tensor:
        """``x`` if it is (B, C, h, w) with the UNet's latent channels and size, else a ValueError naming both."""
        return cond.check_latents(x, self.config.unet, name)

    @torch.no_grad()
    def to_latents(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Images (N, 3, S, S) in [0, 1] → the diffusion space (N, 4, h, w): MoVQ's latents × ``latent_scale``."""
        chunks = images.to(self.device).float().split(batch_size)
        return torch.cat([self.vae.encode_latents(x) for x in chunks]).float() * self.latent_scale  # (N, 4, h, w)

    @torch.no_grad()
    def from_latents(self, x: Tensor) -> Tensor:
        """The diffusion space (B, 4, h, w) → images (B, 3, S, S) in [0, 1], decoded without quantising."""
        return self.vae.decode_latents(self.check_latents(x) / self.latent_scale).float().clamp(0, 1)

    @torch.no_grad()
    def fit_targets(self, images: Tensor) -> cond.TrainingTargets:
        """The latents and image embeddings of ``images`` (N ≥ 2, 3, S, S); fits ``latent_scale`` (with
        ``latent_scaling``), ``latent_range`` (the largest per-sample ``threshold_ratio`` percentile of |latents|, at
        least 1) and the prior's normalisation unless a resumed run brought them back."""
        latents, embeds = self.to_latents(images), self.image_embeddings(images)  # (N, 4, h, w), (N, E)
        if not bool(self.range_fitted):
            scale = 1.0 / float(latents.std()) if self.config.latent_scaling else 1.0
            latents = latents * scale  # the scale was 1 until fitted
            self.latent_scale.fill_(scale)
            per_sample = torch.quantile(latents.abs().flatten(1), self.config.threshold_ratio, dim=1)  # (N,)
            self.latent_range.fill_(max(1.0, float(per_sample.max())))
            self.range_fitted.fill_(True)
        if not bool(self.prior.stats_fitted):
            self.prior.fit_stats(embeds)
        return cond.TrainingTargets(images.cpu(), latents, embeds)

    def begin_step(self, step: int, total: int) -> None:
        """The trainer's hook: before the first step, the frozen parts' view of the registered training split."""
        super().begin_step(step, total)
        if self.targets is None and self.default_data:
            from polymodal.data import load_dataset

            self.targets = self.fit_targets(load_dataset(self.default_data).train["image"])

    # -- training ---------------------------------------------------------------------------------
    def denoise(self, x_t: Tensor, t: Tensor, text: c21.Text, image_embed: Tensor) -> Tensor:
        """ε (B, 4, h, w) for x_t at t (B,) under M-CLIP's ``text`` and the CLIP ``image_embed`` (B, E)."""
        additive, context, mask = self.condition(text, image_embed)  # (B, T), (B, n + L, C), (B, n + L)
        return self.unet(x_t, t, context=context, context_mask=mask, additive_embedding=additive)

    def forward(
        self, x_t: Tensor, t: Tensor, ids: Tensor, image_embed: Tensor, noisy_embed: Tensor, t_prior: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The UNet's ε (B, 4, h, w) for latents x_t at t under ``ids`` (B, L) and ``image_embed`` (B, E), and the
        prior's x0 (B, E) for the normalised ``noisy_embed`` at ``t_prior`` under ``ids``."""
        text = self.text_features(ids)
        eps = self.denoise(self.check_latents(x_t, "x_t"), t, text, image_embed.to(self.device).float())
        return eps, self.prior(noisy_embed.to(self.device), t_prior, *text)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Prior x0 MSE + UNet ε MSE; in training a fresh caption per scene and the condition dropouts."""
        images = batch["image"].to(self.device).float()  # (B, 3, S, S) in [0, 1]
        found = self.targets.lookup(batch, images) if self.training and self.targets is not None else None
        if found is None and self.training and not (bool(self.range_fitted) and bool(self.prior.stats_fitted)):
            found = self.fit_targets(images).lookup(batch, images)  # a folder of images: fit on the first batch
        if found is None:
            found = self.to_latents(images), self.image_embeddings(images)
        x0, image_embed = found  # (B, 4, h, w), (B, E)
        captions = cond.training_captions(self, batch, images.shape[-1])
        text = self.features.get(self, captions)
        prior_loss, prior_metrics = self.prior.loss(
            {"image_embed": image_embed, "text_embed": text[0], "text_tokens": text[1], "text_mask": text[2]}
        )
        metrics: dict[str, Any] = {f"prior_{k}": v for k, v in prior_metrics.items() if k != "loss"}
        if self.training:
            c, u = self.config, torch.rand(len(captions), device=self.device)  # (B,)
            null, no_text = u < c.image_dropout, u < c.image_dropout + c.text_dropout  # (B,), (B,)
            text, image_embed = c21.drop(text, image_embed, no_text, null)
            metrics |= {"image_dropped": null.float().mean(), "text_dropped": no_text.float().mean()}
        unet_loss, more = diffusion_loss(
            self.schedule, lambda x, t: self.denoise(x, t, text, image_embed), x0, weighting=self.config.loss_weighting
        )
        metrics |= {"loss_prior": prior_loss.detach(), "loss_unet": unet_loss.detach(), **more}
        return prior_loss + unet_loss, metrics

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Random latents, timesteps and embeddings, and the ids of shapes captions in several languages."""
        u, e = self.config.unet, self.prior.config.embed_dim
        x = torch.randn(batch_size, u.in_channels, u.sample_size, u.sample_size, generator=generator)
        t = torch.randint(0, self.schedule.T, (batch_size,), generator=generator)  # (B,)
        prompts = [lang.evaluation_prompts("shapes", lang.LANGUAGES[i % 4])[i % 24] for i in range(batch_size)]
        embeds = torch.randn(2, batch_size, e, generator=generator)  # image embedding, noisy prior input
        t_prior = torch.randint(0, self.prior.schedule.T, (batch_size,), generator=generator)  # (B,)
        return x, t, self.tokenize(prompts), embeds[0], embeds[1], t_prior

    # -- sampling and evaluation ----------------------------------------------------------------------
    def generate(self, prompts: Any, **options: Any) -> Tensor:
        """Text → prior → UNet → MoVQ: images (B, 3, S, S) in [0, 1]; see :func:`.sample21.generate`."""
        from .sample21 import generate

        return generate(self, prompts, **options)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Per-language judged samples with and without thresholding, and FD; see :mod:`.evaluate21`."""
        from .evaluate21 import evaluate_kandinsky21

        return evaluate_kandinsky21(self, dataset, split)

    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``polymodal eval --generative``: ``n`` samples for the evaluation prompts, languages cycled."""
        from .evaluate import generative_samples

        return generative_samples(self, dataset, n, seed)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """``polymodal sample``: text → images, ``variations`` of an image, or a ``mix``; see :mod:`.sample21`."""
        from .sample21 import sample_to_folder

        return sample_to_folder(self, out, n=n, prompt=prompt, seed=seed, **options)

    def card_lines(self) -> list[str]:
        """The composition, each part's source, the data."""
        u, p = self.config.unet, self.prior.config
        return [
            f"Kandinsky 2.1: M-CLIP text → diffusion prior (width {p.width}, depth {p.depth}) → CLIP image embedding "
            f"(E = {p.embed_dim}) → UNet (widths {list(u.channels)}) on {u.sample_size}×{u.sample_size}×"
            f"{u.in_channels} MoVQ latents (image embedding as {self.config.image_tokens} context tokens beside the "
            f"text tokens and added to the timestep embedding); latent scale {float(self.latent_scale):.4g}, range "
            f"{float(self.latent_range):.4g}.",
            "",
            *(f"- `{k}`: {v}" for k, v in self.part_sources.items()),
            "",
            f"Data: {self.config.data or 'unspecified'}.",
            "",
        ]
