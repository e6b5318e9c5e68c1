"""Benchmark output: the attention table, ``--compare`` against a baseline, and the PNG plot.

The plot is drawn with Pillow (a core dependency), so no plotting library is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import fmt, text_table


def row_key(row: dict[str, Any]) -> str:
    """A row's identity across runs: its ``key``, or one built from the fields of older reports."""
    if row.get("key"):
        return row["key"]
    from bench_attention import shape_tag

    return f"{row.get('backend')}|{row.get('case')}|{shape_tag(row['shape'])}|{row.get('dtype')}|{row.get('mode')}"


def _tf(value: float | None) -> str:
    if value is None:
        return "-"
    return format(value, ".1f" if value >= 10 else ".3f" if value >= 0.01 else ".5f")


def attention_table(report: dict[str, Any]) -> str:
    """The screen table of an attention report: a header naming the machine and peaks, the rows, the overhead."""
    m = report["machine"]
    cuda = m["device"] == "cuda"
    peaks = ", ".join(f"{k} {_tf(v['tflops'])} TFLOP/s" for k, v in report.get("matmul_peak", {}).items())
    lines = [
        f"attention on {m['device_name']} ({m['device']}, torch {m['torch']}, {m['threads']} threads, "
        f"load {m.get('load_before')}); grid {report.get('grid')}; measured matmul peak: {peaks}; "
        f"copy bandwidth {fmt((report.get('copy_bandwidth') or {}).get('gbps'))} GB/s"
    ]
    if cuda:
        sheet = ", ".join(f"{k} {v:g}" for k, v in (m.get("datasheet_peak_tflops") or {}).items() if v)
        lines.append(f"datasheet dense peak of the {m['device_name']} (TFLOP/s, float32 without TF32): {sheet or '-'}")
        ref = m.get("flash_attention_reference")
        if ref:
            lines.append(
                f"FlashAttention-class reference ({ref['setup']}, {ref['gpu']}): FlashAttention-2 ≈ "
                f"{ref['flash_attention_2_tflops']:g} TFLOP/s, FlashAttention-3 ≈ {ref['flash_attention_3_tflops']:g} "
                f"TFLOP/s; source: {ref['source']}"
            )
    head = ["backend", "case", "D", "dtype", "mode", "median ms", "IQR ms", "TFLOP/s", "% peak"]
    head += ["% sheet", "GB/s", "peak MB"] if cuda else ["GB/s"]
    head.append("status")
    body = []
    for r in report["rows"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        line = [
            r["backend"],
            r["case"],
            r["head_dim"],
            r["dtype"],
            "fwd" if r["mode"] == "forward" else "fwd+bwd",
            fmt(r["median_ms"], ".3f"),
            fmt(r["iqr_ms"], ".3f"),
            _tf(r["tflops"]),
            fmt(r["pct_measured_peak"], ".1f"),
        ]
        line += (
            [fmt(r["pct_datasheet_peak"], ".1f"), fmt(r["gbps"], ".1f"), fmt(r["peak_mem_mb"], ".1f")]
            if cuda
            else [fmt(r["gbps"], ".1f")]
        )
        body.append([*line, status])
    lines.append(text_table(head, body))
    over = report.get("overhead")
    if over and "skipped" in over:
        lines.append(f"dispatcher overhead: skipped ({over['skipped']})")
    elif over:
        for c in over["cases"]:
            lines.append(
                f"dispatcher overhead at {c['shape']}: attention {c['attention_ms']:.4f} ms vs sdpa "
                f"{c['sdpa_ms']:.4f} ms, ratio {c['ratio']:.3f}"
            )
        lines.append(f"dispatcher overhead per tiny call: {over['tiny_call_overhead_us']:.1f} µs")
        if over["ratio"] > 1.05:
            lines.append(f"note: dispatcher overhead ratio {over['ratio']:.3f} is above the 1.05 target")
    return "\n".join(lines)


# -- compare ----------------------------------------------------------------------------------


def compare(new: dict[str, Any], base: dict[str, Any], threshold: float = 0.05, min_us: float = 30.0) -> dict[str, Any]:
    """Rows of ``new`` against the same rows (same key) of ``base``.

    A regression is slower by more than ``threshold`` (relative) *and* by more than
    ``min_us`` microseconds; an improvement is the mirror image. Rows that ran in the
    baseline but not now are listed as ``lost``.
    """

    def timed(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {row_key(r): r for r in report.get("rows", []) if r.get("median_ms")}

    old, now = timed(base), timed(new)
    regressions, improvements, compared = [], [], 0
    for key, r in now.items():
        b = old.get(key)
        if b is None:
            continue
        compared += 1
        ratio = r["median_ms"] / b["median_ms"]
        delta_us = (r["median_ms"] - b["median_ms"]) * 1e3
        item = dict(
            key=key,
            baseline_ms=b["median_ms"],
            new_ms=r["median_ms"],
            ratio=round(ratio, 4),
            delta_us=round(delta_us, 2),
        )
        if ratio > 1 + threshold and delta_us > min_us:
            regressions.append(item)
        elif ratio < 1 / (1 + threshold) and -delta_us > min_us:
            improvements.append(item)
    names = [(r.get("machine") or {}).get("device_name") for r in (new, base)]
    return dict(
        threshold=threshold,
        min_us=min_us,
        compared=compared,
        same_device=names[0] == names[1],
        baseline_device=names[1],
        regressions=sorted(regressions, key=lambda x: -x["ratio"]),
        improvements=sorted(improvements, key=lambda x: x["ratio"]),
        lost=sorted(set(old) - set(now)),
    )


def compare_text(result: dict[str, Any]) -> str:
    """The comparison as lines for the screen."""
    lines = [
        f"compared {result['compared']} rows with the baseline (regression: > {result['threshold']:.0%} and "
        f"> {result['min_us']:g} µs slower)"
    ]
    if not result["same_device"]:
        lines.append(f"warning: the baseline ran on {result['baseline_device']!r}, another device")
    for tag, items in (("REGRESSION", result["regressions"]), ("improvement", result["improvements"])):
        for x in items:
            lines.append(
                f"{tag}: {x['key']}: {x['baseline_ms']:.4f} → {x['new_ms']:.4f} ms "
                f"(×{x['ratio']:.3f}, {x['delta_us']:+.1f} µs)"
            )
    for key in result["lost"]:
        lines.append(f"lost: {key} ran in the baseline but has no timing now")
    lines.append(f"{len(result['regressions'])} regression(s), {len(result['improvements'])} improvement(s)")
    return "\n".join(lines)


# -- the plot ---------------------------------------------------------------------------------

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def plot_attention(report: dict[str, Any], path: str | Path) -> bool:
    """Time vs sequence length per backend, one log-log panel per (dtype, pass, head dim) of the
    causal-LM rows; False (nothing written) when the report has no timed causal-LM rows."""
    from PIL import Image, ImageDraw

    rows = [r for r in report["rows"] if r.get("family") == "causal-lm" and r.get("median_ms")]
    if not rows:
        return False
    panels: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        panel = panels.setdefault((r["dtype"], r["mode"], r["head_dim"]), {})
        panel.setdefault(r["backend"], []).append((r["seq_len"], r["median_ms"]))
    backends = sorted({r["backend"] for r in rows})
    colour = {b: COLOURS[i % len(COLOURS)] for i, b in enumerate(backends)}
    pw, ph, cols = 620, 420, min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    head = 70
    img = Image.new("RGB", (pw * cols, head + ph * nrows), "white")
    draw = ImageDraw.Draw(img)
    m = report["machine"]
    draw.text((12, 8), "Causal attention: time per call vs sequence length, per backend", fill="black", font=_font(16))
    draw.text(
        (12, 30),
        f"{m['device_name']} ({m['device']}), torch {m['torch']}, {m['threads']} threads",
        fill="black",
        font=_font(13),
    )
    draw.text((12, 48), report.get("command", ""), fill="#555555", font=_font(12))
    for i, (key, series) in enumerate(sorted(panels.items())):
        _panel(draw, (i % cols) * pw, head + (i // cols) * ph, pw, ph, key, series, colour)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return True


def _panel(draw, x0: int, y0: int, w: int, h: int, key: tuple, series: dict, colour: dict) -> None:
    left, right, top, bottom = x0 + 70, x0 + w - 150, y0 + 30, y0 + h - 45
    xs = sorted({n for pts in series.values() for n, _ in pts})
    ys = [t for pts in series.values() for _, t in pts]
    lx0, lx1 = math.log2(xs[0]), math.log2(xs[-1])
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    if lx1 == lx0:
        lx0, lx1 = lx0 - 1, lx1 + 1
    if ly1 == ly0:
        ly1 += 1
    px = lambda n: left + (math.log2(n) - lx0) / (lx1 - lx0) * (right - left)  # noqa: E731
    py = lambda t: bottom - (math.log10(t) - ly0) / (ly1 - ly0) * (bottom - top)  # noqa: E731
    small, label = _font(11), _font(13)
    dtype, mode, d = key
    draw.text((left, y0 + 8), f"{dtype}, {mode}, head dim {d}", fill="black", font=label)
    draw.rectangle([left, top, right, bottom], outline="black")
    for e in range(ly0, ly1 + 1):
        y = py(10.0**e)
        draw.line([left, y, right, y], fill="#dddddd")
        draw.text((x0 + 8, y - 7), f"{10.0**e:g} ms", fill="black", font=small)
    for n in xs:
        x = px(n)
        draw.line([x, top, x, bottom], fill="#eeeeee")
        draw.text((x - 12, bottom + 6), str(n), fill="black", font=small)
    draw.text(((left + right) // 2 - 60, bottom + 24), "sequence length N (log)", fill="black", font=small)
    for j, (name, pts) in enumerate(sorted(series.items())):
        pts = sorted(pts)
        coords = [(px(n), py(t)) for n, t in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour[name], width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour[name])
        ly = top + 4 + 16 * j
        draw.line([right + 10, ly + 7, right + 30, ly + 7], fill=colour[name], width=3)
        draw.text((right + 35, ly), name, fill="black", font=small)


# -- Markdown for the READMEs ---------------------------------------------------------------------


def markdown(report: dict[str, Any], statuses: tuple[str, ...] = ("ok",)) -> str:
    """A report as Markdown table rows (the READMEs' tables): timed rows, plus any of ``statuses``."""
    m = report["machine"]
    load = f"load average {m.get('load_before')} before, {m.get('load_after')} after"
    lines = [
        f"{m['device_name']} ({m['device']}), torch {m['torch']}, {m['threads']} threads, {load}; "
        f"`{report.get('command', '').strip()}`",
        "",
    ]
    rows = [r for r in report["rows"] if r["status"] in statuses]
    if report.get("suite") == "models":
        peaks = _peaks(report)
        if peaks:
            lines[0] += f"; measured matmul peak {peaks}"
        lines += [
            "| model | task | batch | dtype | mode | reference | polymodal ms | transformers ms | ratio | GFLOP | "
            "polymodal GFLOP/s (% peak) | transformers GFLOP/s (% peak) | rel diff | polymodal /s | status |",
            "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            lines.append(
                f"| {r['model']} | {r['task']} | {fmt(r['batch'])} | {r['dtype']} | {r.get('mode', 'eager')} | "
                f"{r.get('transformers_options') or r.get('reference') or '-'} | {fmt(r['polymodal_ms'], '.1f')} "
                f"| {fmt(r['transformers_ms'], '.1f')} | {fmt(r['ratio'], '.3f')} | {fmt(r.get('gflop'), '.4g')} | "
                f"{_rate(r, 'polymodal')} | {_rate(r, 'transformers')} | {fmt(r.get('rel_diff'), '.1e')} | "
                f"{fmt(r.get('polymodal_per_s'), '.1f')} {r.get('unit', '')} | {status} |"
            )
        return "\n".join(lines)
    lines += [
        "| case | shape (B, H, Nq, Nk, D) | mask | mode | backend | median ms | IQR ms | TFLOP/s | % peak |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["shape"]
        lines.append(
            f"| {r['case']} | {s['B']}, {s['H']}, {s['Nq']}, {s['Nk']}, {s['D']} | {r['mask']} | "
            f"{'fwd' if r['mode'] == 'forward' else 'fwd+bwd'} | {r['backend']} | {fmt(r['median_ms'], '.3f')} | "
            f"{fmt(r['iqr_ms'], '.3f')} | {_tf(r.get('tflops'))} | {fmt(r.get('pct_measured_peak'), '.1f')} |"
        )
    return "\n".join(lines)


def markdown_pivot(report: dict[str, Any]) -> str:
    """An attention report as one Markdown table per (dtype, pass, head dim): a row per case, the
    median ms of every backend side by side, and the best backend's TFLOP/s and % of peak."""
    rows = [r for r in report["rows"] if r.get("suite") == "attention"]
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["status"] == "ok"))
    out = []
    for dtype, mode, d in dict.fromkeys((r["dtype"], r["mode"], r["head_dim"]) for r in rows):
        group = [r for r in rows if (r["dtype"], r["mode"], r["head_dim"]) == (dtype, mode, d)]
        out += [
            f"{dtype}, {mode}, head dim {d} (median ms per call; - = cannot run, see the JSON for why):",
            "",
            "| case | B, H, Nq, Nk | mask | " + " | ".join(backends) + " | best: TFLOP/s | % peak |",
            "|---|---|---|" + "---:|" * (len(backends) + 2),
        ]
        for case in dict.fromkeys(r["case"] for r in group):
            cells = {r["backend"]: r for r in group if r["case"] == case}
            first = next(iter(cells.values()))
            s = first["shape"]
            timed = [r for r in cells.values() if r.get("median_ms")]
            best = min(timed, key=lambda r: r["median_ms"]) if timed else None
            out.append(
                f"| {case} | {s['B']}, {s['H']}, {s['Nq']}, {s['Nk']} | {first['mask']} | "
                + " | ".join(fmt((cells.get(b) or {}).get("median_ms"), ".2f") for b in backends)
                + f" | {_tf(best['tflops']) + ' (' + best['backend'] + ')' if best else '-'} | "
                f"{fmt(best['pct_measured_peak'] if best else None, '.0f')} |"
            )
        out.append("")
    return "\n".join(out)


# -- the README's performance table ---------------------------------------------------------------------

README_BEGIN = "<!-- bench-table: "
"""Opens a generated block in a README: ``<!-- bench-table: models-cpu-amd-epyc.json [more.json ...] -->``."""
README_END = "<!-- /bench-table -->"
"""Closes a generated block."""


def _peaks(report: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v['tflops'] * 1e3:.0f} GFLOP/s" for k, v in (report.get("matmul_peak") or {}).items() if v.get("tflops")
    )


def _pct(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _rate(r: dict[str, Any], side: str) -> str:
    gflops, pct = r.get(f"{side}_gflops"), r.get(f"{side}_pct_peak")
    if gflops is None:
        return "-"
    return f"{gflops:.1f}" + ("" if pct is None else f" ({_pct(pct)} %)")


TASK_WORDS = {
    "forward": "forward",
    "image-tower": "image tower",
    "text-tower": "text tower",
    "train-step": "train step",
    "generate": "greedy generation",
}


def _task(r: dict[str, Any]) -> str:
    words = TASK_WORDS.get(r["task"], r["task"])
    ref, baseline = r.get("reference"), r.get("baseline")
    if baseline:  # fusion rows: the same model without its cache is the reference
        return f"{words} (vs {baseline})"
    return words + (f" (vs {ref} cache)" if ref else "")


def readme_models(reports: Sequence[dict[str, Any]]) -> str:
    """The README's models table from saved models reports: per machine a line naming it (threads, load, the
    measured matmul peaks, the command), then one row per model, task, batch and dtype with eager and compiled
    side by side: polymodal's time, ``ratio`` (transformers time / polymodal time) and each side's GFLOP/s
    as % of the matmul peak of that dtype (polymodal / transformers), plus polymodal's speed-up over its own
    float32 in the same mode. Rows with no timing show why in the last column."""
    out = []
    for report in reports:
        m = report["machine"]
        out.append(
            f"- {m['device_name']} ({m['device']}), torch {m['torch']}, transformers {m.get('transformers')}, "
            f"{m['threads']} threads, load average {m.get('load_before')} before, {m.get('load_after')} after; "
            f"matmul peak {_peaks(report) or 'not measured'}; `{report.get('command', '').strip()}`"
        )
    out += [
        "",
        "| model | task | batch | dtype | eager: polymodal ms | ratio | % peak (polymodal / transformers) | "
        "compiled: polymodal ms | ratio | % peak (polymodal / transformers) | vs own float32 (eager / compiled) | "
        "note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for report in reports:
        for r in report["rows"]:
            if r.get("batch") is None:
                continue
            key = (r["model"], _task(r), r["batch"], r["dtype"])
            groups.setdefault(key, {})[r.get("mode", "eager")] = r
    for (model, task, batch, dtype), modes in groups.items():
        cells, notes, speed = [], [], []
        for mode in ("eager", "compiled"):
            r = modes.get(mode)
            if r is None or r["status"] != "ok":
                cells += ["-", "-", "-"]
                speed.append("-")
                if r is not None:
                    notes.append(f"{mode}: {r['status']}: {r.get('reason')}")
                continue
            pct = [r.get("polymodal_pct_peak"), r.get("transformers_pct_peak")]
            cells += [
                fmt(r["polymodal_ms"], ".1f"),
                fmt(r["ratio"], ".2f"),
                "-" if None in pct else f"{_pct(pct[0])} / {_pct(pct[1])}",
            ]
            fp32 = groups.get((model, task, batch, "float32"), {}).get(mode)
            if dtype != "float32" and fp32 and fp32.get("polymodal_ms") and r.get("polymodal_ms"):
                speed.append(f"{fp32['polymodal_ms'] / r['polymodal_ms']:.2f}×")
            else:
                speed.append("-")
        out.append(
            f"| {model} | {task} | {batch} | {dtype} | " + " | ".join(cells) + f" | {' / '.join(speed)} | "
            f"{'; '.join(notes)} |"
        )
    return "\n".join(out)


def readme_blocks(text: str) -> list[tuple[int, int, list[str]]]:
    """The generated blocks of a README: (start, end, report file names) with ``text[start:end]`` the body
    between the opening marker's line and the closing marker (ValueError on an unclosed block)."""
    blocks, at = [], 0
    while (i := text.find(README_BEGIN, at)) >= 0:
        close = text.index("-->", i)
        names = text[i + len(README_BEGIN) : close].split()
        start = text.index("\n", close) + 1
        end = text.find(README_END, start)
        if end < 0:
            raise ValueError(f"a {README_BEGIN.strip()} block at offset {i} has no {README_END}")
        blocks.append((start, end, names))
        at = end
    return blocks


def readme_render(text: str, results: Path) -> str:
    """``text`` with every generated block replaced by :func:`readme_models` of the reports it names
    (files under ``results``)."""
    from bench import read_report

    out, last = [], 0
    for start, end, names in readme_blocks(text):
        reports = [read_report(results / name) for name in names]
        out += [text[last:start], readme_models(reports), "\n"]
        last = end
    return "".join(out) + text[last:]
