"""DALL·E's token stream and its trunk: text and image tokens, stream checks, sparse masks and the core decoder.

:class:`DALLEStream` is the half of :class:`~polymodal.plugins.dalle.model.DALLE` that turns captions and
image codes into one id stream ``[text (L)][image (h·w)]`` and runs it: the stream's positions (text
positions, then row + column of each image token), each layer's sparse pattern rows, and
:attr:`DALLEStream.decoder`, the core :class:`~polymodal.generation.decoder.CausalDecoder` over the model's
embeddings, stack and head that :meth:`DALLEStream.stream_logits` and sampling go through.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.attention.masks import image_pattern_mask
from polymodal.generation.decoder import CausalDecoder
from polymodal.nn import KVCache

from . import text as txt


class DALLEStream:
    """Mixin of :class:`~polymodal.plugins.dalle.model.DALLE`: its stream of text and image tokens and the
    causal decoder that runs it (uses the model's ``config``, ``text_tokenizer``, ``vq``, ``grid`` and modules)."""

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
        return self.decoder_masks(torch.arange(start, end, device=device), end)

    def decoder_masks(self, pos: Tensor, keys: int) -> list[Tensor | None] | None:
        """Per layer, the rows ``pos`` (n,) and keys ``:keys`` of its pattern's mask (n, keys) (None: plain causal)."""
        schedule = self.config.schedule
        if all(p == "full" for p in schedule):
            return None
        return [None if p == "full" else self.pattern_mask(p, pos.device)[pos, :keys] for p in schedule]

    def position_rows(self, pos: Tensor) -> Tensor:
        """(n, D) the position embeddings of the stream positions ``pos`` (n,)."""
        return self.positions()[pos]

    @property
    def decoder(self) -> CausalDecoder:
        """The core causal decoder over this model's embeddings, stack, head and sparse masks (no weights of its
        own, so the state-dict keys are unchanged): the trunk of :meth:`stream_logits` and of sampling."""
        dec = self.__dict__.get("_decoder")
        if dec is None:
            sparse = any(p != "full" for p in self.config.schedule)
            dec = self.__dict__["_decoder"] = CausalDecoder(
                self.stack,
                tokens=self.token_embed,
                positions=self.position_rows,
                head=self.head,
                max_len=self.seq_len,
                masks=self.decoder_masks if sparse else None,
                owner=self,
            )
        return dec

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
        self.check_stream(ids, cache.length if cache is not None else 0)
        return self.decoder(ids, cache)  # (B, n, V)

    def next_is_image(self, positions: Tensor) -> Tensor:
        """Bool (n,): the token after each stream position is an image token."""
        return positions + 1 >= self.config.text_length

    def vocab_mask(self, positions: Tensor) -> Tensor:
        """(n, V) bool: the ids the token after each of ``positions`` may take (text or image codes)."""
        ids = torch.arange(self.vocab_size, device=positions.device)  # (V,)
        is_code = ids >= self.image_offset
        return torch.where(self.next_is_image(positions)[:, None], is_code[None], ~is_code[None])  # (n, V)


__all__ = ["DALLEStream"]
