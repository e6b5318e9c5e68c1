"""DALL·E (Ramesh et al., 2021): one causal transformer over text tokens followed by image tokens.

The stream is ``[text (L)][image (h·w)]``. Text comes from a BPE with DALL·E's detail of a
*unique* pad token per text position (the pad at position ``i`` is id ``text_vocab + i``),
always ``L`` long, with ``bos`` at position 0; the unconditional text (caption dropout,
classifier-free guidance) is ``bos`` followed by pads only. Image tokens are the codes of a
frozen, registered image tokenizer (the VQ-VAE), raster order. One vocabulary::

    [0, text_vocab)                      text ids
    [text_vocab, text_vocab + L)         the per-position pads
    [text_vocab + L, … + codebook_size)  image codes

Embeddings: token + text position for text; token + row + column for image tokens. The
logits are restricted to the text ids where the next token is text and to the image codes
where it is an image token (in the loss and, through ``allowed=``, in sampling). The loss
weighs text 1/8 and image 7/8. Attention is causal; each layer may use a sparse image
pattern (row, column, conv) built with :func:`polymodal.attention.image_pattern_mask`.
The stream and its trunk (positions, per-layer mask rows, the core
:class:`~polymodal.generation.decoder.CausalDecoder` that the forward pass and sampling run through) are
in :mod:`polymodal.plugins.dalle.stream`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from polymodal.models import PolymodalModel
from polymodal.models.interfaces import ImageTokenizer, require
from polymodal.models.parts import follow_data
from polymodal.nn import BlockConfig, StackConfig, TransformerStack
from polymodal.nn.embed import init_weights
from polymodal.objectives import cross_entropy

from . import text as txt
from .config import DALLEConfig
from .sample import SAMPLE_OPTIONS
from .stream import DALLEStream


class DALLE(DALLEStream, PolymodalModel):
    """``forward(text (B, L), codes (B, h, w))`` → logits (B, L + h·w − 1, V) over the whole vocabulary."""

    family = "dalle"
    image_fields = "vq.config"  # image_size and channels: what preprocess() prepares
    config_class = DALLEConfig
    sample_options = SAMPLE_OPTIONS
    frozen = ("vq",)
    part_attributes: ClassVar[dict[str, str]] = {"tokenizer": "vq"}

    def __init__(self, config: DALLEConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        vq = self.attach_parts(parts)["tokenizer"]
        self.set_text_tokenizer(
            txt.train_tokenizer(config.data, config.templates, config.class_names, config.text_vocab)
        )
        self._build(vq)

    def _build(self, vq: nn.Module) -> None:
        """Freeze ``vq`` in and make every module whose size depends on it."""
        c = self.config
        self.vq = require(vq, ImageTokenizer, what="DALLEConfig.tokenizer")
        self.freeze()
        self.grid = (int(vq.grid[0]), int(vq.grid[1]))
        self.codebook_size = int(vq.codebook_size)
        self.num_image = self.grid[0] * self.grid[1]
        self.image_offset = c.text_vocab + c.text_length
        self.vocab_size = self.image_offset + self.codebook_size
        self.seq_len = c.text_length + self.num_image
        self.token_embed = nn.Embedding(self.vocab_size, c.dim)
        self.text_pos = nn.Parameter(torch.zeros(c.text_length, c.dim))
        self.row_pos = nn.Parameter(torch.zeros(self.grid[0], c.dim))
        self.col_pos = nn.Parameter(torch.zeros(self.grid[1], c.dim))
        block = BlockConfig(dim=c.dim, heads=c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.stack = TransformerStack(StackConfig(depth=c.depth, block=block))
        self.head = nn.Linear(c.dim, self.vocab_size)
        init_weights(self.stack)
        init_weights(self.head)
        for p in (self.token_embed.weight, self.text_pos, self.row_pos, self.col_pos):
            nn.init.normal_(p, std=0.02)
        self._masks: dict[tuple[str, str], Tensor] = {}
        self.__dict__.pop("_decoder", None)  # the trunk over the modules just made is built on first use

    def set_text_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` for text; it must fit in ``text_vocab`` ids."""
        if tokenizer.vocab_size > self.config.text_vocab:
            raise ValueError(
                f"the text tokenizer has {tokenizer.vocab_size} ids; DALLEConfig.text_vocab is {self.config.text_vocab}"
            )
        self.text_tokenizer = tokenizer

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: DALLEConfig, dataset: Any) -> DALLEConfig:
        """Templates, class names and native size from the dataset; the 'auto' tokenizer trains on it."""
        meta = dataset.meta
        config, name = follow_data(config, dataset, "tokenizer", family="dalle", what="VQ-VAE tokenizer")
        changes: dict[str, Any] = dict(
            data=name,
            templates=tuple(meta.get("templates", ())),
            class_names=tuple(meta.get("class_names", ())),
            image_size=int(meta.get("image_size", 0)),
        )
        return attrs.evolve(config, **changes)

    @classmethod
    def tiny_config(cls, config: DALLEConfig) -> DALLEConfig:
        """A fresh tiny tokenizer and a tiny transformer with a sparse schedule."""
        return attrs.evolve(
            config,
            tokenizer=attrs.evolve(config.tokenizer, path="", tiny=True),
            dim=16,
            depth=2,
            heads=2,
            attention=("row", "column"),
            attention_last="conv",
        )

    def forward(self, text: Tensor, codes: Tensor) -> Tensor:
        """Raw logits (B, L + h·w − 1, V) of the next token at every stream position but the last."""
        return self.stream_logits(self.stream(text, codes)[:, :-1])

    # -- training and evaluation ------------------------------------------------------------------
    def stream_loss(self, ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Weighted next-token cross-entropy of full streams (B, T): text 1/8, image 7/8 by default."""
        logits = self.stream_logits(ids[:, :-1])  # (B, T-1, V)
        pos = torch.arange(ids.shape[1] - 1, device=ids.device)  # (T-1,)
        logits = logits.masked_fill(~self.vocab_mask(pos), float("-inf"))  # restricted vocabulary
        segment = self.next_is_image(pos).long()  # (T-1,) 0 text, 1 image
        w = self.config.text_loss_weight
        loss, metrics = cross_entropy(logits, ids[:, 1:], segment_ids=segment, segment_weights=(w, 1.0 - w))
        metrics["loss_text"] = metrics.pop("ce_segment_0")
        metrics["loss_image"] = metrics.pop("ce_segment_1")
        return loss, metrics

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Weighted cross-entropy of captions (re-sampled per step, some dropped) and image codes.

        A batch from :meth:`collator` brings its augmented images and ``text_ids`` (B, L)."""
        if "text_ids" not in batch:  # a raw batch: do the collator's work here, drawing in its order
            if self.training:
                batch = self.collator()(batch, self.train_step)
            else:
                captions = list(batch["caption"])
                txt.check_captions(batch["image"], captions)
                batch = {**batch, "text_ids": self.encode_text(captions, truncate=True)}
        images, text = batch["image"], batch["text_ids"].to(self.head.weight.device)  # (B, …), (B, L)
        return self.stream_loss(self.stream(text, self.image_codes(images)))

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Test loss (bits per image token) and judged sample accuracy; see :mod:`.evaluate`."""
        from .evaluate import evaluate_dalle

        return evaluate_dalle(self, dataset, split)

    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``polymodal eval --generative``: ``n`` samples for the evaluation prompts (cycled) and their targets."""
        from .evaluate import generative_samples

        return generative_samples(self, dataset, n, seed)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Write ``n`` samples for ``prompt`` as PNGs at the data's native size plus ``grid.png``; see :mod:`.sample`."""
        from .sample import sample_to_folder

        return sample_to_folder(self, out, n=n, prompt=prompt, seed=seed, **options)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random text streams (``bos``, random ids, ``eos``, pads) and random codes (B, h, w)."""
        tok, length = self.text_tokenizer, self.config.text_length
        text = self.pad_ids().repeat(batch_size, 1)  # (B, L)
        ends = torch.randint(1, length - 1, (batch_size,), generator=generator).tolist()
        for i, end in enumerate(ends):
            text[i, 0], text[i, end] = tok.special_tokens["bos"], tok.special_tokens["eos"]
            text[i, 1:end] = torch.randint(len(tok.special_tokens), tok.vocab_size, (end - 1,), generator=generator)
        codes = torch.randint(0, self.codebook_size, (batch_size, *self.grid), generator=generator)  # (B, h, w)
        return text, codes

    # -- model folders ----------------------------------------------------------------------------
    def save_extras(self, directory: Path) -> None:
        """The BPE (tokenizer.json); the frozen image tokenizer is a part, saved in ``tokenizer/``."""
        self.text_tokenizer.save(directory)

    def load_extras(self, directory: Path) -> None:
        """Swap in the folder's BPE."""
        from polymodal.data.tokenizers import load_tokenizer

        self.set_text_tokenizer(load_tokenizer(directory))

    def card_lines(self) -> list[str]:
        """Architecture, stream layout, attention schedule and the tokenizer's source."""
        c = self.config
        return [
            f"DALL·E: width {c.dim}, depth {c.depth}, {c.heads} heads; stream of {c.text_length} text tokens "
            f"(BPE, {c.text_vocab} ids, unique pad per position) then {self.grid[0]}×{self.grid[1]} image tokens "
            f"({self.codebook_size} codes); image attention per layer: {', '.join(c.schedule)}; loss weights "
            f"text {c.text_loss_weight:g} / image {1 - c.text_loss_weight:g}; caption dropout {c.caption_dropout:g}.",
            "",
            f"Image tokenizer: {self.part_sources['tokenizer']} (frozen, saved in `tokenizer/`).",
            "",
            f"Data: {c.data or 'unspecified'}.",
            "",
        ]
