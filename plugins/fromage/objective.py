"""FROMAGe's training side: template captions, the three losses and the contrastive groups.

Loss = captioning cross-entropy (caption tokens and end-of-text after the image prefix; [RET] with
``caption_ret``)
+ ``retrieval_weight`` · two-way InfoNCE of [RET] queries (the text read alone) against images
+ ``emission_weight`` · cross-entropy of [RET] after the text read alone.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from polymodal.data.augment import resize
from polymodal.data.text import NOUNS
from polymodal.nn.collectives import gather, gather_with_grad, is_distributed
from polymodal.objectives import cross_entropy

from .config import fill_template


def encode_captions(tokenizer: Any, texts: list[str], room: int, ret_id: int, length: int | None = None) -> Tensor:
    """``bos text [RET]`` per text (text cut to ``room`` tokens with bos), right-padded with the pad id to the
    longest (or ``length``): (B, T) long."""
    rows = [tokenizer.encode(t, add_bos=True, add_eos=False)[:room] + [ret_id] for t in texts]
    out = torch.full((len(rows), max(length or 0, *map(len, rows))), tokenizer.special_tokens["pad"], dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out  # (B, T)


def captions_for(
    batch: dict[str, Any], templates: tuple[str, ...], generator: torch.Generator | None = None
) -> list[str]:
    """A caption per image from ``templates`` (a template and a noun drawn per sample); the batch's own without labels."""
    if "label" not in batch:
        return list(batch["caption"])
    labels = batch["label"].tolist()
    picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    nouns = torch.randint(len(NOUNS), (len(labels),), generator=generator).tolist()
    return [fill_template(templates[p], y, NOUNS[n]) for p, y, n in zip(picks, labels, nouns)]


def check_batch(batch: dict[str, Any]) -> None:
    """ValueError unless the batch holds one label (or caption) per image."""
    what = "label" if "label" in batch else "caption"
    if len(batch[what]) != len(batch["image"]):
        raise ValueError(
            f"the batch must hold one {what} per image; got {len(batch['image'])} image(s) and "
            f"{len(batch[what])} {what}(s)"
        )


class FromageCollate:
    """``collate(batch, step) -> batch`` for FROMAGe training: ``caption_ids`` (B, T), the captioning
    captions (``bos caption [RET]``, [RET] turned into end-of-text without ``caption_ret``), and
    ``retrieval_ids`` (B, T'), the retrieval captions, both drawn from torch's global generator in
    :meth:`FromageTraining.loss`'s order. Holds the config and the LM's tokenizer only (it pickles)."""

    def __init__(self, config: Any, tokenizer: Any, max_len: int, ret_id: int) -> None:
        self.config, self.tokenizer, self.max_len, self.ret_id = config, tokenizer, max_len, ret_id

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch of global step ``step`` (unused: no curriculum) with both captions' ids."""
        c, tok = self.config, self.tokenizer
        check_batch(batch)
        room = self.max_len - c.prefix_tokens - 1
        ids = encode_captions(tok, captions_for(batch, c.templates), room, self.ret_id)  # (B, T)
        if not c.caption_ret:  # FROMAGe: no [RET] in captioning; a caption ends as the LM's sentences do
            ids = ids.masked_fill(ids == self.ret_id, tok.special_tokens["eos"])  # (B, T)
        retrieval = encode_captions(tok, captions_for(batch, c.retrieval_templates or c.templates), room, self.ret_id)
        out = copy.copy(batch)  # a Batch stays a Batch (its missing-field errors name the dataset)
        out.update(caption_ids=ids, retrieval_ids=retrieval)
        return out


class FromageTraining:
    """Mixin of :class:`~polymodal.plugins.fromage.model.Fromage`: captions, ``loss`` and example batches."""

    def encode_captions(self, texts: list[str], length: int | None = None) -> Tensor:
        """``bos text [RET]`` per text, right-padded with the LM's pad id to the longest (or ``length``): (B, T) long."""
        return encode_captions(
            self.tokenizer, texts, self.lm.max_len - self.config.prefix_tokens - 1, self.ret_id, length
        )

    def captions_for(
        self, batch: dict[str, Any], generator: torch.Generator | None = None, templates: tuple[str, ...] | None = None
    ) -> list[str]:
        """A caption per image from ``templates`` (default: the captioning ones); the batch's own without labels."""
        return captions_for(batch, templates or self.config.templates, generator)

    def collator(self) -> FromageCollate:
        """The captioning and retrieval captions of a training batch, tokenised."""
        return FromageCollate(self.config, self.tokenizer, self.lm.max_len, self.ret_id)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Captioning cross-entropy (caption tokens and [RET]) + ``retrieval_weight`` · two-way InfoNCE
        + ``emission_weight`` · cross-entropy of [RET] after the text read alone."""
        if "caption_ids" not in batch:  # a raw batch: the collator's work, drawing in its order
            batch = self.collator()(batch, self.train_step)
        images = resize(batch["image"].float(), self.vision.config.vision.image_size)  # (B, C, S, S) for the CLIP
        ids = batch["caption_ids"].to(self.ret_token_embed.device)  # (B, T)
        logits = self.caption_logits(images, ids)  # (B, k+T, V+1)
        k = self.config.prefix_tokens
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == self.tokenizer.special_tokens["pad"], -100)  # (B, T-1)
        ce, m = cross_entropy(
            logits[:, k:-1], targets
        )  # position k (last prefix / bos) predicts the first caption token
        text, emit = self.text_embeddings(batch["retrieval_ids"].to(ids.device), with_emission=True)  # (B, S), (B, V+1)
        ret = torch.full((len(ids),), self.ret_id, device=emit.device)  # (B,)
        emission, em = cross_entropy(emit, ret)  # the text alone ends in [RET] too
        image = self.image_embeddings(images)  # (B, S)
        nce, cm = self.retrieval_loss(batch, image, text)
        metrics = {
            "caption_loss": ce.detach(),
            "caption_token_accuracy": m["accuracy"],
            "retrieval_loss": nce.detach(),
            "emission_loss": emission.detach(),
            "ret_emission_accuracy": em["accuracy"],
            "accuracy_t2i": cm["accuracy_t2i"],
            "logit_scale": cm["logit_scale"],
        }
        return ce + self.config.retrieval_weight * nce + self.config.emission_weight * emission, metrics

    def retrieval_loss(self, batch: dict[str, Any], image: Tensor, text: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Mean InfoNCE over the contrastive groups of image (B, S) and [RET] text (B, S) embeddings, and the
        first group's metrics.

        Training on several ranks, the embeddings are gathered with gradients and the labels without
        (:mod:`polymodal.nn.collectives`), so the groups and negatives are those of the global batch and
        every rank computes the global loss; the gathers' backward sums the ranks' gradients into each
        owner, so the rank-averaged gradients are the one-process gradients on the global batch.
        Identical to the local loss in one process.
        """
        if self.training and is_distributed():
            image, text = gather_with_grad(image), gather_with_grad(text)  # (W·B, S), (W·B, S)
            batch = {"label": gather(batch["label"])} if "label" in batch else {}  # (W·B,)
        terms = [self.contrastive(image[g], text[g]) for g in self.contrastive_groups(batch, len(image))]
        return torch.stack([t[0] for t in terms]).mean(), terms[0][1]

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
