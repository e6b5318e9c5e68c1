"""DDPM (Ho et al. 2020) on the core diffusion parts: a UNet, a noise schedule, the `diffusion` objective,
the DDPM/DDIM samplers, classifier-free and classifier guidance, and RePaint inpainting.

Images are [0, 1] outside and [-1, 1] inside (``x * 2 - 1``). A label model (``condition="label"``)
adds a class embedding to the time embedding; with ``cond_dropout > 0`` the last class embedding is
the null label, trained on that share of the batches, so the model is also unconditional and
classifier-free guidance ``ε_u + w (ε_c − ε_u)`` is possible. ``--steps`` and ``--sampler`` pick a
sampler over the stored schedule and never change it.

    model = polymodal.load("runs/ddpm")
    images = model.generate(16, generator=torch.Generator().manual_seed(0))             # (16, 1, 8, 8) in [0, 1]
    images = model.generate(16, sampler="ddim", steps=50)                               # DDIM-50
    model = polymodal.load("runs/ddpm-cfg"); model.generate(10, labels=torch.arange(10), guidance_scale=3)
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from polymodal.diffusion.loop import SampleResult, sample
from polymodal.diffusion.schedule import NoiseSchedule
from polymodal.models import PolymodalModel
from polymodal.models.base import ImageSpec
from polymodal.nn import UNet, eval_mode

from .config import SAMPLE_OPTIONS, SAMPLERS, DiffusionConfig


class DiffusionModel(PolymodalModel):
    """``forward(x_t (B, C, H, W) in [-1, 1], t (B,), labels=None)`` → the UNet's prediction (B, C', H, W)."""

    family = "diffusion"
    config_class = DiffusionConfig
    sample_options = SAMPLE_OPTIONS

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        self.unet = UNet(config.unet)
        self.schedule = NoiseSchedule(config.schedule)

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: DiffusionConfig, dataset: Any, fixed: Collection[str] = ()) -> DiffusionConfig:
        """The data's channels and size, its class count (+ the null label with condition dropout), name."""
        meta = dataset.meta
        unet = config.unet
        changes: dict[str, Any] = {}
        channels, size = int(meta.get("channels", unet.in_channels)), int(meta.get("image_size", unet.sample_size))
        if "unet.in_channels" not in fixed:
            learned = unet.out_channels == 2 * unet.in_channels
            changes.update(in_channels=channels, out_channels=channels * (2 if learned else 1))
        if "unet.sample_size" not in fixed:
            changes["sample_size"] = size
        if config.condition == "label" and "unet.num_classes" not in fixed:
            classes = int(meta.get("num_classes", 0))
            if classes < 1:
                raise ValueError(
                    f"a label-conditioned diffusion model needs a labelled dataset; {dataset.name} has none"
                )
            changes["num_classes"] = classes + (1 if config.cond_dropout > 0 else 0)
        names = tuple(str(n) for n in meta.get("class_names", ()))
        return attrs.evolve(config, unet=attrs.evolve(unet, **changes), data=dataset.name, class_names=names)

    @classmethod
    def tiny_config(cls, config: DiffusionConfig) -> DiffusionConfig:
        """A two-level UNet of widths 8/16 and a 100-step schedule."""
        unet = attrs.evolve(config.unet, channels=(8, 16), layers_per_block=1, norm_groups=4, attention_head_dim=8)
        return attrs.evolve(config, unet=unet, schedule=attrs.evolve(config.schedule, timesteps=100))

    def image_spec(self) -> ImageSpec:
        """Square images of ``unet.sample_size`` with ``unet.in_channels`` channels, in [0, 1]."""
        return ImageSpec(size=int(self.config.unet.sample_size), channels=int(self.config.unet.in_channels))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images."""
        s = self.config.unet.sample_size
        return (self.config.unet.in_channels, s, s)

    # -- the network ------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """The UNet output for x_t (B, C, H, W) in [-1, 1] at timesteps t (B,); ``labels`` (B,) for label
        models (the null label for the unconditional output), None otherwise."""
        if self.config.condition == "none" and labels is not None:
            raise ValueError("this diffusion model is unconditional (condition='none'): expected no labels, got some")
        if self.config.condition == "label" and labels is None:
            raise ValueError("this diffusion model is label-conditioned: expected labels (B,), got None")
        return self.unet(x, t, class_labels=None if labels is None else labels.to(x.device).long())  # (B, C', H, W)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The `diffusion` objective (MSE on the schedule's target, uniform t) on a batch's images;
        label models drop ``cond_dropout`` of the labels to the null label."""
        from polymodal.diffusion.objective import diffusion_loss

        x0 = batch["image"].to(self.unet.conv_in.weight.device).float() * 2 - 1  # (B, C, H, W) in [-1, 1]
        labels = None
        if self.config.condition == "label":
            labels = batch["label"].to(x0.device).long()  # (B,)
            if self.training and self.config.null_label is not None:
                drop = torch.rand(labels.shape, device=labels.device) < self.config.cond_dropout  # (B,)
                labels = torch.where(drop, torch.full_like(labels, self.config.null_label), labels)
        learned = self.config.unet.out_channels == 2 * self.config.unet.in_channels
        return diffusion_loss(
            self.schedule,
            lambda x, t: self(x, t, labels),
            x0,
            weighting=self.config.loss_weighting,
            learned_variance=learned,
        )

    # -- sampling -----------------------------------------------------------------------------------
    def make_sampler(self, sampler: str | None = None, steps: int | None = None, eta: float | None = None) -> Any:
        """A sampler over the stored schedule (never changing it); ``steps`` None: the config's default (its
        ``steps``, else all T for DDPM and 50 for DDIM); ValueError for an unknown name or steps outside 1 … T."""
        from polymodal.diffusion.samplers import make_sampler

        c, T = self.config, self.schedule.T
        name = c.sampler if sampler is None else sampler
        if name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
        if steps is None:
            steps = c.steps or (T if name == "ddpm" else min(50, T))
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in 1 … {T} (the trained T); got {steps!r}")
        eta = c.eta if eta is None else eta
        if not 0 <= float(eta) <= 1:
            raise ValueError(f"eta must be in [0, 1]; got {eta!r}")
        return make_sampler(
            self.schedule, name=name, steps=steps, eta=float(eta), spacing=c.spacing, clip_sample=c.clip_sample
        )

    def check_labels(self, labels: Any, n: int) -> Tensor:
        """``labels`` as (n,) int64 in [0, classes); ValueError naming expected vs given."""
        classes = self.config.labels
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise ValueError(f"expected 1 or {n} labels (one per sample); got {labels.numel()}")
        if classes and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(
                f"labels must lie in [0, {classes}); got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.to(self.unet.conv_in.weight.device)

    def denoise_fn(self, cond: Tensor | None = None, guidance_scale: float | None = None) -> Any:
        """``model_fn(x_t, t)`` for the samplers: unconditional, conditional on labels ``cond`` (B,), or
        classifier-free guided (one batched call on [x, x] with the null label) when the scale is not 1."""
        from polymodal.diffusion.guidance import cfg_model

        c = self.config
        if c.condition == "none":
            if cond is not None:
                raise ValueError("this diffusion model is unconditional (condition='none'): expected no label, got one")
            if guidance_scale is not None and guidance_scale != 1:
                raise ValueError(
                    "classifier-free guidance needs a label model trained with condition dropout; this one is "
                    f"unconditional (got guidance_scale={guidance_scale}; use a classifier for classifier guidance)"
                )
            return lambda x, t: self(x, t)
        if cond is None:
            if c.null_label is None:
                raise ValueError("this label model was trained without condition dropout: expected labels, got None")
            return lambda x, t: self(x, t, torch.full((x.shape[0],), c.null_label, device=x.device))
        scale = c.guidance_scale if guidance_scale is None else float(guidance_scale)
        if scale == 1:
            return lambda x, t: self(x, t, cond)
        if c.null_label is None:
            raise ValueError(
                "classifier-free guidance needs condition dropout in training: expected a model with cond_dropout "
                f"> 0, got cond_dropout={c.cond_dropout} (guidance_scale={scale}; 1 samples the conditional model)"
            )
        null = torch.full((1,), c.null_label, dtype=torch.long, device=cond.device)
        return cfg_model(lambda x, t, k: self(x, t, k["label"]), {"label": cond}, {"label": null}, scale)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        labels: Any = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        classifier: Any = None,
        generator: torch.Generator | None = None,
        **loop: Any,
    ) -> SampleResult:
        """:func:`polymodal.diffusion.loop.sample` in [-1, 1] (``loop``: x_T, known, mask, resample, jump,
        trajectory_every, progress). With ``classifier`` (a noisy classifier model) the unconditional or
        label model is guided towards ``labels`` by its gradient at ``guidance_scale``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer ≥ 1; got {n!r}")
        chosen = self.make_sampler(sampler, steps, eta)
        cond = None if labels is None else self.check_labels(labels, n)
        if classifier is not None:
            from polymodal.diffusion.guidance import classifier_guided

            from .classifier import check_classifier

            check_classifier(classifier, self)
            if cond is None:
                raise ValueError("classifier guidance steers towards a label: expected labels, got None")
            scale = 1.0 if guidance_scale is None else float(guidance_scale)
            base = self.denoise_fn(cond if self.config.condition == "label" else None, None)
            fn = classifier_guided(base, self.schedule, lambda x, t: classifier(x, t), cond, scale)
        else:
            fn = self.denoise_fn(cond, guidance_scale)
        if loop.get("known") is not None and self.config.inpaint_guidance > 0:
            from polymodal.diffusion.guidance import reconstruction_guided

            fn = reconstruction_guided(fn, self.schedule, loop["known"], loop["mask"], self.config.inpaint_guidance)
        device = self.unet.conv_in.weight.device
        with eval_mode(self):
            return sample(fn, chosen, (n, *self.image_shape), generator=generator, device=device, **loop)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        *,
        labels: Any = None,
        captions: Any = None,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> Tensor:
        """(n, C, H, W) samples in [0, 1]; ``options`` as :meth:`sample` (sampler, steps, eta, guidance_scale,
        classifier …). ``captions`` are refused: the family conditions on labels only (``polymodal sample``
        reads a prompt naming one class as its label)."""
        if captions is not None:
            raise ValueError(f"diffusion models condition on labels only; expected no captions, got {captions!r}")
        return ((self.sample(n, labels=labels, generator=generator, **options).images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The generative table's hook (:mod:`polymodal.eval.generative`): ``n`` samples in [0, 1] with the
        default sampler; a label model cycles through its classes at the default guidance (targets given)."""
        g = torch.Generator().manual_seed(int(seed))
        if self.config.condition == "none":
            return self.generate(n, generator=g).cpu(), None
        labels = torch.arange(n) % self.config.labels  # (n,)
        return self.generate(n, labels=labels, generator=g).cpu(), {"label": labels}

    # -- evaluation and sample folders ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Judge FD of DDPM and DDIM samples, the split's own FD, DDIM inversion, inpainting and (label
        models) the guidance trade-off; see :mod:`.evaluate`."""
        from .evaluate import evaluate_diffusion

        return evaluate_diffusion(self, dataset, split)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Write ``n`` samples as PNGs, ``grid.png`` and ``trajectory.png``; see :func:`.samples.sample_to_folder`."""
        from .samples import sample_to_folder

        return sample_to_folder(self, out, n=n, prompt=prompt, seed=seed, **options)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple:
        """Random x_t (B, C, H, W), timesteps in [0, T) and (label models) labels."""
        x = torch.randn(batch_size, *self.image_shape, generator=generator)  # (B, C, H, W)
        t = torch.randint(0, self.schedule.T, (batch_size,), generator=generator)  # (B,)
        if self.config.condition == "none":
            return x, t
        return x, t, torch.randint(0, self.config.unet.num_classes, (batch_size,), generator=generator)

    def card_lines(self) -> list[str]:
        """UNet, schedule, condition and sampling defaults."""
        c, u, s = self.config, self.config.unet, self.config.schedule
        cond = "unconditional" if c.condition == "none" else f"label-conditioned ({c.labels} classes"
        if c.condition == "label":
            cond += f", condition dropout {c.cond_dropout:g}, default guidance {c.guidance_scale:g})"
        return [
            f"DDPM: UNet widths {u.channels}, {u.layers_per_block} blocks per level, attention at "
            f"{u.attention_levels}; {s.kind} schedule, T = {s.timesteps}, {s.prediction} prediction; {cond}.",
            "",
            f"Sampling default: {c.sampler}, {c.steps or 'all'} steps. Data: {c.data or 'unspecified'}.",
            "",
        ]
