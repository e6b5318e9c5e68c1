"""FROMAGe (Koh et al., 2023): a frozen LM and a frozen image encoder joined by linear maps.

Trained parts only (everything else is frozen and stays in eval mode):

* ``adapter`` — a core :class:`~polymodal.nn.fusion.AdapterFusion` (kind linear) from the
  image embedding (B, E_v) to ``prefix_tokens`` LM input embeddings: the captioning prefix;
* ``ret_token_embed`` — the embedding row (1, D) of the new ``[RET]`` token, id
  ``lm.vocab_size``, starting at the mean of the LM's rows (``ret_init``); it is also the
  output row of ``[RET]`` (tied, like the LM's head), so generation can emit it;
* ``ret_head`` (D → S) on the LM hidden state at ``[RET]`` and ``image_head`` (E_v → S) on
  the image embedding, trained with two-way InfoNCE (core :class:`ContrastiveLoss`,
  learnable logit scale).

Captioning sequence: ``bos [prefix₁ … prefix_k] caption eos`` (``bos_first``; FROMAGe's own
order ``[prefix] bos caption eos`` otherwise) with cross-entropy on the caption tokens and the
end of text (FROMAGe masks ``[RET]`` in captioning; ``caption_ret`` ends captions in ``[RET]``
instead). The image feature is the CLIP tower's final-normed [CLS] (FROMAGe's pooler output).
Retrieval sequence: ``bos caption [RET]`` (text alone); its ``[RET]`` hidden state is
the text's query embedding (InfoNCE against the images), and a small cross-entropy teaches the
text alone to end in ``[RET]`` too (see :mod:`.objective`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.generation.options import TOKEN_SAMPLING
from polymodal.models import PolymodalModel
from polymodal.models.interfaces import CausalLM, ImageEncoder, require
from polymodal.models.parts import follow_data
from polymodal.nn.fusion import AdapterFusion
from polymodal.objectives import ContrastiveLoss
from polymodal.registry import get_registry

from .config import EVAL_TEMPLATES, TRAIN_TEMPLATES, FromageConfig
from .objective import FromageTraining


class Fromage(FromageTraining, PolymodalModel):
    """``forward(images, ids)`` → captioning logits (B, k+T, V+1) and unit text/image retrieval embeddings (B, S)."""

    family = "fromage"
    image_fields = "vision.config.vision"  # image_size and channels: what preprocess() prepares
    config_class = FromageConfig
    sample_options = TOKEN_SAMPLING  # gallery, images and max_new_tokens: from Python only
    frozen = ("lm", "vision")
    part_attributes: ClassVar[dict[str, str]] = {"lm": "lm", "vision": "vision"}
    batch_independent = True

    def __init__(self, config: FromageConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        parts = self.attach_parts(parts)
        self._build(parts["lm"], parts["vision"])

    # -- construction ---------------------------------------------------------------------------
    def _build(self, lm: nn.Module, vision: nn.Module) -> None:
        """Freeze ``lm`` and ``vision`` in and make the trained joints for their widths."""
        require(lm, CausalLM, what="FromageConfig.lm")
        require(vision, ImageEncoder, what="FromageConfig.vision")
        self.lm, self.vision = lm, vision
        self.freeze()
        d, e = int(lm.dim), self.visual_dim
        self.ret_id = int(lm.vocab_size)
        self.adapter = AdapterFusion(in_dim=e, out_dim=d, tokens=self.config.prefix_tokens, kind="linear")
        rows = lm.token_embeddings(torch.arange(lm.vocab_size)[None])[0].detach()  # (V, D) the LM's rows
        if self.config.ret_init == "mean":  # transformers' mean_resizing of new rows
            ret = rows.mean(0, keepdim=True)  # (1, D)
        else:
            ret = torch.randn(1, d) * float(rows[:256].std())  # (1, D)
        self.ret_token_embed = nn.Parameter(ret)  # (1, D) the [RET] row, in and out
        reads = len(lm.stack.blocks) if self.config.ret_layer == -2 else 1
        self.ret_head = nn.Linear(d * reads, self.config.shared_dim)
        self.image_head = nn.Linear(e, self.config.shared_dim)
        self.contrastive = ContrastiveLoss(init_temperature=self.config.init_temperature)

    @property
    def visual_dim(self) -> int:
        """Width of the image feature (CLIP embedding or ViT [CLS])."""
        v = self.vision
        return int(v.config.embed_dim if self.config.visual_feature == "embed" else v.config.vision.dim)

    def swap_parts(self, lm: nn.Module | None = None, vision: nn.Module | None = None) -> Fromage:
        """Replace a frozen part by another of the same widths, keeping the trained joints."""
        if lm is not None:
            require(lm, CausalLM, what="FromageConfig.lm")
            want = (self.adapter.cfg.out_dim, self.ret_id)
            if (int(lm.dim), int(lm.vocab_size)) != want:
                raise ValueError(
                    f"FromageConfig.lm: the trained joints expect an LM of width {want[0]} and vocabulary "
                    f"{want[1]}; got width {lm.dim} and vocabulary {lm.vocab_size}"
                )
            self.lm = lm
            self._part_keys["lm"] = frozenset(lm.own_state_dict())
            self.part_sources["lm"] = f"a given {type(lm).__name__}"
        if vision is not None:
            require(vision, ImageEncoder, what="FromageConfig.vision")
            old, self.vision = self.vision, vision
            if self.visual_dim != self.adapter.cfg.in_dim:
                got, self.vision = self.visual_dim, old
                raise ValueError(
                    f"FromageConfig.vision: the trained joints expect image features of width "
                    f"{self.adapter.cfg.in_dim} ({self.config.visual_feature}); got width {got}"
                )
            self.vision = vision
            self._part_keys["vision"] = frozenset(vision.own_state_dict())
            self.part_sources["vision"] = f"a given {type(vision).__name__}"
        self.freeze()
        return self

    @classmethod
    def config_for_data(cls, config: FromageConfig, dataset: Any) -> FromageConfig:
        """The 'auto' CLIP trains on the same (registered) dataset; evaluation defaults to it."""
        config, name = follow_data(config, dataset, "vision", family="fromage", what="CLIP vision tower")
        return attrs.evolve(config, data=name) if ("dataset", name) in get_registry() else config

    @classmethod
    def tiny_config(cls, config: FromageConfig) -> FromageConfig:
        """Fresh tiny LM and CLIP, a small shared space."""
        return attrs.evolve(
            config,
            lm=attrs.evolve(config.lm, path="", tiny=True),
            vision=attrs.evolve(config.vision, path="", tiny=True),
            shared_dim=16,
            max_caption_tokens=4,
            ret_layer=-1,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters (the frozen LM and CLIP included in the total)."""
        params = list(self.parameters())
        return {
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "total_parameters": sum(p.numel() for p in params),
        }

    # -- embeddings and logits ------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The frozen LM's tokenizer (ids below ``ret_id``)."""
        return self.lm.tokenizer

    def check_images(self, images: Tensor) -> Tensor:
        """ValueError naming expected vs given unless ``images`` is (B, C, S, S) float for the CLIP tower."""
        v = self.vision.config.vision
        want = f"(B, {v.channels}, {v.image_size}, {v.image_size})"
        if (
            not isinstance(images, Tensor)
            or images.dim() != 4
            or tuple(images.shape[1:]) != (v.channels, v.image_size, v.image_size)
        ):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images {want} in [0, 1]; got {got}")
        if images.shape[0] == 0 or not images.is_floating_point():
            raise ValueError(
                f"expected a non-empty float image batch {want}; got shape {tuple(images.shape)}, dtype {images.dtype}"
            )
        return images

    def image_features(self, images: Tensor) -> Tensor:
        """(B, C, S, S) images → (B, E_v) frozen image features (no gradient)."""
        self.check_images(images)
        with torch.no_grad():
            pixels = self.vision.prepare(images.to(self.ret_token_embed.device))  # (B, C, S, S)
            if self.config.visual_feature == "cls":
                return self.vision.visual.encoder(pixels)[:, 0]  # (B, D_v)
            return self.vision.encode_image(pixels)  # (B, E_v)

    def embed_ids(self, ids: Tensor) -> Tensor:
        """(B, T) ids (``ret_id`` for [RET]) → (B, T, D) LM input embeddings."""
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"expected token ids (B, T) long; got shape {tuple(ids.shape)}, dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.ret_id):
            raise ValueError(
                f"token ids must lie in [0, {self.ret_id}] ({self.ret_id} = [RET]); "
                f"got ids in [{int(ids.min())}, {int(ids.max())}]"
            )
        is_ret = (ids == self.ret_id).unsqueeze(-1)  # (B, T, 1)
        base = self.lm.token_embeddings(ids.masked_fill(is_ret.squeeze(-1), 0))  # (B, T, D)
        return torch.where(is_ret, self.ret_token_embed.to(base.dtype), base)  # (B, T, D)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, D) hidden → (B, T, V + 1): the LM's logits and the tied [RET] logit."""
        ret = hidden @ self.ret_token_embed.t()  # (B, T, 1)
        return torch.cat([self.lm.logits(hidden), ret], dim=-1)  # (B, T, V + 1)

    def unit_features(self, images: Tensor) -> Tensor:
        """(B, C, S, S) → (B, E_v) image features scaled to norm sqrt(E_v) (unit variance per coordinate)."""
        f = self.image_features(images)  # (B, E_v)
        return F.normalize(f, dim=-1) * f.shape[-1] ** 0.5

    def prefix(self, images: Tensor) -> Tensor:
        """(B, C, S, S) → (B, k, D) the captioning prefix."""
        return self.adapter(self.unit_features(images))  # (B, k, D)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, C, S, S) → (B, S_dim) unit retrieval embeddings of images."""
        return F.normalize(self.image_head(self.unit_features(images)), dim=-1)

    def text_embeddings(self, ids: Tensor, *, with_emission: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, T) ids, each row holding [RET] (text alone, right-padded) → (B, S_dim) unit embeddings at the last [RET].

        With ``with_emission`` also the logits (B, V + 1) at the token before that [RET].
        """
        hits = ids == self.ret_id  # (B, T)
        if not bool(hits.any(-1).all()):
            rows = (~hits.any(-1)).nonzero().flatten().tolist()
            raise ValueError(f"every row needs a [RET] token (id {self.ret_id}); rows {rows[:5]} have none")
        last = ids.shape[1] - 1 - hits.flip(-1).int().argmax(-1)  # (B,)
        rows = torch.arange(ids.shape[0], device=ids.device)
        final, read = self.retrieval_hidden(self.embed_ids(ids))  # (B, T, D), (B, T, D')
        queries = self.query_embeddings(read[rows, last])  # (B, S_dim)
        return (queries, self.logits(final[rows, last - 1])) if with_emission else queries

    def retrieval_hidden(self, embeds: Tensor, cache: Any = None) -> tuple[Tensor, Tensor]:
        """(B, T, D) input embeddings (continuing ``cache``'s positions when given) → the LM output (B, T, D)
        and the states the [RET] query reads (``ret_layer``)."""
        if self.config.ret_layer == -1:
            final = self.lm.run(embeds, cache=cache)  # (B, T, D) after the final norm
            return final, final
        depth = len(self.lm.stack.blocks)
        if self.config.ret_layer > depth:
            raise ValueError(
                f"FromageConfig.ret_layer must be -2, -1 or in [0, {depth}] for this LM; got {self.config.ret_layer}"
            )
        final, hidden = self.lm.run(embeds, cache=cache, return_hidden=True)  # (B, T, D), depth + 1 × (B, T, D)
        if self.config.ret_layer == -2:
            return final, torch.cat(hidden[1:], dim=-1)  # (B, T, depth·D) every block's output (the last one normed)
        return final, hidden[self.config.ret_layer]  # (B, T, D) the input of that block

    def query_embeddings(self, hidden_at_ret: Tensor) -> Tensor:
        """(B, D) LM hidden states at [RET] → (B, S_dim) unit retrieval queries."""
        return F.normalize(self.ret_head(hidden_at_ret), dim=-1)

    def check_batches(self, images: Tensor, ids: Tensor) -> None:
        """ValueError naming both sizes unless the image batch (B, C, S, S) and the text batch (B, T) agree."""
        self.check_images(images)
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected token ids (B, T); got {got}")
        if images.shape[0] != ids.shape[0]:
            raise ValueError(
                f"the image and text batches must be the same size; got a batch of {images.shape[0]} image(s) "
                f"and a batch of {ids.shape[0]} text(s)"
            )

    def caption_logits(self, images: Tensor, ids: Tensor) -> Tensor:
        """Logits (B, k + T, V + 1) of ``ids[:, :1] prefix ids[:, 1:]`` (``bos_first``) or ``prefix ids``.

        ``images`` (B, C, S, S) and ``ids`` (B, T) must be batches of the same size (:meth:`check_batches`).
        """
        self.check_batches(images, ids)
        x = self.embed_ids(ids.to(self.ret_token_embed.device))  # (B, T, D)
        p = self.prefix(images)  # (B, k, D)
        x = torch.cat([x[:, :1], p, x[:, 1:]] if self.config.bos_first else [p, x], dim=1)  # (B, k+T, D)
        if x.shape[1] > self.lm.max_len:
            raise ValueError(f"prefix + caption is {x.shape[1]} tokens; the LM holds at most {self.lm.max_len}")
        return self.logits(self.lm.run(x))  # (B, k+T, V+1)

    def forward(self, images: Tensor, ids: Tensor) -> dict[str, Tensor]:
        """Captioning logits (B, k+T, V+1), unit text (B, S) and image (B, S) retrieval embeddings.

        ``images`` (B, C, S, S) and ``ids`` (B, T) must be batches of the same size; otherwise a
        ValueError names both sizes.
        """
        self.check_batches(images, ids)
        return {
            "logits": self.caption_logits(images, ids),
            "text": self.text_embeddings(ids),
            "image": self.image_embeddings(images),
        }

    # -- evaluation and sampling (see .infer) ---------------------------------------------------
    def generate(self, prompt: str = "", images: Any = None, **options: Any) -> str:
        """The text FROMAGe writes after ``prompt`` over ``images``: :func:`.infer.generate_text` (greedy
        unless ``temperature``/``top_k``/``top_p``; ``max_new_tokens``, ``seed``)."""
        from .infer import generate_text

        return generate_text(self, prompt, images, **options)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, Any]:
        """caption_accuracy, retrieval_r1 (held-out query templates) and parameter counts; see ``infer``."""
        from .evaluate import evaluate_fromage

        return evaluate_fromage(self, dataset, split)

    def sample_to_folder(
        self, out: str | Path, n: int = 8, prompt: str | None = None, seed: int = 0, **options: Any
    ) -> list[Path]:
        """Prompt → generated text + the n nearest test images (or, without a prompt, n captioned images)."""
        from .samples import sample_to_folder

        return sample_to_folder(self, out, n=n, prompt=prompt, seed=seed, **options)

    # -- model folders --------------------------------------------------------------------------
    def card_lines(self) -> list[str]:
        """Parts, joints and templates for the model card."""
        c, n = self.config, self.parameter_counts()
        lm, vision = self.part_sources["lm"], self.part_sources["vision"]
        return [
            f"FROMAGe: frozen LM (width {self.lm.dim}, vocabulary {self.ret_id}; {lm}, saved in `lm/`) and frozen "
            f"CLIP image tower ({vision}, saved in `vision/`).",
            f"Trained: a linear adapter from the CLIP {c.visual_feature} ({self.visual_dim}) to {c.prefix_tokens} LM "
            f"input token(s), the [RET] embedding row (id {self.ret_id}, tied output logit), the [RET]-hidden and "
            f"image heads into a {c.shared_dim}-d retrieval space and the logit scale: "
            f"{n['trainable_parameters']:,} of {n['total_parameters']:,} parameters.",
            "",
            "Training captions: " + "; ".join(f"`{t} [RET]`" for t in c.templates) + ". Held-out retrieval "
            "queries: " + "; ".join(f"`{t}`" for t in c.eval_templates) + ".",
            "",
        ]


__all__ = ["EVAL_TEMPLATES", "Fromage", "FromageConfig", "TRAIN_TEMPLATES"]
