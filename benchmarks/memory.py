"""Does `deploycomp bench --memory` tell pruned models apart and agree with an independent measurement? (issue 28)

For the shipped baseline (28 px) and torchvision ResNet-50 (224 px, random weights), each with magnitude-pruned
variants (30 % and 50 % of the channels, rounded to 8; no fine-tuning: memory only):

* deploycomp: `deploycomp bench ORIGINAL PRUNED... --memory --threads 1` on ONNX Runtime (the .onnx files) and on
  torch (the checkpoints); its steady-state figure (`memory.steady_rss_mib`, median of 3 fresh processes);
* independent: a minimal process written here, not using deploycomp's measuring code, `--repeats` times per model:
  ONNX Runtime: imports numpy and onnxruntime only, creates the input, reads VmRSS from /proc/self/status, creates
  an InferenceSession (one thread), runs it 10 + 20 times, reads VmRSS again; torch: imports torch (and the
  deploycomp model classes, so that the pickled module loads), creates the input, reads VmRSS, loads the pickled
  module, runs it 10 + 20 times under inference_mode, reads VmRSS again. The figure is the difference.

Goal: per model within 10 %, and the reduction between two models within 5 percentage points.

    python benchmarks/memory.py --out benchmarks/results/memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ORT_PROBE = r"""
import sys
import numpy as np
import onnxruntime as ort

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

path, batch, c, h, w = sys.argv[1], *map(int, sys.argv[2:6])
so = ort.SessionOptions()  # the settings deploycomp's ONNX Runtime runner uses
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
x = np.random.default_rng(0).standard_normal((batch, c, h, w)).astype(np.float32)
before = rss()
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
loaded = rss()
name = sess.get_inputs()[0].name
for _ in range(30):
    sess.run(None, {name: x})
print(loaded - before, rss() - before)
"""

TORCH_PROBE = r"""
import sys
import torch
import torchvision  # noqa: F401  imported before the baseline: the pickled module refers to its classes
import deploycomp.zoo  # noqa: F401  and to these

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

path, batch, c, h, w = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(1)
x = torch.randn(batch, c, h, w)
before = rss()
model = torch.load(path, weights_only=False).eval()
loaded = rss()
with torch.inference_mode():
    for _ in range(30):
        model(x)
print(loaded - before, rss() - before)
"""


def prepare(work: Path, names: list[str]) -> dict[str, dict[str, dict[str, str]]]:
    """family -> variant -> {"pt", "onnx", "pickle", "shape"}."""
    import torch

    from deploycomp import console
    from deploycomp.checkpoint import default_model, load_model
    from deploycomp.export import export_onnx
    from deploycomp.prune import prune_channels
    from deploycomp.prune.criteria import get_criterion

    console.set_verbosity(console.QUIET)
    sources = {"baseline": (default_model(), None), "resnet50": ("resnet50", (224, 224))}
    out: dict[str, dict[str, dict[str, str]]] = {}
    for family in names:
        src, size = sources[family]
        original = load_model(src, input_size=size)
        original.save(work / f"{family}.pt")
        variants = {"original": work / f"{family}.pt"}
        for ratio in (0.3, 0.5):
            ckpt = load_model(str(work / f"{family}.pt"))
            x = torch.zeros(1, *ckpt.input_shape)
            with torch.enable_grad():
                history = prune_channels(ckpt.model, x, get_criterion("magnitude")(), ratio, round_to=8)
            ckpt.add_surgery("prune_channels", history=history)
            ckpt.source = None
            path = work / f"{family}-magnitude-{int(ratio * 100)}.pt"
            ckpt.save(path)
            variants[f"magnitude-{int(ratio * 100)}"] = path
        out[family] = {}
        for variant, path in variants.items():
            ckpt = load_model(str(path))
            onnx_path = path.with_suffix(".onnx")
            export_onnx(ckpt, onnx_path, dynamic_batch=True, parity=False)
            pickle_path = path.with_suffix(".pickle.pt")
            torch.save(ckpt.model.eval(), pickle_path)
            out[family][variant] = {"pt": str(path), "onnx": str(onnx_path), "pickle": str(pickle_path),
                                    "shape": list(ckpt.input_shape)}
    return out


def deploycomp_figures(paths: list[str], backend: str, batch: int, work: Path) -> list[dict]:
    """`deploycomp bench PATHS --memory --threads 1`: each model's memory dict, in the order given."""
    out = work / "bench.json"
    cmd = [sys.executable, "-m", "deploycomp", "-q", "bench", *paths, "--backend", backend, "--memory",
           "--threads", "1", "--batch", str(batch), "--sessions", "1", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [r["memory"] for r in json.loads(out.read_text())["results"]]


def independent(backend: str, entry: dict, batch: int, repeats: int) -> dict:
    """Median (and all) of ``repeats`` minimal measurements: (loaded MiB, steady MiB) above the baseline."""
    runs = []
    for _ in range(repeats):
        if backend == "ort":
            args = [sys.executable, "-c", ORT_PROBE, entry["onnx"], str(batch), *map(str, entry["shape"])]
        else:
            args = [sys.executable, "-c", TORCH_PROBE, entry["pickle"], str(batch), *map(str, entry["shape"])]
        done = subprocess.run(args, check=True, capture_output=True, text=True, cwd=str(ROOT))
        loaded, steady = map(float, done.stdout.split())
        runs.append({"loaded_mib": loaded, "steady_mib": steady})
    return {"steady_mib": st.median(r["steady_mib"] for r in runs), "runs": runs}


def measure(models, families: list[str], batch: int, repeats: int, work: Path, log) -> list[dict]:
    rows = []
    for family in families:
        variants = models[family]
        for backend, key in (("ort", "onnx"), ("torch", "pt")):
            mems = deploycomp_figures([v[key] for v in variants.values()], backend, batch, work)
            for (variant, entry), mem in zip(variants.items(), mems, strict=True):
                ind = independent(backend, entry, batch, repeats)
                rows.append({"family": family, "variant": variant, "backend": backend, "batch": batch,
                             "deploycomp_steady_mib": mem["steady_rss_mib"], "deploycomp_range_mib":
                             mem.get("steady_range_mib"), "deploycomp_load_peak_mib": mem["load_peak_rss_mib"],
                             "weights_mib": mem.get("weights_mib"), "torch_imported": mem.get("torch_imported"),
                             "deploycomp_reduction_pct": mem.get("memory_reduction_pct"),
                             "deploycomp_reduction_range_pct": mem.get("memory_reduction_range_pct"),
                             "independent_steady_mib": ind["steady_mib"], "independent_runs": ind["runs"]})
                log(f"{family} {variant} {backend} batch {batch}: deploycomp {mem['steady_rss_mib']:.1f} MiB, "
                    f"independent {ind['steady_mib']:.1f} MiB")
    for r in rows:  # the independent reduction against the original of the same family and backend
        o = next(x for x in rows if (x["family"], x["backend"], x["batch"], x["variant"]) ==
                 (r["family"], r["backend"], r["batch"], "original"))
        r["independent_reduction_pct"] = None if r is o else 100 * (1 - r["independent_steady_mib"] /
                                                                    o["independent_steady_mib"])
    return rows


def report(rows: list[dict], args, seconds: float, env: dict) -> str:
    lines = ["# Memory that tells models apart: deploycomp against an independent measurement (issue 28)", "",
             f"Command: `python benchmarks/memory.py --batches {args.batches} --repeats {args.repeats}` "
             f"({seconds / 60:.1f} min), idle machine: {env['cpu_model']}, {env['cpus_usable']} CPUs, torch "
             f"{env['torch']}, onnxruntime {env['onnxruntime']}; {env['time_utc']}.", "",
             "deploycomp: `deploycomp bench ORIGINAL PRUNED... --backend B --memory --threads 1`, steady state = "
             "resident memory after warmup and the timed runs minus the fresh process's baseline after imports "
             "(median of 3 processes per model, [range]); ONNX Runtime's processes do not import torch. Independent: "
             f"a minimal process of this script ({args.repeats} per model, median), see the module docstring. "
             "Reduction: against the original of the same family, backend and batch.", "",
             "| model | variant | backend | batch | deploycomp steady MiB [range] | independent MiB | difference | "
             "deploycomp reduction [range] | independent reduction | difference (points) | load peak MiB | "
             "weights MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, i = r["deploycomp_steady_mib"], r["independent_steady_mib"]
        rng = r["deploycomp_range_mib"]
        red, ired = r["deploycomp_reduction_pct"], r["independent_reduction_pct"]
        rr = r["deploycomp_reduction_range_pct"]
        lines.append(
            f"| {r['family']} | {r['variant']} | {r['backend']} | {r['batch']} | {d:.1f}"
            + (f" [{rng[0]:.1f}, {rng[1]:.1f}]" if rng else "") + f" | {i:.1f} | {100 * (d / i - 1):+.1f} % | "
            + ("-" if red is None else f"{red:.1f} %" + (f" [{rr[0]:.1f}, {rr[1]:.1f}]" if rr else "")) + " | "
            + ("-" if ired is None else f"{ired:.1f} %") + " | "
            + ("-" if red is None or ired is None else f"{red - ired:+.1f}") + " | "
            + f"{r['deploycomp_load_peak_mib']:.1f} | "
            + ("-" if r["weights_mib"] is None else f"{r['weights_mib']:.2f}") + " |")
    within = [abs(r["deploycomp_steady_mib"] / r["independent_steady_mib"] - 1) <= 0.10 for r in rows]
    red_ok = [abs(r["deploycomp_reduction_pct"] - r["independent_reduction_pct"]) <= 5.0 for r in rows
              if r["deploycomp_reduction_pct"] is not None and r["independent_reduction_pct"] is not None]
    lines += ["", f"Goal: per model within 10 %: {sum(within)} of {len(within)}; reductions within 5 points: "
              f"{sum(red_ok)} of {len(red_ok)}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="baseline,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.md"))
    args = ap.parse_args()
    from deploycomp.bench.env import capture

    t0 = time.perf_counter()
    families = args.families.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploycomp-memory-") as tmp:
        work = Path(tmp)
        models = prepare(work, families)
        for batch in map(int, args.batches.split(",")):
            rows += measure(models, families, batch, args.repeats, work, lambda m: print(m, flush=True))
    seconds = time.perf_counter() - t0
    env = capture("cpu")
    text = report(rows, args, seconds, env)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
