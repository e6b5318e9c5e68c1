"""The training recipe shared by every family: optimiser, schedule, batch, checkpoints."""

from __future__ import annotations

from polymodal.config import config, field, in_range, one_of


@config
class TrainConfig:
    """How the one trainer trains a model (AdamW, linear warmup then cosine decay)."""

    steps: int = field(
        1000, "Optimiser steps (``--epochs`` converts epochs to steps).", check=in_range(1, 10**9, integer=True)
    )
    batch_size: int = field(64, "Samples per step.", check=in_range(1, 1 << 20, integer=True))
    lr: float = field(1e-3, "Peak learning rate.", check=in_range(0.0, 10.0))
    min_lr_ratio: float = field(0.01, "Final learning rate as a fraction of ``lr``.", check=in_range(0.0, 1.0))
    warmup_steps: int = field(100, "Linear warm-up steps from 0 to ``lr``.", check=in_range(0, 10**9, integer=True))
    weight_decay: float = field(
        0.05, "AdamW weight decay (not applied to biases, norms and embeddings' 1-D params).", check=in_range(0.0, 10.0)
    )
    beta1: float = field(0.9, "AdamW beta1.", check=in_range(0.0, 1.0))
    beta2: float = field(0.999, "AdamW beta2.", check=in_range(0.0, 1.0))
    grad_clip: float = field(1.0, "Clip the global gradient norm to this (0 disables).", check=in_range(0.0, 1e6))
    seed: int = field(
        0, "Seed for initialisation, data order and augmentation.", check=in_range(0, 2**63 - 1, integer=True)
    )
    precision: str = field(
        "auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'.", check=one_of("auto", "fp32", "bf16")
    )
    checkpoint_every: int = field(
        500,
        "Write a resumable checkpoint every this many steps (0: only at the end).",
        check=in_range(0, 10**9, integer=True),
    )
    log_every: int = field(
        10, "Update the progress bar's loss every this many steps.", check=in_range(1, 10**9, integer=True)
    )
