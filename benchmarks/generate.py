"""Sampling speed of the autoregressive image decoder: KV cache on/off, and polymodal vs transformers.

    python benchmarks/generate.py                  # about a minute on one CPU thread
    python benchmarks/generate.py --threads 2 --batch 8
    python benchmarks/generate.py --help

Part 1 times :meth:`IGPT.sample_tokens` (the core ``generate`` loop, multinomial sampling)
at 16, 64 and 256 image tokens (4×4, 8×8, 16×16 images), with the KV cache and without it
(the whole stream recomputed every step). Part 2 builds one randomly initialised
transformers ``ImageGPTForCausalImageModeling``, converts it with ``hf-imagegpt`` (same
config, same weights) and times ``generate(do_sample=True)`` against polymodal's sampler
at 64 tokens, both with their caches and without, after checking that both decode the
same tokens greedily. Tokens/s counts generated image tokens of the whole batch.
Results go to ``benchmarks/results/generate-<device>-<device name>.json``.

This script is a small, fast check of the cache itself (a tiny model, sampling). The full-size greedy
generation rows (GPT-2 and ImageGPT-S at batch 1 and 4, float32/bfloat16, eager/compiled, against
transformers' ``generate`` with its default and its static cache, with GFLOP/s) are in
``polymodal bench models`` (``--tasks generate``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import load_average, machine, report_path, resolve_device, write_json
from polymodal.plugins.igpt import IGPT, IGPTConfig
from polymodal.plugins.igpt.convert import convert_hf_imagegpt


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--batch", type=int, default=4, help="images sampled together (default 4)")
    p.add_argument("--dim", type=int, default=64, help="decoder width (default 64)")
    p.add_argument("--depth", type=int, default=4, help="decoder blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--palette", type=int, default=16, help="palette colours (default 16)")
    p.add_argument("--tokens", default="16,64,256", help="image tokens per sample, square numbers (default 16,64,256)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported (default 5)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate-<device>.json)")
    return p.parse_args(argv)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each function: one untimed warm-up each, then ``repeats`` rounds that call
    every function once in turn (so a change in machine load hits all of them alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Visible random weights (norm gains around 1), so sampling spreads over the palette."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name or ".ln_" in name) and p.dim() == 1 else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def row(impl: str, tokens: int, cache: bool, batch: int, times: list[float]) -> dict[str, Any]:
    """One JSON row: the median time and the tokens per second it gives."""
    median = statistics.median(times)
    return dict(
        impl=impl,
        tokens=tokens,
        use_cache=cache,
        batch=batch,
        median_s=round(median, 5),
        best_s=round(min(times), 5),
        times_s=[round(t, 5) for t in times],
        tokens_per_s=round(batch * tokens / median, 1),
        tokens_per_s_best=round(batch * tokens / min(times), 1),
    )


def cache_rows(args: argparse.Namespace, device: torch.device, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Part 1: polymodal sampling with and without the KV cache at each image length."""
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"--tokens must be square numbers (side² pixels); got {n}")
        torch.manual_seed(0)
        model = IGPT(
            IGPTConfig(
                image_size=side, channels=1, palette_size=args.palette, dim=args.dim, depth=args.depth, heads=args.heads
            )
        )
        randomise(model, 0)
        model.to(device).eval()
        times = interleaved(
            {
                c: (lambda c=c, model=model: model.sample_tokens(args.batch, seed=0, use_cache=c == "cache"))
                for c in ("cache", "no-cache")
            },
            args.repeats,
            sync,
        )
        for c, t in times.items():
            rows.append(row("polymodal", n, c == "cache", args.batch, t))
            print(f"polymodal  tokens {n:4d}  {c:8s}  {rows[-1]['tokens_per_s']:9.1f} tokens/s", flush=True)
    return rows


def transformers_rows(args: argparse.Namespace, device: torch.device, sync: Callable[[], None]) -> dict[str, Any]:
    """Part 2: transformers' ImageGPT ``generate`` vs polymodal on the same converted weights (64 tokens)."""
    import transformers

    n = 64
    cfg = transformers.ImageGPTConfig(
        vocab_size=args.palette + 1,
        n_positions=n,
        n_embd=args.dim,
        n_layer=args.depth,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.ImageGPTForCausalImageModeling(cfg)
    randomise(hf, 1)
    hf.eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf", safe_serialization=True)
        pm = convert_hf_imagegpt(Path(tmp) / "hf")
    pm.palette_fitted.fill_(True)
    hf.to(device)
    pm.to(device)
    start = torch.full((args.batch, 1), args.palette, device=device)  # the start token

    def hf_generate(cache: bool, sample: bool = True) -> torch.Tensor:
        with torch.no_grad():
            # top-k left at the generation default (50): a no-op over the palette's 16 logits
            return hf.generate(
                input_ids=start, max_length=n + 1, do_sample=sample, temperature=1.0, use_cache=cache, pad_token_id=0
            )

    greedy_equal = torch.equal(
        hf_generate(True, sample=False)[:, 1:].cpu(), pm.sample_tokens(args.batch, top_k=1).cpu()
    )
    rows = []
    for cache in (True, False):
        times = interleaved(
            {
                "transformers": lambda cache=cache: hf_generate(cache),
                "polymodal": lambda cache=cache: pm.sample_tokens(args.batch, seed=0, use_cache=cache),
            },
            args.repeats,
            sync,
        )
        for impl, t in times.items():
            rows.append(row(impl, n, cache, args.batch, t))
            print(f"{impl:12s} tokens {n}  cache {str(cache):5s}  {rows[-1]['tokens_per_s']:9.1f} tokens/s", flush=True)
    return dict(greedy_tokens_equal=greedy_equal, transformers=transformers.__version__, rows=rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    info = machine(device)
    began = time.perf_counter()
    rows = cache_rows(args, device, sync)
    versus = transformers_rows(args, device, sync)
    info["load_after"] = load_average()
    report = dict(
        suite="generate",
        command="python benchmarks/generate.py " + " ".join(argv or sys.argv[1:]),
        machine=info,
        config=dict(
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            palette=args.palette,
            batch=args.batch,
            repeats=args.repeats,
            sampling="multinomial, T=1",
        ),
        seconds=round(time.perf_counter() - began, 1),
        rows=rows,
        versus_transformers=versus,
    )
    out = Path(args.out) if args.out else report_path("generate", device, info["device_name"])
    write_json(out, report)
    print(f"greedy decoding identical to transformers: {versus['greedy_tokens_equal']}")
    print(f"wrote {out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
