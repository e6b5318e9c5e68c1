"""CLIP (Radford et al., 2021): an image tower and a text tower trained with symmetric InfoNCE.

Image tower: the core ViT encoder (``ln_pre``, bias-free patch conv), final norm, the [CLS]
token, a bias-free projection to ``embed_dim``. Text tower: the core causal text encoder,
final norm, pooled at the end-of-text token, a bias-free projection. The end-of-text
position of a row is the *first* occurrence of ``eos_id`` (as transformers does); with
``eos_id=None`` it is the position of the largest id (OpenAI's original rule, where the
end-of-text token has the highest id). The learnable log logit scale starts at
``ln(1/0.07)`` and never exceeds ``ln(100)``: it is clamped in every forward and loss call,
and in place after every optimiser step through :meth:`CLIPModel.after_step`, which the
core trainer calls.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models import PolymodalModel, interfaces
from polymodal.nn.grid import fit_encoder
from polymodal.objectives import info_nce, retrieval_accuracies, similarity_logits

from . import captions as cap
from .collate import CLIPCollate, prepare_images, tokenize_texts
from .config import CLIPConfig
from .objective import multi_positive_info_nce
from .towers import CLIPTextual, CLIPVisual


class CLIPModel(PolymodalModel):
    """Images (B, C, S, S) and ids (B, L) → (normalised image emb, normalised text emb, scale (B,))."""

    family = "clip"
    progress_metrics = ("accuracy_i2t", "logit_scale")
    image_fields = "config.vision"  # image_size and channels: what preprocess() prepares
    implements = (interfaces.ImageEncoder, interfaces.TextEncoder, interfaces.TextTokenEncoder)
    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self.visual = CLIPVisual(config.vision, config.embed_dim)
        self.textual = CLIPTextual(config.text, config.embed_dim, config.eos_id)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.max_log_scale = math.log(config.max_logit_scale)
        self.tokenizer = cap.caption_tokenizer(config.text.vocab_size) if config.tokenizer == "captions" else None
        if (
            self.tokenizer is not None
            and config.eos_id is not None
            and self.tokenizer.special_tokens["eos"] != config.eos_id
        ):
            raise ValueError(
                f"the caption tokenizer's end-of-text id is {self.tokenizer.special_tokens['eos']}, "
                f"but CLIPConfig.eos_id is {config.eos_id}"
            )

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: CLIPConfig, dataset: Any, fixed: Collection[str] = ()) -> CLIPConfig:
        """Channels, image size (the patch grid keeps about the variant's patches per side, printed;
        not with ``vision.image_size`` in ``fixed``), templates, class names and the caption re-sampler
        from the dataset's meta."""
        meta = dataset.meta
        vision, line = fit_encoder(config.vision, meta, family="clip", key="vision", fixed=fixed)
        if line:
            print(line)
        vision = attrs.evolve(vision, channels=meta.get("channels", config.vision.channels))
        captioner = "none"
        if dataset.name == "shapes" and meta.get("templates"):
            captioner = "shapes"
        elif meta.get("templates") and meta.get("class_names") and "label" in dataset.train:
            captioner = "label"
        return attrs.evolve(
            config,
            vision=vision,
            captioner=captioner,
            data=dataset.name,
            templates=tuple(meta.get("templates", ())),
            heldout_templates=tuple(meta.get("heldout_templates", ())),
            class_names=tuple(meta.get("class_names", ())),
        )

    @classmethod
    def tiny_config(cls, config: CLIPConfig) -> CLIPConfig:
        """The same architecture at toy size (contract tests)."""
        v = config.vision
        vision = attrs.evolve(v.with_block(dim=16, heads=2), depth=1, image_size=min(v.image_size, 2 * v.patch_size))
        text = attrs.evolve(config.text.with_block(dim=16, heads=2), depth=1)
        return attrs.evolve(config, vision=vision, text=text, embed_dim=16)

    # -- the API ----------------------------------------------------------------------------------
    def after_step(self) -> None:
        """Called by the trainer after every optimiser step: keep the logit scale ≤ max_logit_scale."""
        self.clamp_logit_scale_()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log logit scale in place to [0, ln(max_logit_scale)] (only when outside)."""
        value = float(self.logit_scale)
        if value > self.max_log_scale or value < 0.0:
            self.logit_scale.clamp_(0.0, self.max_log_scale)

    def scale(self) -> Tensor:
        """The multiplier exp(s), s clamped to at most ln(max_logit_scale)."""
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()

    def tokenize(self, texts: list[str] | str, truncate: bool = False) -> Tensor:
        """LongTensor (B, L) of ``[bos] text [eos] pad…``, L = the longest row (at most the context length).

        A text longer than the context raises ValueError (length and limit) unless ``truncate``;
        truncation always keeps the end-of-text token.
        """
        return tokenize_texts(self.tokenizer, self.config.text.context_length, texts, truncate)  # (B, L)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, C, S, S) → (B, E) unnormalised (like transformers' ``get_image_features``)."""
        return self.visual(pixels)

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """(B, L) → (B, E) unnormalised (like transformers' ``get_text_features``)."""
        return self.textual(token_ids.to(self.logit_scale.device))

    def encode_text_tokens(self, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) → per-token text features (B, L, D), final-normed, and their mask (B, L), True up to and
        including end-of-text: what unCLIP's prior and decoder cross-attend to (transformers' ``last_hidden_state``)."""
        return self.textual.tokens(token_ids.to(self.logit_scale.device))

    def encode_text_and_tokens(self, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L) → :meth:`encode_text`'s (B, E) and :meth:`encode_text_tokens`' (B, L, D), (B, L) from one pass."""
        tokens, mask = self.encode_text_tokens(token_ids)  # (B, L, D), (B, L)
        return self.textual.pool(tokens, mask), tokens, mask

    def forward(self, pixels: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image (B, E) and text (B', E) embeddings and the scale repeated per image (B,)."""
        self.clamp_logit_scale_()
        image = F.normalize(self.encode_image(pixels), dim=-1)  # (B, E)
        text = F.normalize(self.encode_text(ids), dim=-1)  # (B', E)
        return image, text, self.scale().expand(image.shape[0])

    # -- training and evaluation ------------------------------------------------------------------
    def prepare(self, images: Tensor) -> Tensor:
        """Resize to the tower's size and cast to float; grey images feed an RGB tower as three equal channels."""
        return prepare_images(images, self.config.vision.image_size, self.config.vision.channels)

    def collator(self) -> CLIPCollate | None:
        """Pixels, re-sampled caption views and their token ids for a training batch (None without a tokenizer)."""
        return CLIPCollate(self.config, self.tokenizer) if self.tokenizer is not None else None

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Symmetric InfoNCE of ``batch['image']`` against captions (re-sampled per step when training).

        With several caption views (shapes) the loss is the mean of one term per view; a view
        with positives uses the multi-positive InfoNCE of :mod:`.objective`. A batch from
        :meth:`collator` brings its pixels and views (``pixels``, ``text_ids``, ``positives``). In
        training the negatives are every rank's batch (features gathered with gradients; identical in
        one process); the logged accuracies are this rank's; metrics are 0-dim tensors.
        """
        self.clamp_logit_scale_()
        if "text_ids" not in batch:  # a raw batch: do the collator's work here, drawing in its order
            if self.training:
                batch = CLIPCollate(self.config, self.tokenizer)(batch, self.train_step)
            else:
                batch = {**batch, "pixels": self.prepare(batch["image"])}
                batch |= {"text_ids": [self.tokenize(list(batch["caption"]), truncate=True)], "positives": [None]}
        image = self.encode_image(batch["pixels"].to(self.logit_scale.device))  # (B, E)
        scale = self.scale()
        losses, embeddings = [], []
        for ids, positives in zip(batch["text_ids"], batch["positives"]):
            text = self.encode_text(ids)  # (B, E)
            losses.append(  # negatives from every rank's batch when training on several (identical in one)
                info_nce(image, text, scale, gather=self.training)
                if positives is None
                else multi_positive_info_nce(image, text, scale, positives, gather=self.training)
            )
            embeddings.append(text)
        text = embeddings[0]  # (B, E) the first view's captions give the logged retrieval accuracies
        loss = torch.stack(losses).mean()
        with torch.no_grad():
            logits = similarity_logits(image, text, scale)  # (B, B)
        return loss, {**retrieval_accuracies(logits), "logit_scale": scale.detach()}

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, Any]:
        """Zero-shot accuracy (training and held-out templates) and retrieval R@1/R@5; see ``zeroshot``."""
        from .zeroshot import evaluate_clip

        return evaluate_clip(self, dataset, split)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random images and ids whose rows each hold one end-of-text token (then padding)."""
        (pixels,) = self.visual.encoder.example_inputs(batch_size, generator)
        t = self.config.text
        length = min(8, t.context_length)
        ids = torch.randint(3, t.vocab_size, (batch_size, length), generator=generator)  # (B, L)
        if self.config.eos_id is not None:
            ids[ids == self.config.eos_id] = 3 if self.config.eos_id != 3 else 4
            ends = torch.randint(1, length, (batch_size,), generator=generator)  # (B,)
            for i, end in enumerate(ends.tolist()):
                ids[i, end] = self.config.eos_id
        return pixels, ids

    # -- model folders ----------------------------------------------------------------------------
    def save_extras(self, directory) -> None:
        """The tokenizer (``tokenizer.json`` + ``polymodal_tokenizer.json``)."""
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def load_extras(self, directory) -> None:
        """The saved tokenizer, when there is one."""
        from polymodal.data.tokenizers import load_tokenizer

        if (directory / "tokenizer.json").exists():
            self.tokenizer = load_tokenizer(directory)

    def card_lines(self) -> list[str]:
        """Architecture, data and templates for the model card."""
        c, v, t = self.config, self.config.vision, self.config.text
        lines = [
            f"CLIP: image tower ViT {v.image_size}×{v.image_size}×{v.channels}, patch {v.patch_size}, width {v.dim}, "
            f"depth {v.depth}, {v.block.heads} heads, {v.block.act}; text tower width {t.dim}, depth {t.depth}, "
            f"{t.block.heads} heads, context {t.context_length}, vocabulary {t.vocab_size}, {t.block.act}; "
            f"shared embedding {c.embed_dim}.",
            f"Data: {c.data or 'unspecified'}; captions re-sampled per step: {c.captioner}.",
            "",
        ]
        lines += cap.describe(c)
        if c.templates:
            lines += ["Training templates: " + "; ".join(f"`{x}`" for x in c.templates), ""]
        if c.heldout_templates:
            lines += ["Held-out templates (evaluation only): " + "; ".join(f"`{x}`" for x in c.heldout_templates), ""]
        return lines
