"""deploycomp report: tables and plots rebuilt from hand-made JSON records (exact values)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error


def _bench(batch: int, median: float, p99: float, ips: float, backend: str = "ort", precision: str = "fp32"):
    return {"batch": batch, "backend": backend, "precision": precision, "device": "cpu", "threads": 1,
            "latency_ms": {"median": median, "p99": p99, "cov_pct": 1.0}, "throughput_ips": ips, "warnings": []}


def make_run(root: Path) -> Path:
    """Two branches (original, pruned), each with evaluate, export, int8 and ORT benches at batch 1 and 8."""
    stages = {
        "evaluate-o": {"test": {"top1_pct": 90.0, "samples": 1000}, "dataset": "fashion-mnist", "synthetic": False,
                       "checkpoint_size_mib": 10.0, "params_total": 2_000_000, "macs": 40_000_000},
        "evaluate-p": {"test": {"top1_pct": 88.2, "samples": 1000}, "dataset": "fashion-mnist", "synthetic": False,
                       "checkpoint_size_mib": 4.0, "params_total": 800_000, "macs": 10_000_000},
        "prune-p": {"accuracy": {"after_pruning": {"top1_pct": 50.0}}, "params": {"finetune": {"epochs": 1}}},
        "export-o": {"size_mib": 9.9}, "export-p": {"size_mib": 3.9},
        "quantize-o": {"size_mib": 2.5, "accuracy": {"fp32_top1_pct": 90.0, "top1_pct": 89.5}},
        "quantize-p": {"size_mib": 1.0, "accuracy": {"fp32_top1_pct": 88.2, "top1_pct": 87.0}},
        "bench-o1": {"results": [_bench(1, 2.0, 3.0, 500.0), _bench(8, 8.0, 9.0, 1000.0)]},
        "bench-p1": {"results": [_bench(1, 0.5, 1.0, 2000.0), _bench(8, 2.0, 2.5, 4000.0)]},
        "bench-o2": {"results": [_bench(1, 1.0, 1.5, 1000.0, precision="int8")]},
    }
    for sid, rec in stages.items():
        d = root / "stages" / sid
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps({"stage": sid.split("-")[0], "record": rec}))

    def branch(name, x, desc, steps):
        bench = [{"precision": "fp32", "backend": "ort", "stage": f"bench-{x}1", "source": "export"}]
        if x == "o":
            bench.append({"precision": "int8", "backend": "ort", "stage": "bench-o2", "source": "quantize"})
        return {"name": name, "description": desc, "steps": steps, "evaluate": f"evaluate-{x}",
                "export": f"export-{x}", "quantize": {"int8": f"quantize-{x}"}, "build": {}, "bench": bench}

    run = {"format": "deploycomp.pipeline", "format_version": 1, "status": "finished", "name": "hand",
           "description": "hand-made records", "recipe": "hand.yaml", "recipe_sha256": "0" * 64, "wall_s": 12.3,
           "finished_utc": "2026-01-01T00:00:00+00:00", "stages_run": 10, "stages_cached": 0,
           "tensorrt_available": False, "deploycomp": "0.1.0",
           "versions": {"torch": "2.x", "tensorrt": None},
           "environment": {"cpu_model": "Test CPU", "cpus_usable": 2, "cpu_count": 2, "os": "Linux", "python": "3"},
           "studies": [{"name": "hand", "scale": "tiny", "notes": ["TensorRT is not installed here"],
                        "bench": {"backends": ["ort"], "batches": [1, 8]}, "report": {"backend": "ort", "batch": 1},
                        "branches": [branch("original", "o", "as given", []),
                                     branch("pruned", "p", "prune magnitude 0.5", ["prune-p"])]}]}
    (root / "run.json").write_text(json.dumps(run))
    return root


def test_rows_have_exact_values(tmp_path):
    from deploycomp.report import study_reports

    _, (s,) = study_reports(make_run(tmp_path / "run"))
    o, p = s.rows
    assert o["variant"] == "original" and p["variant"] == "pruned"
    assert o["top1_change_pts"] == 0 and abs(p["top1_change_pts"] - -1.8) < 1e-9
    assert abs(p["accuracy_retained_pct"] - 98.0) < 1e-9
    assert p["size_reduction_pct"] == 60.0 and p["macs_reduction_pct"] == 75.0
    assert p["macs_m"] == 10.0 and p["params_m"] == 0.8 and p["top1_before_finetune_pct"] == 50.0
    assert (p["latency_median_ms"], p["latency_p99_ms"], p["backend"], p["batch"]) == (0.5, 1.0, "ort", 1)
    assert p["speedup"] == 4.0 and p["throughput_ips"] == 2000.0
    int8 = [r for r in s.latency_rows if r["precision"] == "int8"]
    assert len(int8) == 1 and int8[0]["top1_pct"] == 89.5 and int8[0]["size_mib"] == 2.5
    assert int8[0]["format"] == "onnx" and int8[0]["speedup"] == 1.0


def test_markdown_csv_json_and_plots(cli, tmp_path):
    run = make_run(tmp_path / "run")
    result = cli("report", run)
    md = (run / "report.md").read_text()
    assert md == result.output.split("wrote")[0].rstrip("\n") + "\n" or "| pruned |" in result.output
    assert ("| pruned | prune magnitude 0.5 | 88.20 | -1.80 | 98.0 | 50.00 | 4.00 | 60.0 | 0.800 | 10.0 | 75.0 | "
            "0.500 | 1.000 | ort | fp32 | 1 | 2000 | 4.00 |") in md
    assert md.index("| original |") < md.index("| pruned |")
    for fact in ("Test CPU", "tensorrt not installed", "TensorRT: not installed", "12 s", "1,000 test images"):
        assert fact in md, fact
    names = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert names == ["accuracy_vs_latency.png", "accuracy_vs_macs.png", "latency_vs_batch.png"]
    for p in (run / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000

    cli("report", run, "--format", "csv", "--no-plots")
    rows = list(csv.DictReader(io.StringIO((run / "report.csv").read_text())))
    assert [r["variant"] for r in rows] == ["original", "pruned"]
    assert rows[1]["size_reduction_pct"] == "60.0" and rows[1]["speedup"] == "4.0"
    latency = list(csv.DictReader(io.StringIO((run / "report-latency.csv").read_text())))
    assert len(latency) == 5

    cli("report", run, "--format", "json", "--no-plots")
    doc = json.loads((run / "report.json").read_text())
    assert doc["studies"][0]["rows"][1]["macs_reduction_pct"] == 75.0 and doc["tensorrt_available"] is False


def test_report_on_a_directory_without_a_run(cli, tmp_path):
    assert_one_line_error(cli("report", tmp_path, ok=False), "no run.json")


def test_report_refuses_a_run_without_stage_records(cli, tmp_path):
    """A recorded run whose stage caches were not kept: say how to rebuild, write nothing over the report."""
    import shutil

    run = make_run(tmp_path / "run")
    (run / "report.md").write_text("kept")
    shutil.rmtree(run / "stages")
    assert_one_line_error(cli("report", run, ok=False), "no stage records", "deploycomp pipeline hand.yaml")
    assert (run / "report.md").read_text() == "kept"


def test_paired_bench_stage_gives_intervals_verdicts_and_error_bars(cli, tmp_path):
    """One bench stage timed both artifacts in one session: the report pairs them round by round."""
    from deploycomp.bench.paired import paired_speedup
    from deploycomp.report import study_reports

    run = make_run(tmp_path / "run")
    ref_blocks = [2.0, 2.2, 1.8, 2.0, 2.1, 1.9]
    pruned_blocks = [1.0, 1.2, 0.8, 1.1, 1.0, 0.9]

    def row(source, blocks):
        r = _bench(1, sorted(blocks)[3], 3.0, 500.0)
        r.update({"session": "s1", "block_medians_ms": blocks, "latency_median_ci95_ms": [min(blocks), max(blocks)],
                  "source_stage": source, "conditions": {"other_cpu_pct": 3.0, "load_avg_1m_before": 0.4}})
        return r

    shared = {"results": [row("export-o", ref_blocks), row("export-p", pruned_blocks)], "paired": True}
    d = run / "stages" / "bench-shared"
    d.mkdir()
    (d / "record.json").write_text(json.dumps({"stage": "bench", "record": shared}))
    doc = json.loads((run / "run.json").read_text())
    for b, src in zip(doc["studies"][0]["branches"], ("export-o", "export-p"), strict=True):
        b["bench"] = [{"precision": "fp32", "backend": "ort", "stage": "bench-shared", "source": "export",
                       "source_stage": src}]
    doc["studies"][0]["bench"]["batches"] = [1]
    (run / "run.json").write_text(json.dumps(doc))

    _, (s,) = study_reports(run)
    assert len(s.latency_rows) == 2  # each branch takes only its own row of the shared stage
    o, p = s.rows
    expected = paired_speedup(ref_blocks, pruned_blocks)
    assert p["paired"] is True and p["speedup"] == expected.speedup and p["speedup_ci95"] == list(expected.ci95)
    assert p["verdict"] == expected.verdict == "faster" and o["verdict"] is None and o["speedup"] == 1.0
    cli("report", run)
    cli("report", run, "--format", "csv", "--no-plots")
    md = (run / "report.md").read_text()
    cell = f"{expected.speedup:.2f} [{expected.ci95[0]:.2f}, {expected.ci95[1]:.2f}] | faster |"
    assert cell in md and "other processes used at most 3%" in md
    assert "speed-ups are paired, with their 95 % interval within one session" in md  # a schema-2 record
    rows = list(csv.DictReader(io.StringIO((run / "report.csv").read_text())))
    assert float(rows[1]["speedup_ci95_low"]) == expected.ci95[0] and rows[1]["verdict"] == "faster"
    assert (run / "plots" / "accuracy_vs_latency.png").stat().st_size > 5000


def test_error_bars_never_negative_for_records_whose_median_is_outside_the_interval():
    """Records written before latency_median_ms carry the pooled median, which can lie outside the rounds'
    median interval; the bar then reaches the point, it does not go negative (matplotlib refuses that)."""
    from deploycomp.report import _interval_err

    rows = [{"latency_median_ms": 4.349, "latency_median_ci95_ms": [4.285, 4.337]},
            {"latency_median_ms": 1.0, "latency_median_ci95_ms": [0.9, 1.2]}, {"latency_median_ms": 2.0}]
    lo, hi = _interval_err(rows)
    assert lo == pytest.approx([0.064, 0.1, 0.0]) and hi == pytest.approx([0.0, 0.2, 0.0])


def _recorded_study():
    """The rows of benchmarks/results/pipeline_default (ORT FP32, batch 1): a realistic comparison."""
    from deploycomp.report import StudyReport

    def row(variant, top1, change, mib, macs, median, p99, ips, speedup, ci, verdict):
        return {"variant": variant, "top1_pct": top1, "top1_change_pts": change, "size_mib": mib, "macs_m": macs,
                "latency_median_ms": median, "latency_p99_ms": p99, "throughput_ips": ips, "speedup": speedup,
                "speedup_ci95": ci, "verdict": verdict}

    rows = [row("original", 91.95, 0.0, 10.73, 30.9, 0.792, 1.48, 1104.0, 1.0, None, None),
            row("magnitude-30", 90.75, -1.2, 5.18, 15.2, 0.388, 0.893, 2108.0, 2.11, [1.99, 2.25], "faster"),
            row("taylor-50", 88.40, -3.55, 2.73, 7.9, 0.159, 0.429, 4760.0, 5.14, [4.81, 5.49], "faster"),
            row("depth-25", 91.60, -0.35, 6.22, 26.2, 0.512, 1.016, 1701.0, 1.59, [1.48, 1.71], "faster")]
    return StudyReport("default", "", "", "fashion-mnist", False, 2000, rows, [],
                       {"backend": "ort", "precision": "fp32", "batch": 1},
                       ["TensorRT is not installed here: no engines were built and the trt backend was not measured"])


def _terminal_table(capsys, monkeypatch, columns: int, study=None) -> list[str]:
    from deploycomp.report import print_summary

    monkeypatch.setenv("COLUMNS", str(columns))
    print_summary(study or _recorded_study())
    return capsys.readouterr().out.splitlines()


def test_pipeline_table_fits_80_columns_with_whole_names_and_intervals(capsys, monkeypatch):
    lines = _terminal_table(capsys, monkeypatch, 80)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert lines[0] == "default: fashion-mnist (latency: ort fp32, batch 1)"
    assert [c.strip() for c in lines[2].strip("┃").split("┃")] == \
        ["variant", "top-1 %", "Δ pts", "median ms", "speed-up [95%]", "verdict"]
    body = lines[4:8]
    assert [line.split("│")[1].strip() for line in body] == ["original", "magnitude-30", "taylor-50", "depth-25"]
    assert "│ magnitude-30 │   90.75 │ -1.20 │     0.388 │ 2.11 [1.99, 2.25] │  faster │" in body
    assert len(lines) == 11  # title, 3 header lines, 4 rows (one line each), bottom border, the note (2 lines)
    assert lines[9:] == ["Note: TensorRT is not installed here: no engines were built and the trt backend",
                         "  was not measured"]


def test_pipeline_table_shows_more_columns_on_a_wider_terminal(capsys, monkeypatch):
    wide = _terminal_table(capsys, monkeypatch, 120)
    assert [c.strip() for c in wide[2].strip("┃").split("┃")] == \
        ["variant", "top-1 %", "Δ pts", "MiB", "MMACs", "median ms", "p99 ms", "img/s", "speed-up [95%]", "verdict"]
    narrow = _terminal_table(capsys, monkeypatch, 50)
    assert [c.strip() for c in narrow[2].strip("┃").split("┃")] == ["variant", "top-1 %", "speed-up [95%]"]


def test_pipeline_table_never_cuts_a_long_variant_name(capsys, monkeypatch):
    study = _recorded_study()
    study.rows[1]["variant"] = "magnitude-30-finetuned-for-ten-epochs-lr-0.01"
    lines = _terminal_table(capsys, monkeypatch, 80, study)
    assert any("│ magnitude-30-finetuned-for-ten-epochs-lr-0.01 │" in line for line in lines)
    assert any("2.11 [1.99, 2.25]" in line for line in lines)


def test_pareto_front_is_the_most_accurate_model_within_each_latency_budget():
    from deploycomp.report import pareto_front

    points = [(1.0, 90.0), (2.0, 92.0), (1.5, 89.0), (3.0, 91.0), (0.5, 85.0), (1.0, 88.0), (2.0, 92.0)]
    assert pareto_front(points) == [4, 0, 1]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]


# (variant, backend, precision, format, top-1 %, median ms, 95 % interval) of pipeline_default at batch 1
RECORDED_LATENCY = [
    ("original", "torch", "fp32", "pt", 91.95, 5.087, (5.051, 5.104)),
    ("original", "ort", "fp32", "onnx", 91.95, 0.792, (0.741, 0.886)),
    ("original", "ort", "int8", "onnx", 92.00, 0.243, (0.242, 0.244)),
    ("magnitude-30", "torch", "fp32", "pt", 90.75, 3.002, (2.955, 3.092)),
    ("magnitude-30", "ort", "fp32", "onnx", 90.75, 0.388, (0.380, 0.405)),
    ("magnitude-30", "ort", "int8", "onnx", 90.75, 0.163, (0.162, 0.165)),
    ("taylor-50", "torch", "fp32", "pt", 88.40, 1.915, (1.825, 1.997)),
    ("taylor-50", "ort", "fp32", "onnx", 88.40, 0.159, (0.158, 0.160)),
    ("taylor-50", "ort", "int8", "onnx", 88.65, 0.110, (0.109, 0.110)),
    ("depth-25", "torch", "fp32", "pt", 91.60, 3.360, (3.319, 3.405)),
    ("depth-25", "ort", "fp32", "onnx", 91.60, 0.512, (0.494, 0.549)),
    ("depth-25", "ort", "int8", "onnx", 91.55, 0.206, (0.205, 0.208)),
]


def test_accuracy_vs_latency_has_a_log_axis_labels_that_do_not_overlap_and_a_front_per_backend():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deploycomp.report import _overlap, accuracy_latency_figure

    lat = [{"variant": v, "backend": b, "precision": p, "format": f, "top1_pct": t, "latency_median_ms": m,
            "latency_median_ci95_ms": list(ci), "batch": 1, "device": "cpu"}
           for v, b, p, f, t, m, ci in RECORDED_LATENCY]
    study = _recorded_study()
    fig = accuracy_latency_figure(study, lat, "top-1 (%)")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    texts = [t for t in ax.texts if t.get_text() in {r[0] for r in RECORDED_LATENCY}]
    assert sorted(t.get_text() for t in texts) == sorted(r[0] for r in RECORDED_LATENCY)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    frame = ax.get_window_extent(renderer)
    assert all(_overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    fronts = {line.get_label(): list(line.get_xdata()) for line in ax.lines if "Pareto" in line.get_label()}
    assert fronts == {"ort: Pareto front": [0.110, 0.163, 0.206, 0.243],
                      "torch: Pareto front": [1.915, 3.002, 3.360, 5.087]}
    plt.close(fig)
