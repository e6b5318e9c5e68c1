"""Fusion rows of ``polymodal bench models``: Flamingo few-shot captioning and FROMAGe retrieval-generation,
each with its generation cache against the same model without it (one interleaved run, same threads, same dtype).

* ``Flamingo|4-shot caption``: four (image, caption) shots and a query image, 16 new tokens, through
  ``Flamingo.continue_text`` with the visual context's cross-attention keys/values computed once per generation
  (``cross_cache=True``, the default) against the same call projecting them again at every step
  (``cross_cache=False``, the path before issue 18); both keep the self-attention KV cache. ``ratio`` = without /
  with (the issue's bar: >= 2).
* ``Flamingo|4-shot caption, no KV cache``: the same call against ``use_cache=False`` (every step reruns the whole
  interleaved sequence), for scale.
* ``Flamingo (paper proportions: 64 latents, width 512)|4-shot caption``: the first row's comparison at Flamingo's
  proportions scaled to a CPU (:data:`PAPER`): LM width 512, depth 8, 8 heads; vision tower width 256, depth 3
  (8x8 images, 2x2 patches: 17 tokens); the paper's 64 latents per image, so 5 images = 320 context tokens; a gated
  cross-attention block before every LM block (``cross_every=1``, as Flamingo-3B; OpenFlamingo-9B uses every 4th),
  8 heads, MLP x4; resampler depth 2. At the default sizes the context projections are a small share of a
  Python-overhead-bound step; here they are ~70% of the uncached call's counted FLOPs. At batch 1 the cached
  decode step is weight-bandwidth bound (matrix-vector products), so the time ratio stays below the FLOP ratio.
* ``FROMAGe|retrieval-generation``: ``fromage.infer.generate(prompt, gallery=..., k=5)`` (16 new tokens, then the
  [RET] query and the nearest gallery images) with its KV cache (the [RET] query reads on from the generation's
  cache) against ``use_cache=False``. FROMAGe has no cross-attention: its images enter as prefix tokens.

The models are randomly initialised at the default config sizes: ``FlamingoConfig()`` / ``FromageConfig()`` with
both parts built fresh and untrained (``PartConfig(path="")``: the default ``lm`` variant, width 128, depth 4,
and the digits ``clip`` variant; the paper-proportion row: those variants' configs with the sizes above), seeded; Flamingo's tanh gates are set to 0.5 (they start at 0) so the
cross-attention reaches every logit. Nothing is trained or downloaded. Greedy outputs of the two paths must
agree before anything is timed (else a ``mismatch`` row). Flamingo rows record the exact ``sizes``, the counted
``gflop`` / ``baseline_gflop`` per call (``FlopCounterMode``), ``flop_ratio`` (baseline / cached) and
``media_gflop`` (vision tower + resampler, paid once per call on both paths). ``--quick`` uses the tiny parts
(the paper-proportion row: :data:`PAPER_QUICK`).

    python benchmarks/bench_fusion.py --threads 2 --out benchmarks/results/fusion-cpu-amd-epyc.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import fmt, load_average, machine, report_path, resolve_device, text_table, write_json  # noqa: E402
from bench_models import reason_row, time_pair  # noqa: E402

NEW_TOKENS = 16
SHOTS = 4
GALLERY = 64
FROMAGE_PROMPT = "a photo of the number"


# -- models ---------------------------------------------------------------------------------------


def _fresh(model_class: type, quick: bool):
    """``model_class`` at its default config with both parts built fresh with random weights (``--quick``: the
    family's ``tiny_config``, tiny parts)."""
    import attrs

    c = model_class.config_class()
    if quick:
        return model_class(model_class.tiny_config(c))
    parts = {name: attrs.evolve(getattr(c, name), path="") for name in ("lm", "vision")}
    return model_class(attrs.evolve(c, **parts))


def build_flamingo(quick: bool = False, seed: int = 0):
    """A default-size (or tiny) Flamingo with random weights and its gates opened to tanh = 0.5."""
    from polymodal.plugins.flamingo import Flamingo

    torch.manual_seed(seed)
    model = _fresh(Flamingo, quick)
    with torch.no_grad():
        for block in model.xattn_blocks():
            block.attn_gate.fill_(0.5493)  # tanh(0.5493) = 0.5
            block.mlp_gate.fill_(0.5493)
    return model.eval()


PAPER = dict(
    lm_dim=512, lm_depth=8, lm_heads=8, vision_dim=256, vision_depth=3, vision_heads=4,
    num_latents=64, resampler_depth=2, resampler_heads=4, cross_every=1, xattn_heads=8, xattn_mlp_ratio=4.0,
)  # fmt: skip
"""The paper-proportion Flamingo row's sizes (Flamingo's 64 latents per image, its gated blocks' MLP x4, a
cross-attention block before every LM block as in Flamingo-3B), scaled to this CPU."""
PAPER_QUICK = dict(
    PAPER, lm_dim=32, lm_depth=2, lm_heads=2, vision_dim=16, vision_depth=1, vision_heads=2, num_latents=8
)
"""``--quick``: the same row's code path at toy sizes."""
PAPER_NAME = "Flamingo (paper proportions: 64 latents, width 512)"


def build_flamingo_paper(quick: bool = False, seed: int = 0):
    """A Flamingo at :data:`PAPER` sizes (``--quick``: :data:`PAPER_QUICK`) with random weights, the gates
    opened to tanh = 0.5: the default ``lm`` and ``clip`` variants' configs with the widths, depths and heads
    overridden, built fresh and handed to the model as ``parts=`` (a ``PartConfig`` names a variant, not its
    sizes)."""
    import attrs

    from polymodal.plugins.flamingo import Flamingo
    from polymodal.registry import get_registry

    s = PAPER_QUICK if quick else PAPER
    reg = get_registry()
    torch.manual_seed(seed)
    lm_spec, clip_spec = reg.get("model", "lm"), reg.get("model", "clip")
    lm = lm_spec.instantiate(attrs.evolve(lm_spec.config, dim=s["lm_dim"], depth=s["lm_depth"], heads=s["lm_heads"]))
    v = clip_spec.config.vision
    block = attrs.evolve(v.block, dim=s["vision_dim"], heads=s["vision_heads"])
    clip = clip_spec.instantiate(
        attrs.evolve(clip_spec.config, vision=attrs.evolve(v, block=block, depth=s["vision_depth"]))
    )
    c = Flamingo.config_class()
    keys = ("num_latents", "resampler_depth", "resampler_heads", "cross_every", "xattn_heads", "xattn_mlp_ratio")
    c = attrs.evolve(
        c,
        lm=attrs.evolve(c.lm, path=""),
        vision=attrs.evolve(c.vision, path=""),
        **{k: s[k] for k in keys},
    )
    model = Flamingo(c, parts={"lm": lm, "vision": clip})
    with torch.no_grad():
        for b in model.xattn_blocks():
            b.attn_gate.fill_(0.5493)  # tanh(0.5493) = 0.5
            b.mlp_gate.fill_(0.5493)
    return model.eval()


def paper_sizes(model) -> dict[str, Any]:
    """The exact sizes of a Flamingo (recorded in its rows)."""
    c, v = model.config, model.vision.config.vision
    return dict(
        lm_dim=model.lm.dim,
        lm_depth=len(model.lm.stack.blocks),
        lm_heads=model.lm.config.heads,
        vocab=model.lm.vocab_size + 2,
        vision_dim=v.block.dim,
        vision_depth=v.depth,
        vision_heads=v.block.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_latents=c.num_latents,
        resampler_depth=c.resampler_depth,
        resampler_heads=c.resampler_heads,
        cross_every=c.cross_every,
        xattn_blocks=len(model.xattn_blocks()),
        xattn_heads=c.xattn_heads,
        xattn_mlp_ratio=c.xattn_mlp_ratio,
    )


def build_fromage(quick: bool = False, seed: int = 0):
    """A default-size (or tiny) FROMAGe with random weights."""
    from polymodal.plugins.fromage import Fromage

    torch.manual_seed(seed)
    return _fresh(Fromage, quick).eval()


def _images(model, n: int, seed: int) -> torch.Tensor:
    v = model.vision.config.vision
    return torch.rand(n, v.channels, v.image_size, v.image_size, generator=torch.Generator().manual_seed(seed))


def _prepare(model, dtype: torch.dtype):
    """``prepare_inference(model, dtype=...)`` (eager) where it exists, else a plain cast."""
    try:
        from polymodal.models.inference import prepare_inference
    except ImportError:
        return model.to(dtype)
    return prepare_inference(model, dtype=dtype, compile=False)


class _Steps:
    """Counts the calls of the LM's first block (= decoding steps of one generation) and the rows it read."""

    def __init__(self, lm) -> None:
        self.block = lm.stack.blocks[0]
        self.calls = self.rows = 0

    def __enter__(self) -> _Steps:
        self.handle = self.block.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, out) -> None:
        self.calls += 1
        self.rows += args[0].shape[1]

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# -- the tasks ------------------------------------------------------------------------------------


def flamingo_task(model, new_tokens: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The 4-shot captioning calls (``cross``, ``no_cross``, ``no_cache``) and what they read."""
    images = _images(model, SHOTS + 1, seed=1)  # shots, then the query
    text = model.few_shot_text(list(range(SHOTS)))
    opts = dict(max_new_tokens=new_tokens, seed=0)
    calls = {
        "cross": lambda: model.continue_text(text, images, **opts),
        "no_cross": lambda: model.continue_text(text, images, cross_cache=False, **opts),
        "no_cache": lambda: model.continue_text(text, images, use_cache=False, **opts),
    }
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.media([images], 1)  # once per call on both paths
    info = dict(
        prompt_tokens=len(model.encode_text(text)),
        context_tokens=(SHOTS + 1) * model.config.num_latents,
        images=SHOTS + 1,
        media_gflop=round(counter.get_total_flops() / 1e9, 6),  # vision tower + resampler, in every call
        sizes=paper_sizes(model),
    )
    return calls, info


def fromage_task(model, new_tokens: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The retrieval-generation calls (``cached``, ``no_cache``) and what they read."""
    from polymodal.plugins.fromage.infer import generate

    gallery = _images(model, GALLERY, seed=2)
    room = model.lm.max_len - len(model.tokenizer.encode(FROMAGE_PROMPT, add_bos=True, add_eos=False)) - 1
    n = min(new_tokens, room)

    def call(use_cache: bool) -> Callable[[], Any]:
        def run() -> tuple:
            out = generate(model, FROMAGE_PROMPT, gallery=gallery, k=5, max_new_tokens=n, use_cache=use_cache)
            return out["text"], out["retrieved"].tolist()

        return run

    return {"cached": call(True), "no_cache": call(False)}, dict(gallery=GALLERY, k=5, extra_lm_calls=1)  # [RET]


# -- rows -----------------------------------------------------------------------------------------


def _row(
    model: str,
    task: str,
    baseline: str,
    fns: Sequence[Callable[[], Any]],
    steps: int,
    info: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    base: dict[str, Any],
    rounds: int,
    round_s: float,
) -> dict[str, Any]:
    """One timed row: ``fns`` = (polymodal's cached call, the same model's baseline call)."""
    row = reason_row(model, task, None, "ok", device, dtype, base, 1)
    with torch.no_grad():
        ours, theirs = time_pair(fns, device, rounds, round_s)
    return {
        **row,
        "mode": "eager",
        "unit": "tokens/s",
        "baseline": baseline,
        "median_ms": round(ours["median"] * 1e3, 3),
        "polymodal_ms": round(ours["median"] * 1e3, 3),
        "polymodal_iqr_ms": round(ours["iqr"] * 1e3, 3),
        "baseline_ms": round(theirs["median"] * 1e3, 3),
        "baseline_iqr_ms": round(theirs["iqr"] * 1e3, 3),
        "ratio": round(theirs["median"] / ours["median"], 3),
        "polymodal_per_s": round(steps / ours["median"], 2),
        "baseline_per_s": round(steps / theirs["median"], 2),
        "new_tokens": steps,
        "rounds": rounds,
        "calls": [ours["calls"], theirs["calls"]],
        **info,
    }


def _agree(model, calls: dict[str, Callable[[], Any]], exact: bool) -> tuple[int, dict[str, float], str | None]:
    """(decoding steps of the first call, GFLOP of each call counted by ``FlopCounterMode``, why the calls
    disagree or None): every call must return the same; not ``exact`` (reduced precision), only the same
    text (the first item of a tuple output: FROMAGe's retrieved indices may swap near-tied scores)."""
    from torch.utils.flop_counter import FlopCounterMode

    gflop: dict[str, float] = {}
    with torch.no_grad():
        with _Steps(model.lm) as steps:
            first = next(iter(calls.values()))()
        for name, fn in calls.items():
            with FlopCounterMode(display=False) as counter:
                out = fn()
            gflop[name] = counter.get_total_flops() / 1e9
            if (out != first) if exact or not isinstance(out, tuple) else (out[0] != first[0]):
                return steps.calls, gflop, f"outputs differ: {name} gave {out!r}, the cached path {first!r}"
    return steps.calls, gflop, None


def fusion_rows(args: Any, device: torch.device, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The fusion rows for every dtype of ``args`` (``dtypes`` list/comma string, else ``dtype``; float32 by
    default); ``args.quick`` (tiny parts, 6 tokens), ``args.rounds`` / ``args.round_s`` (default 5 / 0.5 s)."""
    quick = bool(getattr(args, "quick", False))
    rounds = getattr(args, "rounds", None) or (2 if quick else 5)
    round_s = getattr(args, "round_s", None)
    round_s = round_s if round_s is not None else (0.01 if quick else 0.5)
    new_tokens = 6 if quick else NEW_TOKENS
    rows: list[dict[str, Any]] = []
    for dtype in _dtypes(args):
        for name, build, task, pairs in (
            (
                "Flamingo",
                build_flamingo,
                flamingo_task,
                (
                    (
                        f"{SHOTS}-shot caption",
                        "cross",
                        "no_cross",
                        "same model, cross-attention K/V projected every step",
                    ),
                    (f"{SHOTS}-shot caption, no KV cache", "cross", "no_cache", "same model, use_cache=False"),
                ),
            ),
            (
                PAPER_NAME,
                build_flamingo_paper,
                flamingo_task,
                (
                    (
                        f"{SHOTS}-shot caption",
                        "cross",
                        "no_cross",
                        "same model, cross-attention K/V projected every step",
                    ),
                ),
            ),
            (
                "FROMAGe",
                build_fromage,
                fromage_task,
                (("retrieval-generation", "cached", "no_cache", "same model, use_cache=False"),),
            ),
        ):
            try:
                model = _prepare(build(quick), dtype).to(device).requires_grad_(False)  # inference only
                calls, info = task(model, new_tokens)
                used = {k for _, *names, _ in pairs for k in names}
                calls = {k: fn for k, fn in calls.items() if k in used}  # only the calls a row times
                steps, gflop, why = _agree(model, calls, exact=dtype == torch.float32)
                steps -= info.pop("extra_lm_calls", 0)  # LM calls that generate no token (FROMAGe's [RET] read)
            except Exception as exc:  # reported as a row, not raised
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
                rows += [reason_row(name, t, msg, "error", device, dtype, base, 1) for t, *_ in pairs]
                continue
            for label, ours, theirs, baseline in pairs:
                if why is not None:
                    rows.append(reason_row(name, label, f"not timed: {why}"[:400], "mismatch", device, dtype, base, 1))
                    continue
                fns = (calls[ours], calls[theirs])
                r = _row(name, label, baseline, fns, steps, info, device, dtype, base, rounds, round_s)
                r.update(gflop=round(gflop[ours], 6), baseline_gflop=round(gflop[theirs], 6))
                r["flop_ratio"] = round(gflop[theirs] / gflop[ours], 3) if gflop[ours] else None  # baseline / ours
                r["checked"] = "outputs identical" if dtype == torch.float32 else "generated text identical"
                r.update(
                    polymodal_gflops=round(gflop[ours] / (r["polymodal_ms"] / 1e3), 2),
                    baseline_gflops=round(gflop[theirs] / (r["baseline_ms"] / 1e3), 2),
                )
                rows.append(r)
                print(
                    f"  {name[:24]:24s} {label:32s} {r['dtype']:9s} ratio {fmt(r['ratio'])}",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def _dtypes(args: Any) -> list[torch.dtype]:
    """The torch dtypes named by ``args.dtypes`` (a comma string or a list), else ``args.dtype``, else float32."""
    names = getattr(args, "dtypes", None) or getattr(args, "dtype", None) or "float32"
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        dt = (
            n if isinstance(n, torch.dtype) else getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}.get(n, n), None)
        )
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"dtypes must name torch dtypes (float32, bfloat16); got {n!r}")
        out.append(dt)
    return out


def fusion_table(rows: Sequence[dict[str, Any]]) -> str:
    """The screen table of fusion rows."""
    head = ["model", "task", "dtype", "cached ms", "baseline ms", "ratio", "tokens", "baseline", "status"]
    body = [
        [
            r["model"],
            r["task"],
            r["dtype"],
            fmt(r.get("polymodal_ms"), ".1f"),
            fmt(r.get("baseline_ms"), ".1f"),
            fmt(r.get("ratio"), ".2f"),
            fmt(r.get("new_tokens")),
            r.get("baseline", "-"),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}",
        ]
        for r in rows
    ]
    return text_table(head, body)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/bench_fusion.py [--threads N] [--dtypes float32,bfloat16] [--quick] [--out PATH]``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_fusion.py")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtypes", default="float32", help="comma-separated dtypes (float32, bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per side (default 5, quick 2)")
    p.add_argument("--round-s", type=float, default=None, help="seconds per side per round (default 0.5)")
    p.add_argument("--quick", action="store_true", help="tiny parts and 6 tokens (a smoke run)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fusion-<device>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = machine(device)
    started = time.perf_counter()
    rows = fusion_rows(args, device, base)
    base["load_after"] = load_average()
    report = dict(
        suite="fusion",
        command="python benchmarks/bench_fusion.py " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=base,
        new_tokens=6 if args.quick else NEW_TOKENS,
        quick=args.quick,
        seconds=round(time.perf_counter() - started, 1),
        rows=rows,
    )
    print(fusion_table(rows))
    out = Path(args.out) if args.out else report_path("fusion", device, base["device_name"], "-quick" * args.quick)
    write_json(out, report)
    print(f"wrote {out}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
