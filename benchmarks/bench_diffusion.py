"""``polymodal bench diffusion``: polymodal's UNet and DDIM loop against diffusers on identical weights.

A randomly initialised diffusers ``UNet2DModel`` (nothing downloaded; sized like a small real model:
32×32 RGB, widths 64/128/128, self-attention at 16×16 and 8×8, two residual blocks per level) is
saved with ``save_pretrained`` and converted with polymodal's ``diffusers-unet`` mapping. Two tasks:

* ``unet-forward``: one UNet call on a batch at random timesteps;
* ``ddim`` (rows ``ddim-50``): a whole DDIM sampling run (η = 0, 50 steps, leading spacing, the linear DDPM schedule)
  from the same ``x_T``: polymodal's sampler and loop against ``DDIMScheduler`` and the
  ``DDIMPipeline``-style loop.

Outputs are compared in float64 before anything is timed (a mismatch is a row with the reason, not a
timing; float64 because DDIM on an untrained network amplifies float32 rounding chaotically); the two sides then run interleaved on the same inputs and thread count (``time_pair`` of
the models suite), and ``ratio`` = diffusers time / polymodal time (> 1: polymodal is faster).
``torch.profiler`` then splits one forward of each side into op categories (convolution,
attention kernels, linear layers, normalisation, the rest), so the report says where the time goes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench import BenchUsageError, fmt, load_average, machine, report_path, resolve_device, text_table, write_json
from bench_models import time_pair

PARITY_RTOL = 1e-4  # max |ours - theirs| / max |theirs| allowed before timing (checked in float64)

CONFIG = dict(  # the diffusers UNet2DModel both sides run
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_num_groups=32,
    attention_head_dim=32,
)
QUICK = dict(CONFIG, sample_size=8, block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=8)
TASKS = ("unet-forward", "ddim")  # ddim: the whole sampling run, labelled ddim-<steps> in rows

# op-name patterns of each category (first match wins), over the profiler's self times
CATEGORIES = (
    ("attention", re.compile(r"scaled_dot_product|flash_attention|efficient_attention|cudnn_attention|fmha|softmax")),
    ("convolution", re.compile(r"conv|cudnn_convolution")),
    ("linear", re.compile(r"addmm|\bmm\b|aten::mm|bmm|linear|matmul|gemm")),
    ("normalisation", re.compile(r"group_norm|layer_norm|native_layer_norm")),
)


def build(quick: bool, folder: Path, seed: int = 0):
    """(diffusers UNet, polymodal UNet, config): the same randomly initialised weights on both sides."""
    import diffusers

    from polymodal.plugins.diffusion.convert import load_diffusers_unet

    diffusers.utils.logging.set_verbosity_error()  # its note on casting a model with .to(dtype) is not ours to act on
    cfg = QUICK if quick else CONFIG
    torch.manual_seed(seed)
    theirs = diffusers.UNet2DModel(**cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norm weights and biases start at 1 and 0: perturb them so a dropped one would show
        for name, p in theirs.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(folder, safe_serialization=True)
    ours, _ = load_diffusers_unet(folder)
    return theirs, ours.eval(), cfg


def ddim_pair(theirs, ours, steps: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """(polymodal run, diffusers run): each maps x_T (B, C, H, W) to x_0 with DDIM (η = 0) in ``steps`` steps."""
    from diffusers import DDIMScheduler

    from polymodal.diffusion.loop import sample
    from polymodal.diffusion.samplers import SamplerConfig, make_sampler
    from polymodal.diffusion.schedule import NoiseSchedule, ScheduleConfig

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    sampler = make_sampler(NoiseSchedule(ScheduleConfig()), SamplerConfig(name="ddim", steps=steps, eta=0.0))

    def run_ours(x_t: torch.Tensor) -> torch.Tensor:
        return sample(lambda x, t: ours(x, t), sampler, x_T=x_t).images  # (B, C, H, W)

    def run_theirs(x_t: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_t
        for t in scheduler.timesteps:
            eps = theirs(x, t).sample  # (B, C, H, W)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x

    return run_ours, run_theirs


def profile_shares(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> dict[str, float]:
    """Share of the profiled op time per category (self times, so nothing is counted twice)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys([c for c, _ in CATEGORIES] + ["other"], 0.0)
    for event in prof.key_averages():
        spent = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        category = next((c for c, pattern in CATEGORIES if pattern.search(event.key)), "other")
        totals[category] += spent
    whole = sum(totals.values()) or 1.0
    return {c: round(v / whole, 4) for c, v in totals.items()}


def parity(ours: Callable, theirs: Callable, x: Any) -> float:
    """max |ours − theirs| / max |theirs| (ValueError on differing shapes or an all-zero reference)."""
    with torch.inference_mode():
        a, b = ours(x), theirs(x)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: polymodal {tuple(a.shape)}, diffusers {tuple(b.shape)}")
    scale = b.abs().max().item()
    if not scale > 0:
        raise ValueError("the diffusers output is all zeros, so a match would mean nothing")
    return (a.float() - b.float()).abs().max().item() / scale


def row_for(task: str, batch: int, steps: int, base: dict, dtype: str) -> dict[str, Any]:
    """A row without timings yet."""
    return dict(
        suite="diffusion",
        key=f"UNet2DModel|{task}|b{batch}|{dtype}",
        model="UNet2DModel",
        task=task,
        batch=batch,
        steps=steps if task != "unet-forward" else 1,
        dtype=dtype,
        device=base["device"],
        device_name=base["device_name"],
        status="ok",
        reason=None,
        parity_rel_diff=None,
        unit="images/s",
        median_ms=None,
        polymodal_ms=None,
        polymodal_iqr_ms=None,
        diffusers_ms=None,
        diffusers_iqr_ms=None,
        ratio=None,
        polymodal_per_s=None,
        diffusers_per_s=None,
        threads=base["threads"],
        torch=base["torch"],
    )


def time_task(row, ours_fn, theirs_fn, x, batch, device, rounds, round_s) -> dict[str, Any]:
    """Time one (already checked) task on both sides, interleaved; the row with its timings."""
    try:
        with torch.inference_mode():
            ours_t, theirs_t = time_pair([lambda: ours_fn(x), lambda: theirs_fn(x)], device, rounds, round_s)
    except Exception as exc:
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]}
    return {
        **row,
        "median_ms": round(ours_t["median"] * 1e3, 3),
        "polymodal_ms": round(ours_t["median"] * 1e3, 3),
        "polymodal_iqr_ms": round(ours_t["iqr"] * 1e3, 3),
        "diffusers_ms": round(theirs_t["median"] * 1e3, 3),
        "diffusers_iqr_ms": round(theirs_t["iqr"] * 1e3, 3),
        "ratio": round(theirs_t["median"] / ours_t["median"], 3),
        "polymodal_per_s": round(batch / ours_t["median"], 2),
        "diffusers_per_s": round(batch / theirs_t["median"], 2),
        "calls": [ours_t["calls"], theirs_t["calls"]],
    }


def check_task(row, ours_fn, theirs_fn, x) -> dict[str, Any]:
    """The row with its (float64) parity measured; status ``mismatch`` or ``error`` when it may not be timed."""
    try:
        diff = parity(ours_fn, theirs_fn, x)
    except Exception as exc:
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]}
    row = {**row, "parity_rel_diff": round(diff, 8)}
    if diff > PARITY_RTOL:
        why = f"not timed: outputs differ: max |polymodal − diffusers| / max |diffusers| = {diff:.2e} > {PARITY_RTOL:g}"
        return {**row, "status": "mismatch", "reason": why}
    return row


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The suite's options."""
    p = argparse.ArgumentParser(
        prog="polymodal bench diffusion",
        description=(
            "polymodal's UNet and DDIM sampling vs diffusers on identical converted weights (random init, "
            "nothing downloaded): outputs checked, then interleaved runs; prints a table and writes JSON rows."
        ),
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--tasks", default="", help=f"comma-separated subset of {', '.join(TASKS)} (default: both)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default 4 on the CPU, 32 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of the sampling task (default 50, quick 3)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16/float16 on CUDA")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per side (default 5, quick 2)")
    p.add_argument("--round-s", type=float, default=None, help="seconds per side per round (default 1.0, quick 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    p.add_argument("--no-profile", action="store_true", help="skip the op-category profile")
    p.add_argument("--quick", action="store_true", help="a tiny UNet (8×8) and short timings (a smoke run)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/diffusion-<device>.json)")
    return p.parse_args(list(argv))


def diffusion_table(report: dict[str, Any]) -> str:
    """The screen table of a diffusion report, with the profile's shares below it."""
    m = report["machine"]
    head = ["task", "batch", "steps", "polymodal ms", "diffusers ms", "ratio", "pm img/s", "df img/s", "status"]
    body = []
    for r in report["rows"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        body.append(
            [
                r["task"],
                fmt(r["batch"]),
                fmt(r["steps"]),
                fmt(r["polymodal_ms"], ".2f"),
                fmt(r["diffusers_ms"], ".2f"),
                fmt(r["ratio"], ".3f"),
                fmt(r["polymodal_per_s"], ".2f"),
                fmt(r["diffusers_per_s"], ".2f"),
                status,
            ]
        )
    title = (
        f"diffusion on {m['device_name']} ({m['device']}, torch {m['torch']}, diffusers {report.get('diffusers')}, "
        f"{m['threads']} threads, load {m.get('load_before')}); ratio = diffusers time / polymodal time"
    )
    text = title + "\n" + text_table(head, body)
    for side, shares in (report.get("profile") or {}).items():
        text += f"\nop time of one forward, {side}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
    return text


def diffusion_suite(argv: Sequence[str]) -> int:
    """Run the suite from command-line options; returns the exit status (0 ok, 1 an error or mismatch)."""
    args = parse(argv)
    device = resolve_device(args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BenchUsageError(f"unknown task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BenchUsageError(f"--dtype must name a torch float dtype (float32, bfloat16); got {args.dtype!r}")
    if args.batch is not None and args.batch < 1 or args.steps is not None and args.steps < 1:
        raise BenchUsageError(f"--batch and --steps must be ≥ 1; got {args.batch} and {args.steps}")
    try:
        import diffusers
    except ImportError:
        raise BenchUsageError("the diffusion suite compares against diffusers: pip install diffusers") from None
    prior = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, list(argv), device, dtype, tasks, diffusers.__version__)
    finally:
        torch.set_num_threads(prior)


def _run(args, argv, device, dtype, tasks, diffusers_version) -> int:
    batch = args.batch or (2 if args.quick else 32 if device.type == "cuda" else 4)
    steps = args.steps or (3 if args.quick else 50)
    rounds = args.rounds or (2 if args.quick else 5)
    round_s = args.round_s if args.round_s is not None else (0.01 if args.quick else 1.0)
    dt = str(dtype).replace("torch.", "")
    base = machine(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="polymodal-bench-diffusion-") as tmp:
        theirs, ours, cfg = build(args.quick, Path(tmp) / "unet")
    g = torch.Generator().manual_seed(0)
    size, ch = cfg["sample_size"], cfg["in_channels"]
    x = torch.randn(batch, ch, size, size, generator=g).to(device)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)  # (B,)
    # Outputs are checked in float64 on 2 images first: a DDIM run of an untrained network amplifies
    # float32 rounding (1e-6) chaotically to O(1) within 50 steps, so only float64 tells a real
    # difference from rounding. Then both sides are cast to the timed dtype.
    theirs.to(device=device, dtype=torch.float64)
    ours.to(device=device, dtype=torch.float64)
    work = []  # (row, (ours, theirs))
    for task in tasks:
        label = f"ddim-{steps}" if task == "ddim" else task
        row = row_for(label, batch, steps, base, dt)
        if task == "unet-forward":
            pair = (lambda v: ours(v, t[: v.shape[0]]), lambda v: theirs(v, t[: v.shape[0]]).sample)
        else:
            try:
                pair = ddim_pair(theirs, ours, steps)
            except ImportError as exc:  # the core's samplers are missing (an older checkout)
                work.append(({**row, "status": "skipped", "reason": f"no polymodal DDIM sampler: {exc}"}, None))
                continue
        work.append((check_task(row, *pair, x[:2].double()), pair))
    theirs.to(dtype=dtype)
    ours.to(dtype=dtype)
    x = x.to(dtype)
    rows = []
    for row, pair in work:
        if row["status"] == "ok":
            row = time_task(row, *pair, x, batch, device, rounds, round_s)
        rows.append(row)
        print(
            f"  {row['task']:14s} b{batch:<4d} {row['status']:8s} ratio {fmt(row['ratio'])}",
            file=sys.stderr,
            flush=True,
        )
    profile = None
    if not args.no_profile:
        with torch.inference_mode():
            profile = {
                "polymodal": profile_shares(lambda: ours(x, t), device),
                "diffusers": profile_shares(lambda: theirs(x, t).sample, device),
            }
    base["load_after"] = load_average()
    report = dict(
        suite="diffusion",
        command="polymodal bench diffusion " + " ".join(argv),
        machine=base,
        diffusers=diffusers_version,
        unet_config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        dtype=dt,
        batch=batch,
        steps=steps,
        rounds=rounds,
        round_s=round_s,
        quick=args.quick,
        parity_rtol=PARITY_RTOL,
        parity_dtype="float64",
        profile=profile,
        seconds=round(time.perf_counter() - started, 1),
        rows=rows,
    )
    print(diffusion_table(report))
    out = (
        Path(args.out)
        if args.out
        else report_path("diffusion", device, base["device_name"], "-quick" if args.quick else "")
    )
    write_json(out, report)
    print(f"wrote {out}")
    return 1 if any(r["status"] in ("error", "mismatch") for r in rows) else 0
