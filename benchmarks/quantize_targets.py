"""INT8 for the backend it is made for: FP32 vs INT8 (tensorrt and ort-cpu targets) on ONNX Runtime CPU
-> benchmarks/results/quantize_targets.md (+ .json).

Models: the shipped baseline (light_resnet18 on Fashion-MNIST, 28 px; calibrated on the training split,
top-1 on the test split) and torchvision ResNet-18 / ResNet-50 at 224 px (random weights, exported with
`deploycomp export --data synthetic`, calibrated on synthetic images: latency does not depend on weight
values and no download is needed; their accuracy means nothing and is not reported). Each model is
exported once and quantized with `deploycomp quantize -p int8 --target T` for every target; the FP32
model and its INT8 variants are timed together by ``deploycomp.bench.benchmark`` on ONNX Runtime's CPU
provider at batch 1 and 8 (speed-up against FP32 with its 95 % interval and verdict where the harness
gives them). A second table checks each calibration method on the baseline (top-1 FP32 vs INT8).
Ablations (``--ablations``, on by default) time what ``ort-cpu`` chose against: S8S8 Q/DQ (int8
activations, ONNX Runtime's documented default) and U8S8 in QOperator format (QLinearConv, ...), each
made by the same ``quantize_onnx`` with the ``ort-cpu`` target changed in that one setting.

Usage: python benchmarks/quantize_targets.py [--threads 1] [--workdir /tmp/deploycomp-qt]
       [--models baseline,resnet18,resnet50] [--calib-methods minmax,entropy,percentile] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("tensorrt", "ort-cpu")
ABLATIONS = {"ort-cpu-s8s8": {"activations": "int8"}, "ort-cpu-qoperator": {"quant_format": "QOperator"}}
MODELS = {  # name -> deploycomp export arguments
    "baseline": [],  # the shipped checkpoint (the default --model), Fashion-MNIST metadata
    "resnet18": ["--model", "resnet18", "--data", "synthetic"],
    "resnet50": ["--model", "resnet50", "--data", "synthetic"],
}
GOAL_SPEEDUP = 2.0  # INT8 ort-cpu vs FP32 on ResNet-18/50
GOAL_TOP1_POINTS = 0.5  # INT8 ort-cpu top-1 within this of FP32 on the baseline


def deploycomp(*args: str) -> dict:
    """Run ``deploycomp ARGS --json`` in a subprocess (the same code path as a user); returns its JSON."""
    cmd = [sys.executable, "-m", "deploycomp", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)


def export(model: str, workdir: Path, input_size: int) -> Path:
    out = workdir / f"{model}-{input_size}.onnx" if model != "baseline" else workdir / "baseline.onnx"
    if not out.exists():
        size = ["--input-size", str(input_size)] if model != "baseline" else []
        deploycomp("export", *MODELS[model], *size, "--dynamic-batch", "-o", str(out))
    return out


def quantize(src: Path, target: str, method: str, calib_samples: int, eval_samples: int | None) -> dict:
    out = src.with_name(f"{src.stem}.int8-{target}-{method}.onnx")
    synthetic = json.loads(Path(f"{src}.json").read_text()).get("dataset") == "synthetic"
    evaluation = ["--no-eval"] if synthetic else (["--eval-samples", str(eval_samples)] if eval_samples else [])
    return deploycomp("quantize", str(src), "-p", "int8", "--target", target, "--calib-method", method,
                      "--calib-samples", str(calib_samples), *evaluation, "-o", str(out))


def register_ablations() -> None:
    """The ort-cpu target with one setting changed, as extra targets of this process only."""
    import dataclasses

    from deploycomp.quantize import INT8_TARGETS

    base = INT8_TARGETS.get("ort-cpu")
    for name, change in ABLATIONS.items():
        if name not in INT8_TARGETS:
            INT8_TARGETS.register(name, dataclasses.replace(base, name=name, **change))


def quantize_ablation(src: Path, name: str, method: str, calib_samples: int, eval_samples: int | None) -> dict:
    """In this process (the ablation targets exist only here), with the same options as :func:`quantize`."""
    from deploycomp import console
    from deploycomp.quantize import quantize_onnx

    console.set_verbosity(console.QUIET)
    synthetic = json.loads(Path(f"{src}.json").read_text()).get("dataset") == "synthetic"
    return quantize_onnx(src, src.with_name(f"{src.stem}.int8-{name}-{method}.onnx"), precision="int8", target=name,
                         calib_method=method, calib_samples=calib_samples, eval_samples=eval_samples,
                         evaluate=not synthetic)


def time_variants(paths: list[Path], threads: int, quick: bool) -> list[dict]:
    """FP32 first, then each INT8 variant: ORT CPU, batch 1 and 8, in one benchmark() call."""
    from deploycomp.bench import BenchConfig, benchmark

    timing = {"warmup": 1, "warmup_ms": 0.0, "iters": 10, "duration_s": 0.1, "rounds": 5} if quick else \
        {"warmup": 3, "warmup_ms": 300.0, "iters": 40, "duration_s": 6.0, "rounds": 20}
    timing = {k: v for k, v in timing.items() if k in BenchConfig.__dataclass_fields__}  # older harness: no rounds
    cfg = BenchConfig(backend="ort", device="cpu", batches=(1, 8), threads=threads, **timing)
    return benchmark([str(p) for p in paths], cfg)


# --------------------------------------------------------------------------------------------------
# Markdown


def _change(acc: dict) -> str:
    return f"{0.0 - acc['top1_drop_points']:+.2f}".replace("-0.00", "+0.00")


def _ci(r: dict) -> str:
    ci = r.get("speedup_ci95")
    return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"


def speed_table(rows: list[dict]) -> list[str]:
    lines = ["| model | batch | variant | median ms | speed-up vs FP32 | 95 % interval | verdict | top-1 % "
             "(FP32 -> INT8) |", "|---|---:|---|---:|---:|---|---|---|"]
    for r in rows:
        acc = r.get("accuracy")
        top1 = f"{acc['fp32_top1_pct']:.2f} -> {acc['top1_pct']:.2f} ({_change(acc)})" if acc \
            else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['latency_ms']['median']:.3f} | "
                     f"{r['speedup']:.2f}x | {_ci(r)} | {r.get('verdict') or '-'} | {top1} |")
    return lines + [""]


def calibration_table(cal: list[dict]) -> list[str]:
    lines = ["| target | calibration | FP32 top-1 % | INT8 top-1 % | change (points) | same predictions % |",
             "|---|---|---:|---:|---:|---:|"]
    for c in cal:
        a = c["accuracy"]
        lines.append(f"| {c['target']} | {c['method']} | {a['fp32_top1_pct']:.2f} | {a['top1_pct']:.2f} | "
                     f"{_change(a)} | {a['prediction_agreement_pct']:.2f} |")
    return lines + [""]


def goal_lines(rows: list[dict]) -> list[str]:
    ort = [r for r in rows if r["variant"] == "int8 ort-cpu"]
    big = [r for r in ort if r["model"] != "baseline"]
    base = [r for r in ort if r["model"] == "baseline"]

    def slower(r):
        return r.get("verdict") == "slower" if r.get("verdict") else r["speedup"] < 1.0

    def name(r):
        return f"{r['model']} batch {r['batch']} {r['speedup']:.2f}x"

    short = [r for r in big if r["speedup"] < GOAL_SPEEDUP]
    lines = [f"- INT8 ort-cpu at least {GOAL_SPEEDUP:g}x faster than FP32 on ResNet-18/50: "
             + ("not measured (models not run)" if not big else
                ("met: " if not short else "NOT met: ") + ", ".join(map(name, big)))]
    lost = [r for r in base if slower(r)]
    verdict = "not measured" if not base else ("met: " if not lost else "NOT met: ") + ", ".join(map(name, base))
    lines.append(f"- INT8 ort-cpu never slower than FP32 on the baseline: {verdict}")
    acc = next((r["accuracy"] for r in base if r.get("accuracy")), None)
    if acc:
        ok = acc["top1_drop_points"] <= GOAL_TOP1_POINTS
        lines.append(f"- INT8 ort-cpu loses at most {GOAL_TOP1_POINTS} points of FP32 top-1 on the baseline: "
                     f"{'met' if ok else 'NOT met'} ({acc['fp32_top1_pct']:.2f}% -> {acc['top1_pct']:.2f}%, "
                     f"{acc['samples']:,} test images)")
    return lines


def write_markdown(path: Path, rows: list[dict], cal: list[dict], meta: dict) -> None:
    env = rows[0].get("environment", {}) if rows else {}
    interleaved = any(r.get("speedup_ci95") for r in rows)
    lines = ["# INT8 targets on ONNX Runtime CPU: tensorrt vs ort-cpu against FP32", "",
             f"Generated by `{meta['command']}` in {meta['minutes']:.1f} min on {env.get('time_utc', '?')[:10]}.", "",
             "## Machine and versions", "",
             f"- CPU: {env.get('cpu_model', '?')}, {env.get('cpus_usable', '?')} usable cores; 8-bit dot product "
             f"(AVX512-VNNI / AVX-VNNI / AMX): {meta['vnni']}; load average (1/5/15 min) at start "
             f"{meta['load_start']}, at end {meta['load_end']}",
             f"- threads: {meta['threads']} (ORT intra_op_num_threads); onnxruntime {env.get('onnxruntime', '?')}, "
             f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}, deploycomp {env.get('deploycomp', '?')}",
             f"- timing: `deploycomp.bench.benchmark([fp32, int8 tensorrt, int8 ort-cpu], BenchConfig(backend='ort', "
             f"device='cpu', batches=(1, 8), threads={meta['threads']}))`, {meta['timing']}; "
             + ("the variants timed in alternation, speed-up with its 95 % interval and verdict from the harness"
                if interleaved else "the variants timed one after the other (this harness gives no interval: "
                                    "the speed-up is the ratio of medians)"),
             f"- quantization: `deploycomp quantize MODEL.onnx -p int8 --target T --calib-method M --calib-samples N`; "
             f"calibration on {meta['calib_samples']} images of the training split (baseline) or "
             f"{meta['resnet_calib_samples']} synthetic images (ResNets: random weights, {meta['input_size']} px); "
             f"top-1 on {meta['eval_desc']} of the Fashion-MNIST test split",
             "- targets: `tensorrt` = symmetric INT8 Q/DQ on the inputs of Conv/Gemm only, FP32 bias, first conv "
             "and classifier in float (what TensorRT fuses); `ort-cpu` = U8S8 Q/DQ on every layer ONNX Runtime has "
             "an integer kernel for, INT32 bias" + (", 7-bit weights (no VNNI)" if meta["reduce_range"] else "")
             + "; ablations: `ort-cpu-s8s8` = the same with int8 activations, `ort-cpu-qoperator` = the same in "
               "QOperator format (QLinearConv, ...)", "",
             f"## Speed on ONNX Runtime CPU (calibration: {meta['default_method']})", "", *speed_table(rows),
             "## Goals (as measured, no noise allowance)", "", *goal_lines(rows), ""]
    if cal:
        lines += ["## Calibration methods on the baseline (top-1, same test images for FP32 and INT8)", "",
                  *calibration_table(cal)]
    lines += ["Raw results (the `deploycomp bench --json` schema plus model and variant, and the quantize sidecars): "
              f"`{path.with_suffix('.json').name}` beside this file.", ""]
    path.write_text("\n".join(lines))


def compact(record: dict) -> dict:
    """What the JSON keeps: the environment once, no round orders, no 1,000 class names per sidecar."""
    results = record["results"]
    env = next((r.get("environment") for r in results if r.get("environment")), None)
    for r in results:
        r.pop("environment", None)
        (r.get("conditions") or {}).pop("order", None)
    for per_target in record["quantize_sidecars"].values():
        for side in per_target.values():
            side.pop("class_names", None)
    return {"environment": env, **record}


def main() -> None:
    from deploycomp.quantize import has_vnni, reduce_range_without_vnni

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/deploycomp-qt")
    ap.add_argument("--models", default="baseline,resnet18,resnet50")
    ap.add_argument("--input-size", type=int, default=224, help="ResNet input size in pixels")
    ap.add_argument("--calib-methods", default="minmax,entropy,percentile",
                    help="checked on the baseline; the first one is used for the speed table")
    ap.add_argument("--calib-samples", type=int, default=512, help="baseline calibration images")
    ap.add_argument("--resnet-calib-samples", type=int, default=128,
                    help="synthetic calibration images for the ResNets (their accuracy is not measured)")
    ap.add_argument("--eval-samples", type=int, default=None, help="test images for top-1 (default: all 10,000)")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                    help="also time ort-cpu with S8S8 activations and in QOperator format")
    ap.add_argument("--quick", action="store_true", help="few iterations (a smoke test, not a result)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize_targets.md"))
    args = ap.parse_args()

    start, load_start = time.time(), " / ".join(f"{x:.1f}" for x in os.getloadavg())
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    methods = args.calib_methods.split(",")
    models = args.models.split(",")
    rows, raw, sidecars, cal = [], [], {}, []
    for model in models:
        src = export(model, workdir, args.input_size)
        n = args.calib_samples if model == "baseline" else args.resnet_calib_samples
        records = {t: quantize(src, t, methods[0], n, args.eval_samples) for t in TARGETS}
        if args.ablations:
            register_ablations()
            records.update({a: quantize_ablation(src, a, methods[0], n, args.eval_samples) for a in ABLATIONS})
        if model == "baseline":
            for t in TARGETS:
                for m in methods:
                    rec = records[t] if m == methods[0] else quantize(src, t, m, args.calib_samples,
                                                                       args.eval_samples)
                    cal.append({"target": t, "method": m, "accuracy": rec["accuracy"]})
        print(f"== {model}: timing FP32 and INT8 {', '.join(records)} on ORT CPU", flush=True)
        results = time_variants([src, *(Path(rec["output"]) for rec in records.values())], args.threads, args.quick)
        names = {str(src): "fp32", **{rec["output"]: f"int8 {t}" for t, rec in records.items()}}
        for r in results:
            r["model"], r["variant"] = model, names[r["artifact"]]
            r["accuracy"] = next((rec.get("accuracy") for t, rec in records.items() if f"int8 {t}" == r["variant"]),
                                 None)
        rows += results
        raw += results
        sidecars[model] = records
    rows.sort(key=lambda r: (models.index(r["model"]), r["batch"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/quantize_targets.py " + " ".join(sys.argv[1:])
    (out.with_suffix(".json")).write_text(json.dumps(compact({"command": cmd.strip(), "results": raw,
                                                              "quantize_sidecars": sidecars, "calibration": cal}),
                                                     default=str))
    timing = "warmup 1 iteration, >= 10 iterations and >= 0.1 s in 5 rounds (--quick: a smoke test, not a result)" \
        if args.quick else ("warmup >= 3 iterations and >= 300 ms, then >= 40 iterations and >= 6 s per artifact and "
                            "batch, shared by 20 rounds")
    meta = {"command": cmd.strip(), "minutes": (time.time() - start) / 60, "threads": args.threads,
            "load_start": load_start, "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "vnni": {True: "yes", False: "no", None: "unknown"}[has_vnni()],
            "reduce_range": reduce_range_without_vnni(),
            "timing": timing, "calib_samples": args.calib_samples,
            "resnet_calib_samples": args.resnet_calib_samples, "input_size": args.input_size,
            "eval_desc": f"{args.eval_samples:,} images" if args.eval_samples else "all 10,000 images",
            "default_method": methods[0]}
    write_markdown(out, rows, cal, meta)
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
