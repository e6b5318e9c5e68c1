"""FROMAGe's training side: template captions, the three losses and the contrastive groups.

Loss = captioning cross-entropy (caption tokens and end-of-text after the image prefix; [RET] with
``caption_ret``)
+ ``retrieval_weight`` · two-way InfoNCE of [RET] queries (the text read alone) against images
+ ``emission_weight`` · cross-entropy of [RET] after the text read alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polymodal.data.augment import resize
from polymodal.data.text import NOUNS
from polymodal.objectives import cross_entropy

from .config import fill_template


class FromageTraining:
    """Mixin of :class:`~polymodal.plugins.fromage.model.Fromage`: captions, ``loss`` and example batches."""

    def encode_captions(self, texts: list[str], length: int | None = None) -> Tensor:
        """``bos text [RET]`` per text, right-padded with the LM's pad id to the longest (or ``length``): (B, T) long."""
        tok = self.tokenizer
        room = self.lm.max_len - self.config.prefix_tokens - 1
        rows = [tok.encode(t, add_bos=True, add_eos=False)[:room] + [self.ret_id] for t in texts]
        out = torch.full((len(rows), max(length or 0, *map(len, rows))), tok.special_tokens["pad"], dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out  # (B, T)

    def captions_for(
        self, batch: dict[str, Any], generator: torch.Generator | None = None, templates: tuple[str, ...] | None = None
    ) -> list[str]:
        """A caption per image from ``templates`` (default: the captioning ones); the batch's own without labels."""
        if "label" not in batch:
            return list(batch["caption"])
        t = templates or self.config.templates
        labels = batch["label"].tolist()
        picks = torch.randint(len(t), (len(labels),), generator=generator).tolist()
        nouns = torch.randint(len(NOUNS), (len(labels),), generator=generator).tolist()
        return [fill_template(t[p], y, NOUNS[n]) for p, y, n in zip(picks, labels, nouns)]

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Captioning cross-entropy (caption tokens and [RET]) + ``retrieval_weight`` · two-way InfoNCE
        + ``emission_weight`` · cross-entropy of [RET] after the text read alone."""
        images = resize(batch["image"].float(), self.vision.config.vision.image_size)  # (B, C, S, S) for the CLIP
        what = "label" if "label" in batch else "caption"
        if len(batch[what]) != len(images):
            raise ValueError(
                f"the batch must hold one {what} per image; got {len(images)} image(s) and {len(batch[what])} {what}(s)"
            )
        ids = self.encode_captions(self.captions_for(batch)).to(self.ret_token_embed.device)  # (B, T)
        if not self.config.caption_ret:  # FROMAGe: no [RET] in captioning; a caption ends as the LM's sentences do
            ids = ids.masked_fill(ids == self.ret_id, self.tokenizer.special_tokens["eos"])  # (B, T)
        logits = self.caption_logits(images, ids)  # (B, k+T, V+1)
        k = self.config.prefix_tokens
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == self.tokenizer.special_tokens["pad"], -100)  # (B, T-1)
        ce, m = cross_entropy(
            logits[:, k:-1], targets
        )  # position k (last prefix / bos) predicts the first caption token
        texts = self.captions_for(batch, templates=self.config.retrieval_templates)
        text, emit = self.text_embeddings(
            self.encode_captions(texts).to(ids.device), with_emission=True
        )  # (B, S), (B, V+1)
        ret = torch.full((len(texts),), self.ret_id, device=emit.device)  # (B,)
        emission, em = cross_entropy(emit, ret)  # the text alone ends in [RET] too
        image = self.image_embeddings(images)  # (B, S)
        terms = [self.contrastive(image[g], text[g]) for g in self.contrastive_groups(batch, len(texts))]
        nce, cm = torch.stack([t[0] for t in terms]).mean(), terms[0][1]
        metrics = {
            "caption_loss": ce.item(),
            "caption_token_accuracy": m["accuracy"],
            "retrieval_loss": nce.item(),
            "emission_loss": emission.item(),
            "ret_emission_accuracy": em["accuracy"],
            "accuracy_t2i": cm["accuracy_t2i"],
            "logit_scale": cm["logit_scale"],
        }
        return ce + self.config.retrieval_weight * nce + self.config.emission_weight * emission, metrics

    def contrastive_groups(self, batch: dict[str, Any], n: int) -> list[Tensor]:
        """Index groups of the batch for InfoNCE: with ``distinct_negatives`` and labels, the i-th image of each
        digit goes to group i, so no caption has an image of its own digit as a negative; else the whole batch."""
        if not self.config.distinct_negatives or "label" not in batch:
            return [torch.arange(n)]
        labels, seen, group = batch["label"].tolist(), {}, []
        for y in labels:
            group.append(seen.get(y, 0))
            seen[y] = group[-1] + 1
        g = torch.tensor(group)  # (B,)
        parts = [(g == i).nonzero().flatten() for i in range(int(g.max()) + 1)]
        return [p for p in parts if len(p) > 1] or [torch.arange(n)]

    def after_step(self) -> None:
        """Keep the InfoNCE logit scale within CLIP's bound."""
        self.contrastive.clamp_()

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random images and ids of template captions (``bos caption [RET]``, padded to 16 tokens)."""
        v = self.vision.config.vision
        images = torch.rand(batch_size, v.channels, v.image_size, v.image_size, generator=generator)
        labels = torch.randint(0, 10, (batch_size,), generator=generator)
        return images, self.encode_captions(self.captions_for({"label": labels}, generator), length=16)

    def example_batch(self, batch_size: int = 4, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A digits-like training batch at the CLIP tower's image size."""
        images, _ = self.example_inputs(batch_size, generator)
        return {"image": images, "label": torch.randint(0, 10, (batch_size,), generator=generator)}


__all__ = ["FromageTraining"]
