"""PIXEL (Rust et al., 2023) fine-tuned as a classifier, next to a same-size byte-level baseline.

``polymodal train pixel`` starts from a pre-trained ``pixel-mae`` (:mod:`.pretrain`; the part field
``mae``: a folder, ``"auto"`` to train the default once into the cache, or ``""`` for a fresh one),
copies its encoder and fine-tunes it with a linear head on the mean of the non-padding patch
tokens (which digit word the sentence names). On the same batches it trains a byte-level
classifier of the same width and depth (core :class:`~polymodal.nn.encoders.TextEncoder` over
:class:`~polymodal.data.tokenizers.ByteTokenizer` ids, mean-pooled). The pre-trained MAE is kept,
frozen, as a part of the model folder (``mae/``), so ``evaluate`` reports its masked-patch loss too
(:mod:`.classify`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import config, field, in_range
from polymodal.data.tokenizers import ByteTokenizer
from polymodal.models import PolymodalModel
from polymodal.models.parts import PartConfig, part_field
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import TextEncoder, TextEncoderConfig

from .classify import evaluate, sample_to_folder
from .pretrain import PixelMAEConfig, PixelMAEModel, Renderer, tiny_pixel_mae
from .render import valid_from_images


@config
class PixelConfig:
    """The PIXEL classifier: the pre-trained MAE it starts from, its head, and the byte-level baseline."""

    mae: PartConfig = part_field(
        PartConfig(variant="pixel-mae", data="text"),
        "The pre-trained pixel-mae whose encoder is fine-tuned (the MAE itself stays frozen).",
    )
    pretrain: PixelMAEConfig = field(PixelMAEConfig(), "Rendering and MAE architecture; must match the `mae` folder's.")
    num_classes: int = field(10, "Classes of the fine-tuning heads.", check=in_range(1, 1 << 20, integer=True))
    head_dropout: float = field(0.1, "Dropout on the pooled features before each head.", check=in_range(0.0, 1.0))
    token_context: int = field(
        64, "Byte positions of the token baseline (longer sentences are cut).", check=in_range(2, 1 << 16, integer=True)
    )
    substitutions: int = field(
        2,
        "Look-alike character substitutions per digit word in the perturbed test text.",
        check=in_range(1, 16, integer=True),
    )
    perturb_draws: int = field(
        3,
        "Perturbed copies of the test split evaluated (seeds eval_seed, eval_seed+1 …).",
        check=in_range(1, 100, integer=True),
    )


class PixelModel(Renderer, PolymodalModel):
    """Rendered strips (B, 1, p, N·p) → digit logits (B, num_classes); see the module docstring."""

    family = "pixel"
    config_class = PixelConfig
    frozen = ("mae_model",)
    part_attributes: ClassVar[dict[str, str]] = {"mae": "mae_model"}

    def __init__(self, config: PixelConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        part = self.attach_parts(parts)["mae"]
        if not isinstance(part, PixelMAEModel) or part.config != config.pretrain:
            got = part.config if isinstance(part, PixelMAEModel) else type(part).__name__
            raise ValueError(
                f"PixelConfig.mae must be a pixel-mae whose config equals `pretrain`;\n"
                f"expected {config.pretrain}\ngot {got} (from {self.part_sources['mae']})"
            )
        self.mae_model = part
        self.freeze()
        e = config.pretrain.mae.encoder
        self.encoder = copy.deepcopy(self.mae.encoder).requires_grad_(True)  # the copy that is fine-tuned
        self.head_drop = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(e.dim, config.num_classes)
        self.tokenizer = ByteTokenizer(add_bos=False, add_eos=True)
        self.token_encoder = TextEncoder(
            TextEncoderConfig(
                vocab_size=self.tokenizer.vocab_size,
                context_length=config.token_context,
                depth=e.depth,
                causal=False,
                block=BlockConfig(
                    dim=e.dim, heads=e.block.heads, mlp_ratio=e.block.mlp_ratio, norm_eps=e.block.norm_eps
                ),
            )
        )
        self.token_head = nn.Linear(e.dim, config.num_classes)
        for head in (self.head, self.token_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def _render_config(self) -> PixelMAEConfig:
        return self.config.pretrain

    @property
    def mae(self) -> nn.Module:
        """The frozen pre-trained MAE (of the ``mae`` part)."""
        return self.mae_model.mae

    @classmethod
    def tiny_config(cls, config: PixelConfig) -> PixelConfig:
        """The same architecture at toy size with a fresh MAE (contract tests)."""
        return attrs.evolve(
            config, mae=attrs.evolve(config.mae, path="", tiny=True), pretrain=tiny_pixel_mae(config.pretrain)
        )

    def _device(self) -> torch.device:
        return self.head.weight.device

    # -- the two classifiers -----------------------------------------------------------------------
    def features(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """Mean of the fine-tuned encoder's tokens over the non-padding patches of rendered strips: (B, D)."""
        valid = valid_from_images(images, self.patch) if valid is None else valid.bool()  # (B, N)
        kp = torch.cat([valid.new_ones(valid.shape[0], self.encoder.prefix), valid], dim=1)  # (B, 1 + N)
        x = self.encoder.embed(self.prepare(images))  # (B, 1 + N, D)
        tokens = self.encoder.blocks(x, key_padding=kp)[:, self.encoder.prefix :]  # (B, N, D)
        w = valid.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
        return (tokens * w).sum(1) / w.sum(1).clamp(min=1)  # (B, D)

    def forward(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """(B, 1, p, N·p) strips → (B, num_classes) logits; ``valid`` defaults to the patches up to the
        end-of-sequence patch."""
        self.mae.check(images)
        return self.head(self.head_drop(self.features(images, valid)))

    def token_ids(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Byte ids (B, L) padded with ``pad`` and their mask (True for real bytes), cut at ``token_context``."""
        ids = [self.tokenizer.encode(t, self.config.token_context, truncate=True) for t in texts]
        batch = torch.full((len(ids), max(len(i) for i in ids)), self.tokenizer.special_tokens["pad"])  # (B, L)
        for row, i in enumerate(ids):
            batch[row, : len(i)] = torch.tensor(i)
        return batch, batch != self.tokenizer.special_tokens["pad"]

    def token_logits(self, texts: Sequence[str]) -> Tensor:
        """The byte-level baseline: (B, num_classes) logits from the mean of its non-padding tokens."""
        ids, real = (t.to(self._device()) for t in self.token_ids(texts))
        tokens = self.token_encoder(ids, key_padding=real)  # (B, L, D)
        w = real.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        return self.token_head(self.head_drop((tokens * w).sum(1) / w.sum(1).clamp(min=1)))  # (B, K)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Both classifiers' cross-entropies on the same batch, summed (their parameters are disjoint)."""
        texts, dev = list(batch["text"]), self._device()
        rendered = self.render(texts)
        labels = batch["label"].to(dev)
        logits = self(rendered.images.to(dev), rendered.valid.to(dev))  # (B, K)
        token_logits = self.token_logits(texts)  # (B, K)
        pixel_ce, token_ce = F.cross_entropy(logits, labels), F.cross_entropy(token_logits, labels)
        return pixel_ce + token_ce, {
            "pixel_ce": pixel_ce.detach(),
            "token_ce": token_ce.detach(),
            "accuracy": (logits.argmax(-1) == labels).float().mean(),
            "token_accuracy": (token_logits.argmax(-1) == labels).float().mean(),
        }

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Clean / perturbed accuracy of PIXEL and of the byte baseline, and the MAE's masked-patch loss
        against the mean baseline; see :func:`.classify.evaluate`."""
        return evaluate(self, dataset, split)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """The frozen MAE's reconstructions (rendering, mask, reconstruction stacked) for ``prompt`` or ``n`` test sentences."""
        if options:
            raise ValueError(f"pixel sampling takes no options; got {', '.join(sorted(options))}")
        return sample_to_folder(self.mae, self, out, n=n, prompt=prompt, seed=seed)

    def card_lines(self) -> list[str]:
        """Architecture summary for the model card."""
        e = self.config.pretrain.mae.encoder
        return [
            f"PIXEL classifier: encoder width {e.dim}, depth {e.depth}, mean pooling over non-padding patches, "
            f"fine-tuned from a pixel-mae ({self.part_sources['mae']}, saved in `mae/`); byte-level baseline "
            "of the same width and depth.",
            "",
        ]
