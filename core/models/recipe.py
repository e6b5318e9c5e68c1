"""The training recipe shared by every family: optimiser, schedule, batch, checkpoints."""

from __future__ import annotations

from typing import Any

from polymodal.config import as_tuple, config, field, in_range, one_of


def _ema_decay(instance: Any, attribute: Any, value: Any) -> None:
    """``ema_decay`` is 0 (off) or a number in (0, 1): a decay of 1 would never move the average."""
    in_range(0.0, 1.0)(instance, attribute, value)
    if value == 1.0:
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be in [0, 1) (0: no EMA; 1 would never move it), "
            f"got {value!r}"
        )


def _increasing_steps(instance: Any, attribute: Any, value: Any) -> None:
    """``restarts`` is a tuple of increasing positive step numbers."""
    ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok or list(value) != sorted(set(value)):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be increasing positive step numbers, e.g. (2000,); "
            f"got {value!r}"
        )


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
    restarts: tuple[int, ...] = field(
        (),
        "Steps at which the schedule starts again: each phase (to the next restart or the end) warms up over "
        "``warmup_steps`` and decays by its own cosine — e.g. a task mixture after a pre-stage that trained "
        "another part, which would otherwise start at a learning rate already decayed (timm's cosine cycles).",
        converter=as_tuple,
        check=_increasing_steps,
        backfill=True,
    )
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
    ema_decay: float = field(
        0.0,
        "Keep an exponential moving average of the trainable weights with this decay (0: off; e.g. 0.999). "
        "The checkpoint holds it (``--resume`` continues it exactly); the model folder stores and evaluates "
        "the EMA weights.",
        check=_ema_decay,
    )
    ema_warmup: str = field(
        "step",
        "How the EMA decay warms up over its k-th update: 'step' (min(decay, (1 + k)/(10 + k)), diffusers' "
        "EMAModel default), 'power' (min(decay, 1 - (1 + k)^-ema_power)) or 'none' (the decay from the start).",
        check=one_of("none", "step", "power"),
    )
    ema_power: float = field(
        2 / 3, "The exponent of the 'power' EMA warm-up (diffusers' default 2/3).", check=in_range(1e-6, 100.0)
    )
    ema_start: int = field(
        0,
        "Optimiser steps before the EMA starts averaging (until then, and at the step after, it copies the "
        "weights; diffusers' update_after_step).",
        check=in_range(0, 10**9, integer=True),
    )
    accumulate: int = field(
        1,
        "Micro-batches per rank per optimiser step (gradient accumulation): each of the W ranks takes "
        "``batch_size / W`` samples of every global batch and splits them into this many micro-batches, so "
        "``batch_size`` is the global batch at any world size. A batch that does not divide is an error.",
        check=in_range(1, 1 << 20, integer=True),
    )
    strategy: str = field(
        "auto",
        "How many processes share the model: 'auto' (DDP when the world size is > 1), 'ddp' "
        "(DistributedDataParallel) or 'fsdp' (FSDP2 ``fully_shard`` per block, then the whole model).",
        check=one_of("auto", "ddp", "fsdp"),
    )
    cpu_offload: bool = field(
        False, "With ``strategy='fsdp'``: keep the sharded parameters on the CPU (FSDP2 offload)."
    )
    compile: bool = field(
        False, "Compile the loss computation with ``torch.compile`` (once; the same shapes never recompile)."
    )
    workers: int = field(
        0,
        "DataLoader worker processes that read and decode a streamed or lazy dataset (a folder, tar shards) and "
        "run the family's collate (0: in the training process).",
        check=in_range(0, 256, integer=True),
    )
    eval_every: int = field(
        0,
        "Evaluate on the test split every this many steps on rank 0, logged to ``train_log.jsonl`` (0: only at "
        "the end).",
        check=in_range(0, 10**9, integer=True),
    )
    tensorboard: bool = field(
        False, "Also write the logged metrics as TensorBoard events under ``OUT/tensorboard`` (needs tensorboard)."
    )
