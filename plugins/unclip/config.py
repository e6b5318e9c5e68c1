"""The unCLIP composite's config (its parts: CLIP, prior, decoder, upsampler; image sizes, evaluation sizes) and the
diffusion prior's and the image decoder's own (:class:`PriorConfig`, :class:`DecoderConfig`)."""

from __future__ import annotations

from typing import Any

import attrs

from polymodal.config import config, field, in_range, one_of
from polymodal.diffusion import SamplerConfig, ScheduleConfig
from polymodal.diffusion.schedule import WEIGHTINGS
from polymodal.models.parts import PartConfig, part_field
from polymodal.nn import UNetConfig


def _optional_part(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: None (no upsampler) or a :class:`PartConfig`."""
    if value is not None and not isinstance(value, PartConfig):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be None or a PartConfig (a folder path string "
            f"through --set); got {value!r}"
        )


def _optional_scale(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: None (the part's default) or a guidance scale in [0, 100]."""
    if value is not None:
        in_range(0.0, 100.0)(instance, attribute, value)


@config
class UnCLIPConfig:
    """unCLIP (DALL·E 2): a frozen CLIP, a diffusion prior and a diffusion decoder trained together, and an
    optional frozen super-resolution stage (the shapes cascade)."""

    clip: PartConfig = part_field(
        PartConfig(variant="clip", data="digits"),
        "The frozen CLIP whose embeddings the prior predicts and the decoder inverts; its data follows --data.",
    )
    prior: PartConfig = part_field(
        PartConfig(variant="unclip-prior", path=""),
        "The diffusion prior (text → CLIP image embedding), built fresh for the CLIP's widths and trained by "
        "this composite; saved in the prior/ sub-folder.",
    )
    decoder: PartConfig = part_field(
        PartConfig(variant="unclip-decoder", path=""),
        "The diffusion decoder (CLIP image embedding → image), built fresh at decoder_size and trained by this "
        "composite; saved in the decoder/ sub-folder.",
    )
    upsampler: PartConfig | None = field(
        None,
        "The frozen super-resolution stage (the diffusion family's sr3: decoder_size → image_size), or None "
        "when the decoder writes the data's size itself.",
        check=_optional_part,
    )
    prior_width: int = field(
        0,
        "Width of a fresh prior's transformer (0: the unclip-prior variant's).",
        check=in_range(0, 65536, integer=True),
    )
    prior_depth: int = field(
        0, "Blocks of a fresh prior's transformer (0: the variant's).", check=in_range(0, 1024, integer=True)
    )
    decoder_channels: tuple[int, ...] = field(
        (), "Level widths of a fresh decoder's UNet (empty: the unclip-decoder variant's)."
    )
    decoder_loss_weighting: str = field(
        "",
        "Loss weighting over timesteps of a fresh decoder: 'none' or 'min_snr' (Min-SNR-γ; '': the variant's).",
        check=one_of("", *WEIGHTINGS),
    )
    guidance_scale: float | None = field(
        None,
        "Default decoder classifier-free guidance scale of this composite's sampling and evaluation "
        "(None: the decoder part's own default).",
        check=_optional_scale,
    )
    prior_guidance_scale: float | None = field(
        None,
        "Default prior classifier-free guidance scale (None: the prior part's own default).",
        check=_optional_scale,
    )
    image_size: int = field(
        8,
        "Native image side of the data: samples are written at it and --variations / --interpolate images "
        "must have it.",
        check=in_range(1, 4096, integer=True),
    )
    channels: int = field(1, "Image channels of the data (1 grey, 3 RGB).", check=in_range(1, 4, integer=True))
    decoder_size: int = field(
        0,
        "Side the decoder generates at (0: image_size); below image_size the upsampler brings it up.",
        check=in_range(0, 4096, integer=True),
    )
    resample_captions: bool = field(
        True,
        "Training: draw a fresh caption per image and step from the training templates (as DALL·E does), "
        "so the prior sees every phrasing of every class; False uses the dataset's captions.",
    )
    ablation_norm: bool = field(
        True,
        "Ablation (decoder fed the CLIP text embedding): rescale the text embedding to the mean norm of the "
        "training image embeddings (the paper's embeddings are unit vectors on both sides).",
    )
    eval_per_class: int = field(
        10,
        "Samples per prompt class in evaluate (digits: per digit; shapes: per colour × kind).",
        check=in_range(1, 10000, integer=True),
    )
    eval_variations: int = field(
        100,
        "Test images evaluate makes one variation of each (0: none).",
        check=in_range(0, 100000, integer=True),
    )
    eval_ablation: bool = field(
        True,
        "Evaluate the paper's ablation too (the decoder fed the CLIP text embedding: text_embed_* metrics); "
        "it samples the evaluation prompts a second time.",
        backfill=True,
    )
    eval_seed: int = field(0, "Seed of evaluate's sampling.", check=in_range(0, 2**31, integer=True))
    data: str = field("", "Name of the dataset the config was adapted to ('' for a folder of images).")
    templates: tuple[str, ...] = field((), "Training caption templates (from the dataset).")
    class_names: tuple[str, ...] = field((), "Class names that fill the templates.")

    def __attrs_post_init__(self) -> None:
        size = self.decoder_size or self.image_size
        if size > self.image_size:
            raise ValueError(
                f"UnCLIPConfig.decoder_size must be at most image_size={self.image_size}; got {self.decoder_size}"
            )
        if size < self.image_size and self.upsampler is None:
            raise ValueError(
                f"UnCLIPConfig.decoder_size={size} is below image_size={self.image_size}, which needs an upsampler "
                "part (upsampler=PartConfig(variant='sr3')); got none"
            )

    @property
    def generated_size(self) -> int:
        """The side the decoder generates at."""
        return self.decoder_size or self.image_size


_prior_size = in_range(1, 65536, integer=True)


@config
class PriorConfig:
    """The diffusion prior: sizes, schedule, guidance and sampling defaults."""

    embed_dim: int = field(
        64, "E: width of the CLIP image and text embeddings (the CLIP's embed_dim).", check=_prior_size
    )
    text_dim: int = field(64, "Dt: width of the CLIP text tower's token encodings.", check=_prior_size)
    text_len: int = field(24, "L: CLIP's text context length (shorter token inputs are padded).", check=_prior_size)
    width: int = field(128, "Width of the transformer's token stream.", check=_prior_size)
    depth: int = field(4, "Transformer blocks.", check=in_range(1, 1024, integer=True))
    heads: int = field(4, "Attention heads; must divide width.", check=in_range(1, 1024, integer=True))
    norm_eps: float = field(1e-5, "Epsilon of every LayerNorm.", check=in_range(0.0, 1.0))
    norm_in: bool = field(False, "LayerNorm the sequence before the blocks (diffusers' norm_in_type='layer').")
    embed_norm: bool = field(False, "LayerNorm the text embedding first (diffusers' embedding_proj_norm_type).")
    dropout: float = field(0.0, "Dropout after the blocks' attention and MLP projections.", check=in_range(0.0, 1.0))
    schedule: ScheduleConfig = field(
        ScheduleConfig(kind="squaredcos_cap_v2", timesteps=1000, prediction="sample"),
        "The noise schedule; the prior predicts x0, so prediction must be 'sample'.",
    )
    text_dropout: float = field(0.1, "Share of training samples whose text is dropped.", check=in_range(0, 1))
    candidates: int = field(2, "Embeddings sampled per prompt; the one closest to the text is kept.", check=_prior_size)
    sampler: SamplerConfig = field(
        SamplerConfig(name="ddpm", steps=64, clip_sample=True, clip_range=5.0),
        "Default sampler (predicted x0 clipped to ±5 std, as Karlo's prior scheduler).",
    )
    guidance_scale: float = field(2.0, "Default guidance scale (1: conditional only).", check=in_range(0, 100))

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"PriorConfig.heads must divide width; got width={self.width}, heads={self.heads}")
        if self.schedule.prediction != "sample":
            raise ValueError(f"PriorConfig.schedule.prediction must be 'sample' (x0); got {self.schedule.prediction!r}")
        if self.sampler.steps > self.schedule.timesteps:
            raise ValueError(
                f"PriorConfig.sampler.steps must be ≤ T={self.schedule.timesteps}; got {self.sampler.steps}"
            )


_decoder_size = in_range(1, 1_000_000, integer=True)
UNET = UNetConfig(
    channels=(32, 64), layers_per_block=1, attention_head_dim=16, scale_shift=True, context_dim=64, sample_size=8
)
"""The digits decoder's UNet: widths 32/64, 8×8 → 4×4, ADM scale-shift, cross-attention (width 64) at 4×4."""


@config
class DecoderConfig:
    """The unCLIP decoder: UNet, CLIP widths, condition dropouts, schedule and sampling defaults."""

    embed_dim: int = field(64, "E, the CLIP embedding width (image and text embeddings).", check=_decoder_size)
    text_dim: int = field(64, "Dt, the width of CLIP's text token encodings.", check=_decoder_size)
    text_len: int = field(
        24, "L, CLIP's text context length (of example inputs; forward takes any).", check=_decoder_size
    )
    unet: UNetConfig = field(
        UNET, "The denoising UNet: image channels and size, context_dim the cross-attention width (> 0)."
    )
    extra_tokens: int = field(4, "Context tokens projected from the CLIP image embedding.", check=_decoder_size)
    image_dropout: float = field(
        0.1, "Training: share of image embeddings replaced by the null one.", check=in_range(0.0, 1.0)
    )
    text_dropout: float = field(0.5, "Training: share of samples whose text is dropped.", check=in_range(0.0, 1.0))
    schedule: ScheduleConfig = field(ScheduleConfig(), "The noise schedule (linear, T = 1000, ε-prediction).")
    loss_weighting: str = field(
        "none",
        "Loss weighting over timesteps: 'none' (L_simple, GLIDE's) or 'min_snr' (Hang et al., γ = 5).",
        check=one_of(*WEIGHTINGS),
    )
    sampler: str = field("ddim", "Default sampler: 'ddpm' or 'ddim'.", check=one_of("ddpm", "ddim"))
    steps: int = field(50, "Default sampling steps (1 … T).", check=in_range(1, 100_000, integer=True))
    eta: float = field(0.0, "Default DDIM η (0: deterministic).", check=in_range(0.0, 1.0))
    spacing: str = field(
        "trailing",
        "How respaced timesteps are chosen (diffusers' timestep_spacing).",
        check=one_of("leading", "trailing", "linspace"),
    )
    clip_sample: bool = field(False, "Clip each step's predicted x0 to [-1, 1].")
    guidance_scale: float = field(
        3.0, "Default classifier-free guidance scale w (1: conditional).", check=in_range(0.0, 100.0)
    )

    def __attrs_post_init__(self) -> None:
        u, T = self.unet, self.schedule.timesteps
        for bad, what, got in (
            (u.context_dim < 1, "unet.context_dim must be ≥ 1 (the decoder cross-attends)", u.context_dim),
            (u.num_classes > 0, "unet.num_classes must be 0 (the CLIP projection is the condition)", u.num_classes),
            (u.embedding_dim > 0, "unet.embedding_dim must be 0 (the CLIP projection is added as is)", u.embedding_dim),
            (u.out_channels != u.in_channels, f"unet.out_channels must be in_channels={u.in_channels}", u.out_channels),
            (self.steps > T, f"steps must be ≤ schedule.timesteps={T}", self.steps),
        ):
            if bad:
                raise ValueError(f"DecoderConfig.{what}; got {got}")
