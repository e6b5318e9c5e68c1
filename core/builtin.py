"""The core plugin: registers the parts that ship with polymodal itself.

It loads through the ``polymodal`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from polymodal import hookimpl


@hookimpl
def register_attention_backends(register):
    """math (reference), sdpa, xformers (CUDA only) and flex."""
    from polymodal.attention import BUILTIN_BACKENDS

    for backend in BUILTIN_BACKENDS:
        register(backend.name, backend)


@hookimpl
def register_encoders(register):
    """The ViT trunk (ViT, CLIP, DINO, PIXEL) and the text trunk (CLIP, ImageBind)."""
    from polymodal.nn.encoders import TextEncoder, ViTEncoder

    register("vit", ViTEncoder)
    register(
        "text", TextEncoder, doc="Text transformer: token + learned position embedding, (causal) blocks, final norm."
    )


@hookimpl
def register_datasets(register):
    """Embedded data: digits, procedural shapes, generated sentences, and a folder of the user's own images."""
    from polymodal.data import load_digits, load_folder, load_shapes, load_text
    from polymodal.data.multilingual import load_digits_multilingual, load_shapes_multilingual

    register("digits", load_digits)
    register("shapes", load_shapes)
    register("digits-multilingual", load_digits_multilingual)
    register("shapes-multilingual", load_shapes_multilingual)
    register("text", load_text)
    register("folder", load_folder)


@hookimpl
def register_metrics(register):
    """Generic metrics."""
    from polymodal.eval.metrics import accuracy

    register("accuracy", accuracy)


@hookimpl
def register_tokenizers(register):
    """Text tokenizers: UTF-8 bytes and byte-level BPE (Hugging Face ``tokenizers``)."""
    from polymodal.data.tokenizers import BPETokenizer, ByteTokenizer

    register("bytes", ByteTokenizer)
    register("bpe", BPETokenizer)


@hookimpl
def register_fusions(register):
    """The three fusions: concatenation, (gated) cross-attention and adapters."""
    from polymodal.nn.fusion import AdapterFusion, ConcatFusion, CrossAttentionFusion

    register("concat", ConcatFusion)
    register("cross-attention", CrossAttentionFusion)
    register("adapter", AdapterFusion)


@hookimpl
def register_objectives(register):
    """Cross-entropy with per-segment weights, CLIP's contrastive loss, MAE's masked-patch loss and the
    diffusion loss (MSE on the schedule's target, optional hybrid loss for a learned variance)."""
    from polymodal.diffusion.objective import diffusion_loss
    from polymodal.nn.mae import masked_patch_loss
    from polymodal.objectives import ContrastiveLoss, cross_entropy

    register("cross-entropy", cross_entropy)
    register("contrastive", ContrastiveLoss)
    register("masked-patches", masked_patch_loss)
    register("diffusion", diffusion_loss)


@hookimpl
def register_token_samplers(register):
    """Token samplers ``(logits (B, V), generator=None, **kw) -> ids (B,)``."""
    from polymodal.generation.sampling import sample_greedy, sample_temperature, sample_top_k, sample_top_p

    register("greedy", sample_greedy)
    register("temperature", sample_temperature)
    register("top-k", sample_top_k)
    register("top-p", sample_top_p)


@hookimpl
def register_diffusion_samplers(register):
    """Diffusion samplers ``(schedule, cfg) -> sampler``: DDPM (ancestral) and DDIM (implicit, invertible)."""
    from polymodal.diffusion.samplers import DDIMSampler, DDPMSampler

    register("ddpm", DDPMSampler)
    register("ddim", DDIMSampler)
