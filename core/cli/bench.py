"""``polymodal bench``: the benchmark suites, which ship with the source tree (``benchmarks/``), not the package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from polymodal.cli import main


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False}
)
@click.argument(
    "suite", type=click.Choice(["attention", "models", "diffusion", "scaling", "compare", "table"]), metavar="SUITE"
)
@click.pass_context
def bench(ctx, suite) -> None:
    """Run a benchmark suite (attention, models, diffusion, scaling), compare two reports, or print one as Markdown (table).

    \b
    Suites (`polymodal bench SUITE --help` shows each one's options):
      attention  every attention backend over ViT, causal-LM, cross and sparse shapes
      models     polymodal against transformers on identical converted weights
      diffusion  the UNet forward and DDIM-50 sampling against diffusers on identical weights
      scaling    polymodal train's samples/s at 1, 2, … processes (torchrun), speedup and efficiency
      compare    NEW.json BASELINE.json: flag regressions (> 5 % and > 30 µs slower)
      table      REPORT.json: a saved report as Markdown

    Everything after SUITE goes to the suite (`--quick`, `--threads N`, `--device cuda`,
    `--compare BASELINE.json` …). The suites ship with the source tree, in benchmarks/.
    """
    sys.path.insert(0, str(_benchmarks_dir()))
    import bench as bench_module  # benchmarks/bench.py: the suites live outside the package

    sys.exit(bench_module.main([suite, *ctx.args]))


def _benchmarks_dir() -> Path:
    """The source tree's ``benchmarks/`` folder (or ``$POLYMODAL_BENCHMARKS``), where the suites live."""
    env = os.environ.get("POLYMODAL_BENCHMARKS")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parents[2] / "benchmarks"]
    for folder in candidates:
        if (folder / "bench.py").is_file():
            return folder
    raise click.ClickException(
        f"the benchmark suites ship with the source tree, not the installed package: expected bench.py in "
        f"{candidates[0]}; clone the repository (or set POLYMODAL_BENCHMARKS to its benchmarks/ folder)"
    )
