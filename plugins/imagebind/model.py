"""ImageBind (Girdhar et al., 2023): one embedding space for many modalities, bound through images.

The image and text towers come frozen from a trained CLIP model; every other modality has
its own encoder (preprocessor + patch stem + ViT trunk, a registered ``imagebind-<m>``
encoder), a head (norm → [CLS] → bias-free projection) and a postprocessor (L2 normalise,
then a fixed scale: audio 20, thermal 10). Those encoders are trained with InfoNCE against
the frozen image embeddings only — never against text — so text ↔ audio alignment is
*emergent*: ``evaluate`` classifies audio clips with CLIP text prompts.

Embedding arithmetic (ImageBind §4.3)::

    model = polymodal.load("runs/imagebind")
    query = compose(model, {"image": images[:1], "audio": dtmf_clips(torch.tensor([7]))})  # (1, E)
    scores, index = retrieve(query, model.embed("image", gallery, normalize_only=True), k=5)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import config, field, in_range
from polymodal.data.augment import resize
from polymodal.data.digits import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES
from polymodal.io.cache import default_part_folder
from polymodal.models import PolymodalModel
from polymodal.models.parts import PartConfig, follow_data, part_field
from polymodal.nn import eval_mode
from polymodal.objectives import info_nce
from polymodal.registry import get_registry as _registry

from .modalities import ModalityHead, Postprocessor, check_batch


@config
class ImageBindConfig:
    """ImageBind: frozen CLIP image/text towers plus one trained encoder per extra modality."""

    clip: PartConfig = part_field(
        PartConfig(variant="clip", data="digits"),
        "The CLIP whose image and text towers are frozen in; its data follows --data.",
    )
    modalities: tuple[str, ...] = field(
        ("audio", "thermal"),
        "Extra modalities; each is the registered encoder 'imagebind-<name>' and the batch field '<name>'.",
    )
    dim: int = field(64, "Token width of every modality trunk.", check=in_range(1, 4096, integer=True))
    depth: int = field(2, "Blocks of every modality trunk.", check=in_range(1, 64, integer=True))
    heads: int = field(4, "Attention heads of every modality trunk.", check=in_range(1, 64, integer=True))
    data_seed: int = field(
        0, "Seed of the modality data synthesised for evaluation.", check=in_range(0, 2**31, integer=True)
    )

    def __attrs_post_init__(self) -> None:
        bad = [m for m in self.modalities if m in ("image", "text") or not re.fullmatch(r"[a-z0-9_]+", m)]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(
                f"ImageBindConfig.modalities must be distinct lowercase names other than image/text; "
                f"got {self.modalities!r}"
            )


def default_clip_folder(variant: str, data: str) -> Path:
    """Where ``clip='auto'`` keeps the CLIP it trains (the core's default part folder)."""
    return default_part_folder(variant, data)


def bind_loss(anchor: Tensor, other: Tensor, *, gather: bool = False) -> Tensor:
    """InfoNCE of unit image embeddings (B, E) against a modality's postprocessed (scaled) ones (B, E);
    ``gather``: the negatives are every rank's batch (identical in one process)."""
    return info_nce(anchor, other, 1.0, normalize=False, gather=gather)


class ImageBind(PolymodalModel):
    """``forward(image, text_ids, *modalities)`` → a dict of postprocessed embeddings (B, E) per modality."""

    family = "imagebind"
    image_fields = "clip.config.vision"  # image_size and channels: what preprocess() prepares
    config_class = ImageBindConfig
    frozen = ("clip",)
    part_attributes: ClassVar[dict[str, str]] = {"clip": "clip"}

    def __init__(self, config: ImageBindConfig, parts: dict[str, PolymodalModel] | None = None) -> None:
        super().__init__(config)
        self._build(self.attach_parts(parts)["clip"])
        self.templates: tuple[tuple[str, ...], tuple[str, ...]] = (TRAIN_TEMPLATES, HELDOUT_TEMPLATES)

    def _build(self, clip: nn.Module) -> None:
        """Freeze ``clip`` in and make each modality's encoder, head and postprocessor."""
        self.clip = clip
        self.freeze()
        e = clip.config.embed_dim
        self.encoders, self.heads = nn.ModuleDict(), nn.ModuleDict()
        self.post = nn.ModuleDict(
            {"image": Postprocessor(1.0), "text": Postprocessor(float(clip.logit_scale.exp()), learnable=True)}
        )
        self.post["text"].requires_grad_(False)  # learnable in CLIP, frozen with the text tower here
        for m in self.config.modalities:
            cls = _registry().get("encoder", f"imagebind-{m}")
            enc = cls(dim=self.config.dim, depth=self.config.depth, heads=self.config.heads)
            self.encoders[m], self.heads[m] = enc, ModalityHead(enc.out_dim, e)
            self.post[m] = Postprocessor(float(cls.logit_scale))

    @classmethod
    def config_for_data(cls, config: ImageBindConfig, dataset: Any) -> ImageBindConfig:
        """The 'auto' CLIP trains on the same (registered) dataset."""
        return follow_data(config, dataset, "clip", family="imagebind", what="CLIP image tower")[0]

    @classmethod
    def tiny_config(cls, config: ImageBindConfig) -> ImageBindConfig:
        """Fresh tiny CLIP towers, tiny trunks."""
        return attrs.evolve(config, clip=attrs.evolve(config.clip, path="", tiny=True), dim=16, depth=1, heads=2)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every embedded modality: image, text and the configured extra ones."""
        return ("image", "text", *self.config.modalities)

    # -- embedding ------------------------------------------------------------------------------
    def embed(self, modality: str, x: Any, *, normalize_only: bool = False) -> Tensor:
        """Inputs of ``modality`` → (B, E): unit norm, then the modality's scale unless ``normalize_only``."""
        if modality == "image":
            v = self.clip.config.vision
            shape = f"(B, {v.channels}, {v.image_size}, {v.image_size})"
            check_batch(x, "image", shape, 4)
            if tuple(x.shape[1:]) != (v.channels, v.image_size, v.image_size):
                raise ValueError(f"image: expected images {shape}; got shape {tuple(x.shape)}")
            with torch.no_grad():
                z = self.clip.encode_image(x)  # (B, E)
        elif modality == "text":
            ids = self.clip.tokenize(list(x)) if isinstance(x, (list, tuple)) and len(x) else x
            if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] == 0:
                raise ValueError(
                    f"text: expected a non-empty list of strings or token ids (B, L); "
                    f"got {tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}"
                )
            with torch.no_grad():
                z = self.clip.encode_text(ids)  # (B, E)
        elif modality in self.encoders:
            z = self.heads[modality](self.encoders[modality](x))  # (B, E)
        else:
            raise ValueError(f"unknown modality {modality!r}; this model embeds {', '.join(self.modalities)}")
        return self.post[modality](z, normalize_only=normalize_only)

    def forward(self, image: Tensor, text: Tensor, *others: Tensor) -> dict[str, Tensor]:
        """Postprocessed embeddings (B, E) of images, token ids and each extra modality (config order)."""
        inputs = {"image": image, "text": text, **dict(zip(self.config.modalities, others))}
        return {m: self.embed(m, x) for m, x in inputs.items()}

    def prepare_images(self, images: Tensor) -> Tensor:
        """Dataset images resized to the CLIP tower's size."""
        return resize(images, self.clip.config.vision.image_size)

    def modality_input(self, modality: str, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """``batch[modality]``, or the modality synthesised from the batch's labels/images when absent."""
        if modality in batch:
            return batch[modality]
        return self.encoders[modality].derive({k: batch[k] for k in ("label", "image") if k in batch}, generator)

    # -- training and evaluation ----------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Mean over the extra modalities of InfoNCE against the frozen image embeddings (in training, the
        negatives are every rank's batch); metrics are 0-dim tensors."""
        device = next(self.heads.parameters()).device
        anchor = self.embed("image", self.prepare_images(batch["image"].to(device)))  # (B, E) unit
        losses, metrics = [], {}
        for m in self.config.modalities:
            z = self.embed(m, self.modality_input(m, batch).to(device))  # (B, E) scaled
            losses.append(bind_loss(anchor, z, gather=self.training))  # global negatives on several ranks
            metrics[f"loss_{m}"] = losses[-1].detach()
            if "label" in batch:  # image→clip retrieval lands on the same digit
                labels = batch["label"].to(device)
                metrics[f"class_match_{m}"] = (labels[(anchor @ z.detach().t()).argmax(1)] == labels).float().mean()
        return torch.stack(losses).mean(), metrics

    @torch.no_grad()
    def embed_split(self, dataset: Any, split: str = "test", batch_size: int = 256) -> dict[str, Tensor]:
        """Unit embeddings (N, E) of every modality of a split (extra modalities synthesised with ``data_seed``)."""
        with eval_mode(self):
            data = dataset.split(split)
            g = torch.Generator().manual_seed(self.config.data_seed * 1_000_003 + (split == "test"))
            device = next(self.heads.parameters()).device
            out: dict[str, list[Tensor]] = {m: [] for m in ("image", *self.config.modalities)}
            for start in range(0, len(data), batch_size):
                batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
                images = self.prepare_images(batch["image"].to(device))
                out["image"].append(self.embed("image", images, normalize_only=True))
                for m in self.config.modalities:
                    out[m].append(self.embed(m, self.modality_input(m, batch, g).to(device), normalize_only=True))
        return {m: torch.cat(v) for m, v in out.items()}

    @torch.no_grad()
    def text_classifier(self, templates: tuple[str, ...] | list[str], class_names: list[str]) -> Tensor:
        """(K, E) prompt-ensembled class embeddings: per class the renormalised mean of its unit prompt embeddings."""
        rows = []
        for i, name in enumerate(class_names):
            prompts = [t.format(numeral=str(i), word=name, label=name) for t in templates]
            rows.append(self.embed("text", prompts, normalize_only=True).mean(0))  # (E,)
        return F.normalize(torch.stack(rows), dim=-1)  # (K, E)

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str = "test") -> dict[str, float]:
        """Zero-shot image accuracy (CLIP's), emergent text→modality and image→modality accuracy per modality.

        ``emergent_text_to_<m>_accuracy``: each clip's class is the arg-max cosine to the
        template-ensembled class prompts (training templates; ``_heldout`` with held-out
        ones). ``image_to_<m>_accuracy``: each image's nearest clip has the image's digit.
        """
        meta = dataset.meta
        names = list(meta.get("class_names", DIGIT_WORDS))
        self.templates = (
            tuple(meta.get("templates", TRAIN_TEMPLATES)),
            tuple(meta.get("heldout_templates", HELDOUT_TEMPLATES)),
        )
        emb = self.embed_split(dataset, split)
        labels = dataset.split(split)["label"].to(emb["image"].device)
        prompts = {
            "": self.text_classifier(self.templates[0], names),
            "_heldout": self.text_classifier(self.templates[1], names),
        }
        metrics: dict[str, float] = {}
        for suffix, cls in prompts.items():
            metrics[f"zero_shot_image_accuracy{suffix}"] = _acc((emb["image"] @ cls.t()).argmax(1), labels)
        for m in self.config.modalities:
            for suffix, cls in prompts.items():
                metrics[f"emergent_text_to_{m}_accuracy{suffix}"] = _acc((emb[m] @ cls.t()).argmax(1), labels)
            metrics[f"image_to_{m}_accuracy"] = _acc(labels[(emb["image"] @ emb[m].t()).argmax(1)], labels)
        metrics["samples"] = len(labels)
        return metrics

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Random images, token ids of digit captions and each modality's example inputs."""
        v = self.clip.config.vision
        images = torch.rand(batch_size, v.channels, v.image_size, v.image_size, generator=generator)
        words = torch.randint(0, 10, (batch_size,), generator=generator).tolist()
        ids = self.clip.tokenize([f"a handwritten {DIGIT_WORDS[w]}" for w in words])
        return (
            images,
            ids,
            *(self.encoders[m].example_inputs(batch_size, generator)[0] for m in self.config.modalities),
        )

    def example_batch(self, batch_size: int = 4, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A digits-like training batch (images, labels); the modalities are synthesised from it."""
        v = self.clip.config.vision
        labels = torch.randint(0, 10, (batch_size,), generator=generator)
        batch = {
            "image": torch.rand(batch_size, v.channels, v.image_size, v.image_size, generator=generator),
            "label": labels,
            "caption": [f"a {DIGIT_WORDS[i]}" for i in labels.tolist()],
        }
        return {**batch, **{m: self.modality_input(m, batch, generator) for m in self.config.modalities}}

    # -- model folders --------------------------------------------------------------------------
    def card_lines(self) -> list[str]:
        """Modalities, scales, data, templates and where the frozen towers come from."""
        scales = ", ".join(f"{m} {float(self.post[m].scale()):.3g}" for m in self.modalities)
        return [
            "ImageBind: frozen CLIP image and text towers; trained encoders for "
            f"{', '.join(self.config.modalities)} (width {self.config.dim}, depth {self.config.depth}), bound to images "
            "with InfoNCE only (never to text).",
            "",
            f"Frozen towers: {self.part_sources['clip']} (saved in `clip/`). Postprocessor scales: {scales}.",
            "",
            "Data: the digits split; audio is each digit's telephone DTMF dual tone (random onset, duration, "
            "phases, amplitude, twist and noise; 8 kHz, 2,240 samples, 32×32 log-mel from torch.stft); thermal is "
            "a blurred 16×16 heat view of the digit image with random ambient level, gain and noise.",
            "",
            "Class prompt templates (ensembled): " + "; ".join(f"`{t}`" for t in self.templates[0]) + ". Held-out "
            "templates (the `_heldout` metrics): " + "; ".join(f"`{t}`" for t in self.templates[1]) + ".",
            "",
        ]


def _acc(pred: Tensor, labels: Tensor) -> float:
    return (pred == labels).float().mean().item()


__all__ = ["ImageBind", "ImageBindConfig", "bind_loss", "default_clip_folder"]
