"""CLIP's config: the two towers (the core ViT and causal text encoders), the shared embedding width, the
logit scale and the training options (see :mod:`.model` for what each part does)."""

from __future__ import annotations

from polymodal.config import config, field, in_range, one_of
from polymodal.nn import BlockConfig
from polymodal.nn.encoders import TextEncoderConfig, ViTEncoderConfig

from . import captions as cap


@config
class CLIPConfig:
    """A CLIP dual encoder."""

    vision: ViTEncoderConfig = field(
        ViTEncoderConfig(ln_pre=True, patch_bias=False, block=BlockConfig(norm_eps=1e-5)),
        "The image tower's ViT trunk (CLIP: ln_pre, no patch bias).",
    )
    text: TextEncoderConfig = field(TextEncoderConfig(), "The text tower's causal transformer.")
    embed_dim: int = field(64, "Width of the shared embedding space.", check=in_range(1, 65536, integer=True))
    eos_id: int | None = field(1, "End-of-text id the text tower pools at (first occurrence); None: the largest id.")
    init_temperature: float = field(
        0.07, "Initial temperature; the log logit scale starts at ln(1/T).", check=in_range(1e-4, 100.0)
    )
    max_logit_scale: float = field(
        100.0, "Upper bound of the logit scale exp(s) (CLIP: 100).", check=in_range(1.0, 1e6)
    )
    tokenizer: str = field(
        "captions",
        "'captions': BPE trained on the embedded training captions; 'file': a "
        "tokenizer.json in the model folder; 'none'.",
        check=one_of("captions", "file", "none"),
    )
    augment_shift: int = field(
        0, "Training augmentation: random translation by up to this many pixels.", check=in_range(0, 64, integer=True)
    )
    captioner: str = field(
        "none",
        "How training re-samples captions each step: 'label' fills the templates from the "
        "class, 'shapes' from the objects, 'none' uses the dataset's.",
        check=one_of("none", "label", "shapes"),
    )
    caption_dropout: tuple[float, float, float] = field(
        (0.0, 0.0, 0.0),
        "Shapes captioner: probabilities that a caption leaves out the colour, the kind and the "
        "position (at least one kept), so short captions like 'a circle' are trained too.",
        check=cap.check_probabilities,
    )
    multi_positive: bool = field(
        False,
        "Shapes captioner: a full caption is a positive of every image in the batch it "
        "is true of (soft-target InfoNCE), not only of its own image (always so for partial "
        "captions).",
    )
    caption_views: tuple[str, ...] = field(
        ("all",),
        "Shapes captioner: captions drawn per image and step, each view its "
        "own contrastive term (mean of the terms): 'all' names every attribute "
        "(with caption_dropout), else '+'-joined names of colour, kind, position.",
        check=cap.check_views,
    )
    first_views: tuple[str, ...] = field(
        (),
        "Shapes captioner: the caption views of the first first_view_steps "
        "training steps (a curriculum: kind alone first, which the easy colour "
        "would otherwise starve); empty: caption_views throughout.",
        check=cap.check_views_or_none,
    )
    first_view_steps: int = field(
        0,
        "Training steps that use first_views (the trainer's global step, so a "
        "resumed run continues the curriculum where it stopped).",
        check=in_range(0, 10**9, integer=True),
    )
    templates: tuple[str, ...] = field((), "Training caption templates (from the dataset).")
    heldout_templates: tuple[str, ...] = field((), "Held-out caption templates, never trained on (evaluation only).")
    class_names: tuple[str, ...] = field((), "Class names used to fill the templates.")
    data: str = field("", "Name of the dataset the config was adapted to.")

    def __attrs_post_init__(self) -> None:
        if not self.vision.cls_token:
            raise ValueError("CLIPConfig.vision.cls_token must be True (the image tower pools the [CLS] token)")
        if self.eos_id is not None and not 0 <= self.eos_id < self.text.vocab_size:
            raise ValueError(f"CLIPConfig.eos_id must be in [0, {self.text.vocab_size}); got {self.eos_id}")


__all__ = ["CLIPConfig"]
