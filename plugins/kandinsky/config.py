"""Kandinsky 2.0's config: the frozen parts (KL-VAE, multilingual CLIP text tower, T5 encoder), the latent UNet,
condition dropout, the noise schedule and the sampling defaults (guidance, dynamic thresholding)."""

from __future__ import annotations

from polymodal.config import config, field, in_range, one_of
from polymodal.diffusion import ScheduleConfig
from polymodal.diffusion.schedule import WEIGHTINGS
from polymodal.models.parts import PartConfig, part_field
from polymodal.nn import UNetConfig

UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=8,
    channels=(64, 128),
    layers_per_block=1,
    attention_levels=(False, True),
    attention_head_dim=32,
    scale_shift=True,
    context_dim=128,
)
"""The shapes UNet: 8×8×4 latents, widths 64/128, self- and cross-attention (context width 128) at 4×4."""


SCHEDULE = ScheduleConfig(kind="linear", timesteps=1000, beta_start=0.00085, beta_end=0.012)
"""Latent diffusion's noise schedule, as diffusers' Kandinsky schedulers keep it: betas linear from 0.00085 to 0.012
over T = 1000, ε-prediction. It noises less than DDPM's pixel-space 1e-4 … 0.02 (terminal ᾱ 1.7e-3 against 4e-5):
on the 8×8×4 latents, where one shape is a few latent cells, it took Kandinsky 2.0's weakest language from colour
0.54 / kind 0.69 to 0.73 / 0.83 at the same cost (README, "Kandinsky 2.0")."""


@config
class LatentDiffusionSettings:
    """What both Kandinsky variants share: the UNet's noise schedule and loss weighting, the sampling defaults
    (sampler, steps, guidance, dynamic thresholding) and the evaluation's size and seed."""

    schedule: ScheduleConfig = field(
        SCHEDULE, "The UNet's noise schedule (linear betas 0.00085 … 0.012, T = 1000, ε-prediction: :data:`SCHEDULE`)."
    )
    loss_weighting: str = field(
        "min_snr", "Loss weighting over timesteps: 'none' or 'min_snr' (Min-SNR-5).", check=one_of(*WEIGHTINGS)
    )
    sampler: str = field("ddim", "Default sampler: 'ddpm' or 'ddim'.", check=one_of("ddpm", "ddim"))
    steps: int = field(50, "Default sampling steps (1 … T).", check=in_range(1, 100_000, integer=True))
    guidance_scale: float = field(4.0, "Default classifier-free guidance scale (1: none).", check=in_range(0.0, 100.0))
    thresholding: bool = field(True, "Default: dynamic thresholding of the predicted x0 (Imagen's).")
    threshold_ratio: float = field(
        0.995,
        "The per-sample percentile of |x0| taken as the threshold s; s is at least the latents' range (the "
        "largest such percentile over the training latents, fitted when training starts: Imagen's 1).",
        check=in_range(0.5, 1.0),
    )
    unplaced_captions: float = field(
        0.0,
        "Training: share of scenes captioned without their positions, in the language's short phrasing ('a red "
        "circle', 'красный круг'; the evaluation prompts' phrasing), so that a prompt naming no place still draws "
        "the object.",
        check=in_range(0.0, 1.0),
        backfill=True,
    )
    eval_per_class: int = field(
        2, "Evaluation samples per colour × kind prompt and language.", check=in_range(1, 10000, integer=True)
    )
    eval_seed: int = field(0, "Seed of evaluate's sampling.", check=in_range(0, 2**31, integer=True))
    data: str = field("", "Name of the dataset the config was adapted to.")

    def check_unet(self, what: str) -> None:
        """A ValueError for a UNet config that cannot take this latent diffusion's condition (``what`` names the
        condition in the message) or a default step count beyond the schedule."""
        u, T, name = self.unet, self.schedule.timesteps, type(self).__name__
        for bad, why, got in (
            (u.context_dim < 1, f"unet.context_dim must be ≥ 1 ({what} cross-attended)", u.context_dim),
            (u.num_classes > 0, "unet.num_classes must be 0 (the text is the condition)", u.num_classes),
            (u.embedding_dim > 0, "unet.embedding_dim must be 0 (the condition is projected here)", u.embedding_dim),
            (u.out_channels != u.in_channels, f"unet.out_channels must be in_channels={u.in_channels}", u.out_channels),
            (self.steps > T, f"steps must be ≤ schedule.timesteps={T}", self.steps),
        ):
            if bad:
                raise ValueError(f"{name}.{why}; got {got}")


@config
class Kandinsky2Config(LatentDiffusionSettings):
    """Kandinsky 2.0: latent diffusion in a frozen KL-VAE's space, conditioned on two frozen multilingual text
    encoders (pooled features added to the timestep embedding, token features as cross-attention context)."""

    vae: PartConfig = part_field(
        PartConfig(variant="kl-vae-shapes", data="shapes"),
        "The frozen latent autoencoder (KL-VAE): its scaled latents are what the UNet denoises.",
    )
    text: PartConfig = part_field(
        PartConfig(variant="mclip-shapes", data="shapes-multilingual"),
        "The frozen multilingual CLIP text tower (XLMR-CLIP's role): pooled embedding and token features.",
    )
    t5: PartConfig = part_field(
        PartConfig(variant="t5-multilingual", data="shapes-multilingual"),
        "The frozen span-corruption encoder (mT5-small's role): mean-pooled and token features.",
    )
    unet: UNetConfig = field(
        UNET, "The latent UNet: in/out channels and sample_size must be the VAE's latent channels and side."
    )
    text_dropout: float = field(
        0.1, "Training: share of samples whose text (both encoders) is dropped, for guidance.", check=in_range(0.0, 1.0)
    )
    pooling: str = field(
        "mean",
        "How the pooled features reach the timestep embedding: 'mean' (M-CLIP's embedding and T5's mean token "
        "feature, each projected linearly) or 'attention' (the reference Text2ImUNet: T5's tokens pooled by a "
        "learned attention, both pooled projections layer-normed before they are summed).",
        check=one_of("mean", "attention"),
        backfill=True,
    )

    def __attrs_post_init__(self) -> None:
        self.check_unet("the text tokens are")
