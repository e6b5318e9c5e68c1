"""DINO (Caron et al., 2021): self-distillation with no labels, on the core ViT encoder.

A student and a teacher of the same architecture (core :class:`ViTEncoder` + :class:`DINOHead`)
see different multi-crop views of a batch: the teacher only the two global views, the student
every view. The student learns to predict the teacher's centred, sharpened distribution for
every pair of different views (:class:`polymodal.plugins.dino.distill.DINOLoss`). The teacher is never
trained by gradients: after every optimiser step the trainer calls :meth:`DINOModel.after_step`,
which moves it towards the student by EMA with a cosine momentum schedule, updates the centre,
and stops training with a :class:`~polymodal.plugins.dino.distill.CollapseError` if the teacher's output no
longer depends on the image. No labels are used in training; they are used only by
:meth:`DINOModel.evaluate` (k-NN and linear probe on frozen teacher features).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from polymodal.data.augment import resize
from polymodal.models import PolymodalModel
from polymodal.nn.encoders import ViTEncoder
from polymodal.nn.grid import fit_encoder
from polymodal.train import cosine_momentum

from .config import DINOConfig
from .crops import check_images, multi_crop
from .distill import CollapseMonitor, DINOHead, DINOLoss, batch_mean, collapse_stats
from .sync import teacher_ema_


class DINOBranch(nn.Module):
    """Backbone + head: images (B, C, H, W) → head logits (B, K); ``features`` gives the [CLS] token."""

    def __init__(self, cfg: DINOConfig) -> None:
        super().__init__()
        self.backbone = ViTEncoder(cfg.encoder)
        self.head = DINOHead(cfg.encoder.dim, cfg.head)

    def features(self, images: Tensor) -> Tensor:
        """(B, D) the [CLS] token after the final norm."""
        return self.backbone(images)[:, 0]  # (B, D)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, K)

    def views(self, views: list[Tensor], shared_head: bool = True) -> list[Tensor]:
        """Head logits per view (each (B, K)). The backbone runs once per crop size; with ``shared_head``
        the head runs once on every view's features together (as DINO's multi-crop wrapper does, so
        BatchNorm sees them all), otherwise once per crop size (BatchNorm statistics per size)."""
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            feats.append(self.features(torch.cat(views[start:end])))  # ((end - start)·B, D)
            start = end
        logits = self.head(torch.cat(feats)) if shared_head else torch.cat([self.head(f) for f in feats])
        return list(logits.split(views[0].shape[0]))  # len(views) × (B, K)


class DINOModel(PolymodalModel):
    """Images (B, C, S, S) → frozen teacher features (B, F) (the [CLS] token, optionally ⊕ mean patch)."""

    family = "dino"
    progress_metrics = ("teacher_entropy", "kl_to_centre")
    image_fields = "config.encoder"  # image_size and channels: what preprocess() prepares
    config_class = DINOConfig

    def __init__(self, config: DINOConfig) -> None:
        super().__init__(config)
        self.student = DINOBranch(config)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(config.head.out_dim, config.loss)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.monitor = CollapseMonitor(config.collapse_min_kl, config.collapse_patience, config.collapse_start)
        self._pending: list[tuple[Tensor, int]] = []  # teacher batch means and rows since the last step
        self._last_stats: dict[str, float] = {}
        self.teacher.eval()

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: DINOConfig, dataset: Any, fixed: Collection[str] = ()) -> DINOConfig:
        """Match the dataset's channels and image size (the patch grid keeps about the variant's patches
        per side and the local crops their share of the image, printed; not with ``encoder.image_size``
        in ``fixed``); remember its name (``polymodal eval`` uses it)."""
        e = config.encoder
        encoder, line = fit_encoder(e, dataset.meta, family="dino", fixed=fixed)
        local = config.local_size
        if encoder.image_size != e.image_size and "local_size" not in fixed:
            p = encoder.patch_size
            local = min(max(round(local * encoder.image_size / e.image_size / p), 1) * p, encoder.image_size)
            line += f"; local crops {local}×{local}"
        if line:
            print(line)
        encoder = attrs.evolve(encoder, channels=dataset.meta.get("channels", e.channels))
        return attrs.evolve(config, encoder=encoder, local_size=local, data=dataset.name)

    @classmethod
    def tiny_config(cls, config: DINOConfig) -> DINOConfig:
        """The same architecture at toy size (contract tests)."""
        encoder = attrs.evolve(config.encoder.with_block(dim=16, heads=2), depth=1)
        head = attrs.evolve(config.head, hidden_dim=32, bottleneck_dim=16, out_dim=32)
        return attrs.evolve(config, encoder=encoder, head=head, local_crops=min(config.local_crops, 2))

    def train(self, mode: bool = True) -> DINOModel:
        """Train the student; the teacher stays in eval mode (it is updated by EMA only), except that
        BatchNorm layers in its head use batch statistics while training, as the student's do."""
        super().train(mode)
        self.teacher.eval()
        for m in self.teacher.head.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.train(mode)
        return self

    def momentum_at(self, step: int) -> float:
        """The teacher's EMA momentum at ``step``: a cosine from ``momentum`` to 1 over the schedule."""
        length = self.config.momentum_steps or self.train_steps or 1
        return cosine_momentum(step, length, self.config.momentum)

    # -- the API ----------------------------------------------------------------------------------
    def prepare(self, images: Tensor) -> Tensor:
        """Float images resized to the encoder's size; a ValueError for the wrong channel count."""
        e = self.config.encoder
        check_images(images, self.config.local_size, e.channels)
        return resize(images.float(), e.image_size)

    def features(self, images: Tensor, branch: str = "teacher") -> Tensor:
        """Frozen features (B, F) of the ``teacher`` (default, as in DINO) or ``student`` backbone."""
        net = self.teacher if branch == "teacher" else self.student
        tokens = net.backbone(self.prepare(images))  # (B, 1 + N, D)
        if self.config.features == "cls":
            return tokens[:, 0]  # (B, D)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)  # (B, 2D)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, S, S) → (B, F) teacher features."""
        return self.features(images)

    def views(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """The two global and ``local_crops`` local views of a batch (see :mod:`.crops`)."""
        c = self.config
        check_images(images, c.local_size, c.encoder.channels)
        return multi_crop(
            images.float(),
            global_size=c.encoder.image_size,
            local_size=c.local_size,
            global_scale=c.global_scale,
            local_scale=c.local_scale,
            local_crops=c.local_crops,
            flip=c.flip,
            jitter=c.jitter,
            generator=generator,
        )

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The DINO loss on multi-crop views of ``batch['image']`` (labels are never read)."""
        globals_, locals_ = self.views(batch["image"])
        step = int(self.steps_done)
        shared = self.config.shared_head_batch
        student = self.student.views(globals_ + locals_, shared)  # (2 + local_crops) × (B, K)
        with torch.no_grad():
            teacher = self.teacher.views(globals_, shared)  # 2 × (B, K)
        loss = self.dino_loss(student, teacher, step)
        probs = torch.cat([self.dino_loss.teacher_probs(t, step) for t in teacher])  # (2B, K)
        stats = collapse_stats(probs, across_ranks=self.training)  # over every rank's batch while training
        if self.training:  # every micro-batch of an accumulated step counts towards the centre
            self._pending.append((batch_mean(teacher), sum(map(len, teacher))))  # (1, K), rows: every micro-batch
            self._last_stats = stats
        metrics = {
            "teacher_entropy": stats["teacher_entropy"],
            "kl_to_centre": stats["kl_to_centre"],
            "teacher_temp": self.dino_loss.teacher_temp(step),
            "momentum": self.momentum_at(step),
        }
        return loss, metrics

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimiser step: EMA teacher update, centre update, collapse check, step count."""
        step = int(self.steps_done)
        teacher_ema_(self.teacher, self.student, self.momentum_at(step))  # ema_update_, FSDP-sharded students too
        if self._pending:  # one micro-batch: its mean as it is; several: their mean weighted by rows
            means, rows = zip(*self._pending)
            mean = means[0] if len(means) == 1 else sum(m * n for m, n in self._pending) / sum(rows)  # (1, K)
            self.dino_loss.update_center_from_mean(mean)
            self._pending = []
        self.steps_done += 1
        if self._last_stats:
            self.monitor.update(step, self._last_stats)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, Any]:
        """Weighted k-NN and linear-probe accuracy on frozen teacher features (and ``attention_mask_iou`` with masks)."""
        from .evaluate import evaluate_dino

        return evaluate_dino(self, dataset, split)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """A random image batch of the configured size."""
        return self.student.backbone.example_inputs(batch_size, generator)

    def example_batch(self, batch_size: int = 4, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A random training batch (images only: DINO needs no labels)."""
        return {"image": self.example_inputs(batch_size, generator)[0]}

    def card_lines(self) -> list[str]:
        """Architecture and recipe for the model card."""
        c, e, h = self.config, self.config.encoder, self.config.head
        return [
            f"DINO: ViT {e.image_size}×{e.image_size}×{e.channels}, patch {e.patch_size}, width {e.dim}, depth {e.depth}, "
            f"{e.block.heads} heads; head MLP {h.hidden_dim} → bottleneck {h.bottleneck_dim} → {h.out_dim} "
            "prototypes.",
            f"Multi-crop: 2 global {e.image_size}² views (area {c.global_scale}), {c.local_crops} local {c.local_size}² "
            f"views (area {c.local_scale}); teacher momentum {c.momentum} → 1 over {c.momentum_steps or 'the run'} steps; "
            f"temperatures student {c.loss.student_temp}, teacher {c.loss.warmup_teacher_temp} → {c.loss.teacher_temp}.",
            f"Data: {c.data or 'unspecified'} (no labels in pre-training; labels only for k-NN and the linear probe).",
            "",
        ]
