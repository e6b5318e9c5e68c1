"""``benchmarks/bf16_accuracy.py``: rows for both precisions from trained folders, the README section
rewritten exactly and idempotently, an evaluation that fails giving an error row. No number is asserted:
the script reports bf16 beside fp32 without a bar."""

from __future__ import annotations

import json
from pathlib import Path

import bf16_accuracy as ba
import pytest
import torch

import polymodal

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two briefly trained folders (2 steps each, default data): a tiny ViT and a CLIP."""
    root = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    common = dict(steps=2, progress=False, keep_checkpoint=False, train_set={"batch_size": 16, "warmup_steps": 0})
    polymodal.train("vit", out=root / "vit", encoder={"depth": 1, "block": {"dim": 16, "heads": 2}}, **common)
    polymodal.train("clip", out=root / "clip", **common)
    return {"vit": root / "vit", "clip": root / "clip"}


def run(folders, out, *extra):
    """The script's main on both folders, one thread; returns (exit status, the JSON report)."""
    argv = ["--models", "vit,clip", "--threads", "1", "--out", str(out), *extra]
    for name, folder in folders.items():
        argv += ["--folder", f"{name}={folder}"]
    status = ba.main(argv)
    return status, json.loads(Path(out).read_text())


def test_rows_for_both_precisions_from_trained_folders(folders, tmp_path, one_thread):
    status, report = run(folders, tmp_path / "r.json")
    assert status == 0
    assert [r["metric"] for r in report["rows"]] == [k for n in ("vit", "clip") for k, _ in ba.HEADLINES[n]]
    for record in report["models"]:
        assert record["errors"] == {}
        assert record["weights_dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}
        assert record["eval_s_fp32"] >= 0 and record["eval_s_bf16"] >= 0  # rounded seconds: 0.0 when quick
        saved = json.loads((folders[record["model"]] / "metrics.json").read_text())
        for key, _ in ba.HEADLINES[record["model"]]:  # fp32 is what training's own evaluation measured
            assert record["metrics"]["fp32"][key] == pytest.approx(saved[key], rel=1e-5, abs=1e-6)
    for row in report["rows"]:
        assert isinstance(row["fp32"], float) and isinstance(row["bf16"], float), row
        assert row["diff"] == pytest.approx(row["bf16"] - row["fp32"])
        assert row["error"] == "" and row["setting"] == ""


def test_a_failing_family_gives_an_error_row(folders, tmp_path, monkeypatch, one_thread):
    from polymodal.plugins.clip.model import CLIPModel

    plain = CLIPModel.evaluate

    def fails_in_bf16(self, *args, **kwargs):
        if next(self.parameters()).dtype == torch.bfloat16:
            raise RuntimeError("no bf16 kernel for this op")
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "evaluate", fails_in_bf16)
    monkeypatch.setitem(ba.HEADLINES, "vit", (("accuracy", "higher"), ("renamed_metric", "higher")))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{ba.START}\nold\n{ba.END}\n")
    status, report = run(folders, tmp_path / "r.json", "--readme", str(readme))
    assert status == 1  # the run finishes, and says something failed
    rows = {r["model"]: [] for r in report["rows"]}
    for row in report["rows"]:
        rows[row["model"]].append(row)
    (vit, missing), want = rows["vit"], "fp32: no number `renamed_metric` in its metrics; bf16: no number"
    assert vit["error"] == "" and vit["bf16"] is not None
    assert missing["fp32"] is None and missing["bf16"] is None and missing["error"].startswith(want)
    assert rows["clip"] and all(r["fp32"] is not None and r["bf16"] is None and r["diff"] is None for r in rows["clip"])
    assert all(r["error"] == "bf16: RuntimeError: no bf16 kernel for this op" for r in rows["clip"])
    assert "bf16: RuntimeError: no bf16 kernel for this op" in readme.read_text()


REPORT = {
    "command": "python benchmarks/bf16_accuracy.py --threads 2",
    "machine": {"device_name": "Some CPU", "threads": 2, "torch": "2.13.0", "load_before": [1.5, 1, 1],
                "load_after": [2.25, 1, 1]},
    "models": [
        {"model": "vit", "eval_s_fp32": 1.25, "eval_s_bf16": 0.5},
        {"model": "ddpm", "eval_s_fp32": 100.0},
    ],
    "rows": [
        {"model": "vit", "metric": "accuracy", "better": "higher", "fp32": 0.98333, "bf16": 0.98056,
         "diff": 0.98056 - 0.98333, "setting": "", "error": ""},
        {"model": "ddpm", "metric": "fd_judge", "better": "lower", "fp32": 155.532, "bf16": None, "diff": None,
         "setting": "eval_samples=200", "error": "bf16: RuntimeError: a | b"},
    ],
}  # fmt: skip


def test_readme_section_is_exact_and_idempotent():
    text = f"# title\n\nbefore\n{ba.START}\nstale table\n{ba.END}\nafter\n"
    once = ba.rewrite_readme(text, REPORT)
    assert once == ba.rewrite_readme(once, REPORT)
    head, rest = once.split(ba.START)
    assert head == "# title\n\nbefore\n" and rest.endswith(f"{ba.END}\nafter\n")
    lines = rest.splitlines()
    assert lines[1:3] == [
        "Measured on Some CPU (2 threads, torch 2.13.0, load average 1.5 → 2.25):",
        "`python benchmarks/bf16_accuracy.py --threads 2`. ↑/↓: which way is better; –: no value (the note says why).",
    ]
    assert lines[4:8] == [
        "| model | metric | fp32 | bf16 | bf16 − fp32 | eval s fp32 / bf16 | note |",
        "|---|---|---:|---:|---:|---:|---|",
        "| vit | `accuracy` ↑ | 0.9833 | 0.9806 | -0.00277 | 1.25 / 0.5 |  |",
        "| ddpm | `fd_judge` ↓ | 155.5 | – | – | 100 / – | eval_samples=200; bf16: RuntimeError: a \\| b |",
    ]
    assert lines[8] == ba.END


@pytest.mark.parametrize("text", ["no markers\n", f"{ba.END}\n{ba.START}\n", f"{ba.START}\n{ba.START}\n{ba.END}\n"])
def test_readme_without_one_pair_of_markers_is_refused(text):
    with pytest.raises(ValueError, match="exactly one"):
        ba.rewrite_readme(text, REPORT)


def test_readme_only_rewrites_from_a_saved_report(tmp_path):
    report, readme = tmp_path / "r.json", tmp_path / "README.md"
    report.write_text(json.dumps(REPORT))
    readme.write_text(f"a\n{ba.START}\n{ba.END}\nb\n")
    assert ba.main(["--out", str(report), "--readme", str(readme), "--readme-only"]) == 0
    assert readme.read_text() == f"a\n{ba.render_section(REPORT)}\nb\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "vitt"], "unknown model 'vitt'; did you mean 'vit'"),
        (["--models", "vit", "--folder", "runs/vit"], "--folder must look like NAME=…; got 'runs/vit'"),
        (["--models", "vit", "--set", "eval_samples=2"], "--set must look like NAME:…"),
        (["--readme-only"], "--readme-only needs --readme FILE"),
        (["--models", "vit", "--from-pytest", "/nonexistent"], "--from-pytest expects a pytest base temp folder"),
    ],
)
def test_usage_errors_name_what_was_expected(argv, message, tmp_path, capsys):
    assert ba.main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_the_readme_has_the_section():
    text = README.read_text(encoding="utf-8")
    assert text.count(ba.START) == 1 and text.count(ba.END) == 1 and text.index(ba.START) < text.index(ba.END)


def test_default_models_are_one_per_family():
    from polymodal.api import spec

    names = ba.default_models()
    families = [spec(n).model_class.family for n in names]
    assert len(set(families)) == len(families) == len(names)
    assert {"vit", "clip", "ddpm", "vit-mae", "pixel", "pixel-mae", "lm", "flamingo", "sr3"} <= set(names)
    assert not {"vit-b16", "clip-shapes", "ddpm-cfg"} & set(names)
    assert set(names) <= set(ba.HEADLINES)  # every default model has its quality test's metrics


def test_pytest_folders_are_found_by_exact_name(tmp_path):
    for name in ("trained-vit0", "trained-vit-mae0", "trained-vit2", "trained-lm0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "trained-vit5").mkdir()  # no model in it (a run cut short)
    assert ba.pytest_folder(tmp_path, "vit") == tmp_path / "trained-vit2"
    assert ba.pytest_folder(tmp_path, "vit-mae") == tmp_path / "trained-vit-mae0"
    assert ba.pytest_folder(tmp_path, "clip") is None
    (tmp_path / "trained-clip").mkdir()  # the fixture's shared folder (no counter; also under pytest -n)
    (tmp_path / "trained-clip" / "config.json").write_text("{}")
    assert ba.pytest_folder(tmp_path, "clip") == tmp_path / "trained-clip"
    assert ba.pytest_folder(tmp_path, "clip-shapes") is None


def test_missing_folders_are_trained_once_with_their_parts(tmp_path, monkeypatch):
    import polymodal.api as api

    calls = []

    def fake_train(name, *, out, set_, **kwargs):
        calls.append((name, set_))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(api, "train_model", fake_train)
    given = {"lm": tmp_path / "my-lm"}
    folders = ba.resolve_folders(["flamingo", "clip"], given, None, tmp_path / "cache", lambda text: None)
    assert folders == {"flamingo": tmp_path / "cache" / "flamingo", "clip": tmp_path / "cache" / "clip"}
    assert calls == [("clip", ()), ("flamingo", (f"lm={tmp_path / 'my-lm'}", f"vision={tmp_path / 'cache' / 'clip'}"))]
    ba.resolve_folders(["flamingo", "clip"], given, None, tmp_path / "cache", lambda text: None)
    assert len(calls) == 2  # reused
