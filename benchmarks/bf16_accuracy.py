"""bf16 inference accuracy beside fp32: each default model's headline metric(s) in both precisions.

    python benchmarks/bf16_accuracy.py --from-pytest /tmp/pytest-of-root/pytest-N --threads 2 --readme README.md
    python benchmarks/bf16_accuracy.py --models vit,vqvae --folder vit=runs/vit --threads 1
    python benchmarks/bf16_accuracy.py --help

For every default model (one variant per registered family: the variant named after the family,
else the family's first variant by name; ``--models`` picks others) the trained folder is loaded
twice, ``polymodal.load(DIR)`` (fp32) and ``polymodal.load(DIR, dtype="bf16")``, and evaluated by
the family's own ``evaluate`` on the variant's default data (the call ``polymodal eval`` makes),
with the global RNG seeded the same before each. The folder comes from ``--folder NAME=DIR``,
else from a finished pytest run (``--from-pytest``: the ``trained`` fixture's ``trained-NAME<k>``
folders), else it is trained once into ``$POLYMODAL_CACHE/bf16-accuracy/NAME`` (exactly
``polymodal train NAME``, parts from the same resolution) and reused later.

A row per (model, headline metric): the metric the family's quality test asserts (:data:`HEADLINES`;
every top-level number for a variant not listed), its fp32 and bf16 values and bf16 − fp32. A
failed evaluation is a row with the error, not a crash. Evaluations too long to run twice use the
smaller setting in :data:`SMALLER` in both precisions (same seed; said in the row's ``setting``;
``--full`` turns it off, ``--set NAME:FIELD=VALUE`` adds one). ``--readme FILE`` rewrites the
section between :data:`START` and :data:`END` from the JSON. No bar: the numbers are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import device_name, load_average, machine, report_path, write_json  # noqa: E402

START = "<!-- bf16-accuracy:start -->"
END = "<!-- bf16-accuracy:end -->"
"""The README markers around the generated section (``--readme`` replaces what lies between)."""

HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "vit": (("accuracy", "higher"),),
    "clip": (("zero_shot_accuracy_heldout", "higher"), ("zero_shot_accuracy", "higher")),
    "imagebind": (("emergent_text_to_audio_accuracy", "higher"), ("image_to_audio_accuracy", "higher")),
    "vqvae": (("recon_mse_normalized", "lower"), ("codebook_perplexity", "higher")),
    "igpt": (("test_nll_bits_per_token", "lower"), ("best_probe_accuracy", "higher")),
    "dalle": (("sample_accuracy", "higher"), ("test_bits_per_image_token_train_templates", "lower")),
    "ddpm": (
        ("fd_judge", "lower"),
        ("fd_judge_100", "lower"),
        ("inversion_mse", "lower"),
        ("inpaint_accuracy", "higher"),
    ),
    "ddpm-cfg": (("sample_accuracy", "higher"),),
    "ddpm-classifier": (("accuracy_t0", "higher"), ("accuracy_uniform_t", "higher")),
    "rudolph": (("caption_accuracy", "higher"), ("zero_shot_accuracy", "higher"), ("sample_accuracy", "higher")),
    "vit-mae": (("loss_ratio", "lower"), ("linear_probe_accuracy", "higher")),
    "pixel-mae": (("masked_loss_ratio", "lower"),),
    "pixel": (("accuracy_clean", "higher"), ("accuracy_drop", "lower")),
    "dino": (("knn_accuracy", "higher"), ("linear_probe_accuracy", "higher")),
    "lm": (("test_nll_bits_per_token", "lower"), ("digit_slot_mass", "higher"), ("sample_valid_rate", "higher")),
    "flamingo": (("accuracy_by_shots.4", "higher"),),
    "fromage": (("caption_accuracy", "higher"), ("retrieval_r1", "higher")),
    "sr3": (("psnr", "higher"), ("sr_kind_accuracy", "higher")),
    "unclip": (("sample_accuracy", "higher"), ("fd_judge", "lower"), ("variation_accuracy", "higher")),
    "unclip-shapes": (("sample_colour_accuracy", "higher"), ("sample_kind_accuracy", "higher")),  # issue 19's bars
    "kl-vae": (("normalised_recon_mse", "lower"),),
    "kl-vae-shapes": (("normalised_recon_mse", "lower"),),  # issue 20's bar (tests/test_klvae_quality.py)
    "movq-shapes": (("normalised_recon_mse", "lower"), ("normalised_recon_mse_unquantised", "lower")),
    "t5-multilingual": (("span_accuracy_en", "higher"), ("span_accuracy_zh", "higher"), ("probe_kind_ru", "higher")),
    "mclip": (("cosine", "higher"),),  # the digits recipe: no quality test of its own yet
    "mclip-shapes": (("cosine", "higher"), ("cosine_zh", "higher"), ("colour_accuracy_ru", "higher")),
    "kandinsky2": (  # issue 20's bars: colour and kind in each language (zh: the weakest)
        ("colour_accuracy", "higher"),
        ("kind_accuracy", "higher"),
        ("colour_accuracy_zh", "higher"),
    ),
    "kandinsky21": (  # issue 20's bars: colour and kind in each language, FD below kandinsky2's
        ("colour_accuracy", "higher"),
        ("kind_accuracy", "higher"),
        ("fd_judge", "lower"),
    ),
    "ofa": (  # issue 21's bars (tests/test_ofa_quality.py)
        ("caption_accuracy", "higher"),
        ("vqa_accuracy", "higher"),
        ("ground_accuracy", "higher"),
        ("region_accuracy", "higher"),
        ("classify_accuracy", "higher"),
        ("sample_colour_accuracy", "higher"),
    ),
}
"""Per variant: the metrics its quality test asserts (dotted keys reach nested dicts) and which way is better."""

SMALLER: dict[str, tuple[str, ...]] = {
    "ddpm": ("eval_samples=200", "eval_inpaint=120"),
}
"""Config overrides (``--set`` syntax) of evaluations too long to run twice at full size, used in both precisions:
ddpm draws 200 instead of 1,000 all-T DDPM samples (``fd_judge`` is then over 200 samples, ``fd_judge_100``
unchanged in kind) and inpaints 120 instead of 360 test images."""

JUDGED_FAMILIES = ("dalle", "diffusion", "sr3", "igpt", "rudolph", "ofa")
"""Families whose ``evaluate`` reads samples with the dataset's judge: it is made (trained once into the cache,
about a minute, or read from it) before the evaluation is timed."""


def default_models() -> list[str]:
    """One variant per registered family: the one named after the family, else the family's first by name (parts
    another variant trains, ``trained_by``, are left out)."""
    from polymodal.registry import get_registry

    families: dict[str, list[str]] = {}
    for entry in get_registry().entries("model"):
        if getattr(entry.obj.model_class, "trained_by", ""):
            continue
        families.setdefault(entry.obj.model_class.family, []).append(entry.name)
    return sorted(family if family in names else sorted(names)[0] for family, names in families.items())


def pytest_folder(root: Path, name: str) -> Path | None:
    """The ``trained`` fixture's folder for ``name`` under a pytest base temp dir, or None: ``trained-NAME`` (the
    fixture's shared folder, also under ``-n``) or, from older runs, the highest-numbered ``trained-NAME<k>``."""
    pattern = re.compile(rf"^trained-{re.escape(name)}(\d*)$")
    found = [
        (int(m.group(1) or -1), p)
        for p in root.iterdir()
        if (m := pattern.match(p.name)) and (p / "config.json").is_file()
    ]
    return max(found)[1] if found else None


def resolve_folders(
    names: Sequence[str], given: dict[str, Path], pytest_root: Path | None, cache: Path, log: Callable[[str], None]
) -> dict[str, Path]:
    """Each model's trained folder (and its parts'): ``given``, else the pytest run's, else trained into ``cache``."""
    from polymodal.api import spec, train_model

    out: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in out:
            return out[name]
        folder = given.get(name) or (pytest_folder(pytest_root, name) if pytest_root else None)
        if folder is None:
            folder = cache / name
            if not (folder / "config.json").is_file():
                config = spec(name).config
                parts = tuple(  # the parts a composite builds fresh and trains itself (path '') are its own
                    f"{field}={get(variant)}" for field, variant in spec(name).parts() if getattr(config, field).path
                )
                shutil.rmtree(folder, ignore_errors=True)  # a run cut short left no model here: start again
                log(f"training {name} into {folder} (`polymodal train {name}`; reused next time)")
                train_model(name, out=folder, set_=parts, progress=False, keep_checkpoint=False)
        out[name] = Path(folder)
        return out[name]

    for name in names:
        get(name)
    return {name: out[name] for name in names}


def metric(metrics: dict[str, Any], key: str) -> Any:
    """``metrics[key]``, a dotted key reaching into nested dicts (``accuracy_by_shots.4``); None when absent."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def headlines(name: str, *metric_sets: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The headline metrics of ``name``: :data:`HEADLINES`, else every top-level number of the metric sets."""
    if name in HEADLINES:
        return HEADLINES[name]
    keys = {k for m in metric_sets for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return tuple((k, "") for k in sorted(keys))


def evaluate_once(
    folder: Path, name: str, dtype: str | None, setting: Sequence[str]
) -> tuple[dict[str, Any], float, str]:
    """Load ``folder`` (``dtype`` None: as saved, fp32) and evaluate it on its default data with ``setting``
    (``--set`` pairs) applied to its config: (metrics, seconds, the dtype of its floating weights)."""
    import polymodal
    from polymodal.api import spec
    from polymodal.config import apply_overrides
    from polymodal.data import load_dataset
    from polymodal.io.folders import plain_metrics

    model = polymodal.load(folder, dtype=dtype)  # None: as saved, what `polymodal eval` loads
    if setting:
        model.config = apply_overrides(model.config, list(setting))
    data = getattr(model, "default_data", None) or spec(name).data
    dataset = load_dataset(data)
    if type(model).family in JUDGED_FAMILIES:  # a judge trained on first use is not the model's time
        from polymodal.eval.judge import get_judge

        with torch.enable_grad():
            get_judge(dataset)
    torch.manual_seed(0)
    start = time.perf_counter()
    metrics = plain_metrics(model.evaluate(dataset))
    seconds = time.perf_counter() - start
    weights = next((str(p.dtype) for p in model.parameters() if p.is_floating_point()), "none")
    return metrics, seconds, weights


def measure_model(name: str, folder: Path, setting: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Both precisions of one model: its record (metrics, seconds, errors) and its rows."""
    record: dict[str, Any] = {"model": name, "folder": str(folder), "setting": list(setting)}
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    record["weights_dtype"] = {}
    for label, dtype in (("fp32", None), ("bf16", "bf16")):
        try:
            results[label], seconds, record["weights_dtype"][label] = evaluate_once(folder, name, dtype, setting)
            record[f"eval_s_{label}"] = round(seconds, 2)
            log(f"{name} {label}: evaluated in {seconds:.1f} s")
        except Exception as exc:  # a failed evaluation is a row with the error
            errors[label] = f"{type(exc).__name__}: {exc}".strip()[:500]
            record[f"traceback_{label}"] = traceback.format_exc(limit=-4)
            log(f"{name} {label}: failed: {errors[label]}")
    record["metrics"] = results
    record["errors"] = errors
    rows = []
    for key, better in headlines(name, *results.values()) or (("-", ""),):

        def metric_of(label: str, key: str = key) -> float | None:
            value = metric(results.get(label, {}), key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        a, b = metric_of("fp32"), metric_of("bf16")
        row = {"model": name, "metric": key, "better": better, "fp32": a, "bf16": b}
        row["diff"] = b - a if a is not None and b is not None else None
        row["setting"] = ", ".join(setting)
        missing = [f"{label}: no number `{key}` in its metrics" for label in results if metric_of(label) is None]
        row["error"] = "; ".join([*(f"{label}: {text}" for label, text in errors.items()), *missing])
        rows.append(row)
    record["rows"] = rows
    return record


# -- README section -------------------------------------------------------------------------------------------


def _num(value: Any) -> str:
    """A metric for the table: 4 significant digits; '–' for none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4g}"


def _diff(value: Any) -> str:
    """bf16 − fp32 with its sign, 3 significant digits ('0' when equal); '–' for none."""
    if value is None:
        return "–"
    return "0" if value == 0 else f"{value:+.3g}"


def render_section(report: dict[str, Any]) -> str:
    """The README section (markers included) for a report: a sentence on how it was measured, then the table."""
    m = report["machine"]
    models = {r["model"]: r for r in report["models"]}
    threads = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    load = m.get("load_before"), m.get("load_after")
    load_text = f", load average {load[0][0]} → {load[1][0]}" if all(load) else ""
    lines = [
        START,
        f"Measured on {m['device_name']} ({threads}, torch {m['torch']}{load_text}):",
        f"`{report['command']}`. ↑/↓: which way is better; –: no value (the note says why).",
        "",
        "| model | metric | fp32 | bf16 | bf16 − fp32 | eval s fp32 / bf16 | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        record = models[row["model"]]
        arrow = {"higher": " ↑", "lower": " ↓"}.get(row["better"], "")
        seconds = " / ".join(_num(record.get(f"eval_s_{p}")) for p in ("fp32", "bf16"))
        note = "; ".join(x for x in (row["setting"], row["error"]) if x).replace("\n", " ")
        note = (note[:199] + "…" if len(note) > 200 else note).replace("|", "\\|")
        cells = [row["model"], f"`{row['metric']}`{arrow}", _num(row["fp32"]), _num(row["bf16"])]
        lines.append("| " + " | ".join([*cells, _diff(row["diff"]), seconds, note]) + " |")
    lines.append(END)
    return "\n".join(lines)


def rewrite_readme(text: str, report: dict[str, Any]) -> str:
    """``text`` with the section between :data:`START` and :data:`END` replaced by :func:`render_section`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start or text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(
            f"the README needs exactly one {START} line followed by one {END} line; found {text.count(START)} "
            f"start and {text.count(END)} end markers"
        )
    return text[:start] + render_section(report) + text[end + len(END) :]


# -- command line ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="", help="comma-separated variants (default: one per registered family)")
    p.add_argument("--folder", action="append", default=[], metavar="NAME=DIR", help="a trained folder of NAME")
    p.add_argument("--from-pytest", type=Path, help="a pytest base temp dir whose trained-NAME<k> folders to use")
    p.add_argument(
        "--cache", type=Path, help="where missing models are trained (default $POLYMODAL_CACHE/bf16-accuracy)"
    )
    p.add_argument("--set", action="append", default=[], metavar="NAME:FIELD=VALUE", help="an evaluation override")
    p.add_argument("--full", action="store_true", help="no smaller settings: every evaluation at its family's size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, help="the JSON report (default benchmarks/results/bf16-accuracy-<cpu>.json)")
    p.add_argument("--readme", type=Path, help="rewrite this README's bf16 section from the report")
    p.add_argument("--readme-only", action="store_true", help="with --readme: rewrite it from --out, measure nothing")
    return p.parse_args(argv)


def _pairs(items: Sequence[str], sep: str, what: str) -> list[tuple[str, str]]:
    """``NAME<sep>REST`` items split once, a ValueError naming ``what`` for one without ``sep``."""
    out = []
    for item in items:
        if sep not in item:
            raise ValueError(f"{what} must look like NAME{sep}…; got {item!r}")
        name, rest = item.split(sep, 1)
        out.append((name.strip(), rest.strip()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (or, with ``--readme-only``, only rewrite the README); 0 when every evaluation ran, 1 when one
    failed (its rows carry the error), 2 for a usage error."""
    args = parse_args(argv)
    try:
        return _main(args, argv)
    except (ValueError, KeyError) as exc:  # a bad --folder/--set/--models, a README without its markers
        print(f"bf16_accuracy.py: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """:func:`main` after parsing."""
    device = torch.device("cpu")
    out = args.out or report_path("bf16-accuracy", device, device_name(device))
    if args.readme_only:
        if not args.readme:
            raise ValueError("--readme-only needs --readme FILE")
        report = json.loads(Path(out).read_text())
        args.readme.write_text(rewrite_readme(args.readme.read_text(encoding="utf-8"), report), encoding="utf-8")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from polymodal.api import spec
    from polymodal.io.cache import cache_root

    def log(text: str) -> None:
        print(f"[bf16-accuracy] {text}", file=sys.stderr, flush=True)

    names = [n.strip() for n in args.models.split(",") if n.strip()] or default_models()
    for name in names:
        spec(name)  # an unknown name fails here, with suggestions
    given = {n: Path(d) for n, d in _pairs(args.folder, "=", "--folder")}
    extra: dict[str, list[str]] = {}
    for name, pair in _pairs(args.set, ":", "--set"):
        extra.setdefault(name, []).append(pair)
    if args.from_pytest is not None and not args.from_pytest.is_dir():
        raise ValueError(f"--from-pytest expects a pytest base temp folder; {args.from_pytest} is not a folder")
    cache = args.cache or cache_root() / "bf16-accuracy"
    folders = resolve_folders(names, given, args.from_pytest, cache, log)
    report: dict[str, Any] = {
        "suite": "bf16-accuracy",
        "command": "python benchmarks/bf16_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(device),
        "models": [],
        "rows": [],
    }
    for name in names:
        setting = [*(() if args.full else SMALLER.get(name, ())), *extra.get(name, ())]
        record = measure_model(name, folders[name], setting, log)
        report["models"].append(record)
        report["rows"] += record.pop("rows")
    report["machine"]["load_after"] = load_average()
    write_json(Path(out), report)
    log(f"wrote {out}")
    if args.readme:
        args.readme.write_text(rewrite_readme(args.readme.read_text(encoding="utf-8"), report), encoding="utf-8")
        log(f"rewrote the bf16 section of {args.readme}")
    for row in report["rows"]:
        print(
            f"{row['model']:<16} {row['metric']:<42} {_num(row['fp32']):>10} {_num(row['bf16']):>10} {_diff(row['diff']):>10}"
        )
    return 1 if any(r["errors"] for r in report["models"]) else 0


if __name__ == "__main__":
    sys.exit(main())
