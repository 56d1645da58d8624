"""CPU latency of pruned models with torch and ONNX Runtime -> benchmarks/results/bench_cpu.md (+ a summary .json).

Models: the shipped baseline (light_resnet18 on Fashion-MNIST, 28 px) and torchvision ResNet-50 at
224 px, each pruned layer-wise by weight magnitude (torch-pruning MetaPruner + MagnitudeImportance,
L2, classifier ignored) at 0 / 10 / 30 / 50 % of channels, with and without rounding the kept channel
counts to multiples of 8. Every model is timed by the deploycomp harness (``deploycomp.bench``) on
torch eager and on ONNX Runtime's CPU EP, at batch 1 and 8; the original is timed first and again
last in each group, so drift of the machine during the group shows up. Also: our torch timing
against ``torch.utils.benchmark`` on the same model and thread count.

Usage: python benchmarks/bench_cpu.py [--threads 1] [--workdir /tmp/deploycomp-bench] [--quick]
(ResNet-50 weights are random: latency does not depend on weight values, and no download is needed.)
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = [  # name, channel ratio pruned per layer, round_to
    ("original", 0.0, None),
    ("mag10", 0.1, None), ("mag10-r8", 0.1, 8),
    ("mag30", 0.3, None), ("mag30-r8", 0.3, 8),
    ("mag50", 0.5, None), ("mag50-r8", 0.5, 8),
]


def make_variants(source: str, tag: str, workdir: Path, input_size=None) -> list[dict]:
    """Prune ``source`` (zoo name or checkpoint) into each variant; save checkpoint and ONNX (cached)."""
    import torch
    import torch_pruning as tp

    from deploycomp import console
    from deploycomp.checkpoint import load_model
    from deploycomp.export import export_onnx
    from deploycomp.metrics import count_macs

    out = []
    for name, ratio, round_to in VARIANTS:
        pt, onnx = workdir / f"{tag}-{name}.pt", workdir / f"{tag}-{name}.onnx"
        if not (pt.exists() and onnx.exists()):
            ckpt = load_model(source, input_size=input_size)
            ckpt.source = None  # a new artifact, not an overwrite of the source
            x = torch.zeros(1, *ckpt.input_shape)
            if ratio:
                pruner = tp.pruner.MetaPruner(ckpt.model, x, importance=tp.importance.MagnitudeImportance(),
                                              pruning_ratio=ratio, round_to=round_to,
                                              ignored_layers=[ckpt.model.fc])
                pruner.step()
                ckpt.add_surgery("prune_channels", history=pruner.pruning_history())
                ckpt.add_lineage("prune", criterion="magnitude", ratio=ratio, round_to=round_to, tool="torch-pruning")
            ckpt.save(pt)
            console.info(f"{pt.name}: {count_macs(ckpt.model, x) / 1e9:.3f} GMACs")
            export_onnx(load_model(str(pt)), onnx, dynamic_batch=True, parity=False)
        out.append({"variant": name, "ratio": ratio, "round_to": round_to, "pt": str(pt), "onnx": str(onnx)})
    return out


def time_model(variants: list[dict], kind: str, threads: int, rounds: int, timing: dict) -> list[dict]:
    """Every variant on one backend at batch 1 and 8, ``rounds`` times round-robin; aggregated per variant.

    One harness call per round times all variants (the original first and again last, to show drift).
    Interleaving rounds spreads the load of a shared machine evenly over the variants; the published
    latency is the median of the per-round medians, and the spread of those medians is reported.
    """
    from deploycomp.bench import BenchConfig, benchmark

    paths = [v[kind] for v in variants + [variants[0]]]
    raw = []
    for rnd in range(rounds):
        cfg = BenchConfig(device="cpu", batches=(1, 8), threads=threads, **timing)
        for r in benchmark(paths, cfg):  # ordered by artifact, then batch
            r["round"] = rnd
            raw.append(r)
    return aggregate(raw)


def aggregate(raw: list[dict]) -> list[dict]:
    """Per-round harness results of one model and backend -> one row per variant and batch.

    Within a round the results come ordered by artifact, then batch, the artifacts being ``VARIANTS``
    and the original again.
    """
    per: dict[tuple[int, int], list[dict]] = {}
    for rnd in sorted({r["round"] for r in raw}):
        rs = [r for r in raw if r["round"] == rnd]
        n_batches = len({r["batch"] for r in rs})
        for k, r in enumerate(rs):
            per.setdefault((k // n_batches, r["batch"]), []).append(r)
    out = []
    for (i, _batch), rs in sorted(per.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name, ratio, round_to = VARIANTS[i] if i < len(VARIANTS) else ("original (again, last)", 0.0, None)
        medians = [r["latency_ms"]["median"] for r in rs]
        agg = dict(rs[0])
        agg.update({"variant": name, "ratio": ratio, "round_to": round_to, "rounds": len(rs),
                    "latency_median_ms": st.median(medians), "round_medians_ms": medians,
                    "round_spread_pct": 100 * (max(medians) - min(medians)) / st.median(medians),
                    "cov_pct_median": st.median(r["latency_ms"]["cov_pct"] for r in rs),
                    "round_cov_pct": [r["latency_ms"]["cov_pct"] for r in rs],
                    "iterations_total": sum(r["iterations"] for r in rs)})
        out.append(agg)
    for batch in sorted({a["batch"] for a in out}):  # speed-up and efficiency from the aggregated medians
        ref = next(a for a in out if a["batch"] == batch)
        for a in out:
            if a["batch"] == batch:
                a["speedup"] = ref["latency_median_ms"] / a["latency_median_ms"]
                a["macs_reduction"] = ref["macs"] / a["macs"] if ref.get("macs") and a.get("macs") else None
                a["speedup_efficiency"] = a["speedup"] / a["macs_reduction"] if a["macs_reduction"] else None
    return out


# What a row of the summary JSON keeps (the tables' numbers and what they were measured with); the
# per-round harness records (every percentile, the environment again with each result) are not kept.
SUMMARY_KEYS = ("model", "variant", "ratio", "round_to", "backend", "batch", "precision", "io", "threads", "macs",
                "params_total", "rounds", "iterations_total", "latency_median_ms", "round_medians_ms",
                "round_spread_pct", "cov_pct_median", "round_cov_pct", "speedup", "macs_reduction",
                "speedup_efficiency")


def _rounded(v, digits: int = 4):
    if isinstance(v, float):
        return round(v, digits)
    return [_rounded(x, digits) for x in v] if isinstance(v, list) else v


def summary(results: list[dict], agreement: list[dict] | None, meta: dict) -> dict:
    """The aggregated rows of the Markdown tables (CoV > 2.5 % is the harness's warning), the environment once."""
    return {"schema": "deploycomp.benchmarks.bench_cpu", "schema_version": 1, "meta": meta,
            "environment": results[0]["environment"], "agreement": agreement,
            "results": [{k: _rounded(r.get(k)) for k in SUMMARY_KEYS} for r in results]}


def torch_utils_agreement(source: str, threads: int, input_size=None, seconds: float = 2.0, rounds: int = 3) -> dict:
    """Median latency from deploycomp's harness and from torch.utils.benchmark on the same model.

    The two are interleaved (ours, theirs, ours, theirs, ...) so that a change of load on a shared
    machine affects both alike; the ratio is of the medians over the rounds.
    """
    import torch
    from torch.utils import benchmark as tub

    from deploycomp.bench import BenchConfig, benchmark
    from deploycomp.checkpoint import load_model

    ckpt = load_model(source, input_size=input_size)
    model = ckpt.model.eval()
    x = torch.randn(1, *ckpt.input_shape)

    def forward():
        with torch.inference_mode():
            return model(x)

    forward()
    ours, theirs = [], []
    for _ in range(rounds):
        (r,) = benchmark(source, BenchConfig(device="cpu", threads=threads, warmup=2, duration_s=seconds,
                                             input_size=input_size))
        ours.append(r["latency_ms"]["median"])
        timer = tub.Timer("forward()", globals={"forward": forward}, num_threads=threads)
        theirs.append(timer.blocked_autorange(min_run_time=seconds).median * 1e3)
    return {"model": ckpt.name, "threads": threads, "rounds": rounds, "deploycomp_round_medians_ms": ours,
            "torch_utils_round_medians_ms": theirs, "deploycomp_median_ms": st.median(ours),
            "torch_utils_benchmark_median_ms": st.median(theirs), "ratio": st.median(ours) / st.median(theirs),
            "round_ratios": [a / b for a, b in zip(ours, theirs, strict=True)]}


# --------------------------------------------------------------------------------------------------
# Markdown


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def model_table(results: list[dict], batch: int) -> list[str]:
    rows: dict[str, dict] = {}
    for r in results:
        if r["batch"] == batch:
            rows.setdefault(r["variant"], {})[r["backend"]] = r
    lines = [f"**batch {batch}**: median latency in ms (median of the per-round medians; in brackets: median CoV "
             "within a round / spread of the round medians)", "",
             "| variant | GMACs | MACs red. | torch ms | torch speed-up | torch eff. | ORT ms | ORT speed-up "
             "| ORT eff. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, by in rows.items():
        t, o = by.get("torch"), by.get("ort")
        any_r = t or o
        cells = [variant, _f(any_r["macs"] / 1e9, "{:.3f}"), _f(any_r["macs_reduction"])]
        for r in (t, o):
            if r is None:
                cells += ["-", "-", "-"]
                continue
            cells += [f"{r['latency_median_ms']:.2f} ({r['cov_pct_median']:.1f}% / {r['round_spread_pct']:.1f}%)",
                      _f(r["speedup"]), _f(r["speedup_efficiency"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _pruned(results):
    return [r for r in results if r["ratio"] and not r["variant"].startswith("original")]


def verdicts(results: list[dict]) -> list[str]:
    pruned = _pruned(results)
    slower = [r for r in pruned if r["speedup"] < 1.0]
    r8 = [r for r in slower if r["round_to"]]

    def name(r):
        return f"{r['model']} {r['variant']} on {r['backend']} batch {r['batch']} ({r['speedup']:.2f}x)"

    lines = [f"- **No pruned model slower than its original**: {len(pruned) - len(slower)} of {len(pruned)} pruned "
             "measurements are at least as fast as their original"
             + ("." if not slower else "; slower: " + ", ".join(map(name, slower)) + ".")
             + (" Among the variants rounded to 8: " + ("none slower." if not r8 else
                                                        ", ".join(map(name, r8)) + " slower."))]
    ort = [r for r in pruned if r["backend"] == "ort"]
    low = [r for r in ort if r["speedup_efficiency"] is not None and r["speedup_efficiency"] < 0.8]
    lines.append("- **Speed-up efficiency >= 0.8 on ONNX Runtime CPU**: "
                 + (f"met for all {len(ort)} pruned ORT measurements." if not low else
                    f"met for {len(ort) - len(low)} of {len(ort)} pruned ORT measurements; below 0.8: " + ", ".join(
                        f"{r['model']} {r['variant']} batch {r['batch']} ({r['speedup_efficiency']:.2f})"
                        for r in low) + "."))
    return lines


def drift_lines(results: list[dict]) -> list[str]:
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["backend"], r["batch"]), []).append(r)
    for (model, backend, batch), rs in groups.items():
        first, last = rs[0]["latency_median_ms"], rs[-1]["latency_median_ms"]
        out.append(f"| {model} | {backend} | {batch} | {first:.2f} | {last:.2f} | {100 * (last / first - 1):+.1f}% | "
                   f"{st.median(r['cov_pct_median'] for r in rs):.1f}% | "
                   f"{st.median(r['round_spread_pct'] for r in rs):.1f}% |")
    return ["| model | backend | batch | original first (ms) | original last (ms) | drift | median CoV | "
            "median round spread |", "|---|---|---:|---:|---:|---:|---:|---:|", *out, ""]


def write_markdown(path: Path, results: list[dict], agreement: list[dict], meta: dict) -> None:
    env = results[0]["environment"]
    lines = ["# CPU benchmark: pruned models on torch and ONNX Runtime", "",
             f"Generated by `{meta['command']}` in {meta['minutes']:.1f} min on {env['time_utc'][:10]}.", "",
             "## Machine and versions", "",
             f"- CPU: {env['cpu_model']}, {env['cpus_usable']} usable cores; load average (1/5/15 min) at start "
             f"{meta['load_start']}, at end {meta['load_end']}: the cores are shared with other work",
             f"- threads: {meta['threads']} (torch.set_num_threads / ORT intra_op_num_threads)",
             f"- torch {env['torch']}, torchvision {env['torchvision']}, onnxruntime {env['onnxruntime']} "
             f"(CPU EP, IO binding), Python {env['python']}, {env['os']}, deploycomp {env['deploycomp']}",
             f"- timing: deploycomp harness; per round and model: {meta['timing']}; {meta['rounds']} rounds "
             "round-robin over the variants; inputs on the device (`--io device`)",
             "- speed-up = original median / variant median (same backend, same batch); "
             "efficiency = speed-up / MACs reduction; MACs of one image, counted by torch-pruning", ""]
    for model in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == model]
        lines += [f"## {model}", ""]
        for batch in sorted({r["batch"] for r in rs}):
            lines += model_table(rs, batch)
    lines += ["## The bar (as measured, no noise allowance)", "", *verdicts(results), "",
              "## Drift and noise (the original timed first and again last in each round)", "",
              *drift_lines(results),
              "## Agreement with torch.utils.benchmark (batch 1, same model, same threads, interleaved rounds)", "",
              "| model | threads | torch.utils.benchmark median ms | deploycomp median ms | ratio (ours / theirs) | "
              "per-round ratios |", "|---|---:|---:|---:|---:|---|"]
    for a in agreement:
        lines.append(f"| {a['model']} | {a['threads']} | {a['torch_utils_benchmark_median_ms']:.3f} "
                     f"| {a['deploycomp_median_ms']:.3f} | {a['ratio']:.3f} | "
                     + ", ".join(f"{x:.3f}" for x in a["round_ratios"]) + " |")
    lines += ["", f"The numbers of these tables, per variant, backend and batch (with the median and CoV of every "
              f"round): `{path.with_suffix('.json').name}` beside this file.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/deploycomp-bench")
    ap.add_argument("--quick", action="store_true", help="few iterations (a smoke test, not a result)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_cpu.md"))
    args = ap.parse_args()

    from deploycomp import console
    from deploycomp.checkpoint import default_model

    start, load_start = time.time(), " / ".join(f"{x:.1f}" for x in os.getloadavg())
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    baseline = default_model()
    base_source = baseline if Path(baseline).exists() else None
    if base_source is None:
        console.warn(f"{baseline} not found: using a freshly initialised light_resnet18 (same shape and cost)")
    models = {
        "light_resnet18_fmnist" if base_source else "light_resnet18 (fresh, 1x28x28)": (
            make_variants(base_source, "baseline", workdir) if base_source else
            make_variants_fresh(workdir)),
        "resnet50 (224 px)": make_variants("resnet50", "resnet50", workdir),
    }
    # batch 1 and 8 in one harness call: at least `iters` iterations AND at least `duration_s` seconds,
    # so fast batch-1 runs get many iterations and slow batch-8 runs a few seconds' worth.
    timing = {"warmup": 2, "warmup_ms": 300.0, "iters": 4, "duration_s": 2.0}
    rounds = 3
    if args.quick:
        timing, rounds = {"warmup": 1, "warmup_ms": 0.0, "iters": 2, "duration_s": 0.2}, 1
    results = []
    for model, variants in models.items():
        for kind, backend in (("pt", "torch"), ("onnx", "ort")):
            console.info(f"== {model}: {backend}, batch 1 and 8, {rounds} rounds")
            agg = time_model(variants, kind, args.threads, rounds, timing)
            for r in agg:
                r["model"] = model
            results += agg
    agreement = [torch_utils_agreement(base_source or str(workdir / "light_resnet18-fresh.pt"), args.threads,
                                       seconds=0.5 if args.quick else 2.0, rounds=1 if args.quick else 3),
                 torch_utils_agreement("resnet50", args.threads, seconds=0.5 if args.quick else 3.0,
                                       rounds=1 if args.quick else 3)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/bench_cpu.py" + (" --quick" if args.quick else "")
                       + f" --threads {args.threads}",
            "minutes": (time.time() - start) / 60, "threads": args.threads, "rounds": rounds,
            "load_start": load_start, "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "timing": f"warmup >= {timing['warmup']} iterations and >= {timing['warmup_ms']:.0f} ms, then >= "
                      f"{timing['iters']} timed iterations and >= {timing['duration_s']} s"}
    from deploycomp.files import write_json

    write_markdown(out, results, agreement, meta)
    write_json(out.with_suffix(".json"), summary(results, agreement, meta))
    print(json.dumps(agreement, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def make_variants_fresh(workdir: Path) -> list[dict]:
    """The baseline's architecture with fresh weights (when the shipped checkpoint is not there)."""
    from deploycomp.checkpoint import load_model

    src = workdir / "light_resnet18-fresh.pt"
    if not src.exists():
        load_model("light_resnet18", in_channels=1, num_classes=10, input_size=(28, 28)).save(src)
    return make_variants(str(src), "baseline-fresh", workdir)


if __name__ == "__main__":
    main()
