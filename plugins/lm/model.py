"""A decoder-only language model (GPT-2 style) from the core parts.

GPT-2's details, all from :mod:`polymodal.nn`: learned absolute position embeddings,
pre-LayerNorm blocks (eps 1e-5) with the tanh-approximate GELU (transformers' ``gelu_new``),
a final LayerNorm, an output head tied to the token embedding (no bias), dropout on the
embeddings, the attention weights and the residual branches, and GPT-2's initialisation
(normal(0, 0.02) weights, zero biases, residual output projections scaled by 1/sqrt(2·depth)).

The interface other families build on (Flamingo, FROMAGe; :class:`polymodal.models.interfaces.CausalLM`)::

    x = lm.token_embeddings(ids)                       # (B, T, D), no positions
    h = lm.run(x, cache=cache, key_padding=kp, injected={i: module}, inject_kwargs={...})  # (B, T, D), final norm
    logits = lm.logits(h)                              # (B, T, V), tied head
    lm(ids, cache) == lm.logits(lm.run(lm.token_embeddings(ids), cache=cache))

``lm.stack`` is the core :class:`~polymodal.nn.TransformerStack`; ``injected={i: module}`` runs
``x = module(x, **inject_kwargs)`` before block ``i`` for that call, leaving the LM unchanged.
The trunk (positions, embedding dropout, causal stack, KV cache, head, generation) is the core
:class:`~polymodal.generation.decoder.CausalDecoder` over these modules (``lm.decoder``; it owns no weights,
so the state-dict keys are GPT-2's as before).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.data.tokenizers import BPETokenizer, ByteTokenizer
from polymodal.generation.decoder import CausalDecoder
from polymodal.models import PolymodalModel, interfaces
from polymodal.nn import BlockConfig, KVCache, PositionEmbedding, StackConfig, TransformerStack
from polymodal.objectives import cross_entropy

from .collate import LMCollate, batch_texts, encode_texts, pack
from .config import LMConfig, make_tokenizer
from .evaluate import EvalMixin
from .sample import SamplingMixin


class LMModel(SamplingMixin, EvalMixin, PolymodalModel):
    """Token ids (B, T) → next-token logits (B, T, V): a GPT-2 style decoder."""

    family = "lm"
    progress_metrics = ("bits_per_token",)
    implements = (interfaces.CausalLM,)
    config_class = LMConfig

    def __init__(self, config: LMConfig) -> None:
        super().__init__(config)
        c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = PositionEmbedding(c.dim, (1, c.max_len), kind="learned")  # weight (1, max_len, D)
        self.drop = nn.Dropout(c.embed_dropout)
        block = BlockConfig(
            dim=c.dim,
            heads=c.heads,
            mlp_ratio=c.mlp_ratio,
            norm="layernorm",
            norm_eps=c.norm_eps,
            act=c.act,
            dropout=c.dropout,
            attn_dropout=c.attn_dropout,
        )
        self.stack = TransformerStack(StackConfig(depth=c.depth, block=block, final_norm=True))
        self.reset_parameters()
        self.tokenizer = None
        self.set_tokenizer(make_tokenizer(c))

    # -- construction -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, unit norms, residual projections / sqrt(2·depth)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        scaled = 0.02 / math.sqrt(2 * self.config.depth)
        for block in self.stack.blocks:
            nn.init.normal_(block.attn.proj.weight, std=scaled)
            nn.init.normal_(block.mlp.fc2.weight, std=scaled)

    def set_tokenizer(self, tokenizer: BPETokenizer | ByteTokenizer | None) -> None:
        """Use ``tokenizer``; its ids must fit the embedding (``vocab_size`` rows)."""
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds only "
                f"vocab_size={self.config.vocab_size}"
            )
        self.tokenizer = tokenizer

    @classmethod
    def config_for_data(cls, config: LMConfig, dataset: Any) -> LMConfig:
        """Record the dataset's name (text comes from its ``text`` or ``caption`` field)."""
        return attrs.evolve(config, data=dataset.name)

    @classmethod
    def tiny_config(cls, config: LMConfig) -> LMConfig:
        """The same architecture at toy size (contract tests)."""
        return attrs.evolve(config, dim=16, depth=1, heads=2, max_len=min(config.max_len, 48), eval_samples=0)

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding = columns of the logits."""
        return self.config.vocab_size

    @property
    def dim(self) -> int:
        """Width of the token stream."""
        return self.config.dim

    @property
    def max_len(self) -> int:
        """Number of learned positions."""
        return self.config.max_len

    # -- the network ------------------------------------------------------------------------------
    def token_embeddings(self, ids: Tensor) -> Tensor:
        """Token ids (B, T) → token embeddings (B, T, D), without positions."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected integer token ids (B, T); got {got}")
        checked = not torch.compiler.is_compiling()  # a compiled decoding step gets the sampler's ids
        if checked and ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}); got values in "
                f"[{int(ids.min())}, {int(ids.max())}] (a family's own tokens need its own embedding)"
            )
        return self.token_embed(ids.to(self.token_embed.weight.device).long())  # (B, T, D)

    def positions(self, past: int, t: int) -> Tensor:
        """Position embeddings (1, t, D) of positions ``past … past + t - 1``."""
        if past + t > self.max_len:
            raise ValueError(f"at most max_len={self.max_len} positions; got {past} cached + {t} new")
        return self.pos_embed()[:, past : past + t]  # (1, t, D)

    def position_rows(self, pos: Tensor) -> Tensor:
        """Position embeddings (n, D) of the positions ``pos`` (n,) (the decoder's ``positions``)."""
        return self.pos_embed()[0, pos]  # (n, D)

    def head_weight(self) -> Tensor:
        """The output head's weight (V, D): the token embedding (tied)."""
        return self.token_embed.weight

    @property
    def decoder(self) -> CausalDecoder:
        """The core causal decoder over this model's modules (built once, kept outside the state dict)."""
        dec = self.__dict__.get("_decoder")
        if dec is None:
            dec = CausalDecoder(
                self.stack,
                tokens=self.token_embeddings,
                positions=self.position_rows,
                head=self.logits,
                max_len=self.max_len,
                dropout=self.drop,
                owner=self,
                head_weight=self.head_weight,
            )
            self.__dict__["_decoder"] = dec
        return dec

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
        """Input embeddings (B, T, D) → hidden states (B, T, D) after the final LayerNorm.

        Adds the position embeddings of positions ``cache.length … cache.length + T - 1`` and runs
        the causal stack (appending to ``cache``). ``key_padding`` (B, cache.length + T) bool marks
        real keys (True). ``injected`` ({layer: module}) runs modules before those blocks for this
        call only (the stack is not changed); ``inject_kwargs`` go to every injected module. With
        ``return_hidden`` also returns the input of every block and the final output.
        """
        if not isinstance(embeds, Tensor) or embeds.dim() != 3 or embeds.shape[-1] != self.dim:
            got = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
            raise ValueError(f"expected input embeddings (B, T, {self.dim}); got {got}")
        return self.decoder.run(
            embeds,
            cache,
            key_padding=key_padding,
            injected=injected,
            inject_kwargs=inject_kwargs,
            return_hidden=return_hidden,
        )  # (B, T, D)

    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states (B, T, D) → logits (B, T, V) through the head tied to the token embedding."""
        return F.linear(hidden, self.token_embed.weight)  # (B, T, V)

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Ids (B, T) → logits (B, T, V); with ``cache`` the ids continue the cached positions."""
        return self.decoder(ids, cache)  # (B, T, V)

    # -- training ---------------------------------------------------------------------------------
    def require_tokenizer(self) -> BPETokenizer | ByteTokenizer:
        """The tokenizer, or a ValueError when the model has none (converted without tokenizer files)."""
        if self.tokenizer is None:
            raise ValueError(
                "this language model has no tokenizer (converted without tokenizer.json or "
                "vocab.json + merges.txt); pass token ids instead of text"
            )
        return self.tokenizer

    def encode_texts(self, groups: list[list[str]]) -> tuple[Tensor, Tensor]:
        """Token streams ``bos s_1 eos s_2 eos …`` per group, right-padded: ids (B, L), targets (B, L).

        Inputs are the stream without its last token, targets the stream shifted by one with
        padding set to -100; streams are cut to ``max_len + 1`` tokens.
        """
        return encode_texts(self.require_tokenizer(), self.max_len, groups)

    def batch_texts(self, batch: dict[str, Any]) -> list[str]:
        """The batch's sentences (``text``, else ``caption``), a ``caption_mix`` share swapped for captions in training."""
        return batch_texts(self.config, batch, self.training)

    def collator(self, training: bool = True) -> LMCollate | None:
        """Caption mixing, packing and tokenising of a training batch (None without a tokenizer)."""
        return LMCollate(self.config, self.tokenizer, training) if self.tokenizer is not None else None

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Next-token cross-entropy (padding ignored) over packed sentences of ``batch``.

        A batch from :meth:`collator` brings its ``ids`` and ``targets``."""
        if "ids" in batch and "targets" in batch:
            ids, targets = batch["ids"], batch["targets"]  # (B, L), (B, L)
        else:  # a raw batch: the collator's work, in its order
            groups = pack(self.batch_texts(batch), self.config.pack, self.training)
            ids, targets = self.encode_texts(groups)  # (B, L), (B, L)
        device = self.token_embed.weight.device
        loss, metrics = cross_entropy(self(ids.to(device)), targets.to(device), ignore_index=-100)
        metrics["bits_per_token"] = loss.detach().double() / math.log(2)
        return loss, metrics

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Random token ids (B, min(16, max_len)) starting with bos."""
        high = self.tokenizer.vocab_size if self.tokenizer is not None else self.vocab_size
        ids = torch.randint(0, high, (batch_size, min(16, self.max_len)), generator=generator)
        if self.tokenizer is not None:
            ids[:, 0] = self.tokenizer.special_tokens["bos"]
        return (ids,)

    # -- folders ----------------------------------------------------------------------------------
    def save_extras(self, directory: Path) -> None:
        """The tokenizer (``tokenizer.json`` or the byte tokenizer's ``polymodal_tokenizer.json``)."""
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def load_extras(self, directory: Path) -> None:
        """The saved tokenizer, when the folder has one."""
        from polymodal.data.tokenizers import CONFIG_FILE, load_tokenizer

        directory = Path(directory)
        if (directory / CONFIG_FILE).exists() or (directory / "tokenizer.json").exists():
            self.set_tokenizer(load_tokenizer(directory))

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        c = self.config
        tok = type(self.tokenizer).__name__ if self.tokenizer is not None else "none"
        return [
            f"GPT-2 style decoder: width {c.dim}, depth {c.depth}, {c.heads} heads, {c.max_len} learned "
            f"positions, vocabulary {c.vocab_size} ({tok}, '{c.tokenizer}'), {c.act} MLP, tied head.",
            "",
        ]


__all__ = ["LMConfig", "LMModel", "make_tokenizer"]
