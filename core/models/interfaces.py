"""The small typed interfaces every part implements.

They are structural (``typing.Protocol``): a part needs the methods, not a base class.
``isinstance(obj, Tokenizer)`` works for a quick check.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Encoder(Protocol):
    """Maps one modality to a token sequence ``(B, N, out_dim)``.

    Registered encoders are ``nn.Module`` classes built from ``config_class()`` defaults,
    and give ``example_inputs(batch_size)`` so the testing kit can run them.
    """

    config_class: type
    out_dim: int

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor: ...

    def example_inputs(self, batch_size: int = 2) -> tuple[Tensor, ...]: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Text or images to integer ids and back.

    ``special_tokens`` maps names (``"bos"``, ``"eos"``, ``"pad"`` …) to ids.
    """

    vocab_size: int
    special_tokens: dict[str, int]

    def encode(self, x: Any) -> Any: ...

    def decode(self, ids: Any) -> Any: ...


@runtime_checkable
class Fusion(Protocol):
    """Joins a stream ``x`` (B, N, D) with a ``context`` from another modality."""

    def forward(self, x: Tensor, context: Tensor, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Objective(Protocol):
    """A loss: returns ``(scalar_loss, {metric_name: float})``."""

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, dict[str, float]]: ...


@runtime_checkable
class TokenSampler(Protocol):
    """Chooses the next token from scores: ``(logits (B, V), generator) -> ids (B,)`` (registry kind ``token_sampler``)."""

    def __call__(self, logits: Tensor, *args: Any, **kwargs: Any) -> Tensor: ...


Sampler = TokenSampler  # the name before diffusion samplers; goes in the next release
