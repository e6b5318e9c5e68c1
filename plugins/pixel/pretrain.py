"""PIXEL pre-training: the core MAE over sentences rendered into 1×N strips, with span masking.

``polymodal train pixel-mae`` trains :class:`PixelMAEModel` on the embedded ``text`` data; the
``pixel`` classifier (:mod:`.model`) starts from its encoder. ``evaluate`` reports the
masked-patch loss on held-out text next to a predict-the-mean baseline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from polymodal.config import config, field, in_range
from polymodal.models import PolymodalModel
from polymodal.nn import BlockConfig, eval_mode
from polymodal.nn.encoders import ViTEncoderConfig
from polymodal.nn.mae import MAE, MAEConfig

from .classify import masked_loss_metrics, sample_to_folder
from .masking import masked_forward
from .render import Rendered, render, valid_from_images

DEFAULT_MAE = MAEConfig(
    encoder=ViTEncoderConfig(
        image_size=12,
        patch_size=12,
        channels=1,
        depth=4,
        pos_embed="sincos",
        block=BlockConfig(dim=64, heads=4, mlp_ratio=2.0),
    ),
    grid_rows=1,
    grid_cols=24,
    decoder_dim=64,
    decoder_depth=2,
    decoder_heads=4,
    decoder_mlp_ratio=2.0,
    mask_ratio=0.25,
)


@config
class PixelMAEConfig:
    """Rendering, span masking and the masked autoencoder of PIXEL."""

    mae: MAEConfig = field(
        DEFAULT_MAE, "The masked autoencoder; its patch size and grid_cols (patches per strip) fix the strip."
    )
    font_size: int = field(10, "Font size in pixels (Pillow's bundled font).", check=in_range(4, 512, integer=True))
    font: str = field("", "A TrueType file to render with ('' = Pillow's bundled font).")
    mask_ratio: float = field(0.25, "Fraction of text patches hidden by span masking.", check=in_range(0.01, 0.95))
    max_span: int = field(6, "Longest masked span in patches.", check=in_range(1, 64, integer=True))
    eval_seed: int = field(
        0,
        "Seed of the evaluation's masks (and the classifier's perturbations).",
        check=in_range(0, 2**31, integer=True),
    )

    def __attrs_post_init__(self) -> None:
        e = self.mae.encoder
        if self.mae.grid_rows != 1 or e.image_size != e.patch_size or e.channels != 1:
            raise ValueError(
                f"PIXEL's mae must describe a grey 1×N strip (grid_rows=1, image_size=patch_size, "
                f"channels=1); got grid_rows={self.mae.grid_rows}, image_size={e.image_size}, "
                f"patch_size={e.patch_size}, channels={e.channels}"
            )


def tiny_pixel_mae(cfg: PixelMAEConfig) -> PixelMAEConfig:
    """The same architecture at toy size (contract tests)."""
    enc = attrs.evolve(cfg.mae.encoder.with_block(dim=16, heads=2), depth=1)
    return attrs.evolve(cfg, mae=attrs.evolve(cfg.mae, encoder=enc, decoder_dim=16, decoder_depth=1, decoder_heads=2))


class Renderer:
    """Mixin: rendering with a model's patch size, strip length and font (memoised per text)."""

    def _render_config(self) -> PixelMAEConfig:
        raise NotImplementedError

    @property
    def patch(self) -> int:
        """Side of a patch in pixels."""
        return self._render_config().mae.encoder.patch_size

    @property
    def max_patches(self) -> int:
        """Patches per strip (the end-of-sequence patch included)."""
        return self._render_config().mae.grid_cols

    def render(self, texts: Sequence[str], truncate: bool = False) -> Rendered:
        """Render ``texts`` (see :func:`.render.render`); ``truncate`` cuts over-long text instead of raising."""
        cfg = self._render_config()
        cache = self.__dict__.setdefault("_renders", {})
        for t in texts:
            key = (truncate, t)
            if key not in cache:
                r = render(
                    [t],
                    patch=self.patch,
                    max_patches=self.max_patches,
                    font_size=cfg.font_size,
                    font=cfg.font,
                    truncate=truncate,
                )
                cache[key] = (r.images[0], int(r.num_text[0]))
        rows = [cache[(truncate, t)] for t in texts]
        images = torch.stack([r[0] for r in rows])  # (B, 1, p, N·p)
        num_text = torch.tensor([r[1] for r in rows], dtype=torch.long)  # (B,)
        index = torch.arange(self.max_patches).unsqueeze(0)  # (1, N)
        return Rendered(images, index < num_text[:, None], index <= num_text[:, None], num_text)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """Rendered strips (black ink on white, in [0, 1]) → what the networks see: ink 1, paper 0
        (blank patches then embed to the bias alone; this trains several times faster)."""
        return 1.0 - images

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Rendered random sentences from the text dataset's templates."""
        from polymodal.data.text import corpus

        rows = corpus()
        picks = torch.randint(0, len(rows), (batch_size,), generator=generator).tolist()
        return (self.render([rows[i][0] for i in picks], truncate=True).images,)


class PixelMAEModel(Renderer, PolymodalModel):
    """PIXEL pre-training. ``forward(strips (B, 1, p, N·p))`` → unmasked encoder tokens (B, 1 + N, D)."""

    family = "pixel-mae"
    config_class = PixelMAEConfig

    def __init__(self, config: PixelMAEConfig) -> None:
        super().__init__(config)
        self.mae = MAE(config.mae)

    def _render_config(self) -> PixelMAEConfig:
        return self.config

    @classmethod
    def tiny_config(cls, config: PixelMAEConfig) -> PixelMAEConfig:
        """The same architecture at toy size (contract tests)."""
        return tiny_pixel_mae(config)

    def forward(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """Every patch visible: encoder tokens (B, 1 + N, D); padding is hidden from attention."""
        self.mae.check(images)
        valid = valid_from_images(images, self.patch) if valid is None else valid
        return self.mae.features(self.prepare(images), valid)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Span-masked reconstruction loss on the rendered ``batch['text']``."""
        rendered = self.render(list(batch["text"]))
        rng = random.Random(int(torch.randint(0, 2**31, ())))  # follows the trainer's torch seed
        out, mask = masked_forward(self.mae, self, rendered, rng)
        return out.loss, {"masked_fraction": float(mask.sum() / rendered.text.sum())}

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """``masked_loss`` on held-out text, ``mean_baseline_loss`` (predict the training text patches'
        mean normalised patch) and their ratio."""
        with eval_mode(self):
            return masked_loss_metrics(self.mae, self, dataset, split)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Rendered sentence, span mask and reconstruction, stacked, for ``prompt`` or ``n`` test sentences."""
        if options:
            raise ValueError(f"pixel sampling takes no options; got {', '.join(sorted(options))}")
        return sample_to_folder(self.mae, self, out, n=n, prompt=prompt, seed=seed)

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        e, m = self.config.mae.encoder, self.config.mae
        return [
            f"PIXEL pre-training: 1×{m.grid_cols} strip of {e.patch_size}×{e.patch_size} grey patches (font size "
            f"{self.config.font_size}), encoder width {e.dim}, depth {e.depth}; decoder width {m.decoder_dim}, "
            f"depth {m.decoder_depth}; span masking {self.config.mask_ratio:.0%} (spans ≤ {self.config.max_span}).",
            "",
        ]
