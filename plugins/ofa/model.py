"""OFA (Wang et al., 2022): one BART-like encoder–decoder for every task, switched by the instruction.

    encoder  [image patches (P)][instruction (L)]   patches from a convolutional ResNet stem; text, codes and
                                                    location tokens embedded by the one shared table
    decoder  <s> target …                           causal, cross-attending to the encoder's output; its logits
                                                    are the shared table applied to its states (tied)

Pre-LN core blocks. Positions: learned absolute embeddings plus OFA's separate relative biases — a 2-D one on
the patch block (:class:`~polymodal.nn.relative.GridRelativePositionBias`), T5's bucketed 1-D one on the text
block (encoder: bidirectional, added through the stack's additive mask; decoder: causal, the blocks' own
``position_bias="t5"``), none between the image and the text. The loss is one cross-entropy over every task's
target (:mod:`.tasks`); inference (beam search, trie constraints) is in :mod:`.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models import PolymodalModel
from polymodal.models.interfaces import ImageTokenizer, require
from polymodal.models.parts import follow_data
from polymodal.nn import BlockConfig, StackConfig, TransformerStack
from polymodal.nn.embed import init_weights
from polymodal.nn.relative import GridRelativePositionBias, RelativePositionBias, block_diagonal_bias

from . import vocab as V
from .config import TASKS, OFAConfig, parse_stage
from .generate import GenerateMixin
from .objective import mixed_task_loss
from .stem import ResNetStem, object_loss
from .tasks import OBJECT_CLASSES, TaskCollate


def block_config(c: OFAConfig, decoder: bool) -> BlockConfig:
    """The pre-LN block of the encoder, or of the decoder (cross-attention, causal 1-D relative bias)."""
    extra = (
        dict(
            cross_attention=True,
            position_bias="t5",
            relative_buckets=c.relative_buckets,
            relative_max_distance=c.relative_max_distance,
            relative_bidirectional=False,
        )
        if decoder
        else {}
    )
    return BlockConfig(
        dim=c.dim, heads=c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout, normformer=c.normformer, **extra
    )


class OFA(GenerateMixin, PolymodalModel):
    """``forward(images | None, instruction (B, L), decoder_ids (B, T))`` → logits (B, T, V)."""

    family = "ofa"
    image_fields = "vq.config"  # image_size and channels: what preprocess() prepares
    config_class = OFAConfig
    frozen = ("vq",)
    part_attributes: ClassVar[dict[str, str]] = {"tokenizer": "vq"}
    progress_metrics = ("accuracy",)

    def __init__(self, config: OFAConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        c = config
        self.vq = require(self.attach_parts(parts)["tokenizer"], ImageTokenizer, what="OFAConfig.tokenizer")
        self.freeze()
        vq_size = int(getattr(getattr(self.vq, "config", None), "image_size", c.image_size))
        if vq_size != c.image_size:
            raise ValueError(f"OFAConfig.tokenizer reads {vq_size}×{vq_size} images; image_size is {c.image_size}")
        self.code_grid = (int(self.vq.grid[0]), int(self.vq.grid[1]))
        tokenizer = V.train_text_tokenizer(c.data, c.text_data, c.text_vocab)
        self.vocab = V.Vocabulary(tokenizer, c.text_vocab, int(self.vq.codebook_size), c.bins)
        d, patches = c.dim, c.grid * c.grid
        self.embed = nn.Embedding(self.vocab.size, d)  # text, codes and bins: one table, shared everywhere
        self.stem = ResNetStem(c)
        if c.stem_pretrain_steps:  # the pre-stage's classifier (colour × kind present); the mixture never reads it
            self.object_head = nn.Linear(d, OBJECT_CLASSES)
        self.image_pos = nn.Parameter(torch.zeros(patches, d))
        self.text_pos = nn.Parameter(torch.zeros(c.max_instruction, d))
        self.target_pos = nn.Parameter(torch.zeros(c.max_target + 1, d))
        self.type_embed = nn.Embedding(2, d)  # 0: image patch, 1: token
        self.encoder_norm = nn.LayerNorm(d)  # BART's layernorm_embedding
        self.decoder_norm = nn.LayerNorm(d)
        self.image_bias = GridRelativePositionBias(c.heads, c.grid, c.grid)
        self.text_bias = RelativePositionBias(
            c.heads, num_buckets=c.relative_buckets, max_distance=c.relative_max_distance, init_std=0.02
        )
        self.encoder = TransformerStack(StackConfig(depth=c.encoder_depth, block=block_config(c, False)))
        self.decoder = TransformerStack(StackConfig(depth=c.decoder_depth, block=block_config(c, True)))
        for module in (self.encoder, self.decoder, self.stem):
            init_weights(module)
        for p in (self.embed.weight, self.image_pos, self.text_pos, self.target_pos, self.type_embed.weight):
            nn.init.normal_(p, std=0.02)
        self._texts: dict[str, Any] | None = None

    @classmethod
    def config_for_data(cls, config: OFAConfig, dataset: Any) -> OFAConfig:
        """The image size of the data; the 'auto' VQ tokenizer trains on it."""
        config, name = follow_data(config, dataset, "tokenizer", family="ofa", what="VQ image tokenizer")
        return attrs.evolve(config, data=name or config.data, image_size=int(dataset.meta.get("image_size", 32)))

    @classmethod
    def tiny_config(cls, config: OFAConfig) -> OFAConfig:
        """A fresh tiny tokenizer, a toy-size encoder–decoder, at most 2 stem pre-stage steps and 1 step of each
        task stage."""
        return attrs.evolve(
            config,
            tokenizer=attrs.evolve(config.tokenizer, path="", tiny=True),
            dim=16,
            heads=2,
            encoder_depth=1,
            decoder_depth=1,
            stem_channels=8,
            patch_stride=8,
            eval_limit=4,
            stem_pretrain_steps=min(config.stem_pretrain_steps, 2),  # a few steps reach the task mixture too
            caption_first_steps=min(config.caption_first_steps, 1),
            first_stages=tuple(f"{'+'.join(t)}:1" for t, _ in map(parse_stage, config.first_stages)),
        )

    # -- the network ------------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> Tensor:
        """``images`` as (B, 3, S, S) floats on the model's device, or a ValueError naming expected vs given."""
        s = self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"OFA images: expected (B, 3, {s}, {s}) RGB in [0, 1]; got {got}")
        return images.to(self.image_pos.device, self.image_pos.dtype)

    def check_instruction(self, ids: Tensor) -> Tensor:
        """Instruction ids (B, L) on the model's device, or a ValueError naming expected vs given."""
        limit = self.config.max_instruction
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"OFA instruction: expected token ids (B, L) long; got {got}")
        if ids.shape[1] > limit:
            raise ValueError(
                f"OFA instruction: at most max_instruction={limit} tokens fit the encoder; got {ids.shape[1]}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab.size):
            raise ValueError(f"OFA instruction: ids must lie in [0, {self.vocab.size}); got {int(ids.max())}")
        return ids.to(self.image_pos.device)

    def encode(self, images: Tensor | None, instruction: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states (B, P + L, D) of [patches][instruction] and their mask (B, P + L), True on real tokens."""
        ids = self.check_instruction(instruction)
        b, n = ids.shape
        text = self.embed(ids) + self.text_pos[:n] + self.type_embed.weight[1]  # (B, L, D)
        real = ids != self.vocab.pad  # (B, L)
        positions = torch.arange(n, device=ids.device)
        bias = [self.text_bias(positions, positions)]  # (1, H, L, L)
        if images is not None:
            patches = self.stem(self.check_images(images)) + self.image_pos + self.type_embed.weight[0]  # (B, P, D)
            if patches.shape[0] != b:
                raise ValueError(f"OFA: {patches.shape[0]} images for {b} instructions")
            text = torch.cat([patches, text], dim=1)  # (B, P + L, D)
            real = torch.cat([real.new_ones(b, patches.shape[1]), real], dim=1)  # (B, P + L)
            bias.insert(0, self.image_bias())  # (1, H, P, P)
        x = self.encoder_norm(text)  # (B, N, D)
        mask = block_diagonal_bias(bias)  # (1, H, N, N): 2-D bias on the patches, 1-D on the text, 0 across
        mask = mask.masked_fill(~real[:, None, None, :], float("-inf"))  # (B, H, N, N)
        return self.encoder(x, mask=mask), real  # (B, N, D), (B, N)

    def decode(self, decoder_ids: Tensor, states: Tensor, real: Tensor, cache: Any = None) -> Tensor:
        """Decoder ids (B, T) (``<s>`` first) over encoder ``states`` (B, N, D) → logits (B, T, V)."""
        start = cache.length if cache is not None else 0
        n = decoder_ids.shape[1]
        if start + n > self.target_pos.shape[0]:
            raise ValueError(f"OFA decoder: at most max_target={self.config.max_target} tokens; got {start + n - 1}")
        x = self.embed(decoder_ids) + self.target_pos[start : start + n]  # (B, T, D)
        h = self.decoder(self.decoder_norm(x), states, causal=True, context_padding=real, cache=cache)  # (B, T, D)
        return F.linear(h, self.embed.weight)  # (B, T, V)

    def forward(self, images: Tensor | None, instruction: Tensor, decoder_ids: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) of the decoder reading ``decoder_ids``."""
        states, real = self.encode(images, instruction)
        return self.decode(decoder_ids.to(states.device), states, real)

    # -- training ---------------------------------------------------------------------------------
    def texts(self) -> dict[str, Any]:
        """The ``text`` dataset's train split (the text-only task's sentences), loaded once."""
        if self._texts is None:
            from polymodal.data import load_dataset

            train = load_dataset(self.config.text_data).split("train")
            self._texts = {"text": list(train["text"]), "label": train["label"]}
        return self._texts

    def collator(self, training: bool = True) -> TaskCollate:
        """The task mixture's collate (every task in every batch; :class:`.tasks.TaskCollate`)."""
        return TaskCollate(self.config, self.vocab, self.texts())

    @torch.no_grad()
    def code_targets(self, images: Tensor, region: str) -> Tensor:
        """Vocabulary ids (B, n) + eos of the VQ codes of ``images``: all of them ('full') or the middle half
        of the grid ('middle', what infilling writes), raster order."""
        codes = self.vq.encode(self.check_images(images))  # (B, h, w)
        if region == "middle":
            h, w = self.code_grid
            codes = codes[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
        ids = self.vocab.code_ids(codes.flatten(1))  # (B, n)
        return torch.cat([ids, ids.new_full((ids.shape[0], 1), self.vocab.eos)], dim=1)  # (B, n + 1)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The collated step's loss (:func:`.objective.mixed_task_loss`: each task part's cross-entropy weighted by
        its share of the rows; in the stem pre-stage :func:`.stem.object_loss`; a raw batch is collated as the
        mixture's first step)."""
        if "parts" not in batch and "instruction" not in batch:
            batch = self.collator()(batch, self.config.mixture_start)
        parts = batch.get("parts", [batch])
        if parts[0].get("task") == "objects":
            images = self.check_images(parts[0]["encoder_images"])  # (B, 3, S, S)
            return object_loss(self.stem, self.object_head, images, parts[0]["objects"])
        return mixed_task_loss(self, parts)

    def part_target(self, part: dict[str, Any]) -> Tensor:
        """A task part's target ids (b, T) on the model's device (code targets filled in from the frozen VQ)."""
        target = part.get("target")
        if target is None:
            target = self.code_targets(part["image"], part["code_target"])  # (b, T)
        return target.to(self.image_pos.device)

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Random images (B, 3, S, S), a captioning instruction (B, L) and decoder ids (B, 4)."""
        s = self.config.image_size
        images = torch.rand(batch_size, 3, s, s, generator=generator)
        instruction = torch.tensor([self.vocab.text(V.CAPTION)] * batch_size)  # (B, L)
        decoder_ids = torch.randint(3, self.vocab.tokenizer.vocab_size, (batch_size, 4), generator=generator)
        decoder_ids[:, 0] = self.vocab.bos
        return images, instruction, decoder_ids

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Every task's score on ``split`` (see :mod:`.evaluate`)."""
        from .evaluate import evaluate_ofa

        return evaluate_ofa(self, dataset, split)

    def generative_samples(self, dataset: Any, n: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``n`` text-to-image samples of one-object test captions and their colour / kind (the generative table)."""
        from .evaluate import generative_samples

        return generative_samples(self, dataset, n, seed)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """``polymodal sample``: ``n`` images drawn for ``prompt`` (text-to-image: image codes sampled with the
        config's temperature and top-k, then the VQ decoder) as ``sample_000.png`` … and a grid."""
        from polymodal.eval.images import write_samples

        if options:
            raise ValueError(f"the ofa family takes no sampling options; got {', '.join(sorted(options))}")
        if not prompt:
            raise ValueError('the ofa family draws an image for a caption: give --prompt "a red circle in the center"')
        return write_samples(self.text_to_image([prompt] * n, seed=seed), out)

    def save_extras(self, directory: Path) -> None:
        """The text BPE (``tokenizer.json``); the VQ image tokenizer is a part, saved in ``tokenizer/``."""
        self.vocab.tokenizer.save(directory)

    def load_extras(self, directory: Path) -> None:
        """The saved text BPE, so a folder reads exactly the ids it was trained on."""
        from polymodal.data.tokenizers import CONFIG_FILE, load_tokenizer

        if (Path(directory) / CONFIG_FILE).exists():
            self.vocab = V.Vocabulary(
                load_tokenizer(directory), self.config.text_vocab, self.vocab.codes, self.vocab.bins
            )

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        c = self.config
        return [
            f"OFA encoder–decoder: width {c.dim}, {c.heads} heads, {c.encoder_depth}+{c.decoder_depth} pre-LN blocks; "
            f"ResNet stem to {c.grid}×{c.grid} patches; unified vocabulary of {self.vocab.size} ids "
            f"(text {c.text_vocab}, image codes {self.vocab.codes}, location bins {c.bins}); 2-D image and 1-D text "
            "relative position biases; tasks: "
            + ", ".join(t for t, w in zip(TASKS, c.weights(), strict=True) if w)
            + ".",
            "",
        ]


__all__ = ["OFA", "OFAConfig", "ResNetStem", "block_config"]
