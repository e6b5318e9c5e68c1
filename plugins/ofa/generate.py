"""OFA's inference: every task is the encoder reading [image][instruction] once and the decoder writing the answer
with the core's beam search (or sampling, for image codes), its vocabulary narrowed to what the task may write:
text without location tokens for captions, a :class:`~polymodal.generation.TokenTrie` over the candidate answers for
VQA, region questions and classification, four location tokens for grounding, image codes for text-to-image and
infilling. The decoder's cross-attention keys and values are computed once per generation (the KV cache's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polymodal.data.boxes import bins_to_box, check_boxes
from polymodal.generation import TokenTrie
from polymodal.generation.beam import beam_search
from polymodal.generation.sampling import generate

from . import vocab as V
from .tasks import box_bins, pad_rows


class GenerateMixin:
    """Task-level inference for :class:`~polymodal.plugins.ofa.model.OFA` (uses its ``encode``/``decode``)."""

    def step_fn(self, states: Tensor, real: Tensor):
        """``step(ids, cache) -> logits`` for the core's generation loops over encoder ``states`` (B, N, D)."""

        def step(ids: Tensor, cache: Any) -> Tensor:
            return self.decode(ids, states, real, cache=cache)  # (B, n, V)

        return step

    def instruction_ids(self, instructions: Sequence[str | list[int]]) -> Tensor:
        """Instructions (text, or ids with location tokens) → ids (B, L), padded (``encode`` checks their length)."""
        rows = [self.vocab.text(t) if isinstance(t, str) else list(t) for t in instructions]
        return pad_rows(rows, self.vocab.pad)

    @torch.no_grad()
    def run(
        self,
        images: Tensor | None,
        instructions: Sequence[str | list[int]],
        *,
        kind: str = "text",
        candidates: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        beams: int | None = None,
        sample: bool = False,
        seed: int = 0,
    ) -> list[list[int]]:
        """The generated ids (eos and padding dropped) per instruction. ``kind`` narrows the vocabulary ('text',
        'bin', 'code'); ``candidates`` narrows text to those answers (a trie); ``sample`` draws image codes with the
        config's temperature and top-k instead of searching."""
        beams = self.config.beams if beams is None else beams
        if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
            raise ValueError(f"OFA beams: expected an integer >= 1; got {beams!r}")
        was = self.training
        self.eval()
        try:
            states, real = self.encode(images, self.instruction_ids(instructions))  # (B, N, D), (B, N)
            b, v = states.shape[0], self.vocab.size
            prompt = torch.full((b, 1), self.vocab.bos, dtype=torch.long, device=states.device)  # (B, 1)
            limit = max_new_tokens or self.config.max_target
            if candidates is not None:
                trie = TokenTrie([self.vocab.text(c) for c in candidates], self.vocab.eos)
                allowed: Any = trie.mask_fn(1, v)
                limit = min(limit, max(len(self.vocab.text(c)) for c in candidates) + 1)
            else:
                allowed = self.vocab.kind_mask(kind, states.device)
                allowed[self.vocab.eos] = True
            if sample:
                g = torch.Generator(device=states.device).manual_seed(seed)
                top_k = self.config.image_top_k or None
                out = generate(
                    self.step_fn(states, real),
                    prompt,
                    limit,
                    temperature=self.config.image_temperature,
                    top_k=top_k,
                    generator=g,
                    allowed=allowed,
                    eos_id=self.vocab.eos,
                )
            else:
                k = beams
                step = self.step_fn(states.repeat_interleave(k, 0), real.repeat_interleave(k, 0))
                out, _ = beam_search(step, prompt, limit, beams=k, eos_id=self.vocab.eos, allowed=allowed)
        finally:
            self.train(was)
        rows = []
        for row in out[:, 1:].tolist():
            rows.append(row[: row.index(self.vocab.eos)] if self.vocab.eos in row else row)
        return rows

    # -- the tasks --------------------------------------------------------------------------------
    def caption(self, images: Tensor) -> list[str]:
        """A caption per image (B, 3, S, S): beam search over text tokens only (never a location token)."""
        return [self.vocab.decode_text(r) for r in self.run(images, [V.CAPTION] * len(images))]

    def ask(self, images: Tensor, questions: Sequence[str], candidates: Sequence[str] | None = None) -> list[str]:
        """Answers to ``questions`` about ``images``, open-ended or, with ``candidates``, one of them (a trie)."""
        rows = self.run(images, [" " + q.strip() for q in questions], candidates=candidates)
        return [self.vocab.decode_text(r) for r in rows]

    def ground(self, images: Tensor, texts: Sequence[str]) -> tuple[Tensor, list[bool]]:
        """The box (B, 4) in pixels of the region each text describes, and whether the decoder wrote exactly four
        location tokens with x0 < x1 and y0 < y1 (a row that did not is reported, its box all zeros)."""
        rows = self.run(images, [V.GROUND.format(text=t) for t in texts], kind="bin", max_new_tokens=5)
        boxes, ok = torch.zeros(len(rows), 4), []
        for i, row in enumerate(rows):
            bins = [t - self.vocab.bin_offset for t in row]
            good = len(bins) == 4 and all(0 <= x < self.vocab.bins for x in bins)
            if good:
                box = bins_to_box(torch.tensor([bins]), self.config.image_size, self.vocab.bins)[0]
                good = bool(box[0] < box[2] and box[1] < box[3])
                boxes[i] = box if good else 0
            ok.append(good)
        return boxes, ok

    def region_question(self, images: Tensor, boxes: Tensor, attribute: str, candidates: Sequence[str]) -> list[str]:
        """The ``attribute`` ('colour' or 'kind') of the object in each pixel box (B, 4), one of ``candidates``."""
        if attribute not in V.REGION_ATTRIBUTES:
            raise ValueError(f"attribute must be one of {tuple(V.REGION_ATTRIBUTES)}; got {attribute!r}")
        b = check_boxes(torch.as_tensor(boxes), self.config.image_size, "region")
        instr = [
            self.vocab.text(V.REGION.format(attribute=V.REGION_ATTRIBUTES[attribute]))
            + box_bins(tuple(x.tolist()), self.vocab, self.config.image_size)
            for x in b
        ]
        return [self.vocab.decode_text(r) for r in self.run(images, instr, candidates=candidates)]

    def classify_text(self, sentences: Sequence[str], candidates: Sequence[str]) -> list[str]:
        """The digit word each sentence names, one of ``candidates`` (text only: no image)."""
        rows = self.run(None, [V.CLASSIFY.format(text=s) for s in sentences], candidates=candidates)
        return [self.vocab.decode_text(r) for r in rows]

    def code_images(self, rows: list[list[int]], region: tuple[int, int] | None = None, base: Tensor | None = None):
        """Generated code ids → images through the VQ decoder: whole grids, or the middle ``region`` (h, w) of
        ``base``'s codes. A row of the wrong length keeps code 0 where it wrote nothing."""
        h, w = self.code_grid
        if region is None:
            codes = torch.zeros(len(rows), h, w, dtype=torch.long)
            size = h * w
        else:
            codes = self.vq.encode(base.to(self.image_pos.device)).cpu()  # (B, h, w)
            size = region[0] * region[1]
        for i, row in enumerate(rows):
            ids = torch.tensor([t - self.vocab.code_offset for t in row[:size]], dtype=torch.long)
            flat = torch.zeros(size, dtype=torch.long)
            flat[: len(ids)] = ids.clamp(0, self.vocab.codes - 1)
            if region is None:
                codes[i] = flat.view(h, w)
            else:
                codes[i, h // 4 : h // 4 + region[0], w // 4 : w // 4 + region[1]] = flat.view(*region)
        return self.vq.decode(codes.to(self.image_pos.device)).clamp(0, 1).cpu()  # (B, C, S, S)

    def text_to_image(self, captions: Sequence[str], seed: int = 0) -> Tensor:
        """Images (B, C, S, S) in [0, 1] drawn for ``captions`` (image codes sampled, then the VQ decoder)."""
        h, w = self.code_grid
        rows = self.run(
            None,
            [V.TEXT_TO_IMAGE.format(caption=c) for c in captions],
            kind="code",
            sample=True,
            seed=seed,
            max_new_tokens=h * w + 1,
        )
        return self.code_images(rows)

    def infill(self, images: Tensor, seed: int = 0) -> Tensor:
        """``images`` with the middle half of their code grid drawn anew from the rest (OFA's image infilling)."""
        from .tasks import mask_middle

        h, w = self.code_grid
        region = (h - 2 * (h // 4), w - 2 * (w // 4))
        rows = self.run(
            mask_middle(images),
            [V.INFILL] * len(images),
            kind="code",
            sample=True,
            seed=seed,
            max_new_tokens=region[0] * region[1] + 1,
        )
        return self.code_images(rows, region, images)


__all__ = ["GenerateMixin"]
