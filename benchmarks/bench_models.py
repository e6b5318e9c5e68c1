"""``polymodal bench models``: polymodal against transformers on identical converted weights.

Each peer is a randomly initialised transformers model built from its config (nothing is
downloaded), saved with ``save_pretrained`` to a temporary folder and converted with
polymodal's own converter (``hf-vit``, ``hf-clip``, ``hf-imagegpt``, ``hf-gpt2``). Outputs are
checked to match in float32 before anything is timed (a mismatch is a row with the reason, not a
timing). Every task then runs over a grid of dtypes (``--dtypes``) × modes (``--modes``: eager,
compiled), the same dtype and mode on both sides of a row: polymodal through
``polymodal.models.inference.prepare_inference(model, dtype=, compile=)``, the reference with the
same weights cast to that dtype, ``attn_implementation="sdpa"`` where the model has it and
``torch.compile`` when compiled (``transformers_options`` says exactly what ran). The two sides
run interleaved (A B, B A, ...) on the same inputs and thread count; the row reports both
medians, ``ratio`` = transformers time / polymodal time (> 1: polymodal is faster), the FLOPs of
one call (``torch.utils.flop_counter`` on the polymodal model at that shape, the same count for
both sides), each side's GFLOP/s and its share of the n×n matmul peak of that dtype measured in
the same run, and on CUDA each side's peak memory.

Generation rows (GPT-2 and ImageGPT-S, greedy) compare polymodal's generation method against
transformers' ``generate`` twice: with its default (dynamic) cache and with
``cache_implementation="static"``; the three run interleaved in one measurement.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import (
    BenchUsageError,
    fmt,
    load_average,
    machine,
    matmul_peak,
    report_path,
    resolve_device,
    sig,
    sync,
    text_table,
    write_json,
)

PARITY_RTOL = {"float32": 1e-4}
"""max |ours − theirs| / max |theirs| allowed before timing, float32 rows (eager and compiled). Reduced
precision rows are not gated: their difference is reported (``rel_diff``) beside the float32 one."""
FAMILIES = ("vit-b16", "clip-b16", "vit-s16-train", "imagegpt-s", "gpt2", "fusion")
"""``fusion``: Flamingo few-shot captioning and FROMAGe retrieval-generation with their generation caches against
the same models without them (``bench_fusion.fusion_rows``; eager, every dtype)."""
MODES = ("eager", "compiled")
REFERENCES = ("dynamic", "static")
"""Generation rows: transformers' ``generate`` with its default cache, and with its static cache."""
GPT2_PROMPT, GPT2_NEW = 16, 32
"""GPT-2 generation rows: a random prompt of 16 tokens extended greedily by exactly 32 (KV cache on all sides)."""
IGPT_NEW = 32
"""ImageGPT-S generation rows: the start token, then 32 greedy pixels (raster order) on all sides."""

Factory = Callable[[torch.nn.Module, bool], Callable[[Any], torch.Tensor]]
"""``(model, compiled) -> call``: how a side calls a (prepared) model; ``compiled`` matters to generation only."""


@dataclass
class Task:
    """One comparison: the same call on both models, with its inputs."""

    model: str  # "ViT-B/16"
    task: str  # forward | image-tower | text-tower | train-step | generate
    batch: int
    unit: str  # what items/s counts: images, texts, tokens, new tokens
    items: int  # items per call
    inputs: Callable[[int, torch.device, torch.dtype, int], Any]  # (batch, device, dtype, seed) → input
    ours: Factory
    theirs: Factory
    kind: str = "forward"  # forward (torch.compile'd on both sides when compiled) | train | generate
    references: dict[str, Factory] = field(default_factory=dict)  # generate: more transformers sides by name
    reference_options: dict[str, Callable[[bool, torch.device], str]] = field(default_factory=dict)

    @property
    def train(self) -> bool:
        """A training step (fp32 weights, bf16 autocast for reduced precision; eager only)."""
        return self.kind == "train"


def call(method: str, **kw: Any) -> Factory:
    """A factory calling ``model.<method>(x)`` (``""``: the model itself) with keyword ``kw`` fixed."""

    def make(model: torch.nn.Module, compiled: bool) -> Callable[[Any], torch.Tensor]:
        fn = model if not method else getattr(model, method)
        return lambda x: fn(x, **kw)

    return make


def hf_call(get: Callable[[torch.nn.Module, Any], torch.Tensor]) -> Factory:
    """A factory from ``get(model, x)``."""
    return lambda model, compiled: lambda x: get(model, x)


# -- FLOPs and the share of the peak -------------------------------------------------------------


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """A linear layer's FLOPs: 2 · rows · out · in, for x (..., in) and weight (out, in)."""
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    return 2 * rows * w_shape[0] * w_shape[1]


def extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for ops torch's counter does not know (torch 2.13): oneDNN's fused linear
    (``mkldnn._linear_pointwise``, which polymodal's float32 CPU decoding calls instead of ``F.linear``: the same
    arithmetic), and the CPU flash-attention kernels behind SDPA on the CPU (``_for_cpu`` forward and backward,
    counted with torch's own SDPA formulas: 4·B·H·Nq·Nk·D forward, causal not halved)."""
    from torch.utils import flop_counter

    def attention(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(q, k, v)

    def attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {}  # keyed by the overload packet, as the counter looks ops up
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", attention),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", attention_backward),
    ):
        if hasattr(aten, name) and getattr(aten, name) not in flop_counter.flop_registry:
            out[getattr(aten, name)] = formula
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is not None:
        out[op] = _linear_flops
    return out


def count_flops(fn: Callable[[Any], Any], x: Any) -> int:
    """FLOPs of one ``fn(x)`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls,
    convolutions, attention kernels: 2 per multiply-add; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        fn(x)
    return int(counter.get_total_flops())


def achieved(gflop: float | None, ms: float | None, peak_tflops: float | None) -> tuple[float | None, float | None]:
    """(GFLOP/s, % of the measured peak) of ``gflop`` done in ``ms`` milliseconds (None where unknown)."""
    if not gflop or not ms:
        return None, None
    gflops = gflop / (ms / 1e3)
    return sig(gflops), (round(100.0 * gflops / (peak_tflops * 1e3), 2) if peak_tflops else None)


# -- building the pairs -------------------------------------------------------------------------


def _visible(model: torch.nn.Module, seed: int) -> None:
    """Perturb norm weights and biases (1 and 0 at init), so a dropped or swapped one would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ("norm" in name and name.endswith("weight")):
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def _convert(hf: torch.nn.Module, converter: str, folder: Path) -> torch.nn.Module:
    from polymodal.registry import get_registry

    hf.save_pretrained(folder, safe_serialization=True)
    return get_registry().get("converter", converter)(folder).eval()


def _sdpa(config: Any, model_cls: Any) -> Any:
    """Ask for transformers' SDPA attention where the model class has it (its fastest documented option)."""
    if getattr(model_cls, "_supports_sdpa", False):
        config._attn_implementation = "sdpa"
    return config


def _pixels(size: int) -> Callable:
    return lambda b, device, dtype, seed: torch.randn(
        b, 3, size, size, generator=torch.Generator().manual_seed(seed)
    ).to(device, dtype)  # (B, 3, S, S)


def _require(converter: str) -> None:
    from polymodal.registry import get_registry

    if not any(e.name == converter for e in get_registry().entries("converter")):
        raise LookupError(f"the {converter} converter is not registered")


def build(family: str, folder: Path, quick: bool, batches: Sequence[int], train_batch: int):
    """(label, transformers model, polymodal model, tasks) for one family."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if family in ("vit-b16", "vit-s16-train"):
        b16 = family == "vit-b16"
        size = (
            dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
            if b16
            else dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536)
        )
        cfg = dict(num_hidden_layers=12, image_size=224, patch_size=16, num_labels=1000, **size)
        if quick:
            cfg.update(
                hidden_size=48,
                num_attention_heads=4,
                intermediate_size=96,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
                num_labels=10,
            )
        cls = transformers.ViTForImageClassification
        hf = cls(_sdpa(transformers.ViTConfig(**cfg), cls)).eval()
        _visible(hf, 1)
        pm = _convert(hf, "hf-vit", folder)
        label = ("ViT-B/16" if b16 else "ViT-S/16") + (" (quick: tiny)" if quick else "")
        pixels = _pixels(cfg["image_size"])
        logits = hf_call(lambda m, x: m(pixel_values=x).logits)
        if b16:
            tasks = [Task(label, "forward", b, "images", b, pixels, call(""), logits) for b in batches]
        else:
            classes = cfg["num_labels"]
            tasks = [
                Task(
                    label,
                    "train-step",
                    train_batch,
                    "images",
                    train_batch,
                    pixels,
                    _train_step(lambda m, x: m(x), classes),
                    _train_step(lambda m, x: m(pixel_values=x).logits, classes),
                    kind="train",
                )
            ]
        return label, hf, pm, tasks
    if family == "clip-b16":
        vision = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        )
        text = {}
        if quick:
            vision = dict(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            )
            text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        cls = transformers.CLIPModel
        hf = cls(_sdpa(transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=512), cls))
        hf.eval()
        _visible(hf, 2)
        pm = _convert(hf, "hf-clip", folder)
        label = "CLIP ViT-B/16" + (" (quick: tiny)" if quick else "")
        tc = hf.config.text_config
        length, eos, vocab = tc.max_position_embeddings, tc.eos_token_id, tc.vocab_size

        def ids(b, device, dtype, seed):
            out = torch.randint(0, min(vocab, eos) - 2, (b, length), generator=torch.Generator().manual_seed(seed))
            out[:, -1] = eos  # every row full length, ending in end-of-text
            return out.to(device)  # (B, L)

        image = hf_call(lambda m, x: _pooled(m.get_image_features(pixel_values=x)))
        text_features = hf_call(lambda m, x: _pooled(m.get_text_features(input_ids=x)))
        tasks = [
            Task(label, "image-tower", b, "images", b, _pixels(vision["image_size"]), call("encode_image"), image)
            for b in batches
        ]
        tasks += [Task(label, "text-tower", b, "texts", b, ids, call("encode_text"), text_features) for b in batches]
        return label, hf, pm, tasks
    if family == "imagegpt-s":
        return _imagegpt(folder, quick, batches)
    if family == "gpt2":
        return _gpt2(folder, quick, batches)
    raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")


def _ids(vocab: int, length: int, first: int | None = None) -> Callable:
    """Random token ids (B, length) below ``vocab``; ``first`` fixes position 0 (a start token)."""

    def make(b, device, dtype, seed):
        out = torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))
        if first is not None:
            out[:, 0] = first
        return out.to(device)  # (B, length)

    return make


def _hf_generate(new: int, pad: int, static: bool) -> Factory:
    """transformers' greedy ``generate`` of exactly ``new`` tokens: its default (dynamic) cache, or its
    static cache. Eager mode keeps it eager (``disable_compile``; on CUDA ``generate`` would otherwise
    compile a static cache by itself); compiled mode lets it compile the static cache's forward, also
    on the CPU, where ``generate`` does not by itself (``CompileConfig._compile_all_devices``)."""

    def make(model: torch.nn.Module, compiled: bool) -> Callable[[Any], torch.Tensor]:
        from transformers import CompileConfig

        kw: dict[str, Any] = dict(
            max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=pad
        )
        if static:
            kw["cache_implementation"] = "static"
            if compiled:
                config = CompileConfig()
                config._compile_all_devices = True
                kw["compile_config"] = config
            else:
                kw["disable_compile"] = True
        return lambda ids: model.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # (B, P + new)

    return make


def _reference_options(static: bool) -> Callable[[bool, torch.device], str]:
    def describe(compiled: bool, device: torch.device) -> str:
        if not static:
            return "generate (default DynamicCache, eager)"
        if compiled:
            how = "torch.compile (CompileConfig, forced on the CPU)" if device.type == "cpu" else "torch.compile"
            return f"generate (cache_implementation='static', {how})"
        return "generate (cache_implementation='static', disable_compile=True)"

    return describe


def _decoder_generate(new: int) -> Factory:
    """polymodal's greedy generation of exactly ``new`` tokens through the model's causal decoder
    (compiled static-cache steps when the model was prepared with ``compile=True``)."""

    def make(model: torch.nn.Module, compiled: bool) -> Callable[[Any], torch.Tensor]:
        decoder = getattr(model, "decoder", None)
        if decoder is not None and hasattr(decoder, "generate"):
            return lambda ids: decoder.generate(ids, new, greedy=True)  # (B, P + new)
        from polymodal.generation.sampling import generate

        return lambda ids: generate(model.step_fn(), ids, new, greedy=True)  # (B, P + new)

    return make


def _generation_tasks(label: str, batches, vocab: int, prompt: Callable, length: int, new: int, ours: Factory, pad):
    """A greedy generation task per batch size, with the static-cache reference beside the default one."""
    return [
        Task(
            label,
            "generate",
            b,
            "new tokens",
            b * new,
            prompt,
            ours,
            _hf_generate(new, pad, static=False),
            kind="generate",
            references={"static": _hf_generate(new, pad, static=True)},
            reference_options={"dynamic": _reference_options(False), "static": _reference_options(True)},
        )
        for b in batches
    ]


def _imagegpt(folder: Path, quick: bool, batches: Sequence[int]):
    """ImageGPT-S (512 wide, 24 layers, 1024 positions): forward over 1024 tokens, and greedy
    generation of 32 pixels after the start token (KV cache on every side)."""
    import transformers

    _require("hf-imagegpt")
    cfg = dict(n_embd=512, n_layer=24, n_head=8, n_positions=1024, vocab_size=513)
    if quick:
        cfg.update(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cls = transformers.ImageGPTForCausalImageModeling
    hf = cls(_sdpa(transformers.ImageGPTConfig(**cfg), cls)).eval()
    _visible(hf, 3)
    pm = _convert(hf, "hf-imagegpt", folder)
    label = "ImageGPT-S" + (" (quick: tiny)" if quick else "")
    n, sos = cfg["n_positions"], cfg["vocab_size"] - 1
    new = 8 if quick else IGPT_NEW
    tasks = [
        Task(
            label,
            "forward",
            b,
            "tokens",
            b * n,
            _ids(sos, n, sos),
            call(""),
            hf_call(lambda m, x: m(input_ids=x).logits),
        )
        for b in batches
    ]
    tasks += _generation_tasks(label, batches, sos, _ids(sos, 1, sos), 1, new, _decoder_generate(new), 0)
    return label, hf, pm, tasks


def _gpt2(folder: Path, quick: bool, batches: Sequence[int]):
    """GPT-2 small (124M): forward over 256 tokens, and greedy generation with the KV cache."""
    import transformers

    _require("hf-gpt2")
    cfg = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
    n = 256
    if quick:
        cfg.update(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=300, bos_token_id=299, eos_token_id=299)
        n = 32
    cls = transformers.GPT2LMHeadModel
    hf = cls(_sdpa(transformers.GPT2Config(**cfg), cls)).eval()
    _visible(hf, 4)
    pm = _convert(hf, "hf-gpt2", folder)
    label = "GPT-2" + (" (quick: tiny)" if quick else "")
    vocab = cfg["vocab_size"]
    generate_ids = call("generate_ids", max_new_tokens=GPT2_NEW, greedy=True, stop_at_eos=False)  # (B, P + new)
    tasks = [
        Task(
            label, "forward", b, "tokens", b * n, _ids(vocab, n), call(""), hf_call(lambda m, x: m(input_ids=x).logits)
        )
        for b in batches
    ]
    tasks += _generation_tasks(
        label, batches, vocab, _ids(vocab, GPT2_PROMPT), GPT2_PROMPT, GPT2_NEW, generate_ids, vocab - 1
    )
    return label, hf, pm, tasks


def _pooled(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _train_step(logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], classes: int) -> Factory:
    """A factory of full optimiser steps (AdamW, cross-entropy on fixed random labels, bf16 autocast when the
    step's ``bf16`` state is set); a step returns the logits."""

    def make(model: torch.nn.Module, compiled: bool) -> Callable[[Any], torch.Tensor]:
        state: dict[str, Any] = {}

        def step(x: torch.Tensor) -> torch.Tensor:
            if "opt" not in state:
                state["opt"] = torch.optim.AdamW(model.parameters(), lr=1e-5)
                state["labels"] = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
            labels = state["labels"].to(x.device)
            state["opt"].zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=state.get("bf16", False)):
                out = logits(model, x)  # (B, K)
                loss = F.cross_entropy(out.float(), labels)
            loss.backward()
            state["opt"].step()
            return out

        step.state = state  # type: ignore[attr-defined]
        return step

    return make


# -- measuring ----------------------------------------------------------------------------------


def difference(ours: torch.Tensor, theirs: torch.Tensor, generated: int | None = None) -> float:
    """How far two outputs are apart: max |ours − theirs| / max |theirs| (ValueError when the shapes differ or
    ``theirs`` is all zeros); token ids (``generated`` = new tokens at the end): the share of new tokens that differ."""
    if ours.shape != theirs.shape:
        raise ValueError(f"output shapes differ: polymodal {tuple(ours.shape)}, transformers {tuple(theirs.shape)}")
    if generated is not None:
        return (ours[:, -generated:].cpu() != theirs[:, -generated:].cpu()).float().mean().item()
    scale = theirs.abs().max().item()
    if not scale > 0:
        raise ValueError("the transformers output is all zeros, so a match would mean nothing")
    return (ours.float() - theirs.float()).abs().max().item() / scale


def parity(task: Task, pm: torch.nn.Module, hf: torch.nn.Module, reference: str = "dynamic") -> float:
    """float32 eager difference on a 2-item batch on the CPU (before anything is timed); generation: the
    share of greedy tokens that differ (0: the same tokens)."""
    x = task.inputs(2, torch.device("cpu"), torch.float32, 7)
    theirs = task.references.get(reference, task.theirs) if reference != "dynamic" else task.theirs
    if task.train:  # the logits before the step, on copies (a step changes the weights)
        pm, hf = copy.deepcopy(pm), copy.deepcopy(hf)
    with torch.enable_grad() if task.train else torch.no_grad():
        a, b = task.ours(pm, False)(x), theirs(hf, False)(x)  # (2, ...)
    return difference(a, b, task.items // task.batch if task.kind == "generate" else None)


REFERENCE_BROKEN = "reference: "
"""Prefix of a parity error that is the reference's own fault (its row is ``skipped``, not ``mismatch``)."""


def reference_consistency(task: Task, hf: torch.nn.Module, reference: str) -> float:
    """The share of greedy tokens where transformers' ``reference`` generation differs from its default one."""
    x = task.inputs(2, torch.device("cpu"), torch.float32, 7)
    with torch.no_grad():
        a, b = task.theirs(hf, False)(x), task.references[reference](hf, False)(x)
    return difference(a, b, task.items // task.batch)


def flops_per_call(task: Task, pm: torch.nn.Module) -> int:
    """FLOPs of one polymodal call at the task's batch: counted at batch 1 in float32, eager, on the CPU,
    times the batch (every op here is linear in the batch: no op mixes batch rows)."""
    x = task.inputs(1, torch.device("cpu"), torch.float32, 3)
    model = copy.deepcopy(pm) if task.train else pm
    grad = torch.enable_grad if task.train else torch.no_grad
    model.train(task.train)
    try:
        with grad():
            return count_flops(task.ours(model, False), x) * task.batch
    finally:
        model.eval()


def time_pair(fns: Sequence[Callable[[], Any]], device: torch.device, rounds: int, round_s: float) -> list[dict]:
    """Interleaved timing: per round each side runs as many calls as fill ``round_s`` (at least one),
    the order alternating round by round; per side the median and IQR over rounds, in seconds."""
    per_call = []
    for fn in fns:  # warm-up (1 call), then the fastest of 2 timed calls sizes a round
        fn()
        best = float("inf")
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - start)
        per_call.append(best)
    counts = [max(1, round(round_s / max(t, 1e-9))) for t in per_call]
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns)))[:: (1 if r % 2 == 0 else -1)]
        for i in order:
            sync(device)
            start = time.perf_counter()
            for _ in range(counts[i]):
                fns[i]()
            sync(device)
            samples[i].append((time.perf_counter() - start) / counts[i])
    out = []
    for count, s in zip(counts, samples):
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        out.append(dict(median=statistics.median(s), iqr=q[2] - q[0], calls=count * len(s)))
    return out


def _attention_used(task: Task, device: torch.device, dtype: torch.dtype) -> str:
    from polymodal.attention import select_backend
    from polymodal.attention.masks import AttentionSpec

    causal = task.task in ("text-tower", "generate") or task.model.startswith(("ImageGPT", "GPT-2"))
    try:
        return select_backend(
            AttentionSpec(device.type, dtype, task.train, causal, False, False, "", False, 197, 197, 64)
        ).name
    except Exception as exc:  # reported, not raised: this is a label
        return f"? ({exc})"


def prepare_polymodal(model: torch.nn.Module, dtype: torch.dtype, compiled: bool, kind: str = "") -> str:
    """Prepare ``model`` in place as a user would for inference; returns what was done, in words.

    ``polymodal.models.inference.prepare_inference(model, dtype=, compile=)``, what ``polymodal.load(DIR,
    dtype=, compile=)`` and ``--dtype``/``--compile`` call: weights cast to ``dtype``; with ``compile`` the
    transformer stacks compiled for uncached calls and the causal decoder's static-cache step compiled for
    generation. Train steps (``kind="train"``) keep float32 weights and autocast to bf16 for reduced precision."""
    dt = str(dtype).replace("torch.", "")
    if kind == "train":
        return f"float32 weights{', torch.autocast(bfloat16)' if dtype != torch.float32 else ''}, eager"
    try:
        from polymodal.models.inference import prepare_inference
    except ImportError:  # older checkouts: the same cast by hand, nothing compiled
        model.to(dtype)
        return f"model.to({dt}) (no prepare_inference in this checkout), eager"
    prepare_inference(model, dtype=dtype, compile=compiled)
    return f"prepare_inference(dtype={dt}, compile={compiled})"


def reference_options(task: Task, hf: torch.nn.Module, dtype: torch.dtype, compiled: bool, ref: str, device) -> str:
    """What the transformers side ran with, in words (dtype, attention implementation, compile, cache)."""
    dt = str(dtype).replace("torch.", "")
    impl = getattr(hf.config, "_attn_implementation", None)
    if task.train:
        return f"float32 weights{', torch.autocast(bfloat16)' if dtype != torch.float32 else ''}, attn_implementation={impl}, eager"
    head = f"dtype={dt}, attn_implementation={impl}"
    if task.kind == "generate":
        return f"{head}, {task.reference_options[ref](compiled, device)}"
    return f"{head}, {'torch.compile' if compiled else 'eager'}"


def _row(task: Task, dtype: torch.dtype, mode: str, ref: str, device, base: dict[str, Any], rounds: int) -> dict:
    """A row's identity and machine fields, nothing measured yet."""
    dt = str(dtype).replace("torch.", "")
    key = f"{task.model}|{task.task}|b{task.batch}|{dt}"  # eager, default reference: the older reports' key
    key += "" if mode == "eager" else f"|{mode}"
    key += "" if ref == "dynamic" else f"|{ref}"
    return dict(
        suite="models",
        key=key,
        model=task.model,
        task=task.task,
        batch=task.batch,
        dtype=dt,
        mode=mode,
        reference=ref if task.kind == "generate" else None,
        device=device.type,
        device_name=base["device_name"],
        status="ok",
        reason=None,
        parity_rel_diff=None,
        rel_diff=None,
        unit=f"{task.unit}/s",
        median_ms=None,
        polymodal_ms=None,
        polymodal_iqr_ms=None,
        transformers_ms=None,
        transformers_iqr_ms=None,
        ratio=None,
        polymodal_per_s=None,
        transformers_per_s=None,
        gflop=None,
        polymodal_gflops=None,
        transformers_gflops=None,
        polymodal_pct_peak=None,
        transformers_pct_peak=None,
        polymodal_options=None,
        transformers_options=None,
        polymodal_peak_mem_mb=None,
        transformers_peak_mem_mb=None,
        rounds=rounds,
        polymodal_attention=None,
        transformers_attention=None,
        threads=base["threads"],
        torch=base["torch"],
        transformers=base.get("transformers"),
    )


def _mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def run_task(
    task: Task,
    pm: torch.nn.Module,
    hf: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    rounds: int,
    round_s: float,
    base: dict[str, Any],
    checks: dict[str, tuple[float | None, str | None]],
    gflop: float | None,
    peak_tflops: float | None,
    options: str,
) -> list[dict[str, Any]]:
    """Time one task in one dtype and mode on both (prepared) models; a row per transformers reference.

    ``checks``: each reference's float32 parity (difference, error); a reference that failed it is a
    ``mismatch`` row, untimed. The first call of every side (which compiles, when compiled) is a probe whose
    outputs give ``rel_diff`` in this dtype and mode (float32: gated like the parity check)."""
    compiled = mode == "compiled"
    refs = ["dynamic", *task.references]
    rows = {ref: _row(task, dtype, mode, ref, device, base, rounds) for ref in refs}
    for ref, row in rows.items():
        row.update(
            parity_rel_diff=checks[ref][0],
            gflop=None if gflop is None else sig(gflop),
            polymodal_options=options,
            transformers_options=reference_options(task, hf, dtype, compiled, ref, device),
            polymodal_attention=_attention_used(task, device, dtype),
            transformers_attention=getattr(hf.config, "_attn_implementation", None),
        )
    tol = PARITY_RTOL["float32"]
    live = []
    for ref in refs:
        diff, err = checks[ref]
        if err is not None or diff is None or diff > tol:
            why = err or f"outputs differ: max |polymodal − transformers| / max |transformers| = {diff:.2e} > {tol:g}"
            if task.kind == "generate" and err is None:
                why = f"greedy tokens differ in float32 ({diff:.1%} of the new tokens)"
            if err and err.startswith(REFERENCE_BROKEN):
                rows[ref].update(status="skipped", reason=err[len(REFERENCE_BROKEN) :])
            else:
                rows[ref].update(status="mismatch", reason=f"not timed: {why}")
        else:
            live.append(ref)
    if not live:
        return list(rows.values())
    x = task.inputs(task.batch, device, torch.float32 if task.train else dtype, 0)  # train: fp32 in, autocast
    sides = [task.ours(pm, compiled)] + [
        (task.theirs if ref == "dynamic" else task.references[ref])(hf, compiled) for ref in live
    ]
    if task.train:
        for fn in sides:
            fn.state["bf16"] = dtype != torch.float32
    if compiled and task.kind == "forward":  # the reference: torch.compile around its call (polymodal: prepared)
        sides = [sides[0], *(torch.compile(fn) for fn in sides[1:])]
    grad = torch.enable_grad if task.train else torch.inference_mode
    for model in (pm, hf):
        model.train(task.train)
    new = task.items // task.batch if task.kind == "generate" else None
    try:
        with grad():
            outs, mem = [], []
            for fn, model in zip(sides, [pm] + [hf] * len(live)):  # probes: compile, and this dtype's outputs
                if device.type == "cuda":
                    sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                outs.append(fn(x))
                if device.type == "cuda":
                    sync(device)
                    mem.append(round(_mb(model) + (torch.cuda.max_memory_allocated(device) - before) / 2**20, 1))
            diffs = [difference(outs[0], o, new) for o in outs[1:]]
            for ref, d in zip(live, diffs):
                rows[ref]["rel_diff"] = round(d, 8)
            bad = [ref for ref, d in zip(live, diffs) if dtype == torch.float32 and d > tol]
            for ref in bad:
                rows[ref].update(
                    status="mismatch",
                    reason=f"not timed: {mode} float32 outputs differ ({rows[ref]['rel_diff']:.2e} > {tol:g})",
                )
            keep = [i for i, ref in enumerate(live) if ref not in bad]
            if not keep:
                return list(rows.values())
            fns = [sides[0]] + [sides[1 + i] for i in keep]
            times = time_pair([(lambda fn=fn: fn(x)) for fn in fns], device, rounds, round_s)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        for ref in live:
            rows[ref].update(status="error", reason=why)
        return list(rows.values())
    finally:
        for model in (pm, hf):
            model.eval()
    ours = times[0]
    for i, theirs in zip(keep, times[1:]):
        ref = live[i]
        pm_ms, hf_ms = ours["median"] * 1e3, theirs["median"] * 1e3
        pm_gflops, pm_pct = achieved(gflop, pm_ms, peak_tflops)
        hf_gflops, hf_pct = achieved(gflop, hf_ms, peak_tflops)
        rows[ref].update(
            median_ms=round(pm_ms, 3),
            polymodal_ms=round(pm_ms, 3),
            polymodal_iqr_ms=round(ours["iqr"] * 1e3, 3),
            transformers_ms=round(hf_ms, 3),
            transformers_iqr_ms=round(theirs["iqr"] * 1e3, 3),
            ratio=round(hf_ms / pm_ms, 3),
            polymodal_per_s=round(task.items / ours["median"], 2),
            transformers_per_s=round(task.items / theirs["median"], 2),
            polymodal_gflops=pm_gflops,
            transformers_gflops=hf_gflops,
            polymodal_pct_peak=pm_pct,
            transformers_pct_peak=hf_pct,
            calls=[ours["calls"], theirs["calls"]],
        )
        if mem:
            rows[ref].update(polymodal_peak_mem_mb=mem[0], transformers_peak_mem_mb=mem[1 + i])
        sheet = (base.get("datasheet_peak_tflops") or {}).get(rows[ref]["dtype"])
        if sheet:  # CUDA: also the share of the datasheet's dense peak
            rows[ref].update(
                polymodal_pct_datasheet=achieved(gflop, pm_ms, sheet)[1],
                transformers_pct_datasheet=achieved(gflop, hf_ms, sheet)[1],
            )
    return list(rows.values())


def reason_row(
    model: str,
    task: str,
    why: str,
    status: str,
    device: torch.device,
    dtype: torch.dtype,
    base: dict[str, Any],
    batch: int | None = None,
    mode: str = "eager",
) -> dict[str, Any]:
    """A row with no timing: why this comparison was not timed."""
    dt = str(dtype).replace("torch.", "")
    return dict(
        suite="models",
        key=f"{model}|{task}|b{batch}|{dt}" + ("" if mode == "eager" else f"|{mode}"),
        model=model,
        task=task,
        batch=batch,
        dtype=dt,
        mode=mode,
        device=device.type,
        device_name=base["device_name"],
        status=status,
        reason=why,
        median_ms=None,
        polymodal_ms=None,
        transformers_ms=None,
        ratio=None,
        threads=base["threads"],
        torch=base["torch"],
        transformers=base.get("transformers"),
    )


# -- the suite --------------------------------------------------------------------------------


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The suite's options."""
    p = argparse.ArgumentParser(
        prog="polymodal bench models",
        description=(
            "polymodal vs transformers on identical converted weights (random init, nothing downloaded): "
            "dtypes × eager/compiled, interleaved runs, same threads; GFLOP/s and % of the measured matmul peak; "
            "prints a table and writes JSON rows."
        ),
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--models", default="", help=f"comma-separated subset of {', '.join(FAMILIES)} (default: all)")
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated subset of forward, image-tower, text-tower, train-step, generate (default: all)",
    )
    p.add_argument("--batches", default="", help="forward batch sizes (default 1,8 on the CPU, 1,32 on CUDA)")
    p.add_argument(
        "--lm-batches",
        "--igpt-batches",
        dest="igpt_batches",
        default="",
        help="forward batch sizes of the language models: ImageGPT-S (1024 tokens each) and GPT-2 (256 tokens "
        "each) (default 1 on the CPU, --batches on CUDA)",
    )
    p.add_argument(
        "--gen-batches", default="", help="GPT-2 and ImageGPT-S generation batch sizes (default 1,4; quick 1,2)"
    )
    p.add_argument("--train-batch", type=int, default=None, help="ViT-S/16 train-step batch (default 8 CPU, 64 CUDA)")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated torch dtypes, the same on both sides of a row (default float32,bfloat16; "
        "train steps keep float32 weights and autocast to bfloat16)",
    )
    p.add_argument("--dtype", default=None, help="one dtype (the same as --dtypes with one name)")
    p.add_argument(
        "--modes",
        default="eager,compiled",
        help="eager and/or compiled: torch.compile on both sides (generation: polymodal's compiled static-cache "
        "decoder against generate's compiled static cache; train steps run eager only)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per side (default 5, quick 2)")
    p.add_argument("--round-s", type=float, default=None, help="seconds per side per round (default 0.5, quick 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul peak size n (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--budget-s", type=float, default=None, help="skip the tasks left after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny configs and short timings (a smoke run)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/models-<device>.json)")
    p.add_argument("--compare", default=None, metavar="BASELINE.json", help="flag rows slower than the baseline")
    p.add_argument("--threshold", type=float, default=0.05, help="--compare: relative slowdown that counts")
    p.add_argument("--min-us", type=float, default=30.0, help="--compare: absolute slowdown that counts, µs")
    p.add_argument("--fail-on-regression", action="store_true", help="exit status 3 when --compare finds one")
    return p.parse_args(list(argv))


def models_table(report: dict[str, Any]) -> str:
    """The screen table of a models report."""
    m = report["machine"]
    cuda = m["device"] == "cuda"
    head = ["model", "task", "batch", "dtype", "mode", "ref", "polymodal ms", "transformers ms", "ratio"]
    head += ["GFLOP", "pm GFLOP/s", "tf GFLOP/s", "pm %peak", "tf %peak", "rel diff", "unit"]
    head += ["pm MB", "tf MB"] if cuda else []
    head.append("status")
    body = []
    for r in report["rows"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        line = [
            r["model"],
            r["task"],
            fmt(r["batch"]),
            r["dtype"],
            r.get("mode", "eager"),
            r.get("reference") or r.get("baseline") or "-",  # fusion rows: the uncached path is the reference
            fmt(r["polymodal_ms"], ".2f"),
            fmt(r["transformers_ms"] if r.get("transformers_ms") is not None else r.get("baseline_ms"), ".2f"),
            fmt(r["ratio"], ".3f"),
            fmt(r.get("gflop"), ".4g"),
            fmt(r.get("polymodal_gflops"), ".1f"),
            fmt(r.get("transformers_gflops"), ".1f"),
            fmt(r.get("polymodal_pct_peak"), ".1f"),
            fmt(r.get("transformers_pct_peak"), ".1f"),
            fmt(r.get("rel_diff"), ".1e"),
            r.get("unit", "-"),
        ]
        line += (
            [fmt(r.get("polymodal_peak_mem_mb"), ".0f"), fmt(r.get("transformers_peak_mem_mb"), ".0f")] if cuda else []
        )
        body.append([*line, status])
    peaks = ", ".join(f"{k} {v['tflops'] * 1e3:.1f} GFLOP/s" for k, v in report.get("matmul_peak", {}).items())
    title = (
        f"models on {m['device_name']} ({m['device']}, torch {m['torch']}, transformers {m.get('transformers')}, "
        f"{m['threads']} threads, load {m.get('load_before')}); measured matmul peak: {peaks}; "
        f"ratio = transformers time / polymodal time"
    )
    return title + "\n" + text_table(head, body)


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in allowed]
    if unknown:
        raise BenchUsageError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


def models_suite(argv: Sequence[str]) -> int:
    """Run the suite from command-line options; returns the exit status."""
    args = parse(argv)
    device = resolve_device(args.device)
    if args.compare:  # a bad baseline is reported now, not after the whole run
        from bench import read_report

        read_report(args.compare, "baseline")
    families = _names(args.models, FAMILIES, "model") or list(FAMILIES)
    args.task_list = _names(args.tasks, ("forward", "image-tower", "text-tower", "train-step", "generate"), "task")
    args.mode_list = _names(args.modes, MODES, "mode")
    if not args.mode_list:
        raise BenchUsageError(f"--modes names none of {', '.join(MODES)}")
    names = [x.strip() for x in (args.dtypes or args.dtype or "float32,bfloat16").split(",") if x.strip()]
    dtypes = [getattr(torch, x, None) for x in names]
    if not names or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise BenchUsageError(f"--dtypes must name floating torch dtypes (float32, bfloat16); got {names}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()] or (
        [1, 2] if args.quick else [1, 32] if device.type == "cuda" else [1, 8]
    )
    args.igpt_batch_list = [int(b) for b in args.igpt_batches.split(",") if b.strip()] or (
        batches if device.type == "cuda" or args.quick else [1]
    )
    args.gen_batch_list = [int(b) for b in args.gen_batches.split(",") if b.strip()] or (
        [1, 2] if args.quick else [1, 4]
    )
    train_batch = args.train_batch or (2 if args.quick else 64 if device.type == "cuda" else 8)
    rounds = args.rounds or (2 if args.quick else 5)
    round_s = args.round_s if args.round_s is not None else (0.01 if args.quick else 0.5)
    prior = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, list(argv), device, dtypes, families, batches, train_batch, rounds, round_s)
    finally:
        torch.set_num_threads(prior)


def _sizes(family: str, args: argparse.Namespace, batches: Sequence[int]) -> dict[str, Sequence[int]]:
    if family == "imagegpt-s":
        return dict(forward=args.igpt_batch_list, generate=args.gen_batch_list)
    if family == "gpt2":
        return dict(forward=args.igpt_batch_list, generate=args.gen_batch_list)
    return dict(forward=batches)


def _family_rows(
    family: str, args, device, dtypes, batches, train_batch, rounds, round_s, base, peaks, deadline: float | None
) -> list[dict]:
    dtype0 = dtypes[0]
    try:
        import transformers  # noqa: F401
    except ImportError:
        why = "transformers is not installed (pip install transformers)"
        return [reason_row(family, "-", why, "skipped", device, dtype0, base)]
    with tempfile.TemporaryDirectory(prefix=f"polymodal-bench-{family}-") as tmp:
        try:
            sizes = _sizes(family, args, batches)
            label, hf, pm, tasks = build(
                family, Path(tmp) / "hf", args.quick, sorted(set().union(*sizes.values())), train_batch
            )
        except Exception as exc:  # a converter that is missing or refuses the config is a finding
            why = f"could not build and convert: {type(exc).__name__}: {exc}"[:400]
            return [
                reason_row(
                    family, "-", why, "skipped" if isinstance(exc, LookupError) else "error", device, dtype0, base
                )
            ]
    wanted = sizes.get
    tasks = [
        t
        for t in tasks
        if (t.train or t.batch in (wanted("generate" if t.kind == "generate" else "forward") or [t.batch]))
        and (not args.task_list or t.task in args.task_list)
    ]
    checks, flops = {}, {}
    for task in tasks:  # every output is checked (float32, CPU, eager) before anything is timed
        for ref in ("dynamic", *task.references):
            try:
                checks[id(task), ref] = (round(parity(task, pm, hf, ref), 8), None)
            except Exception as exc:
                checks[id(task), ref] = (None, f"{type(exc).__name__}: {exc}"[:400])
            if ref != "dynamic" and checks[id(task), ref][0] and checks[id(task), "dynamic"][0] == 0:
                own = reference_consistency(task, hf, ref)  # the reference against its own default cache
                if own:
                    why = (
                        f"transformers' {ref} cache gives other greedy tokens than its own default cache "
                        f"({own:.0%} of the new tokens differ, float32): not a valid reference for this model"
                    )
                    checks[id(task), ref] = (checks[id(task), ref][0], REFERENCE_BROKEN + why)
        try:
            flops[id(task)] = flops_per_call(task, pm) / 1e9
        except Exception as exc:  # a label, not a failure
            print(f"  could not count the FLOPs of {task.model} {task.task}: {exc}", file=sys.stderr)
            flops[id(task)] = None
    rows = []
    for dtype in dtypes:
        for mode in args.mode_list:
            variant = [t for t in tasks if not (t.train and mode != "eager")]  # train steps: eager only
            if not variant:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                why = "the run's time budget (--budget-s) was used up before this task"
                rows += [
                    reason_row(t.model, t.task, why, "skipped", device, dtype, base, t.batch, mode) for t in variant
                ]
                continue
            pm_v, hf_v = copy.deepcopy(pm).to(device), copy.deepcopy(hf).to(device)
            kinds = {t.kind for t in variant}
            options = prepare_polymodal(pm_v, dtype, mode == "compiled", "train" if kinds == {"train"} else "")
            if kinds != {"train"}:  # train steps: float32 weights, autocast
                hf_v.to(dtype)
            for task in variant:
                if deadline is not None and time.perf_counter() > deadline:
                    why = "the run's time budget (--budget-s) was used up before this task"
                    rows.append(
                        reason_row(task.model, task.task, why, "skipped", device, dtype, base, task.batch, mode)
                    )
                    continue
                ck = {ref: checks[id(task), ref] for ref in ("dynamic", *task.references)}
                peak_dtype = "bfloat16" if task.train and dtype != torch.float32 else str(dtype).replace("torch.", "")
                peak = (peaks.get(peak_dtype) or {}).get("tflops")  # train: autocast's matmuls run in bf16
                rows += run_task(
                    task, pm_v, hf_v, device, dtype, mode, rounds, round_s, base, ck, flops[id(task)], peak, options
                )
                for r in rows[-1 - len(task.references) :]:
                    print(
                        f"  {r['model']:24s} {r['task']:12s} b{task.batch:<4d} {r['dtype']:9s} {mode:9s} "
                        f"{r.get('reference') or '':8s} {r['status']:8s} ratio {fmt(r['ratio'])}",
                        file=sys.stderr,
                        flush=True,
                    )
            del pm_v, hf_v
            torch._dynamo.reset()  # compiled graphs of this variant are not reused: free them
    return rows


def _fusion_rows(args, device, names: list[str], rounds: int, round_s: float, base: dict[str, Any]) -> list[dict]:
    """The Flamingo and FROMAGe rows of ``bench_fusion.fusion_rows`` (cached against uncached, eager only)."""
    if "eager" not in args.mode_list:
        return []
    try:
        from bench_fusion import fusion_rows
    except ImportError as exc:
        why = f"benchmarks/bench_fusion.py is missing or does not import: {exc}"
        return [reason_row("fusion", "-", why, "skipped", device, getattr(torch, names[0]), base)]
    options = argparse.Namespace(dtypes=names, quick=args.quick, rounds=rounds, round_s=round_s)
    try:
        return fusion_rows(options, device, base)
    except Exception as exc:  # reported as a row, like any other failure
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        return [reason_row("fusion", "-", why, "error", device, getattr(torch, names[0]), base)]


def _run(args, argv, device, dtypes, families, batches, train_batch, rounds, round_s) -> int:
    from bench_report import compare, compare_text

    base = machine(device)
    started = time.perf_counter()
    deadline = None if args.budget_s is None else started + args.budget_s
    names = [str(d).replace("torch.", "") for d in dtypes]
    peak_time = 0.05 if args.quick else 1.0
    peaks = {
        name: matmul_peak(device, d, peak_time, args.matmul_n or (256 if args.quick else None))
        for name, d in zip(names, dtypes)
    }
    if "float32" in peaks and "bfloat16" not in peaks and any(f == "vit-s16-train" for f in families):
        peaks["bfloat16"] = matmul_peak(
            device, torch.bfloat16, peak_time, args.matmul_n or (256 if args.quick else None)
        )
    rows: list[dict[str, Any]] = []
    for family in families:
        if deadline is not None and time.perf_counter() > deadline:
            why = "the run's time budget (--budget-s) was used up before this model"
            rows.append(reason_row(family, "-", why, "skipped", device, dtypes[0], base))
            continue
        if family == "fusion":
            rows += _fusion_rows(args, device, names, rounds, round_s, base)
            continue
        rows += _family_rows(family, args, device, dtypes, batches, train_batch, rounds, round_s, base, peaks, deadline)
    base["load_after"] = load_average()
    report = dict(
        suite="models",
        command="polymodal bench models " + " ".join(argv),
        machine=base,
        dtypes=names,
        dtype=names[0],
        modes=args.mode_list,
        matmul_peak=peaks,
        batches=batches,
        igpt_batches=args.igpt_batch_list,
        gen_batches=args.gen_batch_list,
        train_batch=train_batch,
        rounds=rounds,
        round_s=round_s,
        quick=args.quick,
        parity_rtol=PARITY_RTOL["float32"],
        seconds=round(time.perf_counter() - started, 1),
        rows=rows,
    )
    print(models_table(report))
    status = 1 if any(r["status"] in ("error", "mismatch") for r in rows) else 0
    if args.compare:
        from bench import read_report

        result = compare(report, read_report(args.compare, "baseline"), args.threshold, args.min_us)
        report["compare"] = dict(baseline=str(args.compare), **result)
        print(compare_text(result))
        if args.fail_on_regression and result["regressions"]:
            status = 3
    out = (
        Path(args.out)
        if args.out
        else report_path("models", device, base["device_name"], "-quick" if args.quick else "")
    )
    write_json(out, report)
    print(f"wrote {out}")
    return status
