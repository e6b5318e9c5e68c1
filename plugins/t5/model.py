"""A T5 v1.1 / mT5-style encoder–decoder from the core blocks, pre-trained on span corruption.

Every block is a core :class:`~polymodal.nn.Block`: pre-norm RMSNorm, no biases, unscaled logits
(``attn_scale=1.0``: T5's initialisation absorbs the 1/sqrt(d) factor), the gated-GELU MLP (``geglu_tanh``) and
T5's bucketed relative position bias (``position_bias="t5"``; bidirectional buckets in the encoder, causal ones in
the decoder, one table per stack). No absolute positions. One token table (``shared``) embeds the encoder's and the
decoder's inputs; the output head is separate (mT5, T5 v1.1) or, with ``tie_head``, the shared table applied to
the decoder states scaled by ``dim ** -0.5`` (the original T5; ``scale_head``).

What Kandinsky 2.0 takes from it, frozen (:class:`~polymodal.models.interfaces.TextTokenEncoder`)::

    ids = model.tokenize(["красный круг"])                       # (B, L): text </s> <pad>…
    pooled, tokens, mask = model.encode_text_and_tokens(ids)     # (B, D), (B, L, D), (B, L)

``tokens`` are the encoder's final-normed states, ``mask`` is True on real tokens (up to and including ``</s>``)
and ``pooled`` is their mean over the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models import PolymodalModel, interfaces
from polymodal.nn import StackConfig, TransformerStack
from polymodal.nn.encoders import masked_mean
from polymodal.objectives import cross_entropy

from .config import T5Config, block_config
from .corruption import SpanCorruptionCollate, corrupt_batch
from .tokenizer import caption_tokenizer


class T5Model(PolymodalModel):
    """Encoder ids (B, L) [and decoder ids (B, T)] → encoder states (B, L, D) [or logits (B, T, V)]."""

    family = "t5"
    implements = (interfaces.TextTokenEncoder,)
    config_class = T5Config
    progress_metrics = ("accuracy",)

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        c = config
        self.shared = nn.Embedding(c.vocab_size, c.dim)
        self.encoder = TransformerStack(StackConfig(depth=c.depth, block=block_config(c, False)))
        self.drop = nn.Dropout(c.dropout)
        if c.decoder_depth:
            self.decoder = TransformerStack(StackConfig(depth=c.decoder_depth, block=block_config(c, True)))
            self.lm_head = None if c.tie_head else nn.Linear(c.dim, c.vocab_size, bias=False)
        else:
            self.decoder, self.lm_head = None, None
        self.reset_parameters()
        self.tokenizer = None
        self.set_tokenizer(caption_tokenizer(c.data, c.vocab_size, c.sentinels) if c.tokenizer == "captions" else None)

    def reset_parameters(self) -> None:
        """T5's initialisation (transformers' ``_init_weights``, factor 1): embeddings N(0, 1), queries
        N(0, (D·Dh)^-½), keys, values and MLP inputs N(0, D^-½), outputs N(0, inner^-½), the head N(0, D^-½)."""
        c = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        hidden = int(c.dim * c.mlp_ratio)
        for stack in (self.encoder, self.decoder):
            for block in stack.blocks if stack is not None else ():
                for attn in (block.attn, getattr(block, "cross_attn", None)):
                    if attn is None:
                        continue
                    if attn.cross:
                        nn.init.normal_(attn.q.weight, std=(c.dim * attn.head_dim) ** -0.5)
                        nn.init.normal_(attn.kv.weight, std=c.dim**-0.5)
                    else:
                        nn.init.normal_(attn.qkv.weight, std=c.dim**-0.5)
                        nn.init.normal_(attn.qkv.weight[: c.dim], std=(c.dim * attn.head_dim) ** -0.5)
                    nn.init.normal_(attn.proj.weight, std=c.dim**-0.5)
                for name in ("gate", "fc1"):
                    if getattr(block.mlp, name, None) is not None:
                        nn.init.normal_(getattr(block.mlp, name).weight, std=c.dim**-0.5)
                nn.init.normal_(block.mlp.fc2.weight, std=hidden**-0.5)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=c.dim**-0.5)

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer``; its ids must fit the shared table (``vocab_size`` rows)."""
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds only vocab_size={self.config.vocab_size}"
            )
        self.tokenizer = tokenizer

    @classmethod
    def config_for_data(cls, config: T5Config, dataset: Any, fixed: Any = ()) -> T5Config:
        """Record the dataset (its training captions teach the tokenizer and the model)."""
        return attrs.evolve(config, data=dataset.name)

    @classmethod
    def tiny_config(cls, config: T5Config) -> T5Config:
        """The same architecture at toy size (contract tests)."""
        return attrs.evolve(
            config, dim=16, heads=2, depth=1, decoder_depth=min(config.decoder_depth, 1), vocab_size=300
        )

    @property
    def pad_id(self) -> int:
        """The padding id (also the decoder's start token): the tokenizer's, else 0 as T5."""
        return self.tokenizer.special_tokens["pad"] if self.tokenizer is not None else 0

    # -- the network ------------------------------------------------------------------------------
    def check_ids(self, ids: Any, what: str = "ids") -> Tensor:
        """``ids`` as a LongTensor (B, L) on the model's device, or a ValueError naming expected vs given."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"{what}: expected integer token ids (B, L); got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"{what}: token ids must lie in [0, {self.config.vocab_size}); got [{int(ids.min())}, {int(ids.max())}]"
            )
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"{what}: at most max_len={self.config.max_len} tokens; got {ids.shape[1]}")
        return ids.to(self.shared.weight.device).long()

    def encode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder ids (B, L) → final-normed states (B, L, D) and the mask (B, L), True on non-padding tokens."""
        ids = self.check_ids(ids)
        mask = ids != self.pad_id  # (B, L)
        x = self.drop(self.shared(ids))  # (B, L, D)
        return self.encoder(x, key_padding=mask), mask  # (B, L, D), (B, L)

    def decode(self, decoder_ids: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        """Decoder ids (B, T) over encoder ``states`` (B, L, D) with ``mask`` (B, L) → logits (B, T, V)."""
        if self.decoder is None:
            raise ValueError("this t5 model is an encoder alone (decoder_depth=0); it has no decoder to run")
        ids = self.check_ids(decoder_ids, "decoder_ids")
        h = self.decoder(self.drop(self.shared(ids)), states, causal=True, context_padding=mask)  # (B, T, D)
        h = self.drop(h)
        if self.config.scale_head:
            h = h * self.config.dim**-0.5
        return F.linear(h, self.shared.weight if self.lm_head is None else self.lm_head.weight)  # (B, T, V)

    def forward(self, input_ids: Tensor, decoder_ids: Tensor | None = None) -> Tensor:
        """Encoder states (B, L, D) of ``input_ids``; with ``decoder_ids`` (B, T), the decoder's logits (B, T, V)."""
        states, mask = self.encode(input_ids)  # (B, L, D), (B, L)
        return states if decoder_ids is None else self.decode(decoder_ids, states, mask)

    # -- the text-encoder interface (Kandinsky 2.0) -----------------------------------------------
    def require_tokenizer(self) -> Any:
        """The tokenizer, or a ValueError for a model converted without one."""
        if self.tokenizer is None:
            raise ValueError("this t5 model has no tokenizer (converted without tokenizer files); pass token ids")
        return self.tokenizer

    def tokenize(
        self, texts: Sequence[str] | str, truncate: bool = False, return_truncated: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Texts → ids (B, L) of ``text </s> <pad>…``, L the longest row (≤ max_len). Any UTF-8 text encodes.

        A text longer than ``max_len`` tokens raises a ValueError (its length and the limit) unless ``truncate``,
        which cuts it keeping ``</s>``; ``return_truncated`` also returns which rows were cut (B,) bool."""
        tok = self.require_tokenizer()
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"tokenize: expected a str or a non-empty list of str; got {texts!r:.80}")
        full = [len(tok.encode(t)) for t in texts]
        ids, _ = tok.encode_batch(texts, None, truncate)  # longest row
        if ids.shape[1] > self.config.max_len or any(n > self.config.max_len for n in full):
            rows = [tok.encode(t, self.config.max_len, truncate) for t in texts]  # raises unless truncate
            ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)  # (B, L)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
        cut = torch.tensor([n > self.config.max_len for n in full])  # (B,)
        return (ids, cut) if return_truncated else ids

    def encode_text_and_tokens(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Ids (B, L) → pooled features (B, D) (the mean over real tokens), final-normed token features (B, L, D)
        and the mask (B, L), True on real tokens (up to and including ``</s>``)."""
        tokens, mask = self.encode(ids)  # (B, L, D), (B, L)
        return masked_mean(tokens, mask), tokens, mask  # (B, D), (B, L, D), (B, L)

    def encode_text(self, ids: Tensor) -> Tensor:
        """Ids (B, L) → pooled features (B, D)."""
        return self.encode_text_and_tokens(ids)[0]

    # -- training ---------------------------------------------------------------------------------
    def collator(self, training: bool = True) -> SpanCorruptionCollate | None:
        """A fresh span corruption of the batch's captions per step (None without a tokenizer)."""
        return SpanCorruptionCollate(self.config, self.tokenizer, training) if self.tokenizer is not None else None

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Cross-entropy of the decoder's teacher-forced predictions of the span-corruption targets.

        A batch from :meth:`collator` brings ``input_ids``, ``decoder_ids`` and ``targets``; a raw batch is
        corrupted here (torch's global generator)."""
        if "targets" not in batch:
            batch = self.collator(self.training)(batch, self.train_step) if self.tokenizer else batch
            if "targets" not in batch:
                raise ValueError("a t5 batch needs input_ids, decoder_ids and targets (or captions and a tokenizer)")
        logits = self(batch["input_ids"], batch["decoder_ids"])  # (B, T, V)
        return cross_entropy(logits, batch["targets"].to(logits.device), ignore_index=-100)

    def corrupt(self, texts: Sequence[str], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Span-corrupted ``input_ids``, ``decoder_ids`` and ``targets`` of ``texts`` (see :mod:`.corruption`)."""
        c = self.config
        return corrupt_batch(
            self.require_tokenizer(),
            list(texts),
            c.max_len,
            noise_density=c.noise_density,
            mean_span=c.mean_span,
            generator=generator,
        )

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Random non-padding encoder ids (B, 12) ending in eos and, with a decoder, decoder ids (B, 6)."""
        low = 2 + self.config.sentinels  # past pad, eos and the sentinels
        high = self.tokenizer.vocab_size if self.tokenizer is not None else self.config.vocab_size
        ids = torch.randint(low, high, (batch_size, 12), generator=generator)  # (B, 12)
        ids[:, -1] = 1
        if self.decoder is None:
            return (ids,)
        dec = torch.randint(low, high, (batch_size, 6), generator=generator)  # (B, 6)
        dec[:, 0] = self.pad_id
        return ids, dec

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Span-corruption loss and accuracy per language and the linear probes (see :mod:`.evaluate`)."""
        from .evaluate import evaluate_t5

        return evaluate_t5(self, dataset, split)

    # -- folders ----------------------------------------------------------------------------------
    def save_extras(self, directory: Path) -> None:
        """The tokenizer (``tokenizer.json`` + ``polymodal_tokenizer.json``)."""
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
        return [
            f"T5 v1.1-style encoder–decoder: width {c.dim}, {c.heads} heads, {c.depth} encoder and {c.decoder_depth} "
            f"decoder blocks, {c.act} MLP ×{c.mlp_ratio}, RMSNorm, relative position bias ({c.relative_buckets} "
            f"buckets up to {c.relative_max_distance}), vocabulary {c.vocab_size} with {c.sentinels} sentinels; "
            f"span corruption (density {c.noise_density}, mean span {c.mean_span}).",
            "",
        ]


__all__ = ["T5Config", "T5Model", "block_config"]
