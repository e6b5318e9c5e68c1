"""MAE (He et al., 2021, "Masked Autoencoders Are Scalable Vision Learners") on square images.

:class:`MAEModel` wraps the core :class:`~polymodal.nn.mae.MAE` (a ViT encoder over the visible
patches, a light decoder that fills in the hidden ones): ``loss`` is the core masked-patch objective
with random masking; ``evaluate`` reports that loss on the test split with seeded masks, a
predict-the-mean baseline (each grid position's mean training patch) and a linear probe on the
encoder's mean-pooled features (next to the same probe on raw pixels). ``masked(images, noise)`` is
transformers' ``ViTMAEForPreTraining(pixel_values, noise=...)``.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from polymodal.config import config, field, in_range
from polymodal.data.augment import resize
from polymodal.models import PolymodalModel
from polymodal.nn import eval_mode
from polymodal.nn.grid import fit_encoder
from polymodal.nn.mae import MAE, MAEConfig, MAEOutput, masked_patch_loss


@config
class MAEModelConfig:
    """An image masked autoencoder on square images (grey or RGB)."""

    mae: MAEConfig = field(
        MAEConfig(), "The masked autoencoder: encoder (image size, patch, channels …), decoder, masking."
    )
    data: str = field("digits", "The dataset the model is trained on (sample_to_folder draws its test images).")
    eval_seed: int = field(0, "Seed of the evaluation's random masks.", check=in_range(0, 2**31, integer=True))

    def __attrs_post_init__(self) -> None:
        rows, cols = self.mae.grid
        if rows != cols or self.mae.encoder.grid is not None:
            raise ValueError(
                f"MAEModelConfig.mae must describe a square patch grid (grid_rows = grid_cols = 0, encoder.grid "
                f"unset); got a {rows}×{cols} grid (PIXEL's pixel-mae reads 1×N strips)"
            )


def _batches(split: Any, batch_size: int):
    for start in range(0, len(split), batch_size):
        yield split.batch(list(range(start, min(start + batch_size, len(split)))))


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Test accuracy of a logistic regression (scikit-learn, L2, lbfgs) fitted on standardised train features."""
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(((train_x - mean) / std).double().numpy(), train_y.numpy())
    pred = clf.predict(((test_x - mean) / std).double().numpy())
    return float((torch.from_numpy(pred) == test_y).double().mean())


class MAEModel(PolymodalModel):
    """``forward(images (B, C, S, S))`` → encoder tokens of every patch, unmasked (B, 1 + N, D)."""

    family = "mae"
    config_class = MAEModelConfig
    image_fields = "config.mae.encoder"  # image_size and channels: what preprocess() prepares

    def __init__(self, config: MAEModelConfig) -> None:
        super().__init__(config)
        self.mae = MAE(config.mae)

    @classmethod
    def config_for_data(cls, config: MAEModelConfig, dataset: Any, fixed: Collection[str] = ()) -> MAEModelConfig:
        """The dataset's channels and image size (the patch grid keeps about the variant's patches per side)."""
        meta = dataset.meta
        encoder, line = fit_encoder(config.mae.encoder, meta, family="mae", key="mae.encoder", fixed=fixed)
        if line:
            print(line)
        encoder = attrs.evolve(encoder, channels=meta.get("channels", encoder.channels))
        return attrs.evolve(config, mae=attrs.evolve(config.mae, encoder=encoder), data=dataset.name)

    @classmethod
    def tiny_config(cls, config: MAEModelConfig) -> MAEModelConfig:
        """The same architecture at toy size (contract tests)."""
        enc = attrs.evolve(config.mae.encoder.with_block(dim=16, heads=2), depth=1)
        return attrs.evolve(
            config, mae=attrs.evolve(config.mae, encoder=enc, decoder_dim=16, decoder_depth=1, decoder_heads=2)
        )

    def _prepare(self, images: Tensor) -> Tensor:
        """A dataset's images (B, C, H, W) at the model's size."""
        return resize(images.float(), self.config.mae.encoder.image_size)

    def forward(self, images: Tensor) -> Tensor:
        """Every patch visible: encoder tokens (B, 1 + N, D) after the final norm."""
        return self.mae.features(images)

    def features(self, images: Tensor) -> Tensor:
        """Pooled features (B, D): the mean of the patch tokens (what the linear probe reads)."""
        return self(images)[:, self.mae.prefix :].mean(1)  # (B, D)

    def masked(
        self, images: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> MAEOutput:
        """Mask (``noise`` (B, N) as ViTMAE's: argsort keeps the lowest; random when None), encode,
        decode, score: transformers' ``ViTMAEForPreTraining(pixel_values, noise=noise)``."""
        return self.mae(images, noise=noise, generator=generator)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The masked-patch loss with random masking (``mask_ratio`` of the patches hidden)."""
        out = self.mae(self._prepare(batch["image"]))
        return out.loss, {"masked_fraction": out.mask.detach().mean()}  # 0-dim: no host sync

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, float]:
        """``masked_loss`` (seeded masks) and ``mean_baseline_loss`` (each position's mean training
        target patch, on the same masks) with their ``loss_ratio``; ``linear_probe_accuracy`` on the
        mean-pooled encoder features and ``pixel_probe_accuracy``, the same probe on raw pixels."""
        with eval_mode(self):
            device = next(self.parameters()).device
            feats: dict[str, list[Tensor]] = {"train": [], "test": []}
            pixels: dict[str, list[Tensor]] = {"train": [], "test": []}
            labels: dict[str, list[Tensor]] = {"train": [], "test": []}
            target_sum = None
            count = 0
            for key, name in (("train", "train"), ("test", split)):
                for batch in _batches(dataset.split(name), batch_size):
                    images = self._prepare(batch["image"].to(device))  # (b, C, S, S)
                    feats[key].append(self.features(images).float().cpu())
                    pixels[key].append(images.flatten(1).cpu())
                    if "label" in batch:
                        labels[key].append(batch["label"])
                    if key == "train":
                        t = self.mae.target(images).sum(0)  # (N, P)
                        target_sum = t if target_sum is None else target_sum + t
                        count += len(images)
            mean_patch = target_sum / count  # (N, P)
            g = torch.Generator().manual_seed(self.config.eval_seed)
            loss_sum = base_sum = weight = 0.0
            for batch in _batches(dataset.split(split), batch_size):
                images = self._prepare(batch["image"].to(device))
                noise = torch.rand(len(images), self.mae.num_patches, generator=g).to(device)
                out = self.mae(images, noise=noise)
                w = float(out.mask.sum())
                loss_sum += float(out.loss) * w
                base_sum += float(masked_patch_loss(mean_patch.expand_as(out.target), out.target, out.mask)) * w
                weight += w
        metrics = {
            "masked_loss": loss_sum / weight,
            "mean_baseline_loss": base_sum / weight,
            "loss_ratio": loss_sum / max(base_sum, 1e-12),
        }
        if labels["train"] and labels["test"]:
            ty, sy = torch.cat(labels["train"]), torch.cat(labels["test"])
            metrics["linear_probe_accuracy"] = probe_accuracy(
                torch.cat(feats["train"]), ty, torch.cat(feats["test"]), sy
            )
            metrics["pixel_probe_accuracy"] = probe_accuracy(
                torch.cat(pixels["train"]), ty, torch.cat(pixels["test"]), sy
            )
        metrics["samples"] = sum(len(f) for f in feats["test"])
        return metrics

    @torch.no_grad()
    def reconstruction_rows(self, images: Tensor, seed: int = 0) -> Tensor:
        """(B, C, S, 3S): each image, its masked version (hidden patches mid-grey) and the reconstruction
        (visible patches as given, hidden ones predicted), side by side."""
        with eval_mode(self):
            images = self._prepare(images.to(next(self.parameters()).device))
            g = torch.Generator().manual_seed(int(seed))
            noise = torch.rand(len(images), self.mae.num_patches, generator=g).to(images.device)
            out = self.mae(images, noise=noise)
            recon = self.mae.reconstruct(out.pred, images, out.mask)  # (B, C, S, S)
            p, grid = self.config.mae.encoder.patch_size, self.mae.grid
            cells = out.mask.view(-1, 1, *grid).repeat_interleave(p, 2).repeat_interleave(p, 3)  # (B, 1, S, S)
            masked = images * (1 - cells) + 0.5 * cells
        return torch.cat([images, masked, recon], dim=3).cpu()

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Image / mask / reconstruction triples for the image file ``prompt`` or ``n`` test images of ``config.data``."""
        from polymodal.data import load_dataset
        from polymodal.eval.images import write_samples

        if options:
            raise ValueError(f"mae sampling takes no options; got {', '.join(sorted(options))}")
        if prompt is not None:
            images = self.preprocess(prompt)  # (1, C, S, S)
        else:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"n must be an integer >= 1; got {n!r}")
            test = load_dataset(self.config.data).test
            images = test.batch(list(range(min(n, len(test)))))["image"]
        return write_samples(self.reconstruction_rows(images, seed), out, grid_scale=4)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """A random image batch of the configured size."""
        return self.mae.encoder.example_inputs(batch_size, generator)

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        m, e = self.config.mae, self.config.mae.encoder
        return [
            f"MAE: {e.image_size}×{e.image_size}×{e.channels} images, patch {e.patch_size} ({m.grid[0]}×{m.grid[1]} "
            f"patches), encoder width {e.dim}, depth {e.depth}; decoder width {m.decoder_dim}, depth "
            f"{m.decoder_depth}; {m.mask_ratio:.0%} of the patches hidden; "
            f"{'per-patch normalised' if m.norm_pix_loss else 'raw'} pixel targets.",
            "",
        ]


__all__ = ["MAEModel", "MAEModelConfig", "probe_accuracy"]
