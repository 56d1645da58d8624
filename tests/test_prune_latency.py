"""Latency-aware pruning: the allocator on synthetic tables, the search against a fake timed backend, the
latency cache, and the CLI's one-line errors. Nothing here reads a clock: the fake backend's "latency" is
a known function of the layers' widths."""

from __future__ import annotations

import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch

from deploycomp.checkpoint import load_model
from deploycomp.data import load_dataset
from deploycomp.inputs import Data
from deploycomp.prune import PruneConfig, prune_checkpoint
from deploycomp.prune.allocate import Problem, Term, allocate, knapsack
from deploycomp.prune.latency_table import LatencyCache, measure_table
from deploycomp.prune.probes import ModelTiming, OpSpec, Probe, Setup, register_probe
from deploycomp.prune.structure import candidate_widths, layer_inputs, layer_spec
from tests.conftest import assert_one_line_error

# -- the allocator ---------------------------------------------------------------------------------


def brute_force(p: Problem, budget: float):
    """(value, latency, choice) of the best choice within budget, by enumeration (ties: less latency)."""
    best = None
    for ch in itertools.product(*[range(len(v)) for v in p.values]):
        lat = p.latency(ch)
        if lat <= budget + 1e-12:
            key = (p.value(ch), -lat)
            if best is None or key > best[0]:
                best = (key, ch)
    return best


def separable() -> Problem:
    """Three groups of widths (8, 16, 24): each layer's latency depends on its own group only."""
    values = [[1.0, 5.0, 6.0], [2.0, 3.0, 9.0], [1.0, 4.0, 4.5]]
    terms = [Term(None, 0, [[1.0, 2.0, 4.0]]), Term(None, 1, [[1.0, 3.0, 5.0]]), Term(None, 2, [[1.0, 1.5, 4.0]])]
    return Problem(values, terms, constant=0.5)


def test_allocator_finds_the_known_optimum_of_a_separable_table():
    p = separable()
    # budget 8.5 - 0.5 = 8 ms for the layers: (16, 24, 16) costs 2 + 5 + 1.5 = 8.5 > 8, (16, 24, 8) costs 8
    # and keeps 5 + 9 + 1 = 15; (24, 24, 8) would cost 10; (8, 24, 16) costs 7.5 and keeps 14.
    a = allocate(p, 8.5)
    assert a.feasible and a.choice == [1, 2, 0]
    assert a.value == 15.0 and a.latency == 8.5
    assert knapsack(p.values, [t.table[0] for t in p.terms], 8.0) == [1, 2, 0]
    for budget in np.linspace(3.5, 13.5, 41):  # every budget: the enumeration's optimum value
        a, (key, _) = allocate(p, budget), brute_force(p, budget)
        assert a.feasible and a.value == key[0] and a.latency <= budget


def test_allocator_prefers_a_wider_width_the_backend_runs_faster():
    """The table says 12 channels run slower than 16 (a slow width): the allocator never picks 12."""
    p = Problem([[1.0, 2.0, 3.0]], [Term(None, 0, [[2.0, 5.0, 3.0]])])
    assert allocate(p, 3.0).choice == [2]  # 16 channels: all of the value, within budget
    assert allocate(p, 2.5).choice == [0]


def test_allocator_coupled_chain_known_optimum():
    """conv a -> conv b -> fc: the middle layer's latency depends on both groups' widths."""
    w = np.array([1.0, 2.0, 3.0])
    p = Problem(values=[[1.0, 1.8, 2.4], [1.0, 2.5, 3.0]],
                terms=[Term(None, 0, [3.0 * w]),  # stem: fixed input, output = group 0
                       Term(0, 1, np.outer(w, w)),  # middle: input = group 0, output = group 1
                       Term(1, None, (0.5 * w)[:, None])],  # classifier: input = group 1
                constant=1.0)
    assert p.latency(p.widest) == 1 + 9 + 9 + 1.5
    budget = 11.5  # (1, 1) would keep 4.3 at 12 ms
    (key, choice) = brute_force(p, budget)
    a = allocate(p, budget)
    assert choice == (0, 2) and key[0] == 4.0  # the narrowest first group buys the widest second one
    assert a.choice == [0, 2] and a.value == 4.0 and a.latency == 1 + 3 + 3 + 1.5


def test_allocator_separable_random_instances_match_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(40):
        g, k = rng.integers(2, 5), rng.integers(2, 5)
        p = Problem([np.cumsum(rng.random(k)) for _ in range(g)],
                    [Term(None, i, np.sort(rng.random(k))[None, :]) for i in range(g)], constant=0.1)
        budget = rng.uniform(p.latency(p.narrowest), p.latency(p.widest))
        (key, _) = brute_force(p, budget)
        assert allocate(p, budget).value == pytest.approx(key[0], abs=1e-12)


def test_allocator_says_when_nothing_fits():
    a = allocate(separable(), 3.0)  # the narrowest options alone take 0.5 + 3 = 3.5 ms
    assert not a.feasible and a.choice == [0, 0, 0] and a.latency == 3.5


def test_candidate_widths_are_multiples_of_the_rounding():
    assert candidate_widths(64, 8, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert candidate_widths(32, 8, 8) == [8, 16, 24, 32]
    assert candidate_widths(100, 8, 4) == [24, 48, 72, 100]  # the full width stays as it is
    assert candidate_widths(6, 8, 8) == [6]


# -- a fake timed backend --------------------------------------------------------------------------

CALL_MS = 0.004  # the fake backend's cost of any call, paid by a layer timed alone and not inside a model


def fake_op_ms(spec: OpSpec) -> float:
    """A layer alone: a call, plus 2 ns per MAC, 2.5 times that when a width is an odd multiple of 8."""
    slow = 1.5 if 8 in (spec.c_in % 16, spec.c_out % 16) else 0.0
    return CALL_MS + 2e-6 * spec.macs() * (1 + slow)


def fake_model_ms(model, example) -> float:
    """A whole model: its layers without the call cost, plus work the table does not see (activations
    scale with the widths, not with the MACs) and a constant: the search has to correct for it."""
    shapes = layer_inputs(model, example)
    modules = dict(model.named_modules())
    total = 10.0
    for name, shape in shapes.items():
        spec = layer_spec(modules[name], shape)
        h, w = spec.out_hw() if spec.kind == "conv" else (1, 1)
        total += fake_op_ms(spec) - CALL_MS + 8e-4 * spec.c_out * h * w
    return total


@register_probe("fake-latency")
class FakeProbe(Probe):
    """Latencies computed from the widths: deterministic, instant, and not additive over layers."""

    models: dict[str, tuple] = {}

    def time_ops(self, specs, setup, progress=None):
        return [fake_op_ms(s) for s in specs]

    def artifact(self, ckpt, workdir, name, setup):
        key = f"{workdir}/{name}"
        FakeProbe.models[key] = (ckpt.model, ckpt.example_input())
        return key

    def compare(self, artifacts, setup, sessions=None):
        ms = [fake_model_ms(*FakeProbe.models[a]) for a in artifacts]
        n = sessions or 5
        return [ModelTiming(m, [m, m], ms[0] / m, [ms[0] / m] * 2 if i else None, "faster" if i else None, [],
                            [{"latency_median_ms": m, "speedup": ms[0] / m, "speedup_ci95": None}] * n)
                for i, m in enumerate(ms)]


@functools.cache
def synthetic() -> Data:
    test, info = load_dataset("synthetic", "test")
    train, _ = load_dataset("synthetic", "train")
    return Data(info, test, train)


def fresh():
    return load_model("light_resnet18", num_classes=10, in_channels=3, input_size=(32, 32))


def latency_config(tmp_path, **kw) -> PruneConfig:
    base = dict(method="magnitude", target_speedup=2.0, measured=True, latency_backend="fake-latency",
                latency_cache=str(tmp_path / "cache"), finetune=None, eval_samples=16, calib_samples=16,
                calib_batch=16)
    return PruneConfig(**{**base, **kw})


def test_search_converges_on_a_fake_backend_and_records_everything(tmp_path):
    ckpt = fresh()
    example = ckpt.example_input()
    original_ms = fake_model_ms(ckpt.model, example)
    pruned, record = prune_checkpoint(ckpt, synthetic(), latency_config(tmp_path))
    lat = record["latency"]
    its = lat["iterations"]
    # the table alone predicts 2x for the first candidate, which the fake backend runs slower than that
    assert its[0]["predicted_speedup"] == pytest.approx(2.0, rel=0.05)
    assert its[0]["measured_speedup"] < 1.9
    assert 2 <= len(its) <= 4 and lat["within_tolerance"]
    assert abs(lat["achieved_speedup"] / 2.0 - 1) <= 0.05
    # the model written is the one measured: its fake latency gives exactly the reported speed-up
    assert original_ms / fake_model_ms(pruned.model, example) == pytest.approx(lat["achieved_speedup"], rel=1e-12)
    assert lat["original_ms"] == pytest.approx(original_ms, rel=1e-12)
    chosen = its[lat["chosen_iteration"] - 1]
    widths = {r["layer"]: r["out"] for r in record["layers"]}
    assert all(widths[root] == w for root, w in chosen["widths"].items())
    assert all(w % 8 == 0 for w in chosen["widths"].values())
    # everything measured is in the record: every table entry, the cost of an empty call subtracted
    spec = OpSpec("conv", 32, 16, (3, 3), (1, 1), (1, 1), in_hw=(16, 16))
    assert lat["table"]["entries"][spec.key] == pytest.approx(fake_op_ms(spec) - CALL_MS, rel=1e-12)
    assert lat["table"]["overhead_ms"] == pytest.approx(CALL_MS)
    assert lat["table"]["layers_measured"] == len(lat["table"]["entries"]) + 1 and lat["table"]["layers_cached"] == 0
    for key in ("predicted_speedup", "measured_speedup", "measured_speedup_ci95", "macs", "seconds"):
        assert key in chosen
    assert record["after"]["macs"] == chosen["macs"]
    # a second search on the same model and setup measures no layer again
    _, again = prune_checkpoint(fresh(), synthetic(), latency_config(tmp_path, target_speedup=1.5))
    assert again["latency"]["table"]["layers_measured"] == 0
    assert abs(again["latency"]["achieved_speedup"] / 1.5 - 1) <= 0.05


def test_search_avoids_the_widths_the_backend_runs_slowly(tmp_path):
    """Widths of 8, 24, 40, ... channels are slow on the fake backend: none survives the search."""
    _, record = prune_checkpoint(fresh(), synthetic(), latency_config(tmp_path, target_speedup=1.6))
    chosen = record["latency"]["iterations"][record["latency"]["chosen_iteration"] - 1]
    assert all(w % 16 == 0 for w in chosen["widths"].values()), chosen["widths"]


def test_target_latency_ms_and_depth_on_a_fake_backend(tmp_path):
    ckpt = fresh()
    ms = fake_model_ms(ckpt.model, ckpt.example_input())
    _, record = prune_checkpoint(ckpt, synthetic(), latency_config(tmp_path, target_speedup=None,
                                                                   target_latency_ms=ms / 1.5, measured=False))
    assert record["latency"]["target_speedup"] == pytest.approx(1.5)
    assert abs(record["latency"]["achieved_ms"] / (ms / 1.5) - 1) <= 0.05
    ckpt = fresh()
    pruned, record = prune_checkpoint(ckpt, synthetic(), latency_config(tmp_path, method="depth", target_speedup=1.2))
    lat = record["latency"]
    chosen = lat["iterations"][lat["chosen_iteration"] - 1]
    assert record["removed_blocks"] and sorted(record["removed_blocks"]) == sorted(chosen["blocks_dropped"])
    assert set(lat["table"]["blocks_ms"]) >= set(record["removed_blocks"])
    assert ms / fake_model_ms(pruned.model, pruned.example_input()) == pytest.approx(lat["achieved_speedup"])


def test_iterative_steps_end_at_the_searched_widths(tmp_path):
    pruned, record = prune_checkpoint(fresh(), synthetic(), latency_config(tmp_path, target_speedup=1.5, steps=2))
    lat = record["latency"]
    final = lat["iterations"][lat["chosen_iteration"] - 1]["widths"]
    assert record["steps"][-1]["widths"] == final
    first = record["steps"][0]["widths"]
    assert all(final[r] <= first[r] for r in final)


# -- the cache ---------------------------------------------------------------------------------------


def test_latency_cache_reuses_matching_entries_and_ignores_damaged_or_foreign_files(tmp_path, capsys):
    setup = Setup("fake-latency", "cpu", 1, 1)
    specs = [OpSpec("conv", 8, 8, (3, 3), in_hw=(8, 8)), OpSpec("linear", 8, 10)]
    first = measure_table(FakeProbe(), setup, specs, str(tmp_path))
    assert first["layers_measured"] == 3 and first["layers_cached"] == 0
    path = tmp_path / first["cache"].split("/")[-1]
    assert path.exists() and first["cache"] == str(path)
    assert measure_table(FakeProbe(), setup, specs, str(tmp_path))["layers_measured"] == 0
    # another setup (batch 2) lives in another file
    assert measure_table(FakeProbe(), Setup("fake-latency", "cpu", 2, 1), specs, str(tmp_path))["layers_measured"] == 3
    # a damaged file is ignored with a warning and replaced
    path.write_text("{not json")
    again = measure_table(FakeProbe(), setup, specs, str(tmp_path))
    assert again["layers_measured"] == 3 and "ignoring the latency cache" in capsys.readouterr().err
    # a file whose context does not match this setup (e.g. copied from another machine) is not trusted
    doc = json.loads(path.read_text())
    doc["context"]["cpu_model"] = "another CPU"
    path.write_text(json.dumps(doc))
    assert measure_table(FakeProbe(), setup, specs, str(tmp_path))["layers_measured"] == 3
    # off: nothing read or written
    off = measure_table(FakeProbe(), setup, specs, "off")
    assert off["cache"] is None and off["layers_measured"] == 3
    assert LatencyCache("off", setup, {}).load() == {}


# -- the CLI: bad input in one line, nothing written ---------------------------------------------------

SYNTH = ["--model", "light_resnet18", "--data", "synthetic", "--method", "magnitude", "--finetune-epochs", 0,
         "--eval-samples", 16, "--calib-samples", 16]


def test_cli_latency_target_writes_record_and_summary(cli, tmp_path):
    r = cli("prune", *SYNTH, "--target-speedup", 1.5, "--measured", "--latency-backend", "fake-latency",
            "--latency-cache", tmp_path / "cache", "-o", "out.pt")
    assert "latency achieved" in r.stdout and "latency table" in r.stdout
    record = json.loads((tmp_path / "out.pt.json").read_text())
    assert record["params"]["measured"] is True and record["params"]["latency_backend"] == "fake-latency"
    assert record["latency"]["within_tolerance"] and record["latency"]["table"]["entries"]
    bench = "deploycomp bench light_resnet18 out.pt --backend fake-latency --device cpu --batch 1 --threads 1"
    assert record["latency"]["reproduce"]["commands"] == [bench] and record["latency"]["reproduce"]["bench"] == bench
    lines = r.stdout.splitlines()
    at = lines.index("The latency target holds for the search's conditions: fake-latency on cpu (batch 1, 1 thread).")
    assert lines[at + 1].startswith("bench's defaults differ: prune searches at 1 thread unless --latency-threads")
    assert lines[at + 3] == f"  {bench}"
    assert lines[at + 4].startswith("Note: bench rebuilds light_resnet18 from its name, without --data synthetic")


def test_bench_commands_export_or_build_both_models_as_the_search_did():
    from deploycomp.checkpoint import default_model
    from deploycomp.prune.latency import bench_commands

    ort = bench_commands(Setup("ort", "cpu", 1, 1), None, {"weights": None}, "runs/p 2x.pt")
    assert ort == {"commands": [
        f"deploycomp export --model {default_model()} --batch 1 -o 'runs/p 2x-original.onnx'",
        "deploycomp export --model 'runs/p 2x.pt' --batch 1 -o 'runs/p 2x.onnx'",
        "deploycomp bench 'runs/p 2x-original.onnx' 'runs/p 2x.onnx' --backend ort --device cpu --batch 1 --threads 1"],
        "bench": "deploycomp bench 'runs/p 2x-original.onnx' 'runs/p 2x.onnx' --backend ort --device cpu --batch 1 "
                 "--threads 1", "caveat": None}
    trt = bench_commands(Setup("trt", "cuda:1", 4, None), "resnet18",
                         {"num_classes": 10, "model_kwargs": {"width": 0.5}, "input_size": (64, 48)}, "p.pt")
    assert trt["commands"] == [
        "deploycomp export --model resnet18 --num-classes 10 --model-kwargs '{\"width\":0.5}' --input-size 64x48 "
        "--batch 4 -o p-original.onnx",
        "deploycomp export --model p.pt --input-size 64x48 --batch 4 -o p.onnx",
        "deploycomp build p-original.onnx -p fp32 --min-batch 4 --opt-batch 4 --max-batch 4 --gpu 1 "
        "-o p-original.engine",
        "deploycomp build p.onnx -p fp32 --min-batch 4 --opt-batch 4 --max-batch 4 --gpu 1 -o p.engine",
        "deploycomp bench p-original.engine p.engine --backend trt --device cuda:1 --batch 4"]
    torch_ = bench_commands(Setup("torch", "cpu", 8, 2), "base.pt", {"input_size": (32, 32), "weights": "w.pth"},
                            "p.pt")
    assert torch_ == {"commands": [torch_["bench"]], "caveat": None,
                      "bench": "deploycomp bench base.pt p.pt --backend torch --device cpu --batch 8 --threads 2 "
                               "--input-size 32x32"}
    fresh = bench_commands(Setup("torch", "cpu", 1, 1), "resnet18", {"in_channels": 1}, "p.pt")
    assert fresh["caveat"] == ("bench rebuilds resnet18 from its name, without --in-channels 1; if that changes the "
                               "network, bench a checkpoint of the original instead")


def test_prune_help_says_where_a_measured_target_holds(cli):
    import re

    text = re.sub(r"\s+", " ", cli("prune", "--help").stdout)
    assert "It holds for the search's conditions only: backend, device, batch and threads (default: ort, CPU, " \
           "batch 1, one thread, while bench defaults to every core)" in text
    assert "Default: 1, not bench's every core: reproducible on a shared machine" in text


@pytest.mark.parametrize(("args", "fragments", "code"), [
    (["--target-latency-ms", 1e6], ["nothing to prune", "ask for less than"], 2),
    (["--target-speedup", 60, "--measured"], ["out of reach", "measures", "ask for"], 2),
    (["--target-speedup", 2, "--measured", "--latency-widths", 1], ["--latency-widths must be"], 2),
])
def test_cli_latency_target_errors(cli, tmp_path, args, fragments, code):
    r = cli("prune", *SYNTH, *args, "--latency-backend", "fake-latency", "--latency-cache", tmp_path / "c",
            "-o", "out.pt", ok=False)
    assert_one_line_error(r, *fragments)
    assert r.exit_code == code
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(("args", "fragments"), [
    (["--ratio", 0.3, "--measured"], ["--measured says", "--target-speedup X"]),
    (["--ratio", 0.3, "--latency-backend", "ort"], ["--latency-backend applies to a measured latency target"]),
    (["--target-latency-ms", 5, "--target-speedup", 2], ["not --target-speedup and --target-latency-ms"]),
    (["--target-speedup", 2, "--measured", "--global"], ["--global has no effect"]),
    (["--target-speedup", 2, "--measured", "--latency-backend", "onnx"], ["unknown latency backend 'onnx'"]),
    (["--target-speedup", 0.5, "--measured"], ["--target-speedup must be above 1 (measured)"]),
])
def test_cli_conflicting_latency_options(cli, tmp_path, args, fragments):
    r = cli("prune", *SYNTH, *args, "-o", "out.pt", ok=False)
    assert_one_line_error(r, *fragments)
    assert r.exit_code == 2 and not (tmp_path / "out.pt").exists()


def test_cli_trt_without_tensorrt_gives_the_install_hint(cli, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    r = cli("prune", *SYNTH, "--target-speedup", 2, "--measured", "--latency-backend", "trt", "-o", "out.pt", ok=False)
    assert_one_line_error(r, "needs TensorRT, which is not installed", 'pip install "deploycomp[tensorrt]"')
    assert r.exit_code == 1 and not (tmp_path / "out.pt").exists()


def test_cli_latency_device_without_cuda(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = cli("prune", *SYNTH, "--target-speedup", 2, "--measured", "--latency-device", "cuda", "-o", "out.pt",
            ok=False)
    assert_one_line_error(r, "--latency-device cuda asked for, but CUDA is not available")
    assert r.exit_code == 2 and not (tmp_path / "out.pt").exists()


def test_prune_help_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from deploycomp.cli import main; sys.argv=['deploycomp','prune','--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_candidate_is_timed_in_several_sessions_and_combined_across_them(tmp_path):
    """A session's interval covers its own rounds; the search's speed-up is the geometric mean over fresh
    sessions, with the Student-t interval across them (t(0.975, 2) = 4.303 for three)."""
    from deploycomp.bench.paired import across_sessions
    from deploycomp.prune.latency import VERIFY_SESSIONS

    est = across_sessions([1.8, 2.0, 2.2], rounds=30, run_spread_pct=0.0)
    logs = np.log([1.8, 2.0, 2.2])
    half = 4.302653 * logs.std(ddof=1) / np.sqrt(3)
    assert est.speedup == pytest.approx(7.92 ** (1 / 3)) and (est.sessions, est.rounds) == (3, 30)
    assert est.ci95 == pytest.approx([np.exp(logs.mean() - half), np.exp(logs.mean() + half)], rel=1e-5)
    # the level above the sessions (runs minutes apart) adds a known term: 1.96 x log(1.01) in quadrature
    wide = across_sessions([1.8, 2.0, 2.2], rounds=30, run_spread_pct=1.0)
    both = math.hypot(half, 1.959964 * math.log(1.01))
    assert wide.ci95 == pytest.approx([np.exp(logs.mean() - both), np.exp(logs.mean() + both)], rel=1e-5)
    same = across_sessions([1.0, 1.0, 1.0], rounds=30, run_spread_pct=1.0)  # no spread between sessions
    assert same.ci95 == pytest.approx([np.exp(-1.959964 * math.log(1.01)), np.exp(1.959964 * math.log(1.01))])
    assert est.verdict == "faster"
    one = across_sessions([1.5], rounds=10)
    assert (one.speedup, one.ci95, one.verdict) == (pytest.approx(1.5), None, None)
    _, record = prune_checkpoint(fresh(), synthetic(), latency_config(tmp_path))
    for it in record["latency"]["iterations"]:
        assert len(it["sessions"]) == VERIFY_SESSIONS == 3
        assert it["measured_speedup"] == pytest.approx(it["sessions"][0]["speedup"])  # the fake backend is exact
