"""Benchmarks: ``polymodal bench attention [options]`` (also ``python benchmarks/attention.py``).

The attention suite times every registered backend over a grid of shapes and mask kinds
(ViT-like, causal LM, cross-attention both ways, packed variable-length sequences and the
same batch padded), forward by default or forward+backward with ``--backward``, and
measures the dispatcher's own overhead against calling
``torch.nn.functional.scaled_dot_product_attention`` directly. A combination a backend
cannot run is a row with the reason, never a crash. Results: a printed table and a JSON
file (``benchmarks/results/attention-<device>.json`` by default).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

SUITES = ("attention",)


@dataclass(frozen=True)
class Case:
    """One attention call shape: q (B, H, Nq, D), k and v (B, H, Nk, D), and its mask."""

    name: str
    b: int
    h: int
    nq: int
    nk: int
    d: int
    causal: bool = False
    seqlens: tuple[int, ...] | None = None  # packed (B = 1, Nq = Nk = sum)
    padded: tuple[int, ...] | None = None  # lengths of a padded batch (key_padding)
    tags: tuple[str, ...] = field(default=())

    @property
    def mask(self) -> str:
        kinds = [k for k, on in (("causal", self.causal), ("seqlens", self.seqlens), ("key_padding", self.padded)) if on]
        return "+".join(kinds) or "none"

    def shape(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(B=self.b, H=self.h, Nq=self.nq, Nk=self.nk, D=self.d)
        if self.seqlens:
            out["seqlens"] = list(self.seqlens)
        if self.padded:
            out["lengths"] = list(self.padded)
        return out

    def flops(self) -> float:
        """Useful forward FLOPs: 4·D per visible (query, key) pair per head (QK^T and PV)."""
        if self.seqlens or self.padded:
            lengths = self.seqlens or self.padded
            pairs = sum(n * (n + 1) // 2 if self.causal else n * n for n in lengths)
            return 4.0 * self.h * pairs * self.d
        pairs = self.nq * self.nk
        if self.causal:
            pairs = sum(min(self.nk, max(0, i + self.nk - self.nq + 1)) for i in range(self.nq))
        return 4.0 * self.b * self.h * pairs * self.d


def packed_and_padded(name: str, seqlens: Sequence[int], h: int, d: int, causal: bool = False) -> list[Case]:
    """The same variable-length batch packed (``seqlens``) and padded (``key_padding``)."""
    n = sum(seqlens)
    return [Case(f"{name}-packed", 1, h, n, n, d, causal=causal, seqlens=tuple(seqlens)),
            Case(f"{name}-padded", len(seqlens), h, max(seqlens), max(seqlens), d, causal=causal,
                 padded=tuple(seqlens))]


def grid(quick: bool) -> list[Case]:
    if quick:
        return [Case("vit-17", 2, 2, 17, 17, 16), Case("lm-64", 1, 2, 64, 64, 16, causal=True),
                Case("cross-4x32", 2, 2, 4, 32, 16), *packed_and_padded("varlen", (5, 3, 8), 2, 16)]
    return [
        Case("vit-65", 32, 6, 65, 65, 64), Case("vit-197", 32, 6, 197, 197, 64),
        Case("lm-512", 4, 8, 512, 512, 64, causal=True), Case("lm-1024", 4, 8, 1024, 1024, 64, causal=True),
        Case("cross-16x1024", 4, 8, 16, 1024, 64), Case("cross-1024x16", 4, 8, 1024, 16, 64),
        *packed_and_padded("varlen", (100, 37, 250, 13), 8, 64),
    ]


# -- the machine -------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def machine(device: torch.device) -> dict[str, Any]:
    import os

    return dict(device=device.type, device_name=device_name(device), torch=torch.__version__,
                threads=torch.get_num_threads(), cpus=os.cpu_count(), python=platform.python_version(),
                platform=platform.platform())


# -- timing ------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> tuple[float, float]:
    """(median, IQR) seconds per call of ``fn``, after a warm-up, with torch's benchmark Timer."""
    from torch.utils.benchmark import Timer

    for _ in range(2):  # warm-up: first-call allocations, lazy imports, kernel selection
        fn()
    sync(device)

    def timed() -> None:
        fn()
        sync(device)

    m = Timer("timed()", globals={"timed": timed}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median, m.iqr


def inputs(case: Case, device: torch.device, dtype: torch.dtype, grad: bool, seed: int = 0) -> dict[str, Any]:
    """Random (never all-zero) q, k, v and the case's mask arguments."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(case.b, case.h, n, case.d, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
               for n in (case.nq, case.nk, case.nk))  # (B, H, N, D)
    call: dict[str, Any] = dict(q=q, k=k, v=v, causal=case.causal)
    if case.seqlens:
        call["seqlens"] = list(case.seqlens)
    if case.padded:
        lengths = torch.tensor(case.padded).unsqueeze(1)  # (B, 1)
        call["key_padding"] = (torch.arange(case.nk).unsqueeze(0) < lengths).to(device)  # (B, Nk)
    return call


def run_case(backend: str, case: Case, device: torch.device, dtype: torch.dtype, backward: bool,
             min_run_time: float, base: dict[str, Any]) -> dict[str, Any]:
    from .attention import AttentionError, attention, backends
    from .attention.dispatch import _spec

    row: dict[str, Any] = dict(
        suite="attention", backend=backend, case=case.name, shape=case.shape(), mask=case.mask,
        dtype=str(dtype).replace("torch.", ""), device=device.type, device_name=base["device_name"],
        mode="forward+backward" if backward else "forward", status="ok", reason=None, median_ms=None,
        iqr_ms=None, gflops=None, peak_mem_mb=None, torch=base["torch"], threads=base["threads"],
    )
    call = inputs(case, device, dtype, backward)
    impl = backends()[backend]
    why = impl.supports(_spec(call["q"], call["k"], case.causal, call.get("key_padding"), call.get("seqlens"),
                              None, 0.0, call["v"]))
    if why is not None:
        return {**row, "status": "skipped", "reason": why}
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    grad_out = torch.randn(case.b, case.h, case.nq, case.d, device=device, dtype=dtype) if backward else None

    def fn() -> None:
        out = attention(q, k, v, backend=backend, **call)  # (B, H, Nq, D)
        if grad_out is not None:
            q.grad = k.grad = v.grad = None
            out.backward(grad_out)

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            fn()
            sync(device)
            row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated(device) - start) / 2**20, 2)
        median, iqr = measure(fn, device, min_run_time)
    except AttentionError as exc:
        return {**row, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # a kernel that fails at run time is a finding, reported in its row
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    flops = case.flops() * (3.5 if backward else 1.0)  # backward ≈ 2.5× forward
    return {**row, "median_ms": round(median * 1e3, 4), "iqr_ms": round(iqr * 1e3, 4),
            "gflops": round(flops / median / 1e9, 2)}


def overhead(device: torch.device, dtype: torch.dtype, quick: bool, min_run_time: float) -> dict[str, Any]:
    """The dispatcher's cost: ``attention(q, k, v)`` vs ``F.scaled_dot_product_attention(q, k, v)``.

    Measured interleaved (A, B, A, B, ...) so drift and neighbours' load hit both equally;
    the reported figure per shape is the median over rounds of each side's median.
    """
    import torch.nn.functional as F

    from .attention import attention

    shapes = [(2, 2, 17, 16)] if quick else [(32, 6, 65, 64), (32, 6, 197, 64)]
    rounds = 3 if quick else 7
    results = []
    for b, h, n, d in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(measure(lambda: attention(q, k, v), device, min_run_time)[0])
            theirs.append(measure(lambda: F.scaled_dot_product_attention(q, k, v), device, min_run_time)[0])
        a, s = statistics.median(ours), statistics.median(theirs)
        results.append(dict(shape=dict(B=b, H=h, N=n, D=d), attention_ms=round(a * 1e3, 4),
                            sdpa_ms=round(s * 1e3, 4), ratio=round(a / s, 4), overhead_us=round((a - s) * 1e6, 2)))
    # The absolute cost per call, where it is not hidden by the kernel: a tiny call.
    q, k, v = (torch.randn(1, 1, 8, 16).to(device=device, dtype=dtype) for _ in range(3))
    tiny_ours, tiny_theirs = [], []
    for _ in range(rounds):
        tiny_ours.append(measure(lambda: attention(q, k, v), device, min_run_time / 2)[0])
        tiny_theirs.append(measure(lambda: F.scaled_dot_product_attention(q, k, v), device, min_run_time / 2)[0])
    worst = max(results, key=lambda r: r["ratio"])
    return dict(method="interleaved torch.utils.benchmark blocked_autorange, median of round medians",
                rounds=rounds, cases=results, attention_ms=worst["attention_ms"], sdpa_ms=worst["sdpa_ms"],
                ratio=worst["ratio"], worst_shape=worst["shape"],
                tiny_call_overhead_us=round((statistics.median(tiny_ours) - statistics.median(tiny_theirs)) * 1e6, 2))


# -- output ------------------------------------------------------------------------------------

def fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("backend", "case", "mask", "mode", "dtype", "median ms", "IQR ms", "GFLOP/s", "peak MB", "status")
    lines = [head]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append((r["backend"], r["case"], r["mask"], r["mode"], r["dtype"], fmt(r["median_ms"], ".3f"),
                      fmt(r["iqr_ms"], ".3f"), fmt(r["gflops"], ".1f"), fmt(r["peak_mem_mb"], ".1f"), status))
    widths = [max(len(str(line[i])) for line in lines[:]) for i in range(len(head) - 1)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1])
                     for line in lines)


def default_out(device: torch.device, name: str, quick: bool) -> Path:
    root = Path(__file__).resolve().parent.parent
    base = root / "benchmarks" / "results" if (root / "benchmarks").is_dir() else Path("benchmarks") / "results"
    return base / f"attention-{slug(device.type + '-' + name)}{'-quick' if quick else ''}.json"


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="polymodal bench attention", description=(
        "Time every attention backend over shapes and mask kinds; print a table and write JSON rows."))
    p.add_argument("--quick", action="store_true", help="small grid and short timings (a smoke run, seconds)")
    p.add_argument("--backward", action="store_true", help="time forward+backward instead of forward only")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--backends", default="", help="comma-separated backend names (default: all registered)")
    p.add_argument("--cases", default="", help="comma-separated case names (default: the whole grid)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement (default 0.3, quick 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's current setting)")
    p.add_argument("--no-overhead", action="store_true", help="skip the dispatcher-overhead measurement")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-<device>.json)")
    return p.parse_args(list(argv))


def attention_suite(argv: Sequence[str]) -> int:
    from .attention import backends

    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    registered = sorted(backends())
    names = [n.strip() for n in args.backends.split(",") if n.strip()] or registered
    unknown = [n for n in names if n not in registered]
    cases = grid(args.quick)
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
        unknown += [c for c in wanted if c not in {case.name for case in cases}]
        cases = [c for c in cases if c.name in wanted]
    if unknown:
        print(f"error: unknown backend or case {', '.join(unknown)}; backends: {', '.join(registered)}; "
              f"cases: {', '.join(c.name for c in grid(args.quick))}", file=sys.stderr)
        return 2
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.01 if args.quick else 0.3)
    prior_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, device, names, cases, dtypes, min_run_time)
    finally:
        torch.set_num_threads(prior_threads)


def _load() -> list[float] | None:
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _run(args: argparse.Namespace, argv: Sequence[str], device: torch.device, names: list[str],
         cases: list[Case], dtypes: list[torch.dtype], min_run_time: float) -> int:
    import warnings

    base = machine(device)
    base["load_before"] = _load()
    started = time.perf_counter()
    rows = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")  # flex is unfused off CUDA
        for dtype in dtypes:
            for case in cases:
                for name in names:
                    rows.append(run_case(name, case, device, dtype, args.backward, min_run_time, base))
                    print(f"  {name:10s} {case.name:16s} {rows[-1]['status']}", file=sys.stderr, flush=True)
        over = None if args.no_overhead else overhead(device, torch.float32, args.quick, min_run_time)
    base["load_after"] = _load()
    report = dict(suite="attention", command="polymodal bench attention " + " ".join(argv), machine=base,
                  quick=args.quick, backward=args.backward, min_run_time_s=min_run_time,
                  seconds=round(time.perf_counter() - started, 1), rows=rows, overhead=over)
    print(f"attention on {base['device_name']} ({device.type}, torch {base['torch']}, {base['threads']} threads)")
    print(table(rows))
    if over is not None:
        for c in over["cases"]:
            print(f"dispatcher overhead at {c['shape']}: attention {c['attention_ms']:.3f} ms vs sdpa "
                  f"{c['sdpa_ms']:.3f} ms, ratio {c['ratio']:.3f}")
        print(f"dispatcher overhead per tiny call: {over['tiny_call_overhead_us']:.1f} µs")
        if over["ratio"] > 1.05:
            print(f"note: dispatcher overhead ratio {over['ratio']:.3f} is above the 1.05 target")
    out = Path(args.out) if args.out else default_out(device, base["device_name"], args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``main(["attention", *options])``; returns the exit status (0 ok, 1 a backend errored, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES:
        print(f"usage: polymodal bench {{{','.join(SUITES)}}} [options]; got {argv[:1] or 'nothing'}",
              file=sys.stderr)
        return 2
    try:
        return attention_suite(argv[1:])
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
