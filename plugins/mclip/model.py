"""M-CLIP (Carlsson et al. 2022, "Cross-lingual and Multilingual CLIP"): a multilingual text tower for a CLIP.

A student text encoder — the core's bidirectional text trunk over a byte-level BPE learnt from the
multilingual training captions, mean-pooled over the real tokens, a linear head — is trained so that its
embedding of a caption in any language equals the frozen English CLIP's (the *teacher*'s) text embedding of
the English caption it translates (MSE, unnormalised: the student lives in the teacher's text-embedding
space, where unCLIP's prior reads it)::

    "красный круг в центре" ──student──▶ (B, E)  ≈  teacher.encode_text("a red circle in the center")

The model offers the text side of a CLIP (``tokenize``, ``encode_text``, ``encode_text_tokens``,
``encode_text_and_tokens``): the token features are the trunk's final hidden states (B, L, D) and their
mask, True for the real tokens (up to and including end-of-text). The teacher is a frozen part (saved in
``teacher/``); its text embeddings of the English captions are cached by caption string, since it never
changes. Evaluation (:mod:`.evaluate`) is per language on the evaluation-only template × language pairs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.data import languages as lang
from polymodal.data.folder import is_folder
from polymodal.models import PolymodalModel, interfaces
from polymodal.models.interfaces import ImageEncoder, TextEncoder, require
from polymodal.models.parts import load_part
from polymodal.nn.encoders import TextEncoder as TextTrunk
from polymodal.nn.encoders import masked_mean

from . import captions as cap
from .config import MCLIPConfig

EOS_ID = 1
"""End-of-text id of the caption tokenizer (bos 0, eos 1, pad 2): the real tokens of a row end at it."""

PAD_ID = 2
"""Padding id of the caption tokenizer."""


class MCLIP(PolymodalModel):
    """Ids (B, L) → (pooled embedding (B, E) in the teacher's text space, token features (B, L, D), mask (B, L))."""

    family = "mclip"
    config_class = MCLIPConfig
    frozen: ClassVar[tuple[str, ...]] = ("teacher",)
    part_attributes: ClassVar[dict[str, str]] = {"teacher": "teacher"}
    implements = (interfaces.TextEncoder, interfaces.TextTokenEncoder)
    progress_metrics = ("cosine",)

    def __init__(self, config: MCLIPConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        parts = dict(parts or {})
        if "teacher" not in parts:
            parts["teacher"] = load_part(config.teacher, name="MCLIPConfig.teacher")
        require(parts["teacher"], (ImageEncoder, TextEncoder), what="MCLIPConfig.teacher")
        for name, part in self.attach_parts(parts).items():
            setattr(self, self.part_attributes[name], part)
        self.embed_dim = int(self.teacher.config.embed_dim)
        """Width of the pooled embedding: the teacher's text-embedding width."""
        self.encoder = TextTrunk(config.text)
        self.head = nn.Linear(config.text.dim, self.embed_dim)
        self.tokenizer = cap.caption_tokenizer(config.tables, config.text.vocab_size)
        specials = self.tokenizer.special_tokens
        if (specials["eos"], specials["pad"]) != (EOS_ID, PAD_ID):
            raise ValueError(f"expected the caption tokenizer's eos, pad ids {EOS_ID}, {PAD_ID}; got {specials}")
        self.freeze()
        self.targets: dict[str, Tensor] = {}  # English caption → the teacher's text embedding (E,), on the CPU

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: MCLIPConfig, dataset: Any, fixed: Collection[str] = ()) -> MCLIPConfig:
        """The caption tables and image size from a multilingual dataset; an 'auto' teacher trains on its
        English dataset (``shapes-multilingual`` → ``shapes``). A dataset without the caption tables is refused."""
        name = getattr(dataset, "name", "")
        if is_folder(dataset) or "languages" not in dataset.meta:
            raise ValueError(
                f"mclip trains on the multilingual caption tables: expected shapes-multilingual or "
                f"digits-multilingual; got {name or 'a folder of images'!r}"
            )
        tables = lang.base_dataset(name)
        teacher = attrs.evolve(config.teacher, data=tables) if config.teacher.path == "auto" else config.teacher
        size = int(dataset.meta.get("image_size", config.image_size))
        return attrs.evolve(config, teacher=teacher, tables=tables, image_size=size, data=name)

    @classmethod
    def tiny_config(cls, config: MCLIPConfig) -> MCLIPConfig:
        """A fresh tiny teacher and a one-block student of width 16 (contract tests)."""
        text = attrs.evolve(config.text.with_block(dim=16, heads=2), depth=1)
        return attrs.evolve(config, teacher=attrs.evolve(config.teacher, path="", tiny=True), text=text)

    # -- the text interface of a CLIP -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the student's weights are."""
        return self.head.weight.device

    def tokenize(self, texts: Sequence[str] | str, truncate: bool = False) -> Tensor:
        """LongTensor (B, L) of ``[bos] text [eos] pad…``, L = the longest row (at most the context length).

        Any UTF-8 text encodes (byte-level BPE). A text longer than the context raises a ValueError naming
        its length and the limit unless ``truncate``; truncation keeps the end-of-text token."""
        texts = cap.check_texts(texts)
        rows = [self.tokenizer.encode(t, self.config.text.context_length, truncate) for t in texts]
        out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out  # (B, L)

    def text_mask(self, ids: Tensor) -> Tensor:
        """(B, L) True up to and including each row's first end-of-text; a row without one is a ValueError."""
        hits = ids == EOS_ID  # (B, L)
        missing = (~hits.any(dim=-1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"expected an end-of-text token (id {EOS_ID}) in every row; rows {missing[:5]} have none")
        ends = hits.int().argmax(dim=-1)  # (B,)
        return torch.arange(ids.shape[1], device=ids.device)[None] <= ends[:, None]  # (B, L)

    def encode_text_tokens(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) ids → the trunk's final hidden states (B, L, D) and their mask (B, L), True for real tokens."""
        self.encoder.check(ids)
        ids = ids.to(self.device)
        mask = self.text_mask(ids)  # (B, L)
        return self.encoder(ids, key_padding=mask), mask  # (B, L, D), bidirectional over the real tokens

    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Mean of the real tokens' features (B, L, D) → the linear head → (B, E)."""
        return self.head(masked_mean(tokens, mask))  # (B, E)

    def encode_text_and_tokens(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L) → the pooled embedding (B, E), token features (B, L, D) and mask (B, L) from one pass."""
        tokens, mask = self.encode_text_tokens(ids)  # (B, L, D), (B, L)
        return self.pool(tokens, mask), tokens, mask

    def encode_text(self, ids: Tensor) -> Tensor:
        """(B, L) → (B, E) unnormalised, in the teacher's text-embedding space."""
        return self.encode_text_and_tokens(ids)[0]

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`encode_text_and_tokens`."""
        return self.encode_text_and_tokens(ids)

    # -- the teacher's targets --------------------------------------------------------------------
    @torch.no_grad()
    def teacher_embeddings(self, english: Sequence[str], batch_size: int = 512) -> Tensor:
        """The frozen teacher's text embeddings (N, E) of English captions, cached by caption string."""
        missing = list(dict.fromkeys(t for t in english if t not in self.targets))
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            ids = self.teacher.tokenize(chunk, truncate=True)  # (b, L')
            out = self.teacher.encode_text(ids.to(self.device)).float().cpu()  # (b, E)
            self.targets.update(zip(chunk, out))
        return torch.stack([self.targets[t] for t in english]).to(self.device)  # (N, E)

    # -- training ---------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE between the student's embedding of each caption and the teacher's embedding of its English.

        Training draws a fresh training (template, language) pair per sample (:func:`.captions.training_captions`);
        evaluation reads the batch's own ``caption``, ``language`` and ``template``."""
        c = self.config
        if self.training:
            student, english, _ = cap.training_captions(c.tables, batch, c.image_size)
        else:
            student = list(batch["caption"])
            items = cap.scenes(c.tables, batch, c.image_size)
            english = [cap.caption(c.tables, "en", int(t), s) for t, s in zip(batch["template"], items)]
        target = self.teacher_embeddings(english)  # (B, E)
        pred = self.encode_text(self.tokenize(student, truncate=True))  # (B, E)
        loss = F.mse_loss(pred, target)
        cosine = F.cosine_similarity(pred.detach(), target, dim=-1).mean()
        return loss, {"cosine": cosine}

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Per language, on the evaluation-only pairs: MSE and cosine to the teacher, zero-shot next to the
        teacher's; see :mod:`.evaluate`."""
        from .evaluate import evaluate_mclip

        return evaluate_mclip(self, dataset, split)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Random ids (B, 8), one end-of-text per row and padding after it."""
        t = self.config.text
        length = min(8, t.context_length)
        ids = torch.randint(3, t.vocab_size, (batch_size, length), generator=generator)  # (B, L)
        ends = torch.randint(1, length, (batch_size,), generator=generator)  # (B,)
        for i, end in enumerate(ends.tolist()):
            ids[i, end] = EOS_ID
            ids[i, end + 1 :] = PAD_ID
        return (ids,)

    # -- model folders ----------------------------------------------------------------------------
    def save_extras(self, directory) -> None:
        """The tokenizer (``tokenizer.json`` + ``polymodal_tokenizer.json``)."""
        self.tokenizer.save(directory)

    def load_extras(self, directory) -> None:
        """The saved tokenizer."""
        from polymodal.data.tokenizers import load_tokenizer

        if (directory / "tokenizer.json").exists():
            self.tokenizer = load_tokenizer(directory)

    def card_lines(self) -> list[str]:
        """The student, the teacher, the data."""
        c, t = self.config, self.config.text
        return [
            f"M-CLIP: a bidirectional student text encoder (width {t.dim}, depth {t.depth}, {t.block.heads} heads, "
            f"context {t.context_length}, byte-level BPE of {t.vocab_size} ids over the {c.tables} captions in "
            f"{', '.join(lang.LANGUAGES)}), mean-pooled, a linear head to the teacher CLIP's text space "
            f"(E = {self.embed_dim}); trained by MSE to the teacher's embeddings of the English captions.",
            "",
            *(f"- `{k}`: {v}" for k, v in self.part_sources.items()),
            "",
            f"Data: {c.data or 'unspecified'}.",
            "",
        ]
