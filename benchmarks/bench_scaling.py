"""``polymodal bench scaling``: training throughput at 1, 2, … processes (data parallel), and its efficiency.

Each row is one real ``polymodal train MODEL`` run under torchrun (``--nproc W``; one process runs the same
command without torchrun), same global batch, same steps, ``--threads`` torch threads per process. The
throughput is read from the run's own ``train_log.jsonl`` (``samples_s`` of every logged window after the
first ``--warmup`` fraction of the run: process start, rendezvous and the first steps are not counted), so
it is the steady-state rate the trainer itself measured. Runs of different world sizes are interleaved
(1, 2, 1, 2 … for ``--rounds`` rounds) and the median per world size is reported, with

* ``speedup`` = samples/s at W processes / samples/s at 1 process, and
* ``efficiency`` = speedup / W (1.0 is perfect linear scaling).

On a CPU, W processes share the machine's cores: with 1 thread each, W ≤ cores is the honest comparison
(``cpus`` is in the report). On CUDA (``--device cuda``) each process drives one GPU (``W`` ≤ the GPUs
visible). Benchmarks measure and report; nothing passes or fails by speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench import BenchUsageError, fmt, machine, report_path, resolve_device, text_table, write_json


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The suite's options."""
    p = argparse.ArgumentParser(prog="polymodal bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit", help="registered model variant to train (default vit)")
    p.add_argument("--procs", default="1,2", help="world sizes, comma-separated (default 1,2)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 60; --quick 6)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default 64; must divide by each W)")
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"), help="data-parallel strategy (default ddp)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    p.add_argument("--warmup", type=float, default=0.25, help="share of the logged windows not counted (default 0.25)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (a few steps, one round)")
    p.add_argument("--out", help="report path (default benchmarks/results/scaling-<device>-<model>-<strategy>.json)")
    return p.parse_args(list(argv))


def run_once(args: argparse.Namespace, world: int, steps: int, folder: Path) -> dict[str, Any]:
    """One training run at world size ``world``; its steady-state samples/s from ``train_log.jsonl``."""
    out = folder / f"w{world}-{time.monotonic_ns()}"
    log_every = max(1, steps // 10)
    cmd = [sys.executable, "-m", "polymodal", "train", args.model, "--steps", str(steps), "--out", str(out)]
    cmd += ["--no-progress", "--no-checkpoint", "--threads", str(args.threads), "--device", args.device]
    cmd += ["--train-set", f"batch_size={args.batch_size}", "--train-set", f"log_every={log_every}"]
    cmd += ["--train-set", "checkpoint_every=0"]
    for pair in args.set_:
        cmd += ["--set", pair]
    if world > 1:
        cmd += ["--nproc", str(world), "--strategy", args.strategy]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), POLYMODAL_THREADS=str(args.threads))
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"status": "error", "reason": " | ".join(tail) or f"exit {done.returncode}", "wall_s": wall}
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_s"] for r in rows if "samples_s" in r and "loss" in r]
    counted = rates[int(len(rates) * args.warmup) :] or rates
    if not counted:
        return {"status": "error", "reason": f"{out}/train_log.jsonl has no samples_s rows", "wall_s": wall}
    return {"status": "ok", "samples_s": statistics.median(counted), "windows": len(counted), "wall_s": wall}


def scaling_suite(argv: Sequence[str]) -> int:
    """Run the suite from command-line options; returns the exit status (0 ok, 1 a run failed)."""
    args = parse(argv)
    device = resolve_device(args.device)
    try:
        worlds = sorted({int(w) for w in args.procs.split(",") if w.strip()})
    except ValueError:
        raise BenchUsageError(f"--procs must be comma-separated whole numbers; got {args.procs!r}") from None
    if not worlds or worlds[0] < 1:
        raise BenchUsageError(f"--procs must name world sizes ≥ 1; got {args.procs!r}")
    bad = [w for w in worlds if args.batch_size % w]
    if bad:
        raise BenchUsageError(f"--batch-size {args.batch_size} does not divide by world size(s) {bad}")
    if device.type == "cuda" and worlds[-1] > torch.cuda.device_count():
        raise BenchUsageError(f"--procs asks for {worlds[-1]} processes; {torch.cuda.device_count()} GPU(s) visible")
    steps = args.steps or (6 if args.quick else 60)
    rounds = args.rounds or (1 if args.quick else 2)
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in worlds}
    with tempfile.TemporaryDirectory(prefix="polymodal-bench-scaling-") as tmp:
        for _ in range(rounds):
            for w in worlds:
                runs[w].append(run_once(args, w, steps, Path(tmp)))
    base = machine(device)
    rows = []
    for w in worlds:
        ok = [r["samples_s"] for r in runs[w] if r["status"] == "ok"]
        row: dict[str, Any] = dict(
            key=f"scaling/{args.model}/{args.strategy}/w{w}",
            model=args.model,
            strategy=args.strategy,
            world=w,
            batch_size=args.batch_size,
            steps=steps,
            threads_per_process=args.threads,
            runs=runs[w],
        )
        if not ok:
            row |= {"status": "error", "reason": next(r["reason"] for r in runs[w] if r["status"] != "ok")}
        else:
            row |= {"status": "ok", "samples_s": statistics.median(ok)}
        rows.append(row)
    one = next((r for r in rows if r["world"] == 1 and r["status"] == "ok"), None)
    for row in rows:
        if one is not None and row["status"] == "ok":
            row["speedup"] = row["samples_s"] / one["samples_s"]
            row["efficiency"] = row["speedup"] / row["world"]
    report = dict(suite="scaling", machine=base, command="polymodal bench scaling " + " ".join(argv), rows=rows)
    report["machine"]["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = (
        Path(args.out)
        if args.out
        else report_path(
            "scaling", device, base["device_name"], f"-{args.model}-{args.strategy}" + ("-quick" if args.quick else "")
        )
    )
    write_json(path, report)
    head = ("model", "strategy", "processes", "samples/s", "speedup", "efficiency", "status")
    lines = [
        (
            r["model"],
            r["strategy"],
            r["world"],
            fmt(r.get("samples_s"), ".1f"),
            fmt(r.get("speedup"), ".2f"),
            fmt(r.get("efficiency"), ".2f"),
            r["status"] if r["status"] == "ok" else f"error: {r['reason']}",
        )
        for r in rows
    ]
    print(text_table(head, lines))
    print(f"report: {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(scaling_suite(sys.argv[1:]))
