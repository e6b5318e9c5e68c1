"""Encoder and decoder stacks: ``depth`` blocks, optional final norm, KV cache, injection points.

Injection points let a recipe add a module before any layer without replacing classes:
``x = module(x, **inject_kwargs)`` runs just before block ``i``. A stack's owner registers such a
module for good with ``stack.inject(i, module)``; a model that runs a stack it does not own (Flamingo's
gated cross-attention in a frozen LM) passes ``injected={i: module}`` per call instead, so the
frozen stack is never changed.

Relative position bias (``BlockConfig.position_bias="t5"``): the stack owns the one learned table
(``relative_bias``, a :class:`~polymodal.nn.relative.RelativePositionBias`), computes the bias once per call
for the new tokens and the cache's past, and gives it to every block, as T5's layers share the first layer's.
The stack, not its first block, owns the table, so the bias is computed outside every block's forward (where
FSDP2, which shards per block, keeps the block's weights whole only during its own forward).

Gradient checkpointing (``StackConfig.checkpointing``, or :func:`set_checkpointing` on any module)
recomputes each block's activations in the backward pass instead of keeping them: less memory for one
more forward per block, the same gradients. It applies with gradients enabled to a stack in training mode
and to frozen blocks that gradients flow through (the frozen LM of Flamingo and FROMAGe); evaluation,
``torch.no_grad`` and KV-cached decoding run the blocks as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from polymodal.config import config, field, in_range
from polymodal.nn.block import Block, BlockConfig, KVCache
from polymodal.nn.norm import make_norm
from polymodal.nn.relative import RelativePositionBias


@config
class StackConfig:
    """A stack of identical blocks."""

    depth: int = field(4, "Number of blocks.", check=in_range(1, 1024, integer=True))
    block: BlockConfig = field(BlockConfig(), "Configuration shared by every block.")
    final_norm: bool = field(True, "Normalise the stack's output.")
    checkpointing: bool = field(
        False,
        "Gradient checkpointing: in training, recompute each block's activations in the backward pass "
        "instead of storing them (less memory, about one more forward; the same gradients). Does not change "
        "the function, so a saved config without it loads.",
        runtime=True,
    )


class TransformerStack(nn.Module):
    """``depth`` pre-norm blocks; drop-path grows linearly from 0 to ``block.drop_path``."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.cfg = cfg
        rates = [cfg.block.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(attrs.evolve(cfg.block, drop_path=r), layer_index=i) for i, r in enumerate(rates)
        )
        b = cfg.block
        self.norm = make_norm(b.norm, b.dim, b.norm_eps, bias=b.norm_bias) if cfg.final_norm else None
        self.relative_bias = (
            RelativePositionBias(
                b.heads,
                num_buckets=b.relative_buckets,
                max_distance=b.relative_max_distance,
                bidirectional=b.relative_bidirectional,
                init_std=b.dim**-0.5,  # T5's initialisation
            )
            if b.position_bias == "t5"
            else None
        )
        self.injected = nn.ModuleDict()
        self.checkpointing = cfg.checkpointing  # per block in training; set_checkpointing switches it

    def inject(self, layer: int, module: nn.Module) -> None:
        """Run ``module(x, **inject_kwargs)`` just before block ``layer`` on every call (the module
        becomes part of the stack; see ``forward(injected=...)`` for a stack you do not own)."""
        self._check_layer(layer)
        self.injected[str(layer)] = module

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"injection layer must be in [0, {len(self.blocks) - 1}], got {layer}")

    def _injections(self, injected: Mapping[int | str, nn.Module] | None) -> dict[int, list[nn.Module]]:
        """Modules to run before each block: the registered ones, then this call's ``injected``."""
        out: dict[int, list[nn.Module]] = {}
        for key, module in [*self.injected.items(), *(injected or {}).items()]:
            layer = int(key)
            self._check_layer(layer)
            out.setdefault(layer, []).append(module)
        return out

    def _recorded(self, block: nn.Module, x: Tensor) -> bool:
        """Whether checkpointing applies to ``block``: the stack trains, or the block is frozen (eval mode,
        no trainable weights) and gradients flow through it to ``x`` (Flamingo's LM)."""
        return self.training or (x.requires_grad and not any(p.requires_grad for p in block.parameters()))

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        key_padding: Tensor | None = None,
        seqlens: Sequence[int] | None = None,
        mask: Tensor | list[Tensor | None] | None = None,
        context_padding: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        injected: Mapping[int | str, nn.Module] | None = None,
        inject_kwargs: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x: (B, N, D) → (B, N, D). ``mask`` may be one mask or a list with one per layer.

        ``injected`` ({layer: module}, e.g. an ``nn.ModuleDict`` keyed by the layer) adds modules
        for this call only, run after any registered with :meth:`inject`; every injected module
        gets ``inject_kwargs``. With ``return_hidden`` also returns the input of every block plus
        the final output (``depth + 1`` tensors, the last one after the final norm).
        """
        hidden = []
        injections = self._injections(injected)
        bias = None if self.relative_bias is None else self.relative_bias.for_tokens(x.shape[1], cache, x.device)
        for i, block in enumerate(self.blocks):
            for module in injections.get(i, ()):
                x = module(x, **(inject_kwargs or {}))  # (B, N, D)
            if return_hidden:
                hidden.append(x)
            layer_mask = mask[i] if isinstance(mask, (list, tuple)) else mask
            run = block
            if self.checkpointing and cache is None and torch.is_grad_enabled() and self._recorded(block, x):
                run = functools.partial(checkpoint, block, use_reentrant=False)  # recomputed in backward
            x = run(
                x,
                context,
                causal=causal,
                key_padding=key_padding,
                seqlens=seqlens,
                mask=layer_mask,
                context_padding=context_padding,
                cache=cache,
                position_bias=bias,  # (1, H, N, N_keys) or None
            )  # (B, N, D)
        if self.norm is not None:
            x = self.norm(x)
        if return_hidden:
            hidden.append(x)
            return x, hidden
        return x


def set_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Switch gradient checkpointing on (or off) in every :class:`TransformerStack` inside ``module``
    (itself included), whatever its config says; returns how many stacks were switched. For families whose
    configs have no ``checkpointing`` key (decoders that build their stack from flat fields)."""
    stacks = [m for m in module.modules() if isinstance(m, TransformerStack)]
    for stack in stacks:
        stack.checkpointing = bool(enabled)
    return len(stacks)


__all__ = ["KVCache", "StackConfig", "TransformerStack", "set_checkpointing"]
