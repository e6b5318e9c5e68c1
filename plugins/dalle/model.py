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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.attention.masks import image_pattern_mask
from polymodal.models import PolymodalModel
from polymodal.models.interfaces import ImageTokenizer, require
from polymodal.models.parts import follow_data
from polymodal.nn import BlockConfig, KVCache, StackConfig, TransformerStack
from polymodal.nn.embed import init_weights
from polymodal.objectives import cross_entropy

from . import text as txt
from .config import DALLEConfig
from .sample import SAMPLE_OPTIONS


class DALLE(PolymodalModel):
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

    # -- text and image tokens --------------------------------------------------------------------
    def pad_ids(self) -> Tensor:
        """(L,) the unique pad id of each text position: ``text_vocab + i``."""
        return txt.pad_ids(self.config.text_vocab, self.config.text_length)

    def encode_text(self, texts: list[str] | str, truncate: bool = False) -> Tensor:
        """(B, L) text stream: ``bos``, caption, ``eos``, then the positions' unique pads.

        A text longer than L tokens raises a ValueError naming its length and the limit,
        unless ``truncate`` (which keeps ``eos``).
        """
        return txt.encode_texts(self.text_tokenizer, self.config, texts, truncate).to(self.head.weight.device)

    def empty_text(self, batch: int) -> Tensor:
        """(B, L) the unconditional text: ``bos`` then pads only."""
        return txt.empty_texts(self.text_tokenizer, self.config, batch).to(self.head.weight.device)  # (B, L)

    def collator(self) -> txt.DALLECollate:
        """Augmentation, caption re-sampling, tokenising and caption dropout of a training batch."""
        return txt.DALLECollate(self.config, self.text_tokenizer)

    def check_codes(self, codes: Tensor) -> None:
        """ValueError naming expected vs given unless ``codes`` is (B, h, w) integer in [0, codebook_size)."""
        h, w = self.grid
        if not isinstance(codes, Tensor) or codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"expected image codes (B, {h}, {w}); got {got}")
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"expected integer image codes; got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"image codes must lie in [0, {self.codebook_size}); got values in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )

    @torch.no_grad()
    def image_codes(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] → (B, h, w) codes of the frozen tokenizer (resized to its size)."""
        vq_cfg = self.vq.config
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != vq_cfg.channels:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images (B, {vq_cfg.channels}, H, W); got {got}")
        images = images.float().to(self.head.weight.device)
        if images.shape[-2:] != (vq_cfg.image_size, vq_cfg.image_size):
            images = F.interpolate(images, size=(vq_cfg.image_size,) * 2, mode="bilinear", align_corners=False)
        return self.vq.encode(images).long()  # (B, h, w)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, h, w) codes → (B, C, S, S) images in [0, 1] at the data's native size."""
        self.check_codes(codes)
        images = self.vq.decode(codes.to(self.head.weight.device)).clamp(0, 1)  # (B, C, S', S')
        size = self.config.image_size or images.shape[-1]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        return images

    def check_text(self, text: Any) -> None:
        """ValueError naming expected vs given unless ``text`` is an integer (B, L) text stream."""
        length = self.config.text_length
        if not isinstance(text, Tensor) or text.dim() != 2 or text.shape[1] != length:
            got = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"expected text ids (B, {length}) (see encode_text); got {got}")
        if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
            raise ValueError(f"expected integer text ids; got dtype {text.dtype}")

    def stream(self, text: Tensor, codes: Tensor) -> Tensor:
        """(B, L + h·w) ids: the text stream (B, L), then the image codes (B, h, w) moved to their vocabulary slot.

        A ValueError names both batch sizes when the text and the image batch differ.
        """
        self.check_text(text)
        self.check_codes(codes)
        if text.shape[0] != codes.shape[0]:
            raise ValueError(
                f"the text and image batches must be the same size; got a batch of {text.shape[0]} text stream(s) "
                f"and a batch of {codes.shape[0]} image(s)"
            )
        return torch.cat([text, codes.flatten(1).to(text.device) + self.image_offset], dim=1)

    # -- the transformer --------------------------------------------------------------------------
    def positions(self) -> Tensor:
        """(L + h·w, D): text position embeddings, then row + column embeddings of each image token."""
        image = (self.row_pos[:, None] + self.col_pos[None]).reshape(self.num_image, -1)  # (h·w, D)
        return torch.cat([self.text_pos, image])

    def pattern_mask(self, pattern: str, device: torch.device) -> Tensor:
        """(T, T) bool mask of ``pattern`` over the whole stream (cached)."""
        key = (pattern, str(device))
        if key not in self._masks:
            self._masks[key] = image_pattern_mask(
                pattern, self.grid, prefix=self.config.text_length, kernel=self.config.conv_kernel, device=device
            )
        return self._masks[key]

    def layer_masks(self, start: int, end: int, device: torch.device) -> list[Tensor | None] | None:
        """Per layer, the rows ``start:end`` and keys ``:end`` of its pattern's mask (None: plain causal)."""
        schedule = self.config.schedule
        if all(p == "full" for p in schedule):
            return None
        return [None if p == "full" else self.pattern_mask(p, device)[start:end, :end] for p in schedule]

    def check_stream(self, ids: Tensor, start: int) -> None:
        """ValueError unless ``ids`` (B, n) fits the stream from position ``start`` with the right id kinds."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected integer token ids (B, n); got {got}")
        n = ids.shape[1]
        if start + n > self.seq_len:
            raise ValueError(
                f"the stream holds {self.seq_len} tokens (text {self.config.text_length} + image "
                f"{self.num_image}); got {n} tokens from position {start}"
            )
        pos = torch.arange(start, start + n, device=ids.device)  # (n,)
        image = pos >= self.config.text_length
        lo = torch.where(image, self.image_offset, 0)  # (n,)
        hi = torch.where(image, self.vocab_size, self.image_offset)
        bad = (ids < lo) | (ids >= hi)  # (B, n)
        if bad.any():
            b, j = bad.nonzero()[0].tolist()
            kind = "an image code" if image[j] else "a text id"
            raise ValueError(
                f"position {start + j} takes {kind} in [{int(lo[j])}, {int(hi[j])}); got id {int(ids[b, j])}"
            )

    def stream_logits(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits (B, n, V) for ``ids`` (B, n) that continue the stream after the ``cache``'s positions."""
        start = cache.length if cache is not None else 0
        self.check_stream(ids, start)
        n = ids.shape[1]
        x = self.token_embed(ids) + self.positions()[start : start + n]  # (B, n, D)
        x = self.stack(x, causal=True, mask=self.layer_masks(start, start + n, ids.device), cache=cache)  # (B, n, D)
        return self.head(x)  # (B, n, V)

    def next_is_image(self, positions: Tensor) -> Tensor:
        """Bool (n,): the token after each stream position is an image token."""
        return positions + 1 >= self.config.text_length

    def vocab_mask(self, positions: Tensor) -> Tensor:
        """(n, V) bool: the ids the token after each of ``positions`` may take (text or image codes)."""
        ids = torch.arange(self.vocab_size, device=positions.device)  # (V,)
        is_code = ids >= self.image_offset
        return torch.where(self.next_is_image(positions)[:, None], is_code[None], ~is_code[None])  # (n, V)

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
