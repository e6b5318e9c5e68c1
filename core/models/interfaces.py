"""The small typed interfaces every part implements.

They are structural (``typing.Protocol``): a part needs the methods, not a base class.
``isinstance(obj, Tokenizer)`` works for a quick check.

Two groups:

- building blocks (:class:`Encoder`, :class:`Tokenizer`, :class:`Fusion`, :class:`Objective`,
  :class:`TokenSampler`);
- the contracts a composite model relies on when it takes a pretrained part: :class:`CausalLM`
  (Flamingo's and FROMAGe's frozen LM), :class:`ImageTokenizer` (DALL·E's and RuDolph's VQ-VAE),
  :class:`ImageEncoder` and :class:`TextEncoder` (a CLIP's two sides: FROMAGe's and Flamingo's
  vision, DALL·E's reranker).

A composite model checks a part with :func:`require`, which raises a ValueError naming every
missing member (and, for members typed with another protocol such as ``ImageEncoder.visual``,
the missing members inside them)::

    require(lm, CausalLM, what="FlamingoConfig.lm")

A model class that implements a contract says so with ``implements = (CausalLM,)`` (see
:attr:`polymodal.models.PolymodalModel.implements`); the contract kit
(:func:`polymodal.testing.components.check_implements`) builds every registered variant of it and
checks the declaration holds.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from polymodal.nn.block import KVCache
from polymodal.nn.stack import TransformerStack


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


# -- contracts of pretrained parts --------------------------------------------------------------


@runtime_checkable
class CausalLM(Protocol):
    """A language model a composite model runs on its own input embeddings (the ``lm`` family)::

    x = lm.token_embeddings(ids)                       # (B, T, D), no positions
    h = lm.run(x, cache=cache, injected=blocks, inject_kwargs={...})  # (B, T, D), final norm applied
    logits = lm.logits(h)                              # (B, T, V)
    """

    tokenizer: Any
    """Its text tokenizer (a :class:`Tokenizer`), or None for a model converted without one."""
    vocab_size: int
    """Rows of the token-embedding table (columns of the logits)."""
    dim: int
    """Width of the embeddings and hidden states."""
    max_len: int
    """Longest sequence (cached positions included) it runs."""
    stack: TransformerStack
    """Its blocks (``len(stack.blocks)`` layers), for models that read or inject per layer."""

    def token_embeddings(self, ids: Tensor) -> Tensor:
        """Ids (B, T) → input embeddings (B, T, D) without positions."""

    def run(
        self,
        embeds: Tensor,
        *,
        cache: KVCache | None = None,
        key_padding: Tensor | None = None,
        injected: Any = None,
        inject_kwargs: dict[str, Any] | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Input embeddings (B, T, D) → hidden states (B, T, D); ``injected`` {layer: module} runs
        ``module(x, **inject_kwargs)`` before that block for this call only."""

    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states (B, T, D) → logits (B, T, vocab_size)."""


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images to a grid of discrete codes and back (a VQ-VAE; DALL·E's and RuDolph's image tokens)."""

    codebook_size: int
    """Number of distinct codes."""
    grid: tuple[int, int]
    """(rows, cols) of codes per image."""

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] → codes (B, rows, cols)."""

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, rows, cols) → images (B, C, S, S)."""


@runtime_checkable
class ImageTower(Protocol):
    """The image side of an :class:`ImageEncoder`: the core ViT trunk and its input check."""

    encoder: nn.Module
    """Pixels (B, C, S, S) → patch tokens (B, 1 + P, D), [CLS] first."""

    def check(self, pixels: Tensor) -> None:
        """Raise a ValueError unless ``pixels`` is a batch the tower takes."""


@runtime_checkable
class ImageEncoder(Protocol):
    """Images to embeddings in a space shared with text (a CLIP's image side).

    Not to be confused with the trunk :class:`polymodal.nn.encoders.ViTEncoder`, which
    ``visual.encoder`` holds.
    """

    visual: ImageTower
    """The image tower (its ``encoder`` gives patch tokens)."""

    def prepare(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] → pixels (B, C', S, S) at the tower's size and channels."""

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Prepared pixels (B, C, S, S) → unnormalised embeddings (B, E)."""


@runtime_checkable
class TextEncoder(Protocol):
    """Texts to embeddings in a space shared with images (a CLIP's text side).

    Not to be confused with the trunk :class:`polymodal.nn.encoders.TextEncoder`.
    """

    def tokenize(self, texts: Sequence[str] | str) -> Tensor:
        """Texts → token ids (B, L)."""

    def encode_text(self, ids: Tensor) -> Tensor:
        """Token ids (B, L) → unnormalised embeddings (B, E)."""


@runtime_checkable
class TextTokenEncoder(Protocol):
    """Texts to a pooled embedding and the per-token features it was pooled from, in one pass (what a
    diffusion prior or decoder cross-attends to beside the embedding: unCLIP, Kandinsky)."""

    def encode_text_and_tokens(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token ids (B, L) → unnormalised embeddings (B, E), final-normed token features (B, L, D) and a mask
        (B, L), True up to and including end-of-text."""


@runtime_checkable
class LatentAutoencoder(Protocol):
    """Images to the latents a latent diffusion model works on, and back (the KL-VAE of Kandinsky 2.0, the MoVQ
    of 2.1): the diffusion model only ever calls these two and reads the latent shape."""

    latent_shape: tuple[int, int, int]
    """(L, h, w) of one image's latent."""

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] → the diffusion model's latents (B, L, h, w) (scaled, where the
        autoencoder has a scale)."""

    def decode_latents(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """The diffusion model's latents (B, L, h, w) → images (B, C, S, S) in [0, 1]."""


DESCRIPTIONS: dict[type, str] = {
    CausalLM: "a language model (family 'lm')",
    ImageTokenizer: "an image tokenizer (family 'vqvae')",
    ImageEncoder: "a CLIP model's image side (family 'clip')",
    TextEncoder: "a CLIP model's text side (family 'clip')",
    TextTokenEncoder: "a CLIP model's text side with its token features (family 'clip')",
    LatentAutoencoder: "a latent autoencoder (family 'klvae' or 'movq')",
}
"""How :func:`require` names what it expected; a protocol not listed is named by its class name."""


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The public members (attributes, properties, methods) a protocol declares, sorted."""
    if not getattr(protocol, "_is_protocol", False):
        raise ValueError(f"expected a typing.Protocol class; got {protocol!r}")
    names: set[str] = set()
    for base in protocol.__mro__:
        if base in (Protocol, typing.Generic, object) or not getattr(base, "_is_protocol", False):
            continue
        names.update(inspect.get_annotations(base))
        names.update(n for n, v in base.__dict__.items() if callable(v) or isinstance(v, property))
    return tuple(sorted(n for n in names if not n.startswith("_")))


def missing_members(obj: Any, protocol: type, prefix: str = "") -> list[str]:
    """Members of ``protocol`` that ``obj`` lacks (dotted into members typed with another protocol)."""
    hints = typing.get_type_hints(protocol)
    missing = []
    for name in protocol_members(protocol):
        if not hasattr(obj, name):
            missing.append(prefix + name)
            continue
        inner = hints.get(name)
        if isinstance(inner, type) and getattr(inner, "_is_protocol", False):
            missing += missing_members(getattr(obj, name), inner, f"{prefix}{name}.")
    return missing


def require(obj: Any, protocols: type | tuple[type, ...], what: str) -> Any:
    """``obj`` if it has every member of ``protocols``, else a ValueError naming what is missing.

    ``what`` names the place the part goes (``"FlamingoConfig.lm"``); the message names the
    expected protocol, the given class (and family) and each missing member.
    """
    protocols = protocols if isinstance(protocols, tuple) else (protocols,)
    for protocol in protocols:
        missing = missing_members(obj, protocol)
        if missing:
            expected = DESCRIPTIONS.get(protocol, protocol.__name__)
            family = getattr(obj, "family", None)
            given = type(obj).__name__ + (f" (family {family!r})" if family else "")
            raise ValueError(
                f"{what}: expected {expected} implementing {protocol.__name__} "
                f"({', '.join(protocol_members(protocol))}); got a {given} lacking {', '.join(missing)}"
            )
    return obj


__all__ = [
    "DESCRIPTIONS",
    "CausalLM",
    "Encoder",
    "Fusion",
    "ImageEncoder",
    "ImageTokenizer",
    "ImageTower",
    "Objective",
    "TextEncoder",
    "TextTokenEncoder",
    "TokenSampler",
    "Tokenizer",
    "missing_members",
    "protocol_members",
    "require",
]
