"""``polymodal bench models``: polymodal against transformers on identical converted weights.

Each peer is a randomly initialised transformers model built from its config (nothing is
downloaded), saved with ``save_pretrained`` to a temporary folder and converted with
polymodal's own converter (``hf-vit``, ``hf-clip``, ``hf-imagegpt``). Outputs are checked
to match before anything is timed (a mismatch is a row with the reason, not a timing). The
two sides then run interleaved (A B, B A, ...) on the same inputs and thread count; the row
reports both medians and ``ratio`` = transformers time / polymodal time (> 1: polymodal is
faster), and on CUDA each side's peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import BenchUsageError, fmt, load_average, machine, report_path, resolve_device, sync, text_table, write_json

PARITY_RTOL = {"float32": 1e-4}  # max |ours - theirs| / max |theirs| allowed before timing (fp32 check)
FAMILIES = ("vit-b16", "clip-b16", "vit-s16-train", "imagegpt-s", "gpt2")
NOT_BUILT = {  # rows that are reported with a reason instead of a timing
    ("ImageGPT-S", "generate"): "KV-cache generation against transformers lives in benchmarks/generate.py",
}


@dataclass
class Task:
    """One comparison: the same call on both models, with its inputs."""

    model: str  # "ViT-B/16"
    task: str  # forward | image-tower | text-tower | train-step
    batch: int
    unit: str  # what items/s counts: images, texts, tokens
    items: int  # items per call
    inputs: Callable[[int, torch.device, torch.dtype, int], Any]  # (batch, device, dtype, seed) → input
    ours: Callable[[Any], torch.Tensor]
    theirs: Callable[[Any], torch.Tensor]
    train: bool = False
    check: tuple[Callable, Callable] | None = None  # parity calls (ours, theirs) when not ``ours``/``theirs``


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


def _pixels(size: int) -> Callable:
    return lambda b, device, dtype, seed: torch.randn(
        b, 3, size, size, generator=torch.Generator().manual_seed(seed)
    ).to(device, dtype)  # (B, 3, S, S)


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
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(**cfg)).eval()
        _visible(hf, 1)
        pm = _convert(hf, "hf-vit", folder)
        label = ("ViT-B/16" if b16 else "ViT-S/16") + (" (quick: tiny)" if quick else "")
        pixels = _pixels(cfg["image_size"])
        if b16:
            tasks = [
                Task(label, "forward", b, "images", b, pixels, pm, lambda x: hf(pixel_values=x).logits) for b in batches
            ]
        else:
            classes = cfg["num_labels"]
            theirs = lambda x: hf(pixel_values=x).logits  # noqa: E731
            tasks = [
                Task(
                    label,
                    "train-step",
                    train_batch,
                    "images",
                    train_batch,
                    pixels,
                    _train_step(pm, pm, classes),
                    _train_step(hf, theirs, classes),
                    train=True,
                    check=(pm, theirs),
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
        hf = transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=512)
        ).eval()
        _visible(hf, 2)
        pm = _convert(hf, "hf-clip", folder)
        label = "CLIP ViT-B/16" + (" (quick: tiny)" if quick else "")
        tc = hf.config.text_config
        length, eos, vocab = tc.max_position_embeddings, tc.eos_token_id, tc.vocab_size

        def ids(b, device, dtype, seed):
            out = torch.randint(0, min(vocab, eos) - 2, (b, length), generator=torch.Generator().manual_seed(seed))
            out[:, -1] = eos  # every row full length, ending in end-of-text
            return out.to(device)  # (B, L)

        tasks = [
            Task(
                label,
                "image-tower",
                b,
                "images",
                b,
                _pixels(vision["image_size"]),
                pm.encode_image,
                lambda x: _pooled(hf.get_image_features(pixel_values=x)),
            )
            for b in batches
        ]
        tasks += [
            Task(
                label,
                "text-tower",
                b,
                "texts",
                b,
                ids,
                pm.encode_text,
                lambda x: _pooled(hf.get_text_features(input_ids=x)),
            )
            for b in batches
        ]
        return label, hf, pm, tasks
    if family == "imagegpt-s":
        from polymodal.registry import get_registry

        if not any(e.name == "hf-imagegpt" for e in get_registry().entries("converter")):
            raise LookupError("the hf-imagegpt converter is not registered")
        cfg = dict(n_embd=512, n_layer=24, n_head=8, n_positions=1024, vocab_size=513)
        if quick:
            cfg.update(n_embd=32, n_layer=2, n_head=4, n_positions=64)
        hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**cfg)).eval()
        _visible(hf, 3)
        pm = _convert(hf, "hf-imagegpt", folder)
        label = "ImageGPT-S" + (" (quick: tiny)" if quick else "")
        n, sos = cfg["n_positions"], cfg["vocab_size"] - 1

        def tokens(b, device, dtype, seed):
            out = torch.randint(0, sos, (b, n), generator=torch.Generator().manual_seed(seed))
            out[:, 0] = sos  # the start token, then pixels
            return out.to(device)  # (B, N)

        tasks = [
            Task(label, "forward", b, "tokens", b * n, tokens, pm, lambda x: hf(input_ids=x).logits) for b in batches
        ]
        return label, hf, pm, tasks
    if family == "gpt2":
        return _gpt2(folder, quick, batches)
    raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")


GPT2_PROMPT, GPT2_NEW = 16, 32
"""Generation rows: a random prompt of 16 tokens extended greedily by exactly 32 (KV cache on both)."""


def _gpt2(folder: Path, quick: bool, batches: Sequence[int]):
    """GPT-2 small (124M): forward over 256 tokens, and greedy generation with the KV cache."""
    import transformers

    from polymodal.registry import get_registry

    if not any(e.name == "hf-gpt2" for e in get_registry().entries("converter")):
        raise LookupError("the hf-gpt2 converter is not registered")
    cfg = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
    n = 256
    if quick:
        cfg.update(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=300, bos_token_id=299, eos_token_id=299)
        n = 32
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    _visible(hf, 4)
    pm = _convert(hf, "hf-gpt2", folder)
    label = "GPT-2" + (" (quick: tiny)" if quick else "")
    vocab = cfg["vocab_size"]

    def tokens(length: int) -> Callable:
        def make(b, device, dtype, seed):
            return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed)).to(device)

        return make  # (B, length) ids

    def ours_generate(ids: torch.Tensor) -> torch.Tensor:
        return pm.generate_ids(ids, GPT2_NEW, greedy=True, stop_at_eos=False)  # (B, P + new)

    def theirs_generate(ids: torch.Tensor) -> torch.Tensor:
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GPT2_NEW,
            min_new_tokens=GPT2_NEW,
            do_sample=False,
            use_cache=True,
            pad_token_id=vocab - 1,
        )  # (B, P + new)

    tasks = [
        Task(label, "forward", b, "tokens", b * n, tokens(n), pm, lambda x: hf(input_ids=x).logits) for b in batches
    ]
    tasks += [
        Task(label, "generate", b, "new tokens", b * GPT2_NEW, tokens(GPT2_PROMPT), ours_generate, theirs_generate)
        for b in batches
    ]
    return label, hf, pm, tasks


def _pooled(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _train_step(model: torch.nn.Module, logits: Callable, classes: int) -> Callable:
    """A full optimiser step (AdamW, cross-entropy on fixed random labels); returns the logits."""
    state: dict[str, Any] = {}

    def step(x: torch.Tensor) -> torch.Tensor:
        if "opt" not in state:
            state["opt"] = torch.optim.AdamW(model.parameters(), lr=1e-5)
            state["labels"] = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
        labels = state["labels"].to(x.device)
        state["opt"].zero_grad(set_to_none=True)
        autocast = torch.autocast(x.device.type, torch.bfloat16, enabled=state.get("bf16", False))
        with autocast:
            out = logits(x)  # (B, K)
            loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        state["opt"].step()
        return out

    step.state = state  # type: ignore[attr-defined]
    return step


# -- measuring ----------------------------------------------------------------------------------


def parity(task: Task) -> float:
    """max |ours − theirs| / max |theirs| on a 2-item batch on the CPU in float32 (ValueError if all-zero)."""
    x = task.inputs(2, torch.device("cpu"), torch.float32, 7)
    call_ours, call_theirs = task.check or (task.ours, task.theirs)
    with torch.no_grad():
        ours, theirs = call_ours(x), call_theirs(x)
    if ours.shape != theirs.shape:
        raise ValueError(f"output shapes differ: polymodal {tuple(ours.shape)}, transformers {tuple(theirs.shape)}")
    scale = theirs.abs().max().item()
    if not scale > 0:
        raise ValueError("the transformers output is all zeros, so a match would mean nothing")
    return (ours.float() - theirs.float()).abs().max().item() / scale


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

    causal = task.task in ("text-tower",) or task.model.startswith("ImageGPT")
    try:
        return select_backend(
            AttentionSpec(device.type, dtype, task.train, causal, False, False, "", False, 197, 197, 64)
        ).name
    except Exception as exc:  # reported, not raised: this is a label
        return f"? ({exc})"


def run_task(
    task: Task,
    hf: torch.nn.Module,
    pm: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    round_s: float,
    base: dict[str, Any],
    check: float | None,
) -> dict[str, Any]:
    """Time one task on both sides (its parity ``check`` already measured); a row."""
    dt = str(dtype).replace("torch.", "")
    row = dict(
        suite="models",
        key=f"{task.model}|{task.task}|b{task.batch}|{dt}",
        model=task.model,
        task=task.task,
        batch=task.batch,
        dtype=dt,
        device=device.type,
        device_name=base["device_name"],
        status="ok",
        reason=None,
        parity_rel_diff=check,
        unit=f"{task.unit}/s",
        median_ms=None,
        polymodal_ms=None,
        polymodal_iqr_ms=None,
        transformers_ms=None,
        transformers_iqr_ms=None,
        ratio=None,
        polymodal_per_s=None,
        transformers_per_s=None,
        polymodal_peak_mem_mb=None,
        transformers_peak_mem_mb=None,
        rounds=rounds,
        polymodal_attention=_attention_used(task, device, dtype),
        transformers_attention=getattr(hf.config, "_attn_implementation", None),
        threads=base["threads"],
        torch=base["torch"],
        transformers=base.get("transformers"),
    )
    x = task.inputs(task.batch, device, torch.float32 if task.train else dtype, 0)  # train: fp32 in, autocast
    train_bf16 = task.train and dtype != torch.float32
    for fn in (task.ours, task.theirs):
        if task.train:
            fn.state["bf16"] = train_bf16
    grad = torch.enable_grad if task.train else torch.inference_mode
    weights = dict(device=device, dtype=torch.float32 if task.train else dtype)  # train: autocast on fp32 weights
    for model in (pm, hf):
        model.train(task.train)
    sides = [lambda: task.ours(x), lambda: task.theirs(x)]
    try:
        if device.type == "cuda":  # one model moved at a time: its own weights, state and activations
            for name, model, fn in (("polymodal", pm, sides[0]), ("transformers", hf, sides[1])):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                model.to(**weights)
                with grad():
                    fn()
                    fn()
                sync(device)
                row[f"{name}_peak_mem_mb"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)
        else:
            for model in (pm, hf):
                model.to(**weights)
        with grad():
            times = time_pair(sides, device, rounds, round_s)
    except Exception as exc:
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]}
    finally:
        if device.type == "cuda":  # so the next task measures each model's memory from zero again
            pm.cpu()
            hf.cpu()
    ours, theirs = times
    return {
        **row,
        "median_ms": round(ours["median"] * 1e3, 3),
        "polymodal_ms": round(ours["median"] * 1e3, 3),
        "polymodal_iqr_ms": round(ours["iqr"] * 1e3, 3),
        "transformers_ms": round(theirs["median"] * 1e3, 3),
        "transformers_iqr_ms": round(theirs["iqr"] * 1e3, 3),
        "ratio": round(theirs["median"] / ours["median"], 3),
        "polymodal_per_s": round(task.items / ours["median"], 2),
        "transformers_per_s": round(task.items / theirs["median"], 2),
        "calls": [ours["calls"], theirs["calls"]],
    }


def reason_row(
    model: str,
    task: str,
    why: str,
    status: str,
    device: torch.device,
    dtype: torch.dtype,
    base: dict[str, Any],
    batch: int | None = None,
) -> dict[str, Any]:
    """A row with no timing: why this comparison was not timed."""
    dt = str(dtype).replace("torch.", "")
    return dict(
        suite="models",
        key=f"{model}|{task}|b{batch}|{dt}",
        model=model,
        task=task,
        batch=batch,
        dtype=dt,
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
            "interleaved runs, same threads; prints a table and writes JSON rows."
        ),
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--models", default="", help=f"comma-separated subset of {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--batches", default="", help="forward batch sizes (default 1,8 on the CPU, 1,32 on CUDA)")
    p.add_argument(
        "--igpt-batches",
        default="",
        help="ImageGPT-S batch sizes, 1024 tokens each (default 1 on the CPU, --batches on CUDA)",
    )
    p.add_argument("--train-batch", type=int, default=None, help="ViT-S/16 train-step batch (default 8 CPU, 64 CUDA)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 or bfloat16 (default float32 CPU, bfloat16 CUDA; "
        "train steps use bf16 autocast with float32 weights)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per side (default 5, quick 2)")
    p.add_argument("--round-s", type=float, default=None, help="seconds per side per round (default 0.5, quick 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
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
    head = [
        "model",
        "task",
        "batch",
        "dtype",
        "polymodal ms",
        "transformers ms",
        "ratio",
        "polymodal /s",
        "transformers /s",
        "unit",
    ]
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
            fmt(r["polymodal_ms"], ".2f"),
            fmt(r["transformers_ms"], ".2f"),
            fmt(r["ratio"], ".3f"),
            fmt(r.get("polymodal_per_s"), ".1f"),
            fmt(r.get("transformers_per_s"), ".1f"),
            r.get("unit", "-"),
        ]
        line += (
            [fmt(r.get("polymodal_peak_mem_mb"), ".0f"), fmt(r.get("transformers_peak_mem_mb"), ".0f")] if cuda else []
        )
        body.append([*line, status])
    title = (
        f"models on {m['device_name']} ({m['device']}, torch {m['torch']}, transformers {m.get('transformers')}, "
        f"{m['threads']} threads, load {m.get('load_before')}); ratio = transformers time / polymodal time"
    )
    return title + "\n" + text_table(head, body)


def models_suite(argv: Sequence[str]) -> int:
    """Run the suite from command-line options; returns the exit status."""
    args = parse(argv)
    device = resolve_device(args.device)
    if args.compare:  # a bad baseline is reported now, not after the whole run
        from bench import read_report

        read_report(args.compare, "baseline")
    families = [f.strip() for f in args.models.split(",") if f.strip()] or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise BenchUsageError(f"unknown model {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise BenchUsageError(f"--dtype must name a torch dtype (float32, bfloat16); got {dtype_name!r}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()] or (
        [1, 2] if args.quick else [1, 32] if device.type == "cuda" else [1, 8]
    )
    args.igpt_batch_list = [int(b) for b in args.igpt_batches.split(",") if b.strip()] or (
        batches if device.type == "cuda" or args.quick else [1]
    )
    train_batch = args.train_batch or (2 if args.quick else 64 if device.type == "cuda" else 8)
    rounds = args.rounds or (2 if args.quick else 5)
    round_s = args.round_s if args.round_s is not None else (0.01 if args.quick else 0.5)
    prior = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, list(argv), device, dtype, families, batches, train_batch, rounds, round_s)
    finally:
        torch.set_num_threads(prior)


def _family_rows(
    family: str, args, device, dtype, batches, train_batch, rounds, round_s, base, deadline: float | None
) -> list[dict]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [
            reason_row(
                family, "-", "transformers is not installed (pip install transformers)", "skipped", device, dtype, base
            )
        ]
    with tempfile.TemporaryDirectory(prefix=f"polymodal-bench-{family}-") as tmp:
        try:
            sizes = args.igpt_batch_list if family == "imagegpt-s" else batches
            label, hf, pm, tasks = build(family, Path(tmp) / "hf", args.quick, sizes, train_batch)
        except Exception as exc:  # a converter that is missing or refuses the config is a finding
            return [
                reason_row(
                    family,
                    "-",
                    f"could not build and convert: {type(exc).__name__}: {exc}"[:400],
                    "skipped" if isinstance(exc, LookupError) else "error",
                    device,
                    dtype,
                    base,
                )
            ]
    rows = []
    checks = {}
    for task in tasks:  # every output is checked (float32, CPU) before anything is timed
        try:
            checks[id(task)] = (parity(task), None)
        except Exception as exc:
            checks[id(task)] = (None, f"{type(exc).__name__}: {exc}")
    for task in tasks:
        diff, err = checks[id(task)]
        tol = PARITY_RTOL["float32"]
        if deadline is not None and time.perf_counter() > deadline:
            rows.append(
                {
                    **reason_row(
                        task.model,
                        task.task,
                        "the run's time budget (--budget-s) was used up before this task",
                        "skipped",
                        device,
                        dtype,
                        base,
                        task.batch,
                    ),
                    "parity_rel_diff": diff,
                }
            )
        elif err is not None or diff is None or diff > tol:
            why = err or f"outputs differ: max |polymodal − transformers| / max |transformers| = {diff:.2e} > {tol:g}"
            rows.append(
                {
                    **reason_row(
                        task.model, task.task, f"not timed: {why}", "mismatch", device, dtype, base, task.batch
                    ),
                    "parity_rel_diff": diff,
                }
            )
        else:
            rows.append(run_task(task, hf, pm, device, dtype, rounds, round_s, base, round(diff, 8)))
        r = rows[-1]
        print(
            f"  {r['model']:24s} {r['task']:12s} b{task.batch:<4d} {r['status']:8s} ratio {fmt(r['ratio'])}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _run(args, argv, device, dtype, families, batches, train_batch, rounds, round_s) -> int:
    from bench_report import compare, compare_text

    base = machine(device)
    started = time.perf_counter()
    deadline = None if args.budget_s is None else started + args.budget_s
    rows: list[dict[str, Any]] = []
    for family in families:
        if deadline is not None and time.perf_counter() > deadline:
            rows.append(
                reason_row(
                    family,
                    "-",
                    "the run's time budget (--budget-s) was used up before this model",
                    "skipped",
                    device,
                    dtype,
                    base,
                )
            )
            continue
        rows += _family_rows(family, args, device, dtype, batches, train_batch, rounds, round_s, base, deadline)
    if not args.quick:
        rows += [
            reason_row(model, task, why, "skipped", device, dtype, base) for (model, task), why in NOT_BUILT.items()
        ]
    base["load_after"] = load_average()
    report = dict(
        suite="models",
        command="polymodal bench models " + " ".join(argv),
        machine=base,
        dtype=str(dtype).replace("torch.", ""),
        batches=batches,
        igpt_batches=args.igpt_batch_list,
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
