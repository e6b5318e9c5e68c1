"""``polymodal bench attention``: attention kernels across backends, shapes, masks, dtypes and passes.

Every registered backend (``math``, ``sdpa``, ``xformers``, ``flex`` and any a plugin adds),
plus each kernel of torch's SDPA forced where the device offers it (``sdpa[flash]``,
``sdpa[efficient]``, ``sdpa[cudnn]``, ``sdpa[math]``), × ViT, causal-LM, cross-attention,
DALL·E-style sparse image and packed-versus-padded shapes × head dims × dtypes × forward and
forward+backward. Each row: median and IQR, TFLOP/s, its fraction of the machine's matmul
peak (timed in the same run) and of the datasheet peak (GPU), bandwidth, peak memory (CUDA).
A combination a backend cannot run is a row with the reason. Nothing is compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import (
    BenchUsageError,
    copy_bandwidth,
    datasheet_tflops,
    fmt,
    load_average,
    machine,
    matmul_peak,
    measure,
    report_path,
    resolve_device,
    sig,
    sync,
    write_json,
)

SDPA_KERNELS = {"cpu": ("flash", "math"), "cuda": ("flash", "efficient", "cudnn", "math")}
"""The SDPA kernels each device type offers, forced one at a time as ``sdpa[<kernel>]``."""
MATERIALISING = ("math", "sdpa[math]", "flex")  # build the whole (B, H, Nq, Nk) score matrix (flex: uncompiled)
MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class Case:
    """One attention call: q (B, H, Nq, D), k and v (B, H, Nk, D), and its mask."""

    name: str
    family: str  # vit | causal-lm | cross | sparse-image | packed | padded
    b: int
    h: int
    nq: int
    nk: int
    d: int
    causal: bool = False
    seqlens: tuple[int, ...] | None = None  # packed: B == 1, Nq == Nk == sum
    padded: tuple[int, ...] | None = None  # the same lengths, padded (key_padding)
    pattern: str | None = None  # sparse image pattern (row, column, conv), a dense (N, N) mask
    grid: tuple[int, int] | None = None  # image tokens (h, w) of a sparse pattern
    prefix: int = 0  # text tokens before the image of a sparse pattern

    @property
    def mask(self) -> str:
        """The mask kinds of the call, e.g. ``causal``, ``seqlens``, ``image-row``, ``none``."""
        kinds = [
            k
            for k, on in (
                ("causal", self.causal),
                ("seqlens", self.seqlens),
                ("key_padding", self.padded),
                (f"image-{self.pattern}", self.pattern),
            )
            if on
        ]
        return "+".join(kinds) or "none"

    def shape(self) -> dict[str, Any]:
        """B, H, Nq, Nk, D (and the lengths of a packed or padded batch, the image grid of a pattern)."""
        out: dict[str, Any] = dict(B=self.b, H=self.h, Nq=self.nq, Nk=self.nk, D=self.d)
        if self.seqlens:
            out["seqlens"] = list(self.seqlens)
        if self.padded:
            out["lengths"] = list(self.padded)
        if self.pattern:
            out.update(prefix=self.prefix, grid=list(self.grid or ()))
        return out

    def dense_mask(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The (N, N) bool mask of a sparse image pattern (None for the other cases)."""
        if not self.pattern:
            return None
        from polymodal.attention import image_pattern_mask

        return image_pattern_mask(self.pattern, self.grid, prefix=self.prefix, device=device)  # (N, N)

    def flops(self) -> float:
        """Forward FLOPs: 4·B·H·Nq·Nk·D, causal halved; packed and padded: the sum over the real
        sequences (so both count the same work); sparse patterns: only the visible pairs."""
        if self.seqlens or self.padded:
            return sum(attention_flops(1, self.h, n, n, self.d, self.causal) for n in (self.seqlens or self.padded))
        if self.pattern:
            return 4.0 * self.b * self.h * visible_pairs(self.pattern, self.grid, self.prefix) * self.d
        return attention_flops(self.b, self.h, self.nq, self.nk, self.d, self.causal)

    def io_bytes(self, element: int, backward: bool) -> float:
        """The least memory traffic of a fused kernel: read q, k, v and write o; a backward pass
        also reads q, k, v, o, dO and writes dq, dk, dv. Masks other than dense ones are free."""
        per = self.b * self.h * self.d * element
        total = (2 * self.nq + 2 * self.nk) * per
        if backward:
            total += (4 * self.nq + 4 * self.nk) * per
        if self.pattern:
            total += self.nq * self.nk * (2 if backward else 1)  # the bool mask, read once per pass
        return float(total)

    def scores_bytes(self, element: int, backward: bool) -> float:
        """What a backend that materialises the scores holds: about 3 (B, H, Nq, Nk) tensors, 6 with backward."""
        return float(self.b * self.h * self.nq * self.nk * element * (6 if backward else 3))


def attention_flops(b: int, h: int, nq: int, nk: int, d: int, causal: bool = False) -> float:
    """The issue's forward count: 4·B·H·Nq·Nk·D (QKᵀ and PV, a multiply-add = 2), causal halved."""
    return 4.0 * b * h * nq * nk * d * (0.5 if causal else 1.0)


def total_flops(case: Case, mode: str) -> float:
    """FLOPs of one call in ``mode``: the backward pass counts 2.5× the forward."""
    return case.flops() * (3.5 if mode == "forward+backward" else 1.0)


@functools.lru_cache(maxsize=64)
def visible_pairs(pattern: str, grid: tuple[int, int], prefix: int) -> int:
    """(query, key) pairs a sparse image pattern lets through."""
    from polymodal.attention import image_pattern_mask

    return int(image_pattern_mask(pattern, grid, prefix=prefix).sum())


# -- grids ------------------------------------------------------------------------------------


def _lm(ns: Sequence[int], tokens: int, hidden: int, d: int) -> list[Case]:
    return [Case(f"lm-{n}", "causal-lm", max(1, tokens // n), hidden // d, n, n, d, causal=True) for n in ns]


def _varlen(name: str, lengths: Sequence[int], h: int, d: int, causal: bool = False) -> list[Case]:
    n, longest = sum(lengths), max(lengths)
    return [
        Case(f"{name}-packed", "packed", 1, h, n, n, d, causal=causal, seqlens=tuple(lengths)),
        Case(f"{name}-padded", "padded", len(lengths), h, longest, longest, d, causal=causal, padded=tuple(lengths)),
    ]


def _sparse(b: int, h: int, d: int, grid: tuple[int, int], prefix: int) -> list[Case]:
    n = prefix + grid[0] * grid[1]
    return [
        Case(f"image-{p}-{n}", "sparse-image", b, h, n, n, d, pattern=p, grid=grid, prefix=prefix)
        for p in ("row", "column", "conv")
    ]


GRIDS = ("quick", "small", "full")


def grid(kind: str, d: int) -> list[Case]:
    """The shapes of a grid at head dim ``d``: ``quick`` (a smoke run), ``small`` (CPU default:
    minutes on 2 cores) or ``full`` (CUDA default; LM shapes as in the FlashAttention-2 paper:
    16k tokens per batch, width 2048)."""
    if kind == "quick":
        return [
            Case("vit-17", "vit", 2, 2, 17, 17, d),
            *_lm((64,), 128, 2 * d, d),
            Case("cross-4x32", "cross", 2, 2, 4, 32, d),
            *_sparse(1, 2, d, (3, 3), 2)[:1],
            *_varlen("varlen", (5, 3, 8), 2, d),
        ]
    if kind == "small":
        h_vit, h = max(1, 384 // d), max(1, 256 // d)
        return [
            *(Case(f"vit-{n}", "vit", 8, h_vit, n, n, d) for n in (65, 197, 577)),
            *_lm((256, 512, 1024, 2048), 2048, 256, d),
            Case("cross-32x2048", "cross", 2, h, 32, 2048, d),
            Case("cross-2048x32", "cross", 2, h, 2048, 32, d),
            *_sparse(1, h, d, (16, 16), 64),
            *_varlen("varlen", (300, 45, 520, 90, 17, 200), h, d),
        ]
    if kind == "full":
        h_vit, h = 768 // d, 1024 // d
        lengths = (1024, 77, 2048, 512, 197, 4096, 33, 256)
        return [
            *(Case(f"vit-{n}", "vit", 32, h_vit, n, n, d) for n in (65, 197, 577)),
            *_lm((512, 1024, 2048, 4096, 8192), 16384, 2048, d),
            Case("cross-64x4096", "cross", 8, h, 64, 4096, d),
            Case("cross-4096x64", "cross", 8, h, 4096, 64, d),
            *_sparse(4, h, d, (32, 32), 256),  # DALL·E: 256 text + 32×32 image tokens
            *_varlen("varlen", lengths, h, d),
            *_varlen("varlen-causal", lengths, h, d, causal=True),
        ]
    raise BenchUsageError(f"--grid must be one of {', '.join(GRIDS)}; got {kind!r}")


def variants(device: torch.device) -> list[str]:
    """Every registered backend, then ``sdpa[<kernel>]`` for each SDPA kernel the device offers."""
    from polymodal.attention import backends

    names = sorted(backends())
    if "sdpa" in names:
        names += [f"sdpa[{k}]" for k in SDPA_KERNELS.get(device.type, ())]
    return names


def _kernel_context(kernel: str | None):
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "math": "MATH",
    }[kernel]
    return sdpa_kernel(getattr(SDPBackend, member))


# -- one row ----------------------------------------------------------------------------------


@dataclass
class Context:
    """What every row of one run shares: the device, the peaks, the budgets."""

    device: torch.device
    base: dict[str, Any]
    min_run_time: float
    peaks: dict[str, float]  # dtype → measured matmul TFLOP/s
    bandwidth_gbps: float | None
    max_gb: float
    deadline: float | None  # time.perf_counter() after which rows are skipped


def inputs(case: Case, device: torch.device, dtype: torch.dtype, grad: bool, seed: int = 0) -> dict[str, Any]:
    """Random (never all-zero) q, k, v and the case's mask arguments."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(case.b, case.h, n, case.d, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
        for n in (case.nq, case.nk, case.nk)
    )  # (B, H, N, D)
    call: dict[str, Any] = dict(q=q, k=k, v=v, causal=case.causal)
    if case.seqlens:
        call["seqlens"] = list(case.seqlens)
    if case.padded:
        lengths = torch.tensor(case.padded).unsqueeze(1)  # (B, 1)
        call["key_padding"] = (torch.arange(case.nk).unsqueeze(0) < lengths).to(device)  # (B, Nk)
    if case.pattern:
        call["mask"] = case.dense_mask(device)  # (N, N) bool
    return call


def shape_tag(shape: dict[str, Any]) -> str:
    """``B8H6Nq65Nk65D64``: the part of a row's key that pins its shape (so changed grids never match)."""
    return "B{B}H{H}Nq{Nq}Nk{Nk}D{D}".format(**shape)


def empty_row(variant: str, case: Case, dtype: torch.dtype, mode: str, ctx: Context) -> dict[str, Any]:
    """A row with the grid point filled in and every measurement ``None``."""
    dt = str(dtype).replace("torch.", "")
    return dict(
        suite="attention",
        key=f"{variant}|{case.name}|{shape_tag(case.shape())}|{dt}|{mode}",
        backend=variant,
        case=case.name,
        family=case.family,
        shape=case.shape(),
        seq_len=case.nk,
        head_dim=case.d,
        mask=case.mask,
        dtype=dt,
        device=ctx.device.type,
        device_name=ctx.base["device_name"],
        mode=mode,
        status="ok",
        reason=None,
        median_ms=None,
        iqr_ms=None,
        runs=None,
        work_gflop=sig(total_flops(case, mode) / 1e9, 6),
        tflops=None,
        gflops=None,
        pct_measured_peak=None,
        pct_datasheet_peak=None,
        gbps=None,
        pct_measured_bandwidth=None,
        peak_mem_mb=None,
        torch=ctx.base["torch"],
        xformers=ctx.base.get("xformers"),
        threads=ctx.base["threads"],
    )


def _sdpa_refusal(caught: list, exc: Exception) -> str:
    why = sorted({str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()})
    return ("; ".join(why) or str(exc).splitlines()[0])[:400]


def run_case(variant: str, case: Case, dtype: torch.dtype, mode: str, ctx: Context) -> dict[str, Any]:
    """Time one (backend, case, dtype, mode); a combination that cannot run is a row with the reason."""
    from polymodal.attention import AttentionError, attention, backends
    from polymodal.attention.dispatch import _spec

    row = empty_row(variant, case, dtype, mode, ctx)
    skip = lambda why: {**row, "status": "skipped", "reason": why}  # noqa: E731
    if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
        return skip("the run's time budget (--budget-s) was used up before this row")
    backend, _, kernel = variant.partition("[")
    kernel = kernel.rstrip("]") or None
    impl = backends().get(backend)
    if impl is None:
        return skip(f"backend {backend!r} is not registered")
    backward = mode == "forward+backward"
    call = inputs(case, ctx.device, dtype, backward)
    why = impl.supports(
        _spec(
            call["q"],
            call["k"],
            case.causal,
            call.get("key_padding"),
            call.get("seqlens"),
            call.get("mask"),
            0.0,
            call["v"],
        )
    )
    if why is not None:
        return skip(why)
    if kernel is not None and kernel not in SDPA_KERNELS.get(ctx.device.type, ()):
        return skip(f"the SDPA {kernel} kernel does not run on {ctx.device.type}")
    element = torch.finfo(dtype).bits // 8
    if variant in MATERIALISING:
        need = case.scores_bytes(element, backward) / 1e9
        if need > ctx.max_gb:
            return skip(
                f"{variant} materialises the (B, H, Nq, Nk) scores: about {need:.1f} GB, over the "
                f"--max-gb budget of {ctx.max_gb:.1f} GB"
            )
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    grad_out = (
        torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device, dtype) if backward else None
    )

    def fn() -> None:
        out = attention(q, k, v, backend=backend, **call)  # (B, H, Nq, D)
        if grad_out is not None:
            q.grad = k.grad = v.grad = None
            out.backward(grad_out)

    try:
        with _kernel_context(kernel):
            cuda = ctx.device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(ctx.device)
                start = torch.cuda.memory_allocated(ctx.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fn()  # the probe: does this combination run at all?
                    sync(ctx.device)
                except RuntimeError as exc:
                    if kernel and ("No available kernel" in str(exc) or "No viable backend" in str(exc)):
                        return skip(f"the SDPA {kernel} kernel cannot run this call: {_sdpa_refusal(caught, exc)}")
                    raise
            if cuda:
                row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated(ctx.device) - start) / 2**20, 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flex's "called without torch.compile", once per call
                median, iqr, runs = measure(fn, ctx.device, ctx.min_run_time, warmup=0)  # the probe warmed up
    except AttentionError as exc:
        return skip(str(exc))
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as exc:
        return skip(f"out of memory: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # a kernel that fails at run time is a finding, reported in its row
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]}
    flops = total_flops(case, mode)
    tflops = flops / median / 1e12
    gbps = case.io_bytes(element, backward) / median / 1e9
    peak, sheet = ctx.peaks.get(row["dtype"]), ctx.base.get("datasheet_tflops", {}).get(row["dtype"])
    return {
        **row,
        "median_ms": sig(median * 1e3, 6),
        "iqr_ms": sig(iqr * 1e3, 6),
        "runs": runs,
        "tflops": sig(tflops),
        "gflops": sig(tflops * 1e3),
        "pct_measured_peak": sig(100 * tflops / peak) if peak else None,
        "pct_datasheet_peak": sig(100 * tflops / sheet) if sheet else None,
        "gbps": sig(gbps),
        "pct_measured_bandwidth": sig(100 * gbps / ctx.bandwidth_gbps) if ctx.bandwidth_gbps else None,
    }


# -- the dispatcher's overhead ------------------------------------------------------------------


def overhead(
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[tuple[int, int, int, int]],
    rounds: int,
    min_run_time: float,
) -> dict[str, Any]:
    """``attention(q, k, v)`` vs ``F.scaled_dot_product_attention(q, k, v)`` at ``shapes`` (B, H, N, D).

    Interleaved (A, B, A, B, ...) so drift and neighbours' load hit both equally; the figure
    per shape is the median over rounds of each side's median. ``tiny_call_overhead_us``:
    the absolute cost per call at (1, 1, 8, 16), where no kernel hides it.
    """
    import torch.nn.functional as F

    from polymodal.attention import attention

    def pair(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run_time: float) -> tuple[float, float]:
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(measure(lambda: attention(q, k, v), device, run_time)[0])
            theirs.append(measure(lambda: F.scaled_dot_product_attention(q, k, v), device, run_time)[0])
        return statistics.median(ours), statistics.median(theirs)

    results = []
    for b, h, n, d in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)
        )  # (B, H, N, D)
        a, s = pair(q, k, v, min_run_time)
        results.append(
            dict(
                shape=dict(B=b, H=h, N=n, D=d),
                attention_ms=round(a * 1e3, 4),
                sdpa_ms=round(s * 1e3, 4),
                ratio=round(a / s, 4),
                overhead_us=round((a - s) * 1e6, 2),
            )
        )
    q, k, v = (torch.randn(1, 1, 8, 16).to(device=device, dtype=dtype) for _ in range(3))  # (1, 1, 8, 16)
    a, s = pair(q, k, v, min_run_time / 2)
    worst = max(results, key=lambda r: r["ratio"])
    return dict(
        method="interleaved torch.utils.benchmark blocked_autorange, median of round medians",
        dtype=str(dtype).replace("torch.", ""),
        rounds=rounds,
        cases=results,
        attention_ms=worst["attention_ms"],
        sdpa_ms=worst["sdpa_ms"],
        ratio=worst["ratio"],
        worst_shape=worst["shape"],
        tiny_call_overhead_us=round((a - s) * 1e6, 2),
    )


# -- the suite --------------------------------------------------------------------------------


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The suite's options."""
    p = argparse.ArgumentParser(
        prog="polymodal bench attention",
        description=(
            "Time every attention backend (and each forced SDPA kernel) over shapes, masks, head dims, dtypes and "
            "passes; print a table, write JSON rows and a PNG plot."
        ),
    )
    p.add_argument("--grid", choices=GRIDS, default=None, help="shape grid (default: small on the CPU, full on CUDA)")
    p.add_argument("--quick", action="store_true", help="the quick grid with short timings (a smoke run, seconds)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--backends", default="", help="comma-separated, e.g. math,sdpa,sdpa[flash] (default: all)")
    p.add_argument("--cases", default="", help="comma-separated case names (default: the whole grid)")
    p.add_argument("--head-dims", default="", help="comma-separated (default 64,128; quick 16)")
    p.add_argument(
        "--dtypes", default="", help="comma-separated (default float32 on the CPU, bfloat16,float32 on CUDA)"
    )
    p.add_argument("--modes", default="", help="forward, forward+backward or both (default both; quick: forward)")
    p.add_argument("--backward", action="store_true", help="only forward+backward (same as --modes forward+backward)")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per measurement (default 0.2 CPU, 0.1 CUDA, quick 0.01)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's current setting)")
    p.add_argument(
        "--max-gb",
        type=float,
        default=None,
        help="skip backends that materialise the scores beyond this (default 2 CPU, 40%% of GPU memory)",
    )
    p.add_argument("--budget-s", type=float, default=None, help="skip the rows left after this many seconds")
    p.add_argument("--no-overhead", action="store_true", help="skip the dispatcher-overhead measurement")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-<device>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--compare", default=None, metavar="BASELINE.json", help="flag rows slower than the baseline")
    p.add_argument("--threshold", type=float, default=0.05, help="--compare: relative slowdown that counts")
    p.add_argument("--min-us", type=float, default=30.0, help="--compare: absolute slowdown that counts, µs")
    p.add_argument("--fail-on-regression", action="store_true", help="exit status 3 when --compare finds one")
    return p.parse_args(list(argv))


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def plan(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Resolve the options into the lists to run (ValueError naming what is unknown)."""
    kind = "quick" if args.quick else args.grid or ("full" if device.type == "cuda" else "small")
    dims = [int(x) for x in _names(args.head_dims)] or ([16] if kind == "quick" else [64, 128])
    dtypes = _names(args.dtypes) or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])
    bad = [d for d in dtypes if not isinstance(getattr(torch, d, None), torch.dtype)]
    modes = (
        ["forward+backward"]
        if args.backward
        else _names(args.modes) or (["forward"] if kind == "quick" else list(MODES))
    )
    bad += [m for m in modes if m not in MODES]
    known = variants(device)
    names = _names(args.backends) or known
    bad += [n for n in names if n not in known]
    cases = [c for d in dims for c in grid(kind, d)]
    if args.cases:
        wanted = set(_names(args.cases))
        bad += sorted(wanted - {c.name for c in cases})
        cases = [c for c in cases if c.name in wanted]
    if bad:
        raise BenchUsageError(
            f"unknown backend, case, dtype or mode: {', '.join(bad)}; backends: {', '.join(known)}; "
            f"cases: {', '.join(dict.fromkeys(c.name for c in grid(kind, dims[0])))}; modes: "
            f"{', '.join(MODES)}"
        )
    run_time = (
        args.min_run_time
        if args.min_run_time is not None
        else (0.01 if kind == "quick" else 0.1 if device.type == "cuda" else 0.2)
    )
    return dict(
        grid=kind,
        head_dims=dims,
        dtypes=[getattr(torch, d) for d in dtypes],
        modes=modes,
        backends=names,
        cases=cases,
        min_run_time=run_time,
    )


def attention_suite(argv: Sequence[str]) -> int:
    """Run the suite from command-line options; returns the exit status."""
    args = parse(argv)
    device = resolve_device(args.device)
    if args.compare:  # a bad baseline is reported now, not after the whole run
        from bench import read_report

        read_report(args.compare, "baseline")
    todo = plan(args, device)
    prior = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, list(argv), device, todo)
    finally:
        torch.set_num_threads(prior)


def _peaks(device: torch.device, todo: dict[str, Any], quick: bool) -> tuple[dict, dict, dict]:
    run_time = max(todo["min_run_time"], 0.05 if quick else 0.3)
    peaks = {
        str(dt).replace("torch.", ""): matmul_peak(device, dt, run_time, 256 if quick else None)
        for dt in todo["dtypes"]
    }
    bandwidth = copy_bandwidth(device, run_time, 8 if quick else None)
    return peaks, bandwidth, {k: v["tflops"] for k, v in peaks.items()}


def run(args: argparse.Namespace, argv: list[str], device: torch.device, todo: dict[str, Any]) -> int:
    """Measure the peaks, every row and the overhead; print, write JSON and PNG, compare."""
    from bench_report import attention_table, compare, compare_text, plot_attention

    quick = todo["grid"] == "quick"
    base = machine(device)
    if device.type == "cuda":
        base["datasheet_tflops"] = {
            str(dt).replace("torch.", ""): datasheet_tflops(base["device_name"], dt) for dt in todo["dtypes"]
        }
    if args.max_gb is not None:
        max_gb = args.max_gb
    elif device.type == "cuda":
        max_gb = 0.4 * torch.cuda.get_device_properties(device).total_memory / 1e9
    else:
        max_gb = 2.0
    started = time.perf_counter()
    peaks, bandwidth, tflops = _peaks(device, todo, quick)
    ctx = Context(
        device,
        base,
        todo["min_run_time"],
        tflops,
        bandwidth["gbps"],
        max_gb,
        None if args.budget_s is None else started + args.budget_s,
    )
    rows = []
    for dtype in todo["dtypes"]:
        for mode in todo["modes"]:
            for case in todo["cases"]:
                for name in todo["backends"]:
                    rows.append(run_case(name, case, dtype, mode, ctx))
                    r = rows[-1]
                    print(
                        f"  {name:16s} {case.name:20s} D{case.d:<4d} {r['dtype']:9s} {mode:17s} {r['status']:8s}"
                        f" {fmt(r['median_ms'], '.3f')} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    over = None
    if not args.no_overhead and ctx.deadline is not None and time.perf_counter() > ctx.deadline:
        over = dict(skipped="the run's time budget (--budget-s) was used up before the overhead measurement")
    elif not args.no_overhead:
        vit = [c for c in todo["cases"] if c.family == "vit" and c.d == todo["head_dims"][0]] or [
            c for c in grid(todo["grid"], todo["head_dims"][0]) if c.family == "vit"
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            over = overhead(
                device, todo["dtypes"][0], [(c.b, c.h, c.nq, c.d) for c in vit], 3 if quick else 7, todo["min_run_time"]
            )
    base["load_after"] = load_average()
    report = dict(
        suite="attention",
        command="polymodal bench attention " + " ".join(argv),
        machine=base,
        grid=todo["grid"],
        head_dims=todo["head_dims"],
        modes=todo["modes"],
        dtypes=[str(d).replace("torch.", "") for d in todo["dtypes"]],
        min_run_time_s=todo["min_run_time"],
        max_gb=round(max_gb, 2),
        quick=quick,
        backward=todo["modes"] == ["forward+backward"],
        matmul_peak=peaks,
        copy_bandwidth=bandwidth,
        seconds=None,
        rows=rows,
        overhead=over,
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(attention_table(report))
    out = (
        Path(args.out) if args.out else report_path("attention", device, base["device_name"], "-quick" if quick else "")
    )
    status = 1 if any(r["status"] == "error" for r in rows) else 0
    if args.compare:
        from bench import read_report

        result = compare(report, read_report(args.compare, "baseline"), args.threshold, args.min_us)
        report["compare"] = dict(baseline=str(args.compare), **result)
        print(compare_text(result))
        if args.fail_on_regression and result["regressions"]:
            status = 3
    write_json(out, report)
    print(f"wrote {out}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        if plot_attention(report, png):
            print(f"wrote {png}")
    return status
