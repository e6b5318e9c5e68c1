"""RuDolph's stream and its trunk: positions, id checks, per-layer masks, the core decoder, codes and text contexts.

:class:`RudolphStream` is the half of :class:`~polymodal.plugins.rudolph.model.RuDolph` that builds the id
stream ``[left text][image][right text]`` (text contexts, image codes) and runs it: each position's
embedding, each layer's causal sparse mask rows, and :attr:`RudolphStream.decoder`, the core
:class:`~polymodal.generation.decoder.CausalDecoder` over the model's embeddings, stack and head that the
forward pass, generation and scoring go through.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.generation.decoder import CausalDecoder

from . import text as tx
from .collate import check_images, text_parts


class RudolphStream:
    """Mixin of :class:`~polymodal.plugins.rudolph.model.RuDolph`: its stream and the causal decoder that runs it
    (uses the model's ``config``, ``text``, ``vq``, ``grid``, buffers and modules)."""

    # -- the stream -------------------------------------------------------------------------------
    def positions(self) -> Tensor:
        """(N, D) position embeddings: left text, image rows + columns (raster order), right text."""
        image = (self.row_pos_embed[:, None] + self.col_pos_embed[None, :]).flatten(0, 1)  # (h·w, D)
        return torch.cat([self.left_pos_embed, image, self.right_pos_embed])  # (N, D)

    def check_ids(self, ids: Tensor, start: int = 0) -> None:
        """ValueError unless ``ids`` (B, n) fit the stream from ``start`` and each part holds its own kind of id."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected integer token ids (B, n); got {got}")
        n = ids.shape[1]
        if start + n > self.seq_len:
            raise ValueError(
                f"the stream holds {self.seq_len} tokens (left {self.config.left_len} + image "
                f"{self.image_len} + right {self.config.right_len}); got {n} tokens from position {start}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}); got ids in [{int(ids.min())}, {int(ids.max())}]"
            )
        ok = self.vocab_masks[self.segments[start : start + n]]  # (n, V)
        ok[:, tx.conditions(self.text)] = self.segments[start : start + n, None] != 1  # pad/task tokens only in text
        bad = ~ok.gather(1, ids.t().clamp(0, self.vocab_size - 1)).t()  # (B, n)
        if bad.any():
            b, p = (int(i) for i in bad.nonzero()[0])
            part = ("left text", "image", "right text")[int(self.segments[start + p])]
            takes = (
                f"image codes as ids [{self.config.text_vocab_size}, {self.vocab_size})"
                if part == "image"
                else f"text ids [0, {self.text.vocab_size})"
            )
            raise ValueError(
                f"position {start + p} is in the {part}, which takes {takes}; row {b} holds id {int(ids[b, p])}"
            )

    def position_rows(self, pos: Tensor) -> Tensor:
        """(n, D) the position embeddings of the stream positions ``pos`` (n,)."""
        return self.positions()[pos]

    def decoder_masks(self, pos: Tensor, keys: int) -> list[Tensor]:
        """Per layer, the rows ``pos`` (n,) and keys ``:keys`` of its causal sparse pattern (n, keys)."""
        return list(self.layer_masks[:, pos, :keys])  # depth × (n, keys)

    @property
    def decoder(self) -> CausalDecoder:
        """The core causal decoder over this model's embeddings, stack, head and per-layer masks (no weights of
        its own, so the state-dict keys are unchanged): the trunk of :meth:`forward` and of every task."""
        dec = self.__dict__.get("_decoder")
        if dec is None:
            dec = self.__dict__["_decoder"] = CausalDecoder(
                self.stack,
                tokens=self.token_embed,
                positions=self.position_rows,
                head=self.head,
                max_len=self.seq_len,
                masks=self.decoder_masks,
                owner=self,
            )
        return dec

    # -- images and codes -------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        """ValueError naming the expected shape unless ``images`` is (B, C, S, S) float for the tokenizer."""
        check_images(images, self.vq.config.channels, self.vq.config.image_size)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) → codes (B, h, w) from the frozen tokenizer."""
        self.check_images(images)
        return self.vq.encode(images.to(self.layer_masks.device).float())

    def check_codes(self, codes: Tensor) -> None:
        """ValueError unless ``codes`` is (B, h, w) integer in ``[0, codebook_size)``."""
        h, w = self.grid
        if (
            not isinstance(codes, Tensor)
            or codes.dim() != 3
            or tuple(codes.shape[1:]) != (h, w)
            or codes.is_floating_point()
        ):
            got = f"{tuple(codes.shape)} {codes.dtype}" if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"expected integer codes (B, {h}, {w}); got {got}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"code ids must be in [0, {self.codebook_size}) (the codebook); got ids in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) → stream ids (B, h·w)."""
        self.check_codes(codes)
        return codes.flatten(1).long().to(self.layer_masks.device) + self.config.text_vocab_size  # (B, h·w)

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """Stream ids of the image part (B, h·w) → codes (B, h, w)."""
        return (ids - self.config.text_vocab_size).view(-1, *self.grid)  # (B, h, w)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) → images (B, C, S, S) in [0, 1]."""
        self.check_codes(codes)
        return self.vq.decode(codes.long()).clamp(0, 1)

    # -- text contexts ----------------------------------------------------------------------------
    def left_text(self, texts: list[str], task: str = "lt_t2i") -> Tensor:
        """(B, left_len) left context; ``task`` 'lt_t2i' (a prompt) or 'lt_i2t' (texts must be empty)."""
        return tx.text_context(self.text, texts, self.config.left_len, task, what="prompt").to(self.layer_masks.device)

    def right_text(self, texts: list[str], task: str = "rt_i2t", truncate: bool = False) -> Tensor:
        """(B, right_len) right context ``[rt_i2t] caption [eos] pad…`` ('pad' task: all padding)."""
        return tx.text_context(self.text, texts, self.config.right_len, task, what="caption", truncate=truncate).to(
            self.layer_masks.device
        )

    def stream(self, captions: list[str], codes: Tensor, t2i: Tensor, truncate: bool = False) -> Tensor:
        """(B, N) training/scoring stream: row i in the text→image layout where ``t2i[i]``, else image→text.

        ``truncate`` cuts captions longer than a context (training on a dataset's own captions).
        """
        left, right = text_parts(self.text, self.config, captions, t2i, truncate)  # (B, L), (B, R)
        dev = self.layer_masks.device
        return torch.cat([left.to(dev), self.codes_to_ids(codes), right.to(dev)], dim=1)  # (B, N)

    def targets(self, ids: Tensor) -> Tensor:
        """Next-token targets (B, N - 1): pad, bos and task tokens are conditions, so ignored."""
        tgt = ids[:, 1:].clone()  # (B, N-1)
        tgt[torch.isin(tgt, torch.tensor(tx.conditions(self.text), device=ids.device))] = tx.IGNORE
        return tgt


__all__ = ["RudolphStream"]
