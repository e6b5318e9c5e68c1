"""RuDolph (Sber AI): one causal transformer over ``[left text][image][right text]``.

Like DALL·E, but with a text context on each side of the image: the left one conditions
image generation (text→image), the right one is generated from the image (captioning).
The pieces only RuDolph has live here:

* separate position tables for the left text, the right text, and the image rows and
  columns (an image token's position is ``row[r] + col[c]``);
* one vocabulary: text ids ``[0, V_t)`` then image codes ``[V_t, V_t + K)`` from a frozen
  VQ-VAE tokenizer; the loss scores each position only against its own part of it;
* per-layer attention masks: causal everywhere, and among image tokens the layer's sparse
  pattern from the schedule ``row, column, conv, …, conv`` (last layer convolutional);
* the loss ``1·CE(left text) + 7·CE(image) + 1·CE(right text)`` (each a mean over its tokens).

Tasks (text→image, captioning, zero-shot classification, self-reranking) are in
:mod:`polymodal.plugins.rudolph.tasks`; the stream and its trunk (positions, mask rows, the core
:class:`~polymodal.generation.decoder.CausalDecoder` every forward pass runs through) in
:mod:`polymodal.plugins.rudolph.stream`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from polymodal.attention import image_pattern_mask, pattern_schedule
from polymodal.models import PolymodalModel
from polymodal.models.parts import follow_data
from polymodal.nn import BlockConfig, KVCache, StackConfig, TransformerStack
from polymodal.nn.embed import init_weights
from polymodal.objectives import cross_entropy
from polymodal.registry import get_registry

from . import text as tx
from .collate import RudolphCollate, batch_captions
from .config import RudolphConfig
from .stream import RudolphStream
from .tasks import RudolphTasks


@torch.no_grad()
def decoded_code_embeddings(vq: nn.Module, grid: tuple[int, int], dim: int, std: float = 0.02) -> Tensor:
    """(K, dim): each code's look (the tokenizer's decoding of a grid filled with it), standardised and randomly
    projected to ``dim`` with rows of scale ``std``: codes that look alike start with similar embeddings."""
    k = int(vq.codebook_size)
    device = next(vq.buffers(), torch.empty(0)).device
    codes = torch.arange(k, device=device)[:, None, None].expand(k, *grid).contiguous()  # (K, h, w)
    look = torch.cat([vq.decode(part) for part in codes.split(256)]).flatten(1).float()  # (K, C·S·S)
    look = (look - look.mean(0)) / look.std(0).clamp(min=1e-6)  # (K, F)
    proj = torch.randn(look.shape[1], dim, device=look.device) / look.shape[1] ** 0.5  # (F, dim)
    return (look @ proj) * std  # (K, dim)


class RuDolph(RudolphTasks, RudolphStream, PolymodalModel):
    """``forward(ids (B, n), cache=None)`` → logits (B, n, V_t + K) for stream positions ``[past, past + n)``."""

    family = "rudolph"
    image_fields = "vq.config"  # image_size and channels: what preprocess() prepares
    config_class = RudolphConfig
    frozen = ("vq",)
    part_attributes: ClassVar[dict[str, str]] = {"tokenizer": "vq"}

    def __init__(self, config: RudolphConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        tokenizer = self.attach_parts(parts)["tokenizer"]
        self.text = tx.make_tokenizer(
            config.text_tokenizer, config.text_vocab_size, config.templates, config.class_names
        )
        self._build(tokenizer)

    def _build(self, vq: nn.Module) -> None:
        """Freeze ``vq`` in and make every layer whose size depends on it."""
        c = self.config
        self.vq = vq
        self.freeze()
        self.grid: tuple[int, int] = tuple(int(g) for g in vq.grid)
        self.codebook_size = int(vq.codebook_size)
        if self.text.vocab_size > c.text_vocab_size:
            raise ValueError(
                f"the text tokenizer has {self.text.vocab_size} ids, more than RudolphConfig.text_vocab_size "
                f"= {c.text_vocab_size}"
            )
        h, w = self.grid
        self.image_len = h * w
        self.seq_len = c.left_len + self.image_len + c.right_len
        self.vocab_size = c.text_vocab_size + self.codebook_size
        self.token_embed = nn.Embedding(self.vocab_size, c.dim)
        self.left_pos_embed = nn.Parameter(torch.randn(c.left_len, c.dim) * 0.02)
        self.right_pos_embed = nn.Parameter(torch.randn(c.right_len, c.dim) * 0.02)
        self.row_pos_embed = nn.Parameter(torch.randn(h, c.dim) * 0.02)
        self.col_pos_embed = nn.Parameter(torch.randn(w, c.dim) * 0.02)
        block = BlockConfig(dim=c.dim, heads=c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.stack = TransformerStack(StackConfig(depth=c.depth, block=block))
        self.head = nn.Linear(c.dim, self.vocab_size, bias=False)
        init_weights(self.stack)
        init_weights(self.head)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if c.image_embed_init == "decoded":
            with torch.no_grad():
                self.token_embed.weight[c.text_vocab_size :] = decoded_code_embeddings(vq, self.grid, c.dim)
        self.patterns = pattern_schedule(c.depth, c.cycle, c.last)
        masks = [
            image_pattern_mask(p, self.grid, prefix=c.left_len, suffix=c.right_len, kernel=c.kernel)
            for p in self.patterns
        ]
        self.register_buffer("layer_masks", torch.stack(masks), persistent=False)  # (depth, N, N)
        segments = torch.tensor([0] * c.left_len + [1] * self.image_len + [2] * c.right_len)
        self.register_buffer("segments", segments, persistent=False)  # (N,)
        text_ok = torch.zeros(self.vocab_size, dtype=torch.bool)
        text_ok[: self.text.vocab_size] = True
        text_ok[tx.conditions(self.text)] = False
        image_ok = torch.zeros(self.vocab_size, dtype=torch.bool)
        image_ok[c.text_vocab_size :] = True
        self.register_buffer("vocab_masks", torch.stack([text_ok, image_ok, text_ok]), persistent=False)  # (3, V)
        self.__dict__.pop("_decoder", None)  # the trunk over the modules just made is built on first use

    # -- config adaptation and tiny form ----------------------------------------------------------
    @classmethod
    def config_for_data(cls, config: RudolphConfig, dataset: Any) -> RudolphConfig:
        """Templates and class names from the dataset's meta; the 'auto' tokenizer trains on the same data."""
        meta = dataset.meta
        config, name = follow_data(config, dataset, "tokenizer", family="rudolph", what="VQ-VAE tokenizer")
        changes: dict[str, Any] = {"data": name}
        registry = get_registry()
        if (
            config.tokenizer.variant == "vqvae"
            and ("dataset", name) in registry
            and ("model", f"vqvae-{name}") in registry
        ):
            changes["tokenizer"] = attrs.evolve(config.tokenizer, variant=f"vqvae-{name}")
        templates, names = tuple(meta.get("templates", ())), tuple(meta.get("class_names", ()))
        if tx.label_templates(templates, names) and "label" in dataset.train:
            changes.update(
                templates=templates, heldout_templates=tuple(meta.get("heldout_templates", ())), class_names=names
            )
        else:  # captions that are not one class's (shapes scenes, a folder): the dataset's own, as bytes
            changes.update(
                templates=(),
                heldout_templates=(),
                class_names=(),
                text_tokenizer="bytes",
                left_len=max(config.left_len, 96),
                right_len=max(config.right_len, 96),
            )
        return attrs.evolve(config, **changes)

    @classmethod
    def tiny_config(cls, config: RudolphConfig) -> RudolphConfig:
        """A fresh tiny tokenizer and a two-layer width-16 decoder (contract tests)."""
        return attrs.evolve(
            config, tokenizer=attrs.evolve(config.tokenizer, path="", tiny=True), dim=16, depth=2, heads=2
        )

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits (B, n, V) for ``ids`` at positions ``[past, past + n)``, ``past`` = what ``cache`` holds."""
        self.check_ids(ids, cache.length if cache is not None else 0)
        return self.decoder(ids, cache)  # (B, n, V)

    def stream_loss(self, *streams: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Weighted next-token cross-entropy of stream batches (B_i, n_i), each a prefix of the full stream.

        Every target is scored within its part's vocabulary (text ids or image codes); the
        segment means are taken over the tokens of all batches together.
        """
        logits, targets, segments = [], [], []
        for ids in streams:
            if ids.shape[0] == 0:
                continue
            seg = self.segments[1 : ids.shape[1]]  # (n-1,) part of each target
            out = self(ids[:, :-1])  # (B, n-1, V)
            logits.append(out.masked_fill(~self.vocab_masks[seg], float("-inf")).flatten(0, 1))  # (B·(n-1), V)
            targets.append(self.targets(ids).flatten())  # (B·(n-1),)
            segments.append(seg.repeat(ids.shape[0]))
        return cross_entropy(
            torch.cat(logits),
            torch.cat(targets),
            segment_ids=torch.cat(segments),
            segment_weights=self.config.loss_weights,
        )

    def batch_captions(self, batch: dict[str, Any]) -> list[str]:
        """Training captions: a random template per sample filled with its label, or the dataset's captions."""
        return batch_captions(self.config, batch)

    def collator(self, augment: bool = True, tokenize: bool = True) -> RudolphCollate:
        """Images at the tokenizer's size (noised with ``augment``), layouts, sampled captions and (with
        ``tokenize``) their text contexts."""
        vq = self.vq.config
        return RudolphCollate(self.config, self.text, vq.image_size, vq.channels, augment=augment, tokenize=tokenize)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """RuDolph's loss on a batch: each sample in the text→image or image→text layout at random.

        A batch from :meth:`collator` brings its images, layouts ``t2i`` and ``left_ids``/``right_ids``."""
        if "t2i" not in batch:  # a raw batch: the collator's draws here, in its order; the stream below
            batch = self.collator(augment=self.training, tokenize=False)(batch, self.train_step)
        codes = self.encode_images(batch["image"])  # (B, h, w)
        t2i, dev = batch["t2i"].to(codes.device), self.layer_masks.device  # (B,)
        if "left_ids" in batch:
            ids = torch.cat([batch["left_ids"].to(dev), self.codes_to_ids(codes), batch["right_ids"].to(dev)], dim=1)
        else:
            ids = self.stream(batch["captions"], codes, t2i, truncate=not self.config.templates)  # (B, N)
        # text→image rows end with the image: their right context is padding, so it is not run
        loss, metrics = self.stream_loss(ids[t2i, : self.config.left_len + self.image_len], ids[~t2i])
        names = {"ce_segment_0": "ce_left", "ce_segment_1": "ce_image", "ce_segment_2": "ce_right"}
        return loss, {names.get(k, k): v for k, v in metrics.items()}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Random full streams (B, N): text ids in both contexts, codes in the image part."""
        c, vt = self.config, self.text.vocab_size
        left = torch.randint(0, vt, (batch_size, c.left_len), generator=generator)
        codes = torch.randint(0, self.codebook_size, (batch_size, self.image_len), generator=generator)
        right = torch.randint(0, vt, (batch_size, c.right_len), generator=generator)
        return (torch.cat([left, codes + c.text_vocab_size, right], dim=1),)  # (B, N)

    def example_batch(self, batch_size: int = 4, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A digits-like training batch: random images, labels and captions."""
        s, ch = self.vq.config.image_size, self.vq.config.channels
        labels = torch.randint(0, max(len(self.config.class_names), 1), (batch_size,), generator=generator)
        return {
            "image": torch.rand(batch_size, ch, s, s, generator=generator),
            "label": labels,
            "caption": [f"a {int(y)}" for y in labels],
        }

    # -- model folders ----------------------------------------------------------------------------
    def save_extras(self, directory: Path) -> None:
        """The text tokenizer in ``text/`` (the frozen VQ-VAE is a part, saved in ``tokenizer/``)."""
        self.text.save(Path(directory) / "text")

    def load_extras(self, directory: Path) -> None:
        """The folder's own text tokenizer, and the layers and masks sized by it (the strict state load
        then fills every weight)."""
        from polymodal.data.tokenizers import load_tokenizer

        self.text = load_tokenizer(Path(directory) / "text")
        self._build(self.vq)

    def card_lines(self) -> list[str]:
        """Layout, schedule, loss weights and where the image tokenizer comes from."""
        c = self.config
        return [
            f"RuDolph: [left text {c.left_len}][image {self.grid[0]}×{self.grid[1]} codes of {self.codebook_size}]"
            f"[right text {c.right_len}], width {c.dim}, depth {c.depth}, {c.heads} heads; image attention per "
            f"layer: {', '.join(self.patterns)}; loss weights left/image/right {c.loss_weights}.",
            "",
            f"Image tokenizer (frozen): {self.part_sources['tokenizer']}, saved in `tokenizer/`. Text: {c.text_tokenizer} "
            f"({self.text.vocab_size} ids) in `text/`.",
            "",
        ]


__all__ = ["RuDolph", "RudolphConfig"]
