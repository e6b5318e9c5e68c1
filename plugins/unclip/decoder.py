"""unCLIP's decoder (Ramesh et al. 2022, §2.1): a GLIDE-style diffusion UNet conditioned on a CLIP image embedding.

The CLIP embeddings enter the core :class:`~polymodal.nn.UNet` twice, as diffusers' ``UnCLIPTextProjModel`` and
``UnCLIPPipeline`` feed its decoder (:class:`UnCLIPProjection` is that module, weight for weight):

* projected and added to the timestep embedding — image and text embedding each by a linear map, the sum passed
  as the UNet's ``additive_embedding`` (diffusers' ``class_embed_type="identity"``);
* projected into ``extra_tokens`` context tokens, concatenated in front of the CLIP text token encodings
  (projected to the context width and layer-normed) for the UNet's cross-attention; the text padding mask is
  extended with True for the extra tokens.

Training (:meth:`UnCLIPDecoder.loss`): ε-prediction on a linear T = 1000 schedule (the MSE optionally Min-SNR-γ
weighted, ``loss_weighting``, which the shapes recipe uses to learn in fewer steps); per sample and independently,
the image embedding is replaced by the learned null embedding with probability ``image_dropout`` (10 %) and the
text dropped with probability ``text_dropout`` (50 %). A dropped text is the empty condition: every text token
masked out of the cross-attention and a zero text embedding; ``text=None`` at sampling is that same condition
(image variations). Classifier-free guidance contrasts the condition with (null image, dropped text), as
diffusers' pipeline does with its learned null embedding and the empty prompt.

    decoder = UnCLIPDecoder(DecoderConfig())
    loss, metrics = decoder.loss(batch)          # image (B, C, S, S) in [0, 1], image_embed, text_embed, tokens, mask
    images = decoder.sample(image_embed, text_embed, text_tokens, text_mask, guidance_scale=3.0)  # [0, 1]
    variations = decoder.sample(image_embed)     # image embedding only
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from polymodal.diffusion import NoiseSchedule, cfg_model, diffusion_loss, make_sampler, sample
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.models.base import ImageSpec
from polymodal.nn import UNet, eval_mode
from polymodal.nn.conditioning import UnCLIPProjection
from polymodal.train import TrainConfig

from .config import DecoderConfig


def _shaped(value: Any, name: str, labels: str, want: tuple) -> Any:
    """``value`` if it is a tensor of shape ``want`` (None: any size), else a ValueError naming both."""
    ok = isinstance(value, Tensor) and value.dim() == len(want)
    if not ok or any(w is not None and s != w for s, w in zip(value.shape, want)):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        shown = ", ".join(lab if w is None else str(w) for lab, w in zip(labels.split(", "), want))
        raise ValueError(f"{name} must be ({labels}) = ({shown}); got {got}")
    return value


class UnCLIPDecoder(PolymodalModel):
    """``forward(x_t (B, C, S, S), t (B,), image_embed (B, E), text_embed, text_tokens, text_mask)`` → ε (B, C, S, S)."""

    family = "unclip-decoder"
    trained_by = "unclip"
    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        c = config
        self.text_proj = UnCLIPProjection(c.embed_dim, c.text_dim, c.unet.time_dim, c.unet.context_dim, c.extra_tokens)
        self.unet = UNet(c.unet)
        self.schedule = NoiseSchedule(c.schedule)

    @classmethod
    def config_for_data(cls, config: DecoderConfig, dataset: Any, fixed: Any = ()) -> DecoderConfig:
        """Refused: the decoder trains on CLIP embeddings that the ``unclip`` composite computes."""
        raise ValueError(
            "unclip-decoder trains on CLIP embeddings of the images, which the composite computes: train "
            f"`polymodal train unclip` (or unclip-shapes), not the decoder alone on {getattr(dataset, 'name', dataset)!r}"
        )

    @classmethod
    def tiny_config(cls, config: DecoderConfig) -> DecoderConfig:
        """Widths 8/16, CLIP widths E = 16, Dt = 24 (the contract kit grows E to its grown tiny CLIP's 24), 6 text
        tokens, T = 100."""
        unet = attrs.evolve(config.unet, channels=(8, 16), norm_groups=4, attention_head_dim=8, context_dim=16)
        return attrs.evolve(
            config, unet=unet, embed_dim=16, text_dim=24, text_len=6, steps=10,
            schedule=attrs.evolve(config.schedule, timesteps=100),
        )  # fmt: skip

    def image_spec(self) -> ImageSpec:
        """Square images of ``unet.sample_size`` with ``unet.in_channels`` channels, in [0, 1]."""
        return ImageSpec(size=int(self.config.unet.sample_size), channels=int(self.config.unet.in_channels))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of the decoder's images."""
        u = self.config.unet
        return (u.in_channels, u.sample_size, u.sample_size)

    @property
    def null_image_embed(self) -> Tensor:
        """The learned null image embedding (1, E) that replaces a dropped one."""
        return self.text_proj.learned_classifier_free_guidance_embeddings[None]

    # -- checks -----------------------------------------------------------------------------------
    def _param(self) -> Tensor:
        return self.unet.conv_in.weight

    def _embed(self, value: Any, name: str, b: int | None) -> Tensor:
        return _shaped(value, name, "B, E", (b, self.config.embed_dim)).to(self._param())

    def _text(self, text_embed, text_tokens, text_mask, b: int):
        """The text condition as tensors on the model's device, or three Nones (no text)."""
        if text_embed is None and text_tokens is None and text_mask is None:
            return None, None, None
        if text_embed is None or text_tokens is None:
            raise ValueError("text needs text_embed and text_tokens together (or neither, for image-only conditioning)")
        text_embed = self._embed(text_embed, "text_embed", b)
        text_tokens = _shaped(text_tokens, "text_tokens", "B, L, Dt", (b, None, self.config.text_dim))
        length = text_tokens.shape[1]
        text_mask = torch.ones(b, length, dtype=torch.bool) if text_mask is None else text_mask
        text_mask = _shaped(text_mask, "text_mask", "B, L", (b, length))
        return text_embed, text_tokens.to(self._param()), text_mask.to(self._param().device).bool()

    def _image(self, x: Any, name: str) -> Tensor:
        return _shaped(x, name, "B, C, H, W", (None, *self.image_shape)).to(self._param())

    # -- the network --------------------------------------------------------------------------------
    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        image_embed: Tensor,
        text_embed: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """ε for x_t (B, C, S, S) in [-1, 1] at t (B,). ``text_mask`` (B, L) True for real tokens (None: all);
        no text (all three None) is the dropped-text condition: a zero text embedding and no text tokens."""
        x_t = self._image(x_t, "x_t")
        b = x_t.shape[0]
        image_embed = self._embed(image_embed, "image_embed", b)
        text_embed, text_tokens, text_mask = self._text(text_embed, text_tokens, text_mask, b)
        if text_embed is None:
            text_embed = torch.zeros_like(image_embed)  # (B, E): the dropped text
        context, additive = self.text_proj(image_embed, text_embed, text_tokens)  # (B, n + L, C), (B, T)
        mask = None
        if text_mask is not None:
            extra = torch.ones(b, self.config.extra_tokens, dtype=torch.bool, device=text_mask.device)  # (B, n)
            mask = torch.cat([extra, text_mask], dim=1)  # (B, n + L)
        return self.unet(x_t, t, context=context, context_mask=mask, additive_embedding=additive)  # (B, C, S, S)

    def drop_masks(self, batch_size: int, device: Any = None) -> tuple[Tensor, Tensor]:
        """Which samples lose their image embedding and which their text, (B,) bool each, drawn independently
        from the global RNG at ``image_dropout`` and ``text_dropout``."""
        drop_image = torch.rand(batch_size, device=device) < self.config.image_dropout  # (B,)
        drop_text = torch.rand(batch_size, device=device) < self.config.text_dropout  # (B,)
        return drop_image, drop_text

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The ε MSE (uniform t) on the batch's images; in training mode the condition dropouts apply."""
        need = ("image", "image_embed", "text_embed", "text_tokens", "text_mask")
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(
                f"the unCLIP decoder trains on CLIP embeddings: its batch needs {', '.join(need)}; missing "
                f"{', '.join(missing)} (train `polymodal train unclip`, which computes them)"
            )
        image = self._image(batch["image"], "batch['image']")
        b = image.shape[0]
        image_embed = self._embed(batch["image_embed"], "image_embed", b)
        text_embed, tokens, mask = self._text(batch["text_embed"], batch["text_tokens"], batch["text_mask"], b)
        metrics: dict[str, Any] = {}  # detached 0-dim tensors: no host sync per step
        if self.training:
            drop_image, drop_text = self.drop_masks(b, image.device)
            image_embed = torch.where(drop_image[:, None], self.null_image_embed, image_embed)  # (B, E)
            text_embed = text_embed.masked_fill(drop_text[:, None], 0.0)  # (B, E)
            mask = mask & ~drop_text[:, None]  # (B, L)
            metrics = {"image_dropped": drop_image.float().mean(), "text_dropped": drop_text.float().mean()}
        x0 = image * 2 - 1  # (B, C, S, S) in [-1, 1]

        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            return self(x_t, t, image_embed, text_embed, tokens, mask)  # (B, C, S, S)

        loss, more = diffusion_loss(self.schedule, eps, x0, weighting=self.config.loss_weighting)
        return loss, {**more, **metrics}

    # -- sampling ---------------------------------------------------------------------------------------
    def make_sampler(self, sampler: str | None = None, steps: int | None = None, eta: float | None = None) -> Any:
        """A DDPM or DDIM sampler over the stored schedule; None takes the config's default."""
        c, T = self.config, self.schedule.T
        name = c.sampler if sampler is None else sampler
        if name not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim'; got {name!r}")
        steps = c.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in 1 … {T} (the trained T); got {steps!r}")
        eta = c.eta if eta is None else float(eta)
        return make_sampler(
            self.schedule, name=name, steps=steps, eta=eta, spacing=c.spacing, clip_sample=c.clip_sample
        )

    def denoise_fn(self, image_embed, text_embed=None, text_tokens=None, text_mask=None, guidance_scale=None):
        """``model_fn(x_t, t)`` for the samplers: the conditional ε, classifier-free guided against (null image
        embedding, dropped text) in one batched call when the scale is not 1."""
        image_embed = self._embed(image_embed, "image_embed", None)
        b = image_embed.shape[0]
        text_embed, text_tokens, text_mask = self._text(text_embed, text_tokens, text_mask, b)
        cond, null = {"image_embed": image_embed}, {"image_embed": self.null_image_embed.detach()}
        if text_embed is not None:
            cond.update(text_embed=text_embed, text_tokens=text_tokens, text_mask=text_mask)
            null.update(
                text_embed=torch.zeros_like(text_embed[:1]),  # (1, E)
                text_tokens=torch.zeros_like(text_tokens[:1]),  # (1, L, Dt): masked out
                text_mask=torch.zeros_like(text_mask[:1]),  # (1, L)
            )
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale

        def fn(x: Tensor, t: Tensor, k: dict) -> Tensor:
            return self(x, t, k["image_embed"], k.get("text_embed"), k.get("text_tokens"), k.get("text_mask"))

        return cfg_model(fn, cond, null, scale)

    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor,
        text_embed: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Images (B, C, S, S) in [0, 1] for CLIP image embeddings (B, E) and optional text; ``noise`` fixes x_T
        (B, C, S, S) (variations and interpolations reuse it), else it is drawn from ``generator``."""
        fn = self.denoise_fn(image_embed, text_embed, text_tokens, text_mask, guidance_scale)
        shape = (image_embed.shape[0], *self.image_shape)
        if noise is not None and (not isinstance(noise, Tensor) or tuple(noise.shape) != shape):
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise (x_T) must have shape {shape}; got {got}")
        chosen = self.make_sampler(sampler, steps, eta)
        device = self._param().device
        x_T = None if noise is None else noise.to(self._param())
        with eval_mode(self):
            out = sample(fn, chosen, None if x_T is not None else shape, x_T=x_T, generator=generator, device=device)
        return ((out.images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Refused: the decoder is evaluated inside the ``unclip`` composite (it needs CLIP embeddings)."""
        raise ValueError("the unCLIP decoder is evaluated by the unclip composite (polymodal eval on an unclip folder)")

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple:
        """Random x_t, timesteps in [0, T), image and text embeddings, text tokens and a padding mask."""
        c, g = self.config, generator
        x = torch.randn(batch_size, *self.image_shape, generator=g)  # (B, C, S, S)
        t = torch.randint(0, self.schedule.T, (batch_size,), generator=g)  # (B,)
        lengths = torch.randint(1, c.text_len + 1, (batch_size,), generator=g)  # (B,)
        mask = torch.arange(c.text_len)[None] < lengths[:, None]  # (B, L)
        embeds = torch.randn(2, batch_size, c.embed_dim, generator=g)  # (2, B, E)
        tokens = torch.randn(batch_size, c.text_len, c.text_dim, generator=g)  # (B, L, Dt)
        return x, t, embeds[0], embeds[1], tokens, mask

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A training batch: images in [0, 1] with random CLIP embeddings, text tokens and padding mask."""
        _, _, image_embed, text_embed, tokens, mask = self.example_inputs(batch_size, generator)
        image = torch.rand(batch_size, *self.image_shape, generator=generator)  # (B, C, S, S)
        names = ("image_embed", "text_embed", "text_tokens", "text_mask")
        return {"image": image, **dict(zip(names, (image_embed, text_embed, tokens, mask), strict=True))}


VARIANTS = {
    "unclip-decoder": ModelSpec(
        UnCLIPDecoder,
        DecoderConfig(),
        data="digits",
        train=TrainConfig(steps=2000, batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.0, checkpoint_every=0),
        doc="unCLIP's decoder part: a UNet on CLIP image embeddings (trained by `polymodal train unclip`).",
    )
}
