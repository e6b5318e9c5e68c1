"""unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents").

A composite of registered parts: a frozen CLIP, the diffusion prior (``unclip-prior``: text → CLIP image
embedding), the diffusion decoder (``unclip-decoder``: CLIP image embedding → image) and, for the shapes
cascade, a frozen SR3 upsampler (the diffusion family's ``sr3``: 16×16 → 32×32)::

    text ──CLIP──▶ (text embedding, token features) ──prior──▶ image embedding ──decoder──▶ 16×16 ──SR3──▶ 32×32

The prior and the decoder are built fresh (part path ``''``) for the CLIP's widths and the data's image
size, and trained together: :meth:`UnCLIP.loss` computes, without gradients, the CLIP image embedding of
each training image and the text embedding, token features and mask of a caption drawn for it, then adds
the prior's loss (x0 MSE on normalised embeddings) and the decoder's (ε MSE). The prior's normalisation
(``clip_mean``/``clip_std``) is fitted once on the whole training split's CLIP image embeddings, in
:meth:`UnCLIP.begin_step` before the first training step (the trainer's hook; resumed runs bring the fitted
buffers back from the checkpoint). Sampling (text → image, variations, interpolation, text diffs) is in
:mod:`.sample`, evaluation in :mod:`.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from polymodal.models import PolymodalModel
from polymodal.models.interfaces import ImageEncoder, TextEncoder, TextTokenEncoder, require
from polymodal.models.parts import PartConfig, follow_data, load_part
from polymodal.models.tiny import tiny_config
from polymodal.registry import get_registry

from . import condition as cond
from .cache import TrainingFeatures
from .config import UnCLIPConfig
from .sample import SAMPLE_OPTIONS


def _fresh_configs(part: Any, variant: str) -> list[Any]:
    """The configs a part built fresh for ``variant`` may have: the variant's and its tiny form."""
    spec = get_registry().get("model", variant)
    return [spec.config, tiny_config(spec.model_class, spec.config)]


class UnCLIP(PolymodalModel):
    """``forward(images, text_ids, noisy_embed, t_prior, x_t, t_decoder)`` → (the prior's x0 (B, E), the
    decoder's ε (B, C, h, w)): both denoisers on the CLIP condition of ``images`` and ``text_ids``."""

    family = "unclip"
    config_class = UnCLIPConfig
    image_fields = "config"  # image_size and channels of the data: what --variations images are prepared to
    frozen: ClassVar[tuple[str, ...]] = ("clip",)
    part_attributes: ClassVar[dict[str, str]] = {"clip": "clip", "prior": "prior", "decoder": "decoder"}
    sample_options = SAMPLE_OPTIONS
    progress_metrics = ("loss_prior", "loss_decoder")

    def __init__(self, config: UnCLIPConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        if config.upsampler is not None and "upsampler" not in self.part_attributes:
            raise ValueError(
                "UnCLIPConfig.upsampler is set: that is the `unclip-cascade` family's model (UnCLIPCascade), "
                f"not {type(self).__name__}; got upsampler={config.upsampler!r}"
            )
        parts = dict(parts or {})
        if "clip" not in parts:
            parts["clip"] = load_part(config.clip, name="UnCLIPConfig.clip")
        clip = require(parts["clip"], (ImageEncoder, TextEncoder, TextTokenEncoder), what="UnCLIPConfig.clip")
        e, dt, length = int(clip.config.embed_dim), int(clip.config.text.dim), int(clip.config.text.context_length)
        sizes = {"width": config.prior_width, "depth": config.prior_depth}
        wants = {
            "prior": {"embed_dim": e, "text_dim": dt, "text_len": length, **{k: v for k, v in sizes.items() if v}},
            "decoder": {"embed_dim": e, "text_dim": dt, "text_len": length},
        }
        for name in ("prior", "decoder"):
            part = parts[name] if name in parts else load_part(getattr(config, name), name=f"UnCLIPConfig.{name}")
            parts[name] = self._fitted_part(name, part, wants[name])
        for name, part in self.attach_parts(parts).items():
            setattr(self, self.part_attributes[name], part)
        self.freeze()
        self.training_features: TrainingFeatures | None = None  # the frozen CLIP's, once training starts

    def _fitted_part(self, name: str, part: Any, want: dict[str, int]) -> Any:
        """``part`` if its widths fit the CLIP; a fresh part (path '') is rebuilt for them; else a ValueError."""
        c = self.config
        pc: PartConfig = getattr(c, name)
        if name == "decoder":
            u = part.config.unet
            unet = attrs.evolve(u, in_channels=c.channels, out_channels=c.channels, sample_size=c.generated_size)
            if c.decoder_channels:
                levels = len(c.decoder_channels)
                attention = (u.attention_levels + (u.attention_levels[-1],) * levels)[:levels]
                unet = attrs.evolve(unet, channels=c.decoder_channels, attention_levels=attention)
            fresh_want = {**want, "unet": unet}
            if c.decoder_loss_weighting:
                fresh_want["loss_weighting"] = c.decoder_loss_weighting
            strict = {k: want[k] for k in ("embed_dim", "text_dim")}  # forward takes any text length
        else:
            fresh_want = want
            strict = {k: want[k] for k in ("embed_dim", "text_dim")}  # shorter texts are padded, longer cut
        got = {k: getattr(part.config, k) for k in fresh_want}
        if got == fresh_want:
            return part
        fresh = not bool(getattr(part, "stats_fitted", False))  # a trained prior is never rebuilt
        if pc.path == "" and fresh and any(part.config == f for f in _fresh_configs(part, pc.variant)):
            spec = get_registry().get("model", pc.variant)
            return spec.instantiate(attrs.evolve(part.config, **fresh_want))
        bad = {k: (v, getattr(part.config, k)) for k, v in strict.items() if getattr(part.config, k) != v}
        if bad:
            detail = "; ".join(f"{k}: the CLIP needs {v}, the {name} has {g}" for k, (v, g) in bad.items())
            raise ValueError(
                f"UnCLIPConfig.{name} does not fit the CLIP ({detail}); give a CLIP and a {name} of the same "
                "embedding and text widths (or leave the path '' to build it fresh for the CLIP)"
            )
        return part

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: UnCLIPConfig, dataset: Any, fixed: Any = ()) -> UnCLIPConfig:
        """The 'auto' CLIP (and upsampler) train on the same data; image size, channels, templates from it."""
        meta = dataset.meta
        config, name = follow_data(config, dataset, "clip", family=cls.family, what="CLIP")
        if config.upsampler is not None and config.upsampler.path == "auto":
            config = follow_data(config, dataset, "upsampler", family=cls.family, what="SR3 upsampler")[0]
        size = int(meta.get("image_size", config.image_size))
        changes: dict[str, Any] = dict(
            data=name,
            templates=tuple(meta.get("templates", ())),
            class_names=tuple(meta.get("class_names", ())),
            channels=int(meta.get("channels", config.channels)),
        )
        if "image_size" not in fixed:
            changes["image_size"] = size
            if config.decoder_size and "decoder_size" not in fixed:  # keep the variant's factor (shapes: 1/2)
                changes["decoder_size"] = max(1, config.decoder_size * size // config.image_size)
        return attrs.evolve(config, **changes)

    @classmethod
    def tiny_config(cls, config: UnCLIPConfig) -> UnCLIPConfig:
        """Fresh tiny parts, few evaluation samples."""
        tiny = dict(path="", tiny=True)
        changes: dict[str, Any] = dict(
            clip=attrs.evolve(config.clip, **tiny),
            prior=attrs.evolve(config.prior, **tiny),
            decoder=attrs.evolve(config.decoder, **tiny),
            prior_width=0,
            prior_depth=0,
            decoder_channels=(),
            eval_per_class=1,
            eval_variations=4,
        )
        if config.upsampler is not None:
            changes["upsampler"] = attrs.evolve(config.upsampler, **tiny)
        return attrs.evolve(config, **changes)

    # -- the CLIP condition -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the trained parts' weights are."""
        return self.decoder.unet.conv_in.weight.device

    @torch.no_grad()
    def image_embeddings(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """CLIP image embeddings (N, E), unnormalised, of images (N, C, H, W) in [0, 1] (resized to CLIP's input)."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images (N, C, H, W); got {got}")
        out = [self.clip.encode_image(self.clip.prepare(x.to(self.device))) for x in images.split(batch_size)]
        return torch.cat(out).float()  # (N, E)

    @torch.no_grad()
    def text_condition(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """CLIP ids (B, L) → text embedding (B, E), token features (B, L', Dt) and mask (B, L'), L' ≤ the prior's."""
        ids = ids.to(self.device)
        embed, tokens, mask = self.clip.encode_text_and_tokens(ids)  # (B, E), (B, L, Dt), (B, L): one text pass
        embed, tokens, length = embed.float(), tokens.float(), self.prior.config.text_len
        if tokens.shape[1] > length:  # only padding is cut; shorter texts stay short (the parts pad or mask)
            tokens, mask = cond.fit_length(tokens, mask, length, "prior")
        return embed, tokens, mask

    def encode_prompts(self, prompts: Any, truncate: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Prompts → :meth:`text_condition`; an empty prompt, or one longer than CLIP's context unless
        ``truncate``, is a ValueError naming expected vs given."""
        return self.text_condition(self.clip.tokenize(cond.check_prompts(prompts), truncate=truncate))

    def decoder_images(self, images: Tensor) -> Tensor:
        """Data images (B, C, H, W) in [0, 1] → the decoder's training targets at its size and channels."""
        c, s, _ = self.decoder.image_shape
        return cond.resize_to(cond.to_channels(images.float(), c), s)  # (B, c, s, s)

    # -- the prior's normalisation ------------------------------------------------------------------
    @torch.no_grad()
    def fit_clip_stats(self, images: Tensor) -> None:
        """Fit the prior's ``clip_mean``/``clip_std`` to the CLIP image embeddings of ``images`` (N, C, H, W)."""
        self.prior.fit_stats(self.image_embeddings(images))

    def begin_step(self, step: int, total: int) -> None:
        """The trainer's hook: before the first step, compute the frozen CLIP's features of the whole training
        split of the registered dataset the config names (:class:`.cache.TrainingFeatures`) and fit the prior's
        statistics on its image embeddings (a folder of images: on the first batch, in :meth:`loss`)."""
        super().begin_step(step, total)
        if self.training_features is None and self.default_data:
            from polymodal.data import load_dataset

            self.training_features = TrainingFeatures.build(self, load_dataset(self.default_data).train["image"])
            if not bool(self.prior.stats_fitted):  # a resumed run brings its fitted statistics back
                self.prior.fit_stats(self.training_features.embeds)

    # -- training ---------------------------------------------------------------------------------
    def forward(
        self, images: Tensor, text_ids: Tensor, noisy_embed: Tensor, t_prior: Tensor, x_t: Tensor, t_decoder: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The prior's x0 (B, E) for ``noisy_embed`` at ``t_prior`` and the decoder's ε for ``x_t`` at
        ``t_decoder``, conditioned on the CLIP embeddings of ``images`` (B, C, H, W) and ``text_ids`` (B, L)."""
        image_embed = self.image_embeddings(images)  # (B, E)
        text_embed, tokens, mask = self.text_condition(text_ids)  # (B, E), (B, L, Dt), (B, L)
        x0 = self.prior(noisy_embed, t_prior, text_embed, tokens, mask)  # (B, E)
        eps = self.decoder(x_t, t_decoder, image_embed, text_embed, tokens, mask)  # (B, C, h, w)
        return x0, eps

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Prior loss + decoder loss on the CLIP condition of the batch (captions re-drawn per step in training)."""
        images = batch["image"].to(self.device).float()  # (B, C, H, W) in [0, 1]
        captions = cond.resample_captions(self.config, batch) if self.training else list(batch["caption"])
        if self.training and not bool(self.prior.stats_fitted):  # a folder of images: fit on the first batch
            self.fit_clip_stats(images)
        features = self.training_features if self.training else None
        image_embed = features.image_embeddings(batch, images) if features is not None else None
        if image_embed is None:
            image_embed = self.image_embeddings(images)  # (B, E), no grad
        text = features.text_condition(captions) if features is not None else None
        if text is None:
            text = self.text_condition(self.clip.tokenize(captions, truncate=True))
        text_embed, tokens, mask = text  # (B, E), (B, n, Dt), (B, n)
        embeds = {"image_embed": image_embed, "text_embed": text_embed, "text_tokens": tokens, "text_mask": mask}
        prior_loss, prior_metrics = self.prior.loss(embeds)
        decoder_loss, decoder_metrics = self.decoder.loss({**embeds, "image": self.decoder_images(images)})
        metrics: dict[str, Any] = {"loss_prior": prior_loss.detach(), "loss_decoder": decoder_loss.detach()}
        metrics |= {f"prior_{k}": v for k, v in prior_metrics.items() if k != "loss"}
        metrics |= {f"decoder_{k}": v for k, v in decoder_metrics.items() if k != "loss"}
        return prior_loss + decoder_loss, metrics

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Random images at the data's size, CLIP ids with an end-of-text each, the parts' noisy inputs and t."""
        c = self.config
        images = torch.rand(batch_size, c.channels, c.image_size, c.image_size, generator=generator)
        ids = self.clip.example_inputs(batch_size, generator=generator)[1]  # (B, L)
        noisy, t_prior = self.prior.example_inputs(batch_size, generator)[:2]  # (B, E), (B,)
        x_t, t_decoder = self.decoder.example_inputs(batch_size, generator)[:2]  # (B, C, h, w), (B,)
        return images, ids, noisy, t_prior, x_t, t_decoder

    # -- sampling and evaluation ----------------------------------------------------------------------
    def upscale(self, images: Tensor, *, generator: torch.Generator | None = None, **options: Any) -> Tensor:
        """The decoder's images (B, C, h, w) at the data's size (B, C, S, S): resized when they differ."""
        return cond.resize_to(images, self.config.image_size)

    def generate(self, prompts: Any, **options: Any) -> Tensor:
        """Text → prior → decoder (→ upsampler): images (B, C, S, S) in [0, 1]; see :func:`.sample.generate`."""
        from .sample import generate

        return generate(self, prompts, **options)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Test losses, judged samples, the prior ablation, variations and FD; see :mod:`.evaluate`."""
        from .evaluate import evaluate_unclip

        return evaluate_unclip(self, dataset, split)

    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``polymodal eval --generative``: ``n`` samples for the evaluation prompts (cycled) and their targets."""
        from .evaluate import generative_samples

        return generative_samples(self, dataset, n, seed)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """``polymodal sample``: text → images, ``variations``, ``interpolate`` or a text diff; see :mod:`.sample`."""
        from .sample import sample_to_folder

        return sample_to_folder(self, out, n=n, prompt=prompt, seed=seed, **options)

    def card_lines(self) -> list[str]:
        """The cascade, each part's source, the data."""
        c, (ch, s, _) = self.config, self.decoder.image_shape
        return [
            f"unCLIP: CLIP (E = {self.clip.config.embed_dim}) → diffusion prior → decoder at {s}×{s}×{ch}"
            + (f" → upsampler to {c.image_size}×{c.image_size}" if c.upsampler is not None else "")
            + ".",
            "",
            *(f"- `{k}`: {v}" for k, v in self.part_sources.items()),
            "",
            f"Data: {c.data or 'unspecified'}.",
            "",
        ]
