"""Backends on a tiny model (torch and ONNX Runtime on CPU), TensorRT error paths, GPU paths (marked)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from deploycomp.bench import BenchConfig, benchmark
from deploycomp.bench.backends import BACKENDS, RunnerOptions, backend_for, get_backend, profile_batch_range
from deploycomp.errors import MissingDependencyError, UsageError

# One thread: the 2 CI cores are shared, and OpenMP threads that get preempted make latency explode.
FAST = {"warmup": 3, "warmup_ms": 0, "iters": 30, "threads": 1, "sessions": 1}  # one session, in this process


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A fresh (untrained) light_resnet18 saved as a deploycomp checkpoint: real structure, no training."""
    from deploycomp.checkpoint import load_model

    out = tmp_path_factory.mktemp("bench") / "tiny.pt"
    load_model("light_resnet18", in_channels=1, num_classes=10, input_size=(28, 28)).save(out)
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model) -> Path:
    from deploycomp.checkpoint import load_model
    from deploycomp.export import export_onnx

    out = tiny_model.with_suffix(".onnx")
    export_onnx(load_model(str(tiny_model)), out, dynamic_batch=True, parity=False, simplify=False)
    return out


def _direct_ms(fn, n=20) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def test_registry_and_auto_selection():
    assert {"torch", "torch-compile", "ort", "trt"} <= set(BACKENDS.names())
    assert backend_for("m.onnx") == "ort" and backend_for("models/m.pt") == "torch"
    assert backend_for("resnet50") == "torch"
    assert all(backend_for(f"e{s}") == "trt" for s in (".engine", ".trt", ".plan"))
    with pytest.raises(UsageError, match="did you mean 'ort'"):
        get_backend("ortt")
    with pytest.raises(ValueError):
        BACKENDS.register("ort", object)


def _sane(r: dict, batch: int) -> None:
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["iterations"] == FAST["iters"] and r["warmup_iterations"] >= FAST["warmup"]
    # throughput from the wall time of the loop agrees with the per-iteration latencies
    assert r["throughput_ips"] == pytest.approx(batch * 1e3 / lat["mean"], rel=0.25)
    assert r["environment"]["torch"] and r["environment"]["device_name"]


def test_torch_cpu_sane_on_tiny_model(tiny_model):
    import torch

    from deploycomp.checkpoint import load_model

    (r1, r4) = benchmark(str(tiny_model), BenchConfig(device="cpu", batches=(1, 4), **FAST))
    _sane(r1, 1)
    _sane(r4, 4)
    assert r1["backend"] == "torch" and r1["threads"] == 1 and r1["input_shape"] == [1, 28, 28]
    assert r1["macs"] > 1e6 and r1["speedup"] == 1.0
    model = load_model(str(tiny_model)).model.eval()
    x = torch.randn(1, 1, 28, 28)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            direct = _direct_ms(lambda: model(x))
    finally:
        torch.set_num_threads(threads)
    assert 0.1 < r1["latency_ms"]["median"] / direct < 10, (r1["latency_ms"]["median"], direct)


def test_ort_cpu_sane_on_tiny_model(tiny_model, tiny_onnx):
    import onnxruntime as ort

    results = benchmark([str(tiny_model), str(tiny_onnx)], BenchConfig(device="cpu", batches=(1,), **FAST))
    torch_r, ort_r = results
    _sane(ort_r, 1)
    assert ort_r["backend"] == "ort" and ort_r["provider"] == "cpu"
    assert ort_r["extra"]["execution_providers"][0] == "CPUExecutionProvider"
    assert ort_r["macs"] == torch_r["macs"]  # from the export sidecar
    assert ort_r["macs_reduction"] == 1.0 and ort_r["speedup_efficiency"] == pytest.approx(ort_r["speedup"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tiny_onnx), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    direct = _direct_ms(lambda: sess.run(None, {sess.get_inputs()[0].name: x}))
    assert 0.1 < ort_r["latency_ms"]["median"] / direct < 10, (ort_r["latency_ms"]["median"], direct)


def test_ort_sessions_timed_in_alternation_stop_spinning_after_each_run(tiny_onnx, tmp_path):
    """Several multi-threaded ORT sessions: spinning stops at the end of each run (it would slow the next one)."""
    import shutil

    copy = tmp_path / "copy.onnx"
    shutil.copyfile(tiny_onnx, copy)
    fast = {**FAST, "threads": 2, "iters": 10}
    alone = benchmark([str(tiny_onnx)], BenchConfig(device="cpu", **fast))
    assert alone[0]["extra"]["ort_spinning"] == "ORT default"
    pair = benchmark([str(tiny_onnx), str(copy)], BenchConfig(device="cpu", **fast))
    assert [r["extra"]["ort_spinning"] for r in pair] == ["stopped after each run"] * 2
    one_thread = benchmark([str(tiny_onnx), str(copy)], BenchConfig(device="cpu", **{**fast, "threads": 1}))
    assert [r["extra"]["ort_spinning"] for r in one_thread] == ["ORT default"] * 2  # nothing spins with 1 thread


def test_ort_io_binding_output_is_the_model_output(tiny_model, tiny_onnx):
    import torch

    from deploycomp.checkpoint import load_model

    runner = get_backend("ort")(str(tiny_onnx), RunnerOptions(device="cpu"))
    with runner:
        runner.prepare(2)
        runner.run()
        runner.sync()
        runner.download()
        model = load_model(str(tiny_model)).model.eval()
        with torch.inference_mode():
            ref = model(torch.from_numpy(runner.x_np)).numpy()
        np.testing.assert_allclose(runner.out_host, ref, atol=1e-3, rtol=1e-3)


def test_ort_fixed_batch_is_refused(tiny_model, tmp_path):
    from deploycomp.checkpoint import load_model
    from deploycomp.export import export_onnx

    fixed = tmp_path / "fixed.onnx"
    export_onnx(load_model(str(tiny_model)), fixed, batch=1, parity=False, simplify=False)
    with pytest.raises(UsageError, match="fixed batch of 1"):
        benchmark(str(fixed), BenchConfig(device="cpu", batches=(4,), **FAST))


def test_io_host_on_cpu(tiny_model, tiny_onnx):
    results = benchmark([str(tiny_model), str(tiny_onnx)], BenchConfig(device="cpu", io="host", **FAST))
    for r in results:
        assert r["h2d_ms"]["median"] >= 0 and r["d2h_ms"]["median"] >= 0 and r["io"] == "host"


def test_memory_runs_in_fresh_processes_of_its_own(tiny_model, tiny_onnx):
    """torch: weights counted exactly; ORT: a process without torch; steady state above the baseline."""
    results = benchmark([str(tiny_model), str(tiny_onnx)],
                        BenchConfig(device="cpu", memory=True, warmup=1, warmup_ms=0, iters=5, threads=1, sessions=1))
    mem_pt, mem_onnx = (r["memory"] for r in results)
    from deploycomp.checkpoint import load_model

    model = load_model(str(tiny_model)).model
    exact = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    assert mem_pt["weights_mib"] == pytest.approx(exact) and mem_pt["torch_imported"] is True
    assert mem_onnx["torch_imported"] is False and mem_onnx["weights_mib"] is None
    for mem in (mem_pt, mem_onnx):
        assert mem["peaks"] == "per step"
        assert 0 < mem["steady_rss_mib"] <= mem["run_peak_rss_mib"]
        assert mem["load_peak_rss_mib"] >= mem["loaded_rss_mib"] > 0
        assert len(mem["repeats"]) == 3 and mem["steady_range_mib"][0] <= mem["steady_rss_mib"] <= mem[
            "steady_range_mib"][1]
        assert mem["torch_peak_allocated_mib"] is None  # CPU: no CUDA allocator
    # the ORT session holds the weights (about the fp32 size of the parameters) plus its buffers
    assert mem_onnx["steady_rss_mib"] > 0.5 * exact


def test_memory_processes_overlap_only_on_the_cpu(monkeypatch):
    from deploycomp.bench import memory

    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cpu = BenchConfig(device="cpu")
    assert memory.memory_workers([("a.onnx", "ort"), ("b.pt", "torch")], cpu) == 4  # at most 4 at once
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert memory.memory_workers([("a.onnx", "ort")], cpu) == 2
    # an engine runs on a GPU: GPU processes share its memory and run one at a time
    assert memory.memory_workers([("a.onnx", "ort"), ("e.engine", "trt")], BenchConfig()) == 1


def test_trt_profile_batch_range():
    assert profile_batch_range(((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))) == (1, 16)
    assert profile_batch_range({"min": (2, 3), "opt": (4, 3), "max": (8, 3)}) == (2, 8)
    assert profile_batch_range({"input": ((1, 3), (4, 3), (32, 3))}) == (1, 32)


def test_trt_engine_without_tensorrt(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip(reason="TensorRT is installed here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        benchmark(str(engine), BenchConfig(**FAST))


@pytest.mark.gpu
def test_torch_cuda_events_and_graph(tiny_model):
    r_plain, = benchmark(str(tiny_model), BenchConfig(device="cuda", batches=(8,), **FAST))
    assert r_plain["device_ms"]["median"] > 0
    assert r_plain["device_ms"]["median"] <= r_plain["latency_ms"]["median"] * 1.05
    r_graph, = benchmark(str(tiny_model), BenchConfig(device="cuda", batches=(8,), cuda_graph=True, memory=True,
                                                      **FAST))
    assert r_graph["cuda_graph"] and r_graph["memory"]["torch_peak_reserved_mib"] > 0
    assert r_graph["enqueue_ms"]["median"] < r_plain["enqueue_ms"]["median"]


@pytest.mark.gpu
def test_ort_cuda_io_binding(tiny_onnx):
    r, = benchmark(str(tiny_onnx), BenchConfig(provider="cuda", batches=(1, 8), io="host", **FAST))[:1]
    assert r["extra"]["execution_providers"][0] == "CUDAExecutionProvider" and r["h2d_ms"]["median"] > 0


@pytest.mark.tensorrt
def test_trt_engine_benchmark(tiny_onnx, tmp_path):
    from deploycomp import trt

    engine = tmp_path / "tiny.engine"
    trt.build_engine(str(tiny_onnx), str(engine))  # the TensorRT helper's builder
    r, = benchmark(str(engine), BenchConfig(batches=(1,), memory=True, **FAST))
    assert r["backend"] == "trt" and r["memory"]["trt_engine_device_memory_mib"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("DEPLOYCOMP_SLOW_TESTS"),
                    reason="torch.compile takes 30-60 s on 2 CPU cores; set DEPLOYCOMP_SLOW_TESTS=1 to run")
def test_torch_compile_compiles_in_warmup(tiny_model):
    (r,) = benchmark(str(tiny_model), BenchConfig(backend="torch-compile", device="cpu", **FAST))
    assert r["backend"] == "torch-compile" and r["extra"]["compile_mode"] == "default"
    assert r["warmup_s"] > 1.0  # the compilation happened here ...
    assert r["latency_ms"]["max"] < 1000  # ... and not in a timed iteration


def test_sessions_run_in_fresh_processes_without_torch_for_onnx(tiny_onnx, tmp_path):
    """Three sessions, each a fresh process that loads both models anew; ONNX Runtime's never imports torch."""
    import math
    import shutil

    copy = tmp_path / "copy.onnx"
    shutil.copyfile(tiny_onnx, copy)
    cfg = BenchConfig(device="cpu", **{**FAST, "sessions": 3})
    ref, r = benchmark([str(tiny_onnx), str(copy)], cfg)
    for x in (ref, r):
        assert x["interval"] == "across 3 sessions (fresh processes)" and len(x["sessions"]) == 3
        assert x["iterations"] == 3 * FAST["iters"] and [s["iterations"] for s in x["sessions"]] == [30] * 3
        assert x["environment"]["torch_threads"] is None  # torch was never imported in the session's process
        assert x["session"] == ref["session"]
    assert len({s["session"] for s in r["sessions"]}) == 3
    per = [s["speedup"] for s in r["sessions"]]
    assert r["paired"] is True and r["speedup"] == pytest.approx(math.exp(sum(map(math.log, per)) / 3))
    assert r["speedup_ci95"][0] <= r["speedup"] <= r["speedup_ci95"][1]
    assert r["verdict"] in ("same", "faster", "slower")
