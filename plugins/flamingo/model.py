"""Flamingo (Alayrac et al., 2022): a frozen vision encoder and a frozen language model joined by
a Perceiver Resampler and gated cross-attention dense blocks.

* Vision: the frozen CLIP's patch tokens ``clip.visual.encoder(pixels)`` (B, 1 + P, Dv) per image,
  resampled to ``num_latents`` visual tokens by the trained :class:`PerceiverResampler`.
* Language: the frozen LM (plugins/lm); a core :class:`~polymodal.nn.fusion.CrossAttentionFusion`
  (gated, both gates 0 at initialisation) runs before every ``cross_every``-th block: the blocks are
  Flamingo's own (``xattn``) and reach the LM per call (``lm.run(..., injected=self.xattn)``), so the
  frozen LM is never changed.
* Interleaved text: ``<image>`` and ``<|endofchunk|>`` get ids ``V`` and ``V + 1`` (V = ``lm.vocab_size``)
  and trained embedding rows of their own (tied as two extra output columns; they start as copies of the
  LM's bos / eos rows, the LM's own sentence boundaries); the LM's rows stay frozen.
* Media masking: each token sees only the latest image at or before it (see :mod:`.interleave`).

Only the resampler, the cross-attention blocks and the two special rows train. At initialisation
the logits (the first V columns) equal the frozen LM's logits on the same input embeddings exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models import PolymodalModel
from polymodal.models.interfaces import CausalLM, ImageEncoder, require
from polymodal.models.parts import follow_data
from polymodal.nn.fusion import CrossAttentionFusion
from polymodal.objectives import cross_entropy
from polymodal.registry import get_registry

from . import interleave as il
from .config import FlamingoConfig
from .evaluate import EvalMixin
from .generate import GenerateMixin
from .resampler import PerceiverResampler


class Flamingo(GenerateMixin, EvalMixin, PolymodalModel):
    """``forward(ids (B, T), images (B, M, C, H, W) or per-row lists)`` → logits (B, T, V + 2)."""

    family = "flamingo"
    image_fields = "vision.config.vision"  # image_size and channels: what preprocess() prepares
    config_class = FlamingoConfig
    frozen = ("lm", "vision")
    part_attributes: ClassVar[dict[str, str]] = {"lm": "lm", "vision": "vision"}

    def __init__(self, config: FlamingoConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        parts = self.attach_parts(parts)
        self._build(parts["lm"], parts["vision"])

    # -- construction -----------------------------------------------------------------------------
    def _build(self, lm: nn.Module, vision: nn.Module) -> None:
        """Freeze ``lm`` and ``vision`` in, check their widths, make the resampler, blocks and special rows."""
        require(lm, CausalLM, what="FlamingoConfig.lm")
        require(vision, ImageEncoder, what="FlamingoConfig.vision")
        c = self.config
        vdim = vision.config.vision.dim
        for name, want, got in (("lm", c.lm_dim, lm.dim), ("vision", c.vision_dim, vdim)):
            if want is not None and want != got:
                raise ValueError(
                    f"frozen {name} width mismatch: the Flamingo model expects {name}_dim={want}, "
                    f"the given {name} has width {got}"
                )
        self.config = attrs.evolve(c, lm_dim=lm.dim, vision_dim=vdim)
        self.lm, self.vision = lm, vision
        self.freeze()
        self.resampler = PerceiverResampler(
            vdim, c.num_latents, c.resampler_depth, c.resampler_heads, final_norm=c.resampler_final_norm
        )
        self.special = nn.Embedding(2, lm.dim)  # rows: <image>, <|endofchunk|>
        tok = getattr(lm.tokenizer, "special_tokens", None) or {}
        with torch.no_grad():  # start as the LM's sentence boundaries: <image> ~ bos, <|endofchunk|> ~ eos
            for row, name in enumerate(("bos", "eos")):
                if name in tok and tok[name] < lm.vocab_size:
                    self.special.weight[row] = lm.token_embeddings(torch.tensor([[tok[name]]]))[0, 0]
                else:
                    nn.init.normal_(self.special.weight[row], std=0.02)
        self.xattn = nn.ModuleDict(
            {  # keyed by the LM block each one runs before
                str(i): CrossAttentionFusion(
                    dim=lm.dim,
                    context_dim=vdim,
                    heads=c.xattn_heads,
                    gate=True,
                    mlp_ratio=c.xattn_mlp_ratio,
                    norm="layernorm",
                    norm_eps=1e-5,
                )
                for i in range(0, len(lm.stack.blocks), c.cross_every)
            }
        )

    @property
    def image_id(self) -> int:
        """Id of ``<image>`` (= the LM's vocabulary size)."""
        return self.lm.vocab_size

    @property
    def eoc_id(self) -> int:
        """Id of ``<|endofchunk|>``."""
        return self.lm.vocab_size + 1

    @property
    def tokenizer(self):
        """The frozen LM's text tokenizer."""
        return self.lm.tokenizer

    def xattn_blocks(self) -> list[nn.Module]:
        """The gated cross-attention blocks run inside the LM (in layer order)."""
        return [self.xattn[k] for k in sorted(self.xattn, key=int)]

    @classmethod
    def config_for_data(cls, config: FlamingoConfig, dataset: Any) -> FlamingoConfig:
        """The 'auto' CLIP trains on the same (registered) dataset; remember the dataset's name."""
        config, name = follow_data(config, dataset, "vision", family="flamingo", what="CLIP vision tower")
        return attrs.evolve(config, data=name) if ("dataset", name) in get_registry() else config

    @classmethod
    def tiny_config(cls, config: FlamingoConfig) -> FlamingoConfig:
        """Fresh tiny parts, one small resampler layer."""
        return attrs.evolve(
            config,
            lm=attrs.evolve(config.lm, path="", tiny=True),
            vision=attrs.evolve(config.vision, path="", tiny=True),
            num_latents=2,
            resampler_depth=1,
            resampler_heads=2,
            xattn_heads=2,
            eval_limit=20,
        )

    # -- the network ------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """Ids (B, T) → input embeddings (B, T, D): frozen LM rows for text, own rows for the two markers."""
        v = self.lm.vocab_size
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected integer token ids (B, T); got {got}")
        if ids.numel() and (ids.min() < 0 or ids.max() > v + 1):
            raise ValueError(
                f"token ids must lie in [0, {v + 1}] (text < {v}, <image> {v}, <|endofchunk|> {v + 1}); "
                f"got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        ids = ids.to(self.special.weight.device).long()
        special = ids >= v  # (B, T)
        text = self.lm.token_embeddings(ids.masked_fill(special, 0))  # (B, T, D)
        own = self.special((ids - v).clamp(min=0, max=1))  # (B, T, D)
        return torch.where(special.unsqueeze(-1), own, text)  # (B, T, D)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (N, C, H, W) in [0, 1] → visual tokens (N, L, Dv) (frozen tower, trained resampler)."""
        pixels = self.vision.prepare(images.to(self.special.weight.device))  # (N, C, S, S)
        self.vision.visual.check(pixels)
        with torch.no_grad():
            feats = self.vision.visual.encoder(pixels)  # (N, 1 + P, Dv)
        return self.resampler(feats)  # (N, L, Dv)

    def media(self, images: Tensor | Sequence[Tensor], batch: int) -> tuple[Tensor, Tensor]:
        """Visual tokens of every row's images, padded: context (B, M·L, Dv) and image counts (B,)."""
        if isinstance(images, Tensor):
            if images.dim() == 4:  # one image per row
                images = images.unsqueeze(1)  # (B, 1, C, H, W)
            if images.dim() != 5:
                raise ValueError(
                    f"images must be (B, M, C, H, W) or a list of (M_b, C, H, W); got {tuple(images.shape)}"
                )
            rows = list(images)
        else:
            rows = list(images)
        if len(rows) != batch:
            raise ValueError(f"images: expected one entry per row of ids ({batch}); got {len(rows)}")
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (B,)
        m, lat, dv = int(counts.max()) if batch else 0, self.config.num_latents, self.config.vision_dim
        real = [r for r in rows if len(r)]
        tokens = self.encode_images(torch.cat(list(real))) if real else self.special.weight  # (ΣM, L, Dv)
        context = tokens.new_zeros(batch, max(m, 1), lat, dv)  # (B, M, L, Dv) in the resampler's dtype
        if real:
            start = 0
            for b, r in enumerate(rows):
                context[b, : len(r)] = tokens[start : start + len(r)]
                start += len(r)
        return context.flatten(1, 2), counts  # (B, M·L, Dv), (B,)

    def check_images(self, ids: Tensor, counts: Tensor) -> None:
        """One image per ``<image>`` token in every row, else a ValueError naming expected vs given."""
        tokens = il.image_counts(ids, self.image_id).cpu()  # (B,)
        for b, (t, n) in enumerate(zip(tokens.tolist(), counts.tolist())):
            if t > n:
                raise ValueError(
                    f"row {b} has {t} <image> tokens but {n} images were given (expected one image per <image> token)"
                )
            if n > t:
                raise ValueError(
                    f"row {b}: {n} images were given but only {t} <image> tokens "
                    f"({n - t} image(s) without an <image> token)"
                )

    def hidden(
        self, ids: Tensor, context: Tensor, *, cache: Any = None, offset: Tensor | None = None, cross_cache: bool = True
    ) -> Tensor:
        """Hidden states (B, T, D): the LM run on ``embed(ids)`` with media-masked cross-attention to ``context``;
        with ``cache`` (ids continue its positions) and ``cross_cache`` the blocks keep ``context``'s keys/values
        there (projected once per generation; False: again every call)."""
        index = il.media_index(ids.to(context.device), self.image_id, offset)  # (B, T)
        mask = il.media_mask(index, context.shape[1] // self.config.num_latents, self.config.num_latents)  # (B, T, M·L)
        kwargs = {"context": context, "mask": mask, "cache": cache if cross_cache else None}
        return self.lm.run(self.embed(ids), cache=cache, injected=self.xattn, inject_kwargs=kwargs)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, D) → (B, T, V + 2): the LM's tied head, then the two special rows (tied too)."""
        return torch.cat([self.lm.logits(hidden), F.linear(hidden, self.special.weight)], dim=-1)

    def forward(self, ids: Tensor, images: Tensor | Sequence[Tensor]) -> Tensor:
        """Interleaved ids (B, T) and each row's images (one per ``<image>``) → logits (B, T, V + 2)."""
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected integer token ids (B, T); got {got}")
        context, counts = self.media(images, ids.shape[0])
        self.check_images(ids, counts)
        return self.logits(self.hidden(ids, context))

    # -- input helpers ----------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Ids of an interleaved text (``<image>`` / ``<|endofchunk|>`` markers), starting with bos."""
        return il.encode(text, self.tokenizer, self.image_id, self.eoc_id)

    def pad_id(self) -> int:
        """The LM tokenizer's padding id."""
        return self.tokenizer.special_tokens["pad"]

    # -- training ---------------------------------------------------------------------------------
    def collator(self) -> il.FlamingoCollate:
        """The interleaved sequences of a training batch, tokenised (see :func:`.interleave.training_rows`)."""
        return il.FlamingoCollate(self.config, self.tokenizer, self.image_id, self.eoc_id, self.lm.max_len)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Next-token cross-entropy over interleaved sequences built from the batch's images and labels.

        Caption tokens and ``<|endofchunk|>`` are targets; ``<image>`` and padding are not. A batch from
        :meth:`collator` brings ``ids``, ``targets`` and ``image_index``.
        """
        if "image_index" not in batch:  # a raw batch: the collator's work, in its order
            batch = self.collator()(batch, self.train_step)
        device = self.special.weight.device
        ids, targets = batch["ids"], batch["targets"]  # (S, T + 1), (S, T)
        media = [batch["image"][idx].to(device) for idx in batch["image_index"]]
        logits = self(ids[:, :-1].to(device), media)  # (S, T, V + 2)
        loss, metrics = cross_entropy(logits, targets.to(device), ignore_index=-100)
        gates = [torch.tanh(b.attn_gate.detach()).abs().reshape(()) for b in self.xattn_blocks()]
        metrics["gate_attn"] = torch.stack(gates).double().sum() / len(gates)
        return loss, metrics

    def example_batch(self, batch_size: int = 4, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A digits-like batch of random images and labels."""
        v = self.vision.config.vision
        return {
            "image": torch.rand(batch_size, v.channels, v.image_size, v.image_size, generator=generator),
            "label": torch.randint(0, 10, (batch_size,), generator=generator),
        }

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two chunks per row: ``bos <image> w w <|endofchunk|> <image> w w w`` and two random images per row."""
        v = self.vision.config.vision
        high = min(self.tokenizer.vocab_size, self.lm.vocab_size) if self.tokenizer is not None else self.lm.vocab_size
        ids = torch.randint(3, high, (batch_size, 10), generator=generator)  # (B, 10)
        ids[:, 0] = 0
        ids[:, 1], ids[:, 4], ids[:, 5] = self.image_id, self.eoc_id, self.image_id
        images = torch.rand(batch_size, 2, v.channels, v.image_size, v.image_size, generator=generator)
        return ids, images

    # -- model folders ----------------------------------------------------------------------------
    def card_lines(self) -> list[str]:
        """Architecture, trainable share and where the frozen parts come from."""
        c = self.config
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        lm, vision = self.part_sources["lm"], self.part_sources["vision"]
        return [
            f"Flamingo: frozen LM (width {c.lm_dim}, {len(self.lm.stack.blocks)} blocks; {lm}, saved in `lm/`) and "
            f"frozen CLIP vision tower (width {c.vision_dim}; {vision}, saved in `vision/`); Perceiver Resampler "
            f"({c.num_latents} latents, depth {c.resampler_depth}); gated cross-attention before every "
            f"{c.cross_every} LM block(s).",
            "",
            f"Trainable parameters: {trained:,} of {total:,}.",
            "",
            "Training captions: "
            + "; ".join(f"`{t}`" for t in c.templates)
            + f". Evaluation format: `{c.eval_template}`.",
            "",
        ]


__all__ = ["Flamingo", "FlamingoConfig"]
