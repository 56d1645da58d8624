"""deploycomp bench: the command, its JSON/CSV schema and its one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from deploycomp.bench import CSV_COLUMNS, SCHEMA, SCHEMA_VERSION, read_results
from deploycomp.bench.timing import STAT_KEYS

FAST = ["--warmup", "2", "--warmup-ms", "0", "--iters", "10", "--threads", "1", "--sessions", "1"]

RECORD_KEYS = {
    "schema_version": int, "artifact": str, "label": str, "backend": str, "device": str, "batch": int,
    "input_shape": list, "precision": str, "io": str, "threads": int, "cuda_graph": bool, "macs": int,
    "params_total": int, "warmup_iterations": int, "warmup_s": float, "iterations": int, "timed_wall_s": float,
    "targets": dict, "latency_ms": dict, "enqueue_ms": dict, "throughput_ips": float, "warnings": list,
    "environment": dict, "extra": dict, "rounds": int, "block_medians_ms": list, "latency_median_ci95_ms": list,
    "session": str, "conditions": dict, "sessions": list, "interval": str,
}
NULLABLE_KEYS = ("arch", "provider", "device_ms", "h2d_ms", "d2h_ms", "memory", "reference", "speedup",
                 "macs_reduction", "speedup_efficiency", "speedup_ci95", "verdict", "paired")
ENV_KEYS = ("deploycomp", "python", "os", "cpu_model", "cpu_count", "cpus_usable", "torch", "torchvision",
            "onnxruntime", "tensorrt", "cuda_runtime", "torch_cuda_build", "cudnn", "driver", "device_name",
            "compute_capability", "torch_threads", "time_utc")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """light_resnet18 and a half-width-ish pruned copy (fewer MACs), as checkpoints."""
    import torch
    import torch_pruning as tp

    from deploycomp.checkpoint import load_model

    d = tmp_path_factory.mktemp("bench-cli")
    base = load_model("light_resnet18", in_channels=1, num_classes=10, input_size=(28, 28))
    base.save(d / "base.pt")
    pruned = load_model(str(d / "base.pt"))
    x = torch.zeros(1, 1, 28, 28)
    pruner = tp.pruner.MetaPruner(pruned.model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[pruned.model.fc])
    pruner.step()
    pruned.add_surgery("prune_channels", history=pruner.pruning_history())
    pruned.source = None
    pruned.save(d / "pruned.pt")
    return d / "base.pt", d / "pruned.pt"


def test_bench_two_models_json_csv_schema(cli, two_models):
    base, pruned = two_models
    two_sessions = [*FAST[:-1], "2"]  # each session a fresh process
    res = cli("bench", base, pruned, "--batch", "1,2", *two_sessions, "--json", "out.json", "--csv", "out.csv")
    assert "speed-up" in res.output and "efficiency" in res.output
    assert "95% interval across 2 sessions (fresh processes)" in res.output
    doc = json.loads(Path("out.json").read_text())
    assert doc["schema"] == SCHEMA and doc["schema_version"] == SCHEMA_VERSION
    results = doc["results"]
    assert [(Path(r["artifact"]).name, r["batch"]) for r in results] == [
        ("base.pt", 1), ("base.pt", 2), ("pruned.pt", 1), ("pruned.pt", 2)]
    for r in results:
        for key, typ in RECORD_KEYS.items():
            assert isinstance(r[key], typ), (key, r[key])
        for key in NULLABLE_KEYS:
            assert key in r
        assert set(STAT_KEYS) == set(r["latency_ms"]) == set(r["enqueue_ms"])
        assert set(ENV_KEYS) <= set(r["environment"])
        assert r["reference"] == "base"
        assert set(r["targets"]) == {"warmup_iterations", "warmup_ms", "min_iterations", "max_iterations",
                                     "duration_s", "rounds", "budget_s"}
        # --iters 10 alone: exactly 10 iterations per session, so 10 rounds of one iteration each
        assert r["iterations"] == 20 and r["rounds"] == 20 and len(r["block_medians_ms"]) == 20
        assert [(s["iterations"], s["rounds"], len(s["block_medians_ms"])) for s in r["sessions"]] == [(10, 10, 10)] * 2
        assert r["interval"] == "across 2 sessions (fresh processes)"
        low, high = r["latency_median_ci95_ms"]
        assert low <= r["latency_median_ms"] <= high
        assert min(s["latency_median_ms"] for s in r["sessions"]) <= r["latency_median_ms"] <= max(
            s["latency_median_ms"] for s in r["sessions"])
        assert {"load_avg_1m_before", "load_avg_1m_after", "other_cpu_pct"} <= set(r["conditions"])
        assert r["conditions"]["sessions"] == 2
    assert len({r["session"] for r in results}) == 1  # one run: its id pairs the results
    assert len({s["session"] for r in results for s in r["sessions"]}) == 4  # a session id per session and batch
    pr = results[2]
    assert pr["macs_reduction"] > 2 and pr["speedup_efficiency"] == pytest.approx(pr["speedup"] / pr["macs_reduction"])
    assert pr["paired"] is True and pr["verdict"] in ("faster", "same", "slower")
    assert pr["speedup_ci95"][0] <= pr["speedup"] <= pr["speedup_ci95"][1]
    assert results[0]["speedup"] == 1.0 and results[0]["speedup_efficiency"] == 1.0
    assert results[0]["verdict"] is None and results[0]["speedup_ci95"] is None  # the reference itself
    assert "reference_final_block_ms" in results[0]["conditions"]  # timed again after the last round
    assert read_results("out.json") == results
    with open("out.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 4
    assert float(rows[2]["latency_ms_median"]) == pytest.approx(pr["latency_ms"]["median"])
    assert rows[0]["schema_version"] == str(SCHEMA_VERSION) and rows[0]["device_name"] and rows[0]["sessions"] == "2"
    assert rows[2]["verdict"] == pr["verdict"] and float(rows[2]["speedup_ci95_low"]) == pytest.approx(
        pr["speedup_ci95"][0])


def test_bench_json_to_stdout(cli, two_models):
    res = cli("bench", two_models[0], *FAST, "--json", "-")
    doc = json.loads(res.stdout)
    assert doc["results"][0]["backend"] == "torch"


def test_bench_without_arguments_uses_the_baseline(cli, two_models, monkeypatch):
    monkeypatch.setenv("DEPLOYCOMP_BASELINE", str(two_models[0]))
    res = cli("bench", "--iters", "5", "--warmup", "1", "--threads", "1")
    assert "base" in res.output and "torch" in res.output


@pytest.mark.skipif(not Path(__file__).resolve().parent.parent.joinpath("models", "light_resnet18_fmnist.pt")
                    .exists(), reason="the shipped baseline models/light_resnet18_fmnist.pt is not there yet")
def test_bench_with_no_arguments_at_all(cli, monkeypatch):
    monkeypatch.delenv("DEPLOYCOMP_BASELINE", raising=False)
    res = cli("bench")
    assert "light_resnet18_fmnist" in res.output


def test_read_results_refuses_foreign_and_newer_files(tmp_path):
    from deploycomp.errors import InputFileError

    (tmp_path / "a.json").write_text(json.dumps({"schema": "other", "results": []}))
    (tmp_path / "b.json").write_text(json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION + 1}))
    for name in ("a.json", "b.json"):
        with pytest.raises(InputFileError):
            read_results(str(tmp_path / name))


@pytest.mark.parametrize("args, fragments", [
    (["--backend", "tensorrtt"], ["unknown benchmark backend 'tensorrtt'", "Valid"]),
    (["--device", "cuda"], ["CUDA is not available"]),
    (["--iters", "0"], ["--iters must be at least 1"]),
    (["--duration-s", "0"], ["--duration-s must be positive"]),
    (["--batch", "0"], ["--batch"]),
    (["--batch", "1,x"], ["--batch"]),
    (["--threads", "0"], ["--threads must be positive"]),
    (["--backend", "ort"], ["the ort backend cannot run"]),
    (["--cuda-graph", "--device", "cpu"], ["--cuda-graph needs --device cuda"]),
])
def test_bench_one_line_errors(cli, two_models, args, fragments):
    assert_one_line_error(cli("bench", two_models[0], *FAST, *args, ok=False), *fragments)


def test_bench_missing_artifact(cli):
    assert_one_line_error(cli("bench", "nothere.pt", ok=False), "nothere.pt", "does not exist")
    assert_one_line_error(cli("bench", "nothere.onnx", ok=False), "nothere.onnx", "does not exist")


def test_bench_engine_without_tensorrt(cli):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip(reason="TensorRT is installed here")
    Path("model.engine").write_bytes(b"\x00" * 64)
    assert_one_line_error(cli("bench", "model.engine", ok=False), "TensorRT")


def test_bench_onnx_on_cuda_without_cuda(cli, two_models):
    Path("m.onnx").write_bytes(b"\x00")
    assert_one_line_error(cli("bench", "m.onnx", "--provider", "cuda", ok=False), "CUDA is not available")


class _FakeEngine:
    """Stands in for deploycomp.trt.EngineRunner: an engine whose profile allows batch 1..8."""

    def __init__(self, path, device_index):
        self.input_name = "input"
        self.profile = {"min": (1, 3, 32, 32), "opt": (4, 3, 32, 32), "max": (8, 3, 32, 32)}
        self.device_memory_bytes = 1 << 20
        self.stream = None
        self.closed = False

    def close(self):
        self.closed = True


class _FakeTrt:
    EngineRunner = _FakeEngine

    @staticmethod
    def tensorrt_available():
        return True

    @staticmethod
    def require_tensorrt():
        return None


def test_bench_batch_beyond_engine_profile(cli, monkeypatch):
    from deploycomp.bench import backends

    monkeypatch.setattr(backends, "trt_module", lambda: _FakeTrt)
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    Path("model.engine").write_bytes(b"\x00" * 64)
    # --sessions 1: in this process, where the stand-in TensorRT is (a fresh process would not have it)
    assert_one_line_error(cli("bench", "model.engine", "--batch", "16", "--sessions", "1", ok=False),
                          "batch 16 is outside the optimisation profile", "1 to 8")
    assert_one_line_error(cli("bench", "model.engine", "--device", "cpu", "--sessions", "1", ok=False), "NVIDIA GPU")


def test_bench_help_lists_options(cli):
    out = cli("bench", "--help").output
    for opt in ("--backend", "--device", "--provider", "--batch", "--warmup", "--warmup-ms", "--iters",
                "--duration-s", "--threads", "--io", "--cuda-graph", "--memory", "--json", "--csv"):
        assert opt in out
