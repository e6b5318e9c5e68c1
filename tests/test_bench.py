"""The benchmark suite: FLOP and byte formulas, the row schema, reason rows, ``--compare``, the
plot, and tiny smoke runs through the command line. No test asserts a speed."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import bench
import bench_attention as ba
import bench_models as bm
from bench_report import compare, plot_attention, row_key
from polymodal.cli import main

ROW_KEYS = {
    "suite",
    "key",
    "backend",
    "case",
    "family",
    "shape",
    "seq_len",
    "head_dim",
    "mask",
    "dtype",
    "device",
    "device_name",
    "mode",
    "status",
    "reason",
    "median_ms",
    "iqr_ms",
    "runs",
    "work_gflop",
    "tflops",
    "gflops",
    "pct_measured_peak",
    "pct_datasheet_peak",
    "gbps",
    "pct_measured_bandwidth",
    "peak_mem_mb",
    "torch",
    "xformers",
    "threads",
}


@pytest.fixture(autouse=True)
def one_thread():
    prior = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prior)


def context(**over) -> ba.Context:
    device = torch.device("cpu")
    fields = dict(
        device=device,
        base=bench.machine(device),
        min_run_time=0.005,
        peaks={"float32": 0.05},
        bandwidth_gbps=10.0,
        max_gb=2.0,
        deadline=None,
    )
    return ba.Context(**{**fields, **over})


# -- formulas -----------------------------------------------------------------------------------


def test_forward_flops_follow_the_issue_formula():
    assert ba.attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert ba.attention_flops(2, 3, 5, 7, 11, causal=True) == 4 * 2 * 3 * 5 * 7 * 11 / 2
    case = ba.Case("c", "vit", 2, 3, 5, 7, 11)
    assert case.flops() == 4 * 2 * 3 * 5 * 7 * 11
    assert ba.total_flops(case, "forward") == case.flops()
    assert ba.total_flops(case, "forward+backward") == 3.5 * case.flops()  # backward = 2.5 × forward


def test_packed_and_padded_count_the_sum_over_sequences():
    packed, padded = ba._varlen("v", (3, 5, 2), h=4, d=8)
    want = sum(4 * 4 * n * n * 8 for n in (3, 5, 2))
    assert packed.flops() == padded.flops() == want
    assert (packed.b, packed.nq, padded.b, padded.nq) == (1, 10, 3, 5)
    causal, _ = ba._varlen("v", (3, 5, 2), h=4, d=8, causal=True)
    assert causal.flops() == want / 2


def test_sparse_patterns_count_only_visible_pairs():
    # grid 2×2, no prefix: causal and same row → each row of 2 tokens has 3 visible pairs.
    assert ba.visible_pairs("row", (2, 2), 0) == 6
    assert ba.visible_pairs("column", (2, 2), 0) == 6
    case = ba._sparse(b=2, h=3, d=4, grid=(2, 2), prefix=1)[0]
    mask = case.dense_mask()
    assert mask.shape == (5, 5) and case.flops() == 4 * 2 * 3 * 4 * int(mask.sum())
    assert int(mask.sum()) < 5 * 6 // 2  # sparser than causal


def test_io_bytes_are_the_fused_minimum():
    case = ba.Case("c", "vit", 2, 3, 5, 7, 4)
    per = 2 * 3 * 4 * 2  # B·H·D·bytes
    assert case.io_bytes(2, backward=False) == (2 * 5 + 2 * 7) * per
    assert case.io_bytes(2, backward=True) == (6 * 5 + 6 * 7) * per


def test_full_grid_lm_shapes_match_the_flashattention_setup():
    lm = [c for c in ba.grid("full", 128) if c.family == "causal-lm"]
    assert [c.nq for c in lm] == [512, 1024, 2048, 4096, 8192]
    assert all(c.b * c.nq == 16384 and c.h * c.d == 2048 and c.causal for c in lm)
    families = {c.family for c in ba.grid("full", 64)}
    assert families == {"vit", "causal-lm", "cross", "sparse-image", "packed", "padded"}
    assert {c.family for c in ba.grid("small", 64)} == families == {c.family for c in ba.grid("quick", 16)}
    assert [c.nq for c in ba.grid("full", 64) if c.family == "vit"] == [65, 197, 577]


def test_inputs_are_never_all_zero():
    case = ba.Case("c", "vit", 1, 2, 6, 6, 4)
    call = ba.inputs(case, torch.device("cpu"), torch.float32, grad=False)
    assert all(call[k].abs().sum() > 0 for k in "qkv")


def test_datasheet_peaks_by_gpu_name():
    assert bench.datasheet_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert bench.datasheet_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert bench.datasheet_tflops("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5
    assert bench.datasheet_tflops("Some Future GPU", torch.bfloat16) is None


def test_cuda_attention_report_names_the_datasheet_peak_and_flash_attention_figures():
    from bench_report import attention_table

    machine = dict(
        device="cuda",
        device_name="NVIDIA H200",
        torch="t",
        threads=1,
        datasheet_peak_tflops={"bfloat16": 989.0, "float32": 67.0},
        flash_attention_reference=bench.FLASH_ATTENTION_REFERENCE,
    )
    text = attention_table(dict(machine=machine, rows=[], matmul_peak={}))
    assert "datasheet dense peak of the NVIDIA H200" in text and "bfloat16 989" in text
    assert "FlashAttention-2 ≈ 350 TFLOP/s, FlashAttention-3 ≈ 740 TFLOP/s" in text and "arXiv:2407.08608" in text
    assert "flash_attention_reference" not in bench.machine(torch.device("cpu"))


def test_measure_warms_up_and_times_slow_calls_one_by_one():
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.004)

    median, iqr, runs = bench.measure(slow, torch.device("cpu"), min_run_time=0.001, warmup=2)
    assert runs == 3 and len(calls) == 2 + 3 and median >= 0.004 and iqr >= 0
    calls.clear()
    median, _, runs = bench.measure(lambda: calls.append(1), torch.device("cpu"), min_run_time=0.01, warmup=1)
    assert runs >= 1 and len(calls) > 10 and median > 0  # fast calls: blocks of many calls


# -- rows ---------------------------------------------------------------------------------------


def test_a_timed_row_has_the_schema_and_consistent_numbers():
    ctx = context()
    row = ba.run_case("math", ba.Case("vit-9", "vit", 2, 2, 9, 9, 8), torch.float32, "forward", ctx)
    assert ROW_KEYS <= set(row) and row["status"] == "ok" and row["reason"] is None
    assert row["median_ms"] > 0 and row["iqr_ms"] >= 0 and row["runs"] >= 1
    tflops = ba.Case("vit-9", "vit", 2, 2, 9, 9, 8).flops() / (row["median_ms"] / 1e3) / 1e12
    assert row["tflops"] == pytest.approx(tflops, rel=1e-3)
    assert row["pct_measured_peak"] == pytest.approx(100 * row["tflops"] / 0.05, rel=1e-2)
    assert row["key"] == "math|vit-9|B2H2Nq9Nk9D8|float32|forward" == row_key({**row, "key": None})
    assert row["peak_mem_mb"] is None and row["pct_datasheet_peak"] is None  # CPU


def test_backward_rows_run_forward_and_backward():
    row = ba.run_case(
        "sdpa",
        ba.Case("lm-16", "causal-lm", 1, 2, 16, 16, 8, causal=True),
        torch.float32,
        "forward+backward",
        context(),
    )
    assert row["status"] == "ok" and row["mode"] == "forward+backward"
    assert row["work_gflop"] == pytest.approx(3.5 * 4 * 2 * 16 * 16 * 8 / 2 / 1e9, rel=1e-3)


@pytest.mark.parametrize(
    "variant, mode, needle",
    [
        ("xformers", "forward", "CUDA"),
        ("flex", "forward+backward", "backward"),
        ("sdpa[efficient]", "forward", "does not run on cpu"),
        ("nope", "forward", "not registered"),
    ],
)
def test_combinations_a_backend_cannot_run_are_rows_with_the_reason(variant, mode, needle):
    row = ba.run_case(variant, ba.Case("vit-9", "vit", 1, 2, 9, 9, 8), torch.float32, mode, context())
    assert row["status"] == "skipped" and needle in row["reason"] and row["median_ms"] is None
    assert ROW_KEYS <= set(row)


def test_memory_and_time_budgets_skip_with_the_reason():
    case = ba.Case("big", "vit", 4, 4, 64, 64, 8)
    row = ba.run_case("math", case, torch.float32, "forward", context(max_gb=1e-6))
    assert row["status"] == "skipped" and "--max-gb" in row["reason"]
    assert ba.run_case("sdpa", case, torch.float32, "forward", context(max_gb=1e-6))["status"] == "ok"  # fused
    row = ba.run_case("sdpa", case, torch.float32, "forward", context(deadline=0.0))
    assert row["status"] == "skipped" and "budget" in row["reason"]


def test_a_kernel_failing_at_run_time_is_an_error_row(monkeypatch):
    import polymodal.attention as attention_pkg

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(attention_pkg, "attention", broken)
    row = ba.run_case("math", ba.Case("vit-9", "vit", 1, 2, 9, 9, 8), torch.float32, "forward", context())
    assert row["status"] == "error" and "kernel exploded" in row["reason"]


def test_sdpa_refusal_names_the_warnings():
    class W:
        def __init__(self, text):
            self.message = text

    why = ba._sdpa_refusal([W("Flash attention does not support fp32\nmore"), W("")], RuntimeError("No available"))
    assert why == "Flash attention does not support fp32"
    assert ba._sdpa_refusal([], RuntimeError("No available kernel.\nx")) == "No available kernel."


# -- compare ------------------------------------------------------------------------------------


def report(rows, name="cpu-x"):
    return {"machine": {"device_name": name}, "rows": rows}


def r(key, ms):
    return {"key": key, "median_ms": ms, "status": "ok" if ms else "skipped"}


def test_compare_flags_only_slowdowns_over_5_percent_and_30_us():
    base = report([r("a", 1.0), r("b", 1.0), r("c", 0.05), r("d", 2.0), r("e", 1.0), r("f", None)])
    new = report([r("a", 1.06), r("b", 1.04), r("c", 0.06), r("d", 1.5), r("f", 1.0)])
    out = compare(new, base)
    assert [x["key"] for x in out["regressions"]] == ["a"]  # 6 % and 60 µs
    assert out["regressions"][0]["delta_us"] == pytest.approx(60.0)
    # b: 4 % only; c: 20 % but 10 µs only; f: no baseline timing.
    assert [x["key"] for x in out["improvements"]] == ["d"]
    assert out["lost"] == ["e"] and out["compared"] == 4 and out["same_device"]
    assert not compare(new, report(base["rows"], "other"))["same_device"]
    assert compare(new, base, threshold=0.1)["regressions"] == []


def test_compare_matches_rows_of_older_reports_without_a_key():
    shape = {"B": 32, "H": 6, "Nq": 65, "Nk": 65, "D": 64}
    old = {"backend": "sdpa", "case": "vit-65", "shape": shape, "dtype": "float32", "mode": "forward", "median_ms": 1.0}
    new = {**old, "key": "sdpa|vit-65|B32H6Nq65Nk65D64|float32|forward", "median_ms": 2.0}
    assert [x["key"] for x in compare(report([new]), report([old]))["regressions"]] == [new["key"]]
    other = {**new, "key": "sdpa|vit-65|B8H6Nq65Nk65D64|float32|forward"}  # same case name, another shape
    assert compare(report([other]), report([old]))["compared"] == 0


def test_compare_command_exit_status(tmp_path):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text(json.dumps(report([r("a", 1.0)])))
    new.write_text(json.dumps(report([r("a", 2.0)])))
    result = CliRunner().invoke(main, ["bench", "compare", str(new), str(base)])
    assert result.exit_code == 0 and "REGRESSION: a" in result.output
    result = CliRunner().invoke(main, ["bench", "compare", str(new), str(base), "--fail-on-regression"])
    assert result.exit_code == 3
    result = CliRunner().invoke(main, ["bench", "compare", str(base), str(base), "--fail-on-regression"])
    assert result.exit_code == 0 and "0 regression(s)" in result.output


def test_table_prints_a_report_as_markdown(tmp_path):
    row = dict(
        r("k", 1.5),
        case="vit-65",
        shape=dict(B=8, H=6, Nq=65, Nk=65, D=64),
        mask="none",
        mode="forward",
        backend="sdpa",
        iqr_ms=0.1,
        tflops=0.0421,
        pct_measured_peak=30.0,
    )
    skipped = {**row, "key": "k2", "status": "skipped", "reason": "xformers needs CUDA", "median_ms": None}
    rep = dict(
        suite="attention",
        command="polymodal bench attention",
        machine=dict(device_name="X", device="cpu", torch="t", threads=2, load_before=[0.5], load_after=[1.0]),
        rows=[row, skipped],
    )
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    out = CliRunner().invoke(main, ["bench", "table", str(path)]).output
    assert "| vit-65 | 8, 6, 65, 65, 64 | none | fwd | sdpa | 1.500 | 0.100 | 0.042 | 30.0 |" in out
    assert "X (cpu)" in out and "[0.5]" in out and "CUDA" not in out
    assert "xformers needs CUDA" not in out
    assert out.count("| vit-65 |") == 1
    out = CliRunner().invoke(main, ["bench", "table", str(path), "--all"]).output
    assert out.count("| vit-65 |") == 2


# -- the plot -----------------------------------------------------------------------------------


def test_plot_draws_lm_rows_and_skips_without_them(tmp_path):
    from PIL import Image

    rows = [
        dict(family="causal-lm", median_ms=t, backend=b, dtype="float32", mode=m, head_dim=64, seq_len=n)
        for b in ("math", "sdpa")
        for m in ("forward", "forward+backward")
        for n, t in ((256, 1.0), (512, 3.0))
    ]
    rep = dict(machine=dict(device_name="X", device="cpu", torch="t", threads=1), command="c", rows=rows)
    assert plot_attention(rep, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:
        assert img.size[0] > 1000 and 400 < img.size[1] < 600  # two panels across, one row, a header
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (0x1F, 0x77, 0xB4) in colours and (0xD6, 0x27, 0x28) in colours  # a line per backend
    assert not plot_attention({**rep, "rows": [{**x, "family": "vit"} for x in rows]}, tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


# -- smoke runs through the command line --------------------------------------------------------


def test_attention_smoke_run_through_the_cli(tmp_path):
    out, baseline = tmp_path / "a.json", tmp_path / "base.json"
    key = "math|lm-64|B2H2Nq64Nk64D16|float32|forward+backward"  # well over 30 µs on any CPU
    baseline.write_text(
        json.dumps(
            report(
                [r(key, 1e-6), r("math|gone|B1H1Nq1Nk1D16|float32|forward", 1.0)],
                bench.device_name(torch.device("cpu")),
            )
        )
    )
    args = [
        "bench",
        "attention",
        "--quick",
        "--threads",
        "1",
        "--backends",
        "math,sdpa,sdpa[math],xformers",
        "--modes",
        "forward,forward+backward",
        "--cases",
        "vit-17,lm-64",
        "--out",
        str(out),
        "--compare",
        str(baseline),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rep = json.loads(out.read_text())
    assert {"machine", "rows", "overhead", "matmul_peak", "copy_bandwidth", "compare"} <= set(rep)
    assert {"device_name", "torch", "threads", "transformers", "xformers"} <= set(rep["machine"])
    rows = rep["rows"]
    assert len(rows) == 4 * 2 * 2 and all(ROW_KEYS <= set(x) for x in rows)
    assert {x["status"] for x in rows if x["backend"] != "xformers"} == {"ok"}
    assert all(x["status"] == "skipped" and x["reason"] for x in rows if x["backend"] == "xformers")
    assert rep["matmul_peak"]["float32"]["tflops"] > 0
    assert all(x["pct_measured_peak"] > 0 for x in rows if x["status"] == "ok")
    assert [x["key"] for x in rep["compare"]["regressions"]] == [key]  # slower than 1 ns, by far
    assert rep["compare"]["lost"] == ["math|gone|B1H1Nq1Nk1D16|float32|forward"]
    assert "REGRESSION" in result.output and "backend" in result.output
    assert out.with_suffix(".png").is_file()
    result = CliRunner().invoke(main, [*args, "--fail-on-regression", "--no-plot", "--no-overhead"])
    assert result.exit_code == 3


def test_attention_rejects_unknown_names():
    result = CliRunner().invoke(main, ["bench", "attention", "--quick", "--backends", "sdpa[turbo]"])
    assert result.exit_code == 2 and "sdpa[turbo]" in result.output
    result = CliRunner().invoke(main, ["bench", "attention", "--quick", "--dtypes", "float33"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["bench", "nope"])
    assert result.exit_code == 2


transformers = pytest.importorskip("transformers")

MODEL_ROW_KEYS = {
    "suite",
    "key",
    "model",
    "task",
    "batch",
    "dtype",
    "mode",
    "reference",
    "status",
    "reason",
    "parity_rel_diff",
    "rel_diff",
    "polymodal_ms",
    "transformers_ms",
    "ratio",
    "gflop",
    "polymodal_gflops",
    "transformers_gflops",
    "polymodal_pct_peak",
    "transformers_pct_peak",
    "polymodal_options",
    "transformers_options",
    "threads",
}
EAGER_FP32 = ["--dtypes", "float32", "--modes", "eager"]


# -- FLOPs and the share of the peak ------------------------------------------------------------


def test_flop_count_of_known_modules():
    linear = torch.nn.Linear(8, 16)
    with torch.no_grad():
        assert bm.count_flops(linear, torch.randn(4, 8)) == 2 * 4 * 8 * 16
        q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))  # (B, H, N, D)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        assert bm.count_flops(lambda x: sdpa(*x), (q, k, v)) == 4 * 2 * 3 * 5 * 5 * 4  # the CPU flash kernel too
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            x = torch.randn(3, 8)
            fused = lambda x: torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [], "")  # noqa: E731
            assert torch.allclose(fused(x), linear(x), atol=1e-5)
            assert bm.count_flops(fused, x) == bm.count_flops(linear, x) == 2 * 3 * 8 * 16


def test_flops_are_counted_at_batch_one_and_scale_with_the_batch(tmp_path):
    _, hf, pm, tasks = bm.build("vit-b16", tmp_path / "hf", True, [1, 3], 2)
    one, three = tasks
    direct = bm.count_flops(lambda x: pm(x), one.inputs(3, torch.device("cpu"), torch.float32, 0))
    assert bm.flops_per_call(three, pm) == direct == 3 * bm.flops_per_call(one, pm) > 0


def test_share_of_the_peak_arithmetic():
    gflops, pct = bm.achieved(2.0, 100.0, 0.04)  # 2 GFLOP in 100 ms = 20 GFLOP/s of a 40 GFLOP/s peak
    assert gflops == pytest.approx(20.0) and pct == pytest.approx(50.0)
    assert bm.achieved(None, 100.0, 0.04) == (None, None)
    assert bm.achieved(2.0, 100.0, None) == (20.0, None)


# -- smoke runs ---------------------------------------------------------------------------------


def models(tmp_path, *args):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["bench", "models", "--quick", "--threads", "1", *args, "--out", str(out)])
    return result, (json.loads(out.read_text()) if out.is_file() else None)


def test_models_smoke_run_checks_outputs_then_times_both(tmp_path):
    result, rep = models(
        tmp_path, "--models", "vit-b16", "--batches", "2", "--dtypes", "float32,bfloat16", "--modes", "eager"
    )
    assert result.exit_code == 0, result.output
    assert set(rep["matmul_peak"]) == {"float32", "bfloat16"} and rep["modes"] == ["eager"]
    fp32, bf16 = rep["rows"]
    for row in (fp32, bf16):
        assert MODEL_ROW_KEYS <= set(row) and row["status"] == "ok" and row["batch"] == 2 and row["mode"] == "eager"
        assert row["polymodal_ms"] > 0 and row["transformers_ms"] > 0
        assert row["ratio"] == pytest.approx(row["transformers_ms"] / row["polymodal_ms"], rel=1e-2)
        assert row["polymodal_per_s"] == pytest.approx(2 / (row["polymodal_ms"] / 1e3), rel=1e-2)
        peak = rep["matmul_peak"][row["dtype"]]["tflops"] * 1e3  # GFLOP/s
        for side in ("polymodal", "transformers"):
            gflops = row["gflop"] / (row[f"{side}_ms"] / 1e3)
            assert row[f"{side}_gflops"] == pytest.approx(gflops, rel=1e-2)
            assert row[f"{side}_pct_peak"] == pytest.approx(100 * gflops / peak, rel=1e-2, abs=0.01)
        assert row["parity_rel_diff"] <= bm.PARITY_RTOL["float32"] and row["rel_diff"] is not None
        assert row["transformers_options"].startswith(f"dtype={row['dtype']}, attn_implementation=sdpa")
        assert row["polymodal_options"] == f"prepare_inference(dtype={row['dtype']}, compile=False)"
    assert fp32["gflop"] == bf16["gflop"] > 0 and fp32["rel_diff"] <= bm.PARITY_RTOL["float32"]
    assert fp32["key"] == "ViT-B/16 (quick: tiny)|forward|b2|float32"  # eager keys match older reports
    assert rep["machine"]["threads"] == 1 and "ratio" in result.output and "GFLOP/s" in result.output


def test_models_rejects_unknown_modes_and_dtypes(tmp_path):
    assert models(tmp_path, "--modes", "jit")[0].exit_code == 2
    assert models(tmp_path, "--dtypes", "float33")[0].exit_code == 2
    assert models(tmp_path, "--dtypes", "int8")[0].exit_code == 2


def test_models_mismatched_outputs_are_not_timed(tmp_path, monkeypatch):
    convert = bm._convert

    def broken(hf, converter, folder):
        model = convert(hf, converter, folder)
        with torch.no_grad():
            model.encoder.blocks.blocks[0].mlp.fc1.weight.mul_(1.5)  # a wrong weight
        return model

    monkeypatch.setattr(bm, "_convert", broken)
    result, rep = models(tmp_path, "--models", "vit-b16", "--batches", "1", *EAGER_FP32)
    assert result.exit_code == 1
    (row,) = rep["rows"]
    assert row["status"] == "mismatch" and "outputs differ" in row["reason"] and row["polymodal_ms"] is None


def test_models_train_step_and_towers_run(tmp_path):
    result, rep = models(tmp_path, "--models", "vit-s16-train,clip-b16", "--batches", "1", "--rounds", "1", *EAGER_FP32)
    assert result.exit_code == 0, result.output
    rows = {x["task"]: x for x in rep["rows"]}
    assert set(rows) == {"train-step", "image-tower", "text-tower"}
    assert all(x["status"] == "ok" and x["ratio"] > 0 and x["gflop"] > 0 for x in rows.values())
    result, rep = models(tmp_path, "--models", "vit-s16-train", "--modes", "compiled", "--dtypes", "float32")
    assert result.exit_code == 0 and rep["rows"] == []  # train steps are timed eager only


def test_models_generation_rows_match_greedy_tokens_before_timing(tmp_path):
    result, rep = models(
        tmp_path,
        "--models",
        "gpt2,imagegpt-s",
        "--batches",
        "2",
        "--gen-batches",
        "2",
        "--rounds",
        "1",
        "--tasks",
        "generate",
        *EAGER_FP32,
    )
    assert result.exit_code == 0, result.output
    rows = {(x["model"].split()[0], x["reference"]): x for x in rep["rows"]}
    assert set(rows) == {(m, ref) for m in ("GPT-2", "ImageGPT-S") for ref in ("dynamic", "static")}
    for (model, ref), gen in rows.items():
        assert MODEL_ROW_KEYS <= set(gen) and gen["task"] == "generate"
        if gen["status"] == "skipped":  # transformers' ImageGPT: its static cache disagrees with its own default
            assert (model, ref) == ("ImageGPT-S", "static") and "own default cache" in gen["reason"]
            continue
        assert gen["status"] == "ok" and gen["parity_rel_diff"] == 0 == gen["rel_diff"]  # the same greedy tokens
        new = bm.GPT2_NEW if model == "GPT-2" else 8
        assert gen["polymodal_per_s"] == pytest.approx(2 * new / (gen["polymodal_ms"] / 1e3), rel=1e-2)
        assert gen["gflop"] > 0 and ("static" in gen["transformers_options"]) == (ref == "static")
    assert rows["GPT-2", "static"]["polymodal_ms"] == rows["GPT-2", "dynamic"]["polymodal_ms"]  # one interleaved run
    assert rows["GPT-2", "static"]["key"].endswith("|static")


@pytest.mark.slow
def test_models_compiled_smoke_run(tmp_path):
    """Compiled rows: polymodal prepared with compile=True (stacks and the decoder step) against
    torch.compile'd transformers and generate's compiled static cache; tiny models, about a minute."""
    result, rep = models(
        tmp_path,
        "--models",
        "gpt2",
        "--batches",
        "1",
        "--gen-batches",
        "1",
        "--rounds",
        "1",
        "--dtypes",
        "float32",
        "--modes",
        "compiled",
    )
    assert result.exit_code == 0, result.output
    rows = {(x["task"], x["reference"]): x for x in rep["rows"]}
    assert set(rows) == {("forward", None), ("generate", "dynamic"), ("generate", "static")}
    for row in rows.values():
        assert row["status"] == "ok" and row["mode"] == "compiled" and row["key"].split("|")[4] == "compiled"
        assert row["rel_diff"] <= bm.PARITY_RTOL["float32"] and row["polymodal_options"].endswith("compile=True)")
    assert rows["forward", None]["transformers_options"].endswith("torch.compile")
    assert "torch.compile" in rows["generate", "static"]["transformers_options"]


# -- the README's table -------------------------------------------------------------------------


def test_readme_table_pivots_modes_and_reports_the_bf16_speedup():
    from bench_report import readme_models

    def row(dtype, mode, ms, ratio, status="ok"):
        return dict(
            model="ViT-B/16",
            task="forward",
            batch=8,
            dtype=dtype,
            mode=mode,
            status=status,
            reason=None if status == "ok" else "why",
            polymodal_ms=ms,
            ratio=ratio,
            polymodal_pct_peak=50.0,
            transformers_pct_peak=5.25,
        )

    rep = dict(
        command="polymodal bench models",
        machine=dict(
            device_name="X", device="cpu", torch="t", transformers="tf", threads=2, load_before=[0.1], load_after=[0.2]
        ),
        matmul_peak={"float32": {"tflops": 0.2}, "bfloat16": {"tflops": 0.8}},
        rows=[
            row("float32", "eager", 1000.0, 1.01),
            row("float32", "compiled", 800.0, 1.1),
            row("bfloat16", "eager", 250.0, 1.2),
            row("bfloat16", "compiled", None, None, "error"),
        ],
    )
    text = readme_models([rep])
    assert "matmul peak float32 200 GFLOP/s, bfloat16 800 GFLOP/s" in text
    assert (
        "| ViT-B/16 | forward | 8 | float32 | 1000.0 | 1.01 | 50 / 5.2 | 800.0 | 1.10 | 50 / 5.2 | - / - |  |" in text
    )
    assert (
        "| ViT-B/16 | forward | 8 | bfloat16 | 250.0 | 1.20 | 50 / 5.2 | - | - | - | 4.00× / - | compiled: error: why |"
        in text
    )


def test_readme_performance_tables_are_generated_from_the_committed_results():
    from pathlib import Path

    from bench_report import readme_blocks, readme_render

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text(encoding="utf-8")
    assert readme_blocks(text), "README.md has no <!-- bench-table: ... --> block"
    assert readme_render(text, root / "benchmarks" / "results") == text, (
        "README.md's benchmark tables are stale: run `polymodal bench table --readme README.md --write`"
    )


def test_table_readme_command_checks_and_rewrites_the_blocks(tmp_path):
    rep = dict(
        suite="models",
        command="polymodal bench models",
        machine=dict(device_name="X", device="cpu", torch="t", threads=1),
        rows=[
            dict(
                model="M",
                task="forward",
                batch=1,
                dtype="float32",
                mode="eager",
                status="ok",
                polymodal_ms=2.0,
                ratio=1.5,
            )
        ],
    )
    (tmp_path / "m.json").write_text(json.dumps(rep))
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- bench-table: m.json -->\nold table\n<!-- /bench-table -->\n\nafter\n")
    args = ["bench", "table", "--readme", str(readme), "--results", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "differ" in result.output
    assert CliRunner().invoke(main, [*args, "--write"]).exit_code == 0
    text = readme.read_text()
    assert "old table" not in text and "| M | forward | 1 | float32 | 2.0 | 1.50 |" in text and text.endswith("after\n")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "up to date" in result.output
    readme.write_text("<!-- bench-table: m.json -->\nno end\n")
    assert CliRunner().invoke(main, args).exit_code == 2


def test_models_suite_includes_the_fusion_rows(tmp_path):
    pytest.importorskip("bench_fusion")
    result, rep = models(tmp_path, "--models", "fusion", "--rounds", "1", *EAGER_FP32)
    assert result.exit_code == 0, result.output
    names = {x["model"].split()[0] for x in rep["rows"]}
    assert {"Flamingo", "FROMAGe"} <= names and all(x["status"] == "ok" and x["ratio"] > 0 for x in rep["rows"])
    assert models(tmp_path, "--models", "fusion", "--modes", "compiled")[1]["rows"] == []  # eager only
