"""Benchmarks: ``polymodal bench {attention,models,compare} [options]`` (also ``python benchmarks/*.py``).

The suites live in the source tree, outside the ``polymodal`` package: they name plugins and
import transformers. ``polymodal bench`` finds this folder beside the installed source.

* ``attention`` (:mod:`bench_attention`): every attention backend, and each kernel of
  torch's SDPA forced where the device offers it, over ViT, causal-LM, cross-attention,
  sparse-image and packed-versus-padded shapes × head dims × dtypes × forward and
  forward+backward; TFLOP/s against the machine's matmul peak timed in the same run; the
  dispatcher's own overhead; a JSON report, a PNG plot and ``--compare BASELINE.json``.
* ``models`` (:mod:`bench_models`): polymodal against transformers on identical
  converted weights, interleaved, same threads, ratio reported.
* ``diffusion`` (:mod:`bench_diffusion`): polymodal's UNet and DDIM loop against diffusers on
  identical converted weights, interleaved, with the share of time per op category.
* ``scaling`` (:mod:`bench_scaling`): ``polymodal train`` throughput at 1, 2, … processes under torchrun
  (DDP or FSDP), speedup and scaling efficiency, runs interleaved.
* ``compare NEW.json BASELINE.json``: the regression check alone, on two saved reports;
  ``table REPORT.json``: a saved report as Markdown (the READMEs' tables).

This module holds what the suites share: the machine description, the timer, the measured
matmul and copy peaks, datasheet peaks and the JSON writer. Benchmarks measure and report;
they never pass or fail by speed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

SUITES = ("attention", "models", "diffusion", "scaling", "compare", "table")


HELP = """usage: polymodal bench SUITE [options]   (or: python benchmarks/bench.py SUITE [options])

suites (`polymodal bench SUITE --help` shows each one's options):
  attention  every attention backend over ViT, causal-LM, cross-attention, sparse and packed shapes
  models     polymodal against transformers on identical converted weights, interleaved
  diffusion  polymodal's UNet forward and DDIM-50 sampling against diffusers on identical weights
  scaling    `polymodal train` throughput at 1, 2, … data-parallel processes, speedup and efficiency
  compare    NEW.json BASELINE.json: flag rows slower than the baseline (> 5 % and > 30 µs)
  table      REPORT.json: a saved report as Markdown; --readme README.md [--write]: the README's tables"""
"""What ``polymodal bench --help`` and ``bench.py --help`` print: the suites and how to get each one's help."""


class BenchUsageError(ValueError):
    """A bad option value (device, backend, case, dtype, model name): exit status 2, no traceback."""


# Dense (no structured sparsity) datasheet peaks in TFLOP/s, by a substring of the GPU name:
# (bfloat16/float16 tensor cores, float32 without TF32). Checked in order: the first match wins.
DATASHEET_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),  # SXM5
    ("H800", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 80.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("A800", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}),
    ("L40", {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    ("A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 31.2}),
    ("A10", {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2}),
    ("RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}),
    ("RTX 3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("T4", {"float16": 65.0, "float32": 8.1}),
)


FLASH_ATTENTION_REFERENCE: dict[str, Any] = {
    "gpu": "H100 SXM5 (989 dense bf16 TFLOP/s; the H200 has the same compute, more and faster memory)",
    "setup": "attention forward, bf16/fp16, head dim 128, long sequences (16k tokens per batch)",
    "flash_attention_2_tflops": 350.0,
    "flash_attention_3_tflops": 740.0,
    "source": "Shah et al., FlashAttention-3 (arXiv:2407.08608), abstract: FlashAttention-2 reaches about 35 % "
    "utilization on the H100; FlashAttention-3 up to 740 TFLOP/s (75 %) in fp16/bf16",
}
"""FlashAttention-class reference figures for the attention rows on H100/H200 (published numbers, not measured
here): what a state-of-the-art fused kernel reaches on that chip, printed next to ``pct_datasheet_peak``."""


# -- the machine -------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; anything else as given (ValueError without CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchUsageError(f"--device {name} asks for CUDA, but no CUDA device is available")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from ``/proc/cpuinfo``."""
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
    """``"AMD EPYC 7B13"`` → ``"amd-epyc-7b13"`` (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict[str, str | None]:
    """Versions of the libraries a result depends on (None: not installed)."""
    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "xformers", "polymodal"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None)
        except Exception:  # not installed, or a build that does not import
            out[name] = None
    if out["polymodal"] is None:
        try:
            from importlib.metadata import version

            out["polymodal"] = version("polymodal")
        except Exception:
            pass
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


def machine(device: torch.device) -> dict[str, Any]:
    """Where and with what a report was measured: device, libraries, threads, load, platform."""
    info: dict[str, Any] = dict(
        device=device.type,
        device_name=device_name(device),
        **versions(),
        threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        platform=platform.platform(),
        load_before=load_average(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            datasheet_peak_tflops={
                k: datasheet_tflops(info["device_name"], getattr(torch, k)) for k in ("bfloat16", "float16", "float32")
            },
        )
        if any(chip in info["device_name"] for chip in ("H100", "H200", "H800")):
            info["flash_attention_reference"] = FLASH_ATTENTION_REFERENCE
    return info


def datasheet_tflops(name: str, dtype: torch.dtype) -> float | None:
    """The datasheet's dense peak TFLOP/s for GPU ``name`` at ``dtype`` (None: not in the table)."""
    key = str(dtype).replace("torch.", "")
    for needle, peaks in DATASHEET_TFLOPS:
        if needle.lower() in name.lower():
            return peaks.get(key)
    return None


def report_path(suite: str, device: torch.device, name: str, suffix: str = "", ext: str = "json") -> Path:
    """``benchmarks/results/<suite>-<device type>-<device name>[<suffix>].<ext>`` in this checkout."""
    root = Path(__file__).resolve().parent.parent
    base = root / "benchmarks" / "results" if (root / "benchmarks").is_dir() else Path("benchmarks") / "results"
    return base / f"{suite}-{slug(device.type + '-' + name)}{suffix}.{ext}"


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


# -- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, min_run_time: float, warmup: int = 2, slow_samples: int = 3
) -> tuple[float, float, int]:
    """(median, IQR, measurements) in seconds per call of ``fn``: ``warmup`` untimed calls, one
    timed call, then ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls, so no
    per-call synchronisation skews short kernels). A call slower than ``min_run_time`` on its own
    is instead timed ``slow_samples`` times, one call each. Every clock reading synchronises CUDA."""
    import timeit

    from torch.utils.benchmark import Timer

    for _ in range(warmup):  # first-call allocations, lazy imports, kernel selection, autotuning
        fn()

    def clock() -> float:
        sync(device)
        return timeit.default_timer()

    times = []
    for _ in range(slow_samples):
        start = clock()
        fn()
        times.append(clock() - start)
        if times[0] < min_run_time:
            break
    if len(times) > 1:  # slow calls: the single-call samples are the measurement
        q = statistics.quantiles(times, n=4)
        return statistics.median(times), q[2] - q[0], len(times)
    m = Timer("fn()", globals={"fn": fn}, timer=clock, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median, m.iqr, len(m.times)


def matmul_peak(device: torch.device, dtype: torch.dtype, min_run_time: float, n: int | None = None) -> dict[str, Any]:
    """The machine's measured peak: a large (n × n) @ (n × n) product, 2·n³ FLOPs per call."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))  # (n, n)
    median, iqr, runs = measure(lambda: a @ b, device, min_run_time)
    return dict(
        dtype=str(dtype).replace("torch.", ""),
        n=n,
        median_ms=round(median * 1e3, 4),
        tflops=round(2.0 * n**3 / median / 1e12, 4),
    )


def copy_bandwidth(device: torch.device, min_run_time: float, mib: int | None = None) -> dict[str, Any]:
    """The machine's measured memory bandwidth: copying a ``mib`` MiB buffer (read + write bytes)."""
    mib = mib or (1024 if device.type == "cuda" else 128)
    src = torch.rand(mib * 2**18, device=device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    median, _, _ = measure(lambda: dst.copy_(src), device, min_run_time)
    return dict(mib=mib, median_ms=round(median * 1e3, 4), gbps=round(2 * src.numel() * 4 / median / 1e9, 2))


def sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (CPU TFLOP/s are small, GPU ones large)."""
    return float(f"{value:.{digits}g}")


def fmt(value: Any, spec: str = "") -> str:
    """``value`` formatted, ``-`` for None."""
    return "-" if value is None else format(value, spec)


def text_table(head: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns; the last column is not padded."""
    rows = [tuple(head), *[tuple(str(c) for c in line) for line in lines]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


# -- the command ------------------------------------------------------------------------------


def read_report(path: str | Path, what: str = "report") -> dict[str, Any]:
    """The benchmark report saved at ``path``; a missing or unreadable file, bad JSON or JSON that is
    not a report (an object with ``machine`` and a ``rows`` list) raises a BenchUsageError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchUsageError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchUsageError(f"cannot read {what} {path}: {exc}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchUsageError(f"{what} {path} is not JSON ({exc}); expected a report written by a suite") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list) or "machine" not in report:
        got = f"an object with keys {sorted(report)[:6]}" if isinstance(report, dict) else f"a {type(report).__name__}"
        raise BenchUsageError(
            f"{what} {path} is not a benchmark report (an object with 'machine' and 'rows'); got {got}"
        )
    return report


def compare_suite(argv: Sequence[str]) -> int:
    """``polymodal bench compare NEW.json BASELINE.json [--threshold 0.05] [--min-us 30]``."""
    import argparse

    from bench_report import compare, compare_text

    p = argparse.ArgumentParser(
        prog="polymodal bench compare",
        description=("Flag rows of NEW that are slower than BASELINE by more than --threshold and --min-us."),
    )
    p.add_argument("new")
    p.add_argument("baseline")
    p.add_argument("--threshold", type=float, default=0.05, help="relative slowdown that counts (default 0.05)")
    p.add_argument("--min-us", type=float, default=30.0, help="absolute slowdown that counts, µs (default 30)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit status 3 when a row regressed")
    args = p.parse_args(list(argv))
    new, base = read_report(args.new, "new report"), read_report(args.baseline, "baseline")
    result = compare(new, base, args.threshold, args.min_us)
    print(compare_text(result))
    return 3 if args.fail_on_regression and result["regressions"] else 0


def table_suite(argv: Sequence[str]) -> int:
    """``polymodal bench table REPORT.json [--all] [--pivot]``: the report as Markdown table rows;
    ``polymodal bench table --readme README.md [--write]``: the README's generated blocks from the reports
    they name (``--write``: rewritten in place; without it the file is only checked: exit status 1 if stale)."""
    import argparse

    from bench_report import markdown, markdown_pivot, readme_render

    p = argparse.ArgumentParser(prog="polymodal bench table", description="Print a saved report as Markdown.")
    p.add_argument("report", nargs="?", help="a report JSON (not with --readme)")
    p.add_argument(
        "--readme",
        default=None,
        metavar="README.md",
        help="regenerate the README's <!-- bench-table: FILE.json ... --> blocks from benchmarks/results/FILE.json",
    )
    p.add_argument(
        "--write", action="store_true", help="--readme: rewrite the file (default: check it, exit 1 if stale)"
    )
    p.add_argument("--results", default=None, help="--readme: the folder of the reports (default benchmarks/results)")
    p.add_argument("--all", action="store_true", help="also the skipped, mismatch and error rows")
    p.add_argument(
        "--pivot", action="store_true", help="attention: one table per dtype, pass and head dim, backends side by side"
    )
    args = p.parse_args(list(argv))
    if args.readme:
        readme = Path(args.readme)
        if not readme.is_file():
            raise BenchUsageError(f"--readme {readme} does not exist")
        text = readme.read_text(encoding="utf-8")
        results = Path(args.results) if args.results else Path(__file__).resolve().parent / "results"
        try:
            new = readme_render(text, results)
        except ValueError as exc:
            raise BenchUsageError(str(exc)) from None
        if args.write:
            readme.write_text(new, encoding="utf-8")
            print(f"wrote {readme}" + (" (unchanged)" if new == text else ""))
            return 0
        print("up to date" if new == text else f"{readme}'s benchmark tables differ from the reports (--write updates)")
        return 0 if new == text else 1
    if args.report is None:
        raise BenchUsageError("bench table needs a REPORT.json (or --readme README.md)")
    report = read_report(args.report)
    suite = report.get("suite")
    if suite not in ("attention", "models") or (args.pivot and suite != "attention"):
        raise BenchUsageError(
            f"{args.report} is a {suite!r} report; `bench table` prints attention and models reports "
            f"(--pivot: attention only)"
        )
    statuses = ("ok", "skipped", "mismatch", "error") if args.all else ("ok",)
    print(markdown_pivot(report) if args.pivot else markdown(report, statuses))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``main([suite, *options])``; returns the exit status (0 ok, 1 a row errored, 2 usage, 3 regression)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    if not argv or argv[0] not in SUITES:
        got = argv[:1] or "nothing"
        print(
            f"usage: polymodal bench {{{','.join(SUITES)}}} [options]; got {got} (--help lists them)", file=sys.stderr
        )
        return 2
    suite, rest = argv[0], argv[1:]
    try:
        if suite == "attention":
            from bench_attention import attention_suite

            return attention_suite(rest)
        if suite == "models":
            from bench_models import models_suite

            return models_suite(rest)
        if suite == "diffusion":
            from bench_diffusion import diffusion_suite

            return diffusion_suite(rest)
        if suite == "scaling":
            from bench_scaling import scaling_suite

            return scaling_suite(rest)
        if suite == "table":
            return table_suite(rest)
        return compare_suite(rest)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    except BenchUsageError as exc:  # a bad option value (device, names), reported without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
