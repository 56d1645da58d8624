"""One table per task study (segmentation, detection): run a recipe through every stage, then render it.

    python benchmarks/segmentation.py | benchmarks/detection.py          # run the recipe, then render
    python benchmarks/detection.py --run-dir RUN --no-run                # render an existing run only

Per study (model) and variant: parameters and MACs before/after pruning, the task's headline metric
before pruning (the original), right after pruning and after fine-tuning, the ONNX Runtime CPU speed-up
of the pruned FP32 model against the original (paired, 95 % interval across sessions), and INT8: its
speed-up against the same model's FP32 and its metric change.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Table:
    name: str  # the recipe's and the result's stem: benchmarks/recipes/NAME.yaml -> benchmarks/results/NAME.md
    title: str
    data: str  # one sentence: the data and what the metric is computed on
    label: str  # the metric's words in column heads ("mIoU", "mAP")


def _f(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def _speedup(r) -> str:
    if not r or r.get("speedup") is None:
        return "-"
    ci = r.get("speedup_ci95")
    return f"{r['speedup']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r['speedup']:.2f}"


def _vs_fp32(r) -> str:
    if not r or r.get("speedup_vs_fp32") is None:
        return "-"
    ci = r.get("speedup_vs_fp32_ci95")
    return f"{r['speedup_vs_fp32']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r['speedup_vs_fp32']:.2f}"


def _int8_speedup(lat, variant, batch):
    """INT8 against the same variant's FP32 on ORT: the ratio of the compound speed-ups against the
    original FP32 (both paired with it in the same sessions), with the INT8 row's interval scaled alike."""
    fp32 = _row(lat, variant, "fp32", batch)
    int8 = _row(lat, variant, "int8", batch)
    if not fp32 or not int8 or int8.get("speedup_vs_fp32") is None:
        return "-"
    base = fp32.get("speedup_vs_fp32") or 1.0
    ci = int8.get("speedup_vs_fp32_ci95")
    point = int8["speedup_vs_fp32"] / base
    return f"{point:.2f} [{ci[0] / base:.2f}, {ci[1] / base:.2f}]" if ci else f"{point:.2f}"


def _row(lat, variant, precision, batch, backend="ort"):
    return next((r for r in lat if r["variant"] == variant and r["precision"] == precision and r["batch"] == batch
                 and r["backend"] == backend and r["format"] == "onnx"), None)


def render(table: Table, run_dir: Path, command: str, wall: float | None) -> str:
    report = json.loads((run_dir / "report.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    env = run.get("environment") or {}
    lines = [f"# {table.title}", "",
             f"Command: `{command}`" + (f" ({wall / 60:.1f} min)" if wall else "")
             + f"; the run's wall time {run.get('wall_s', 0):.0f} s for "
             f"{run.get('stages_run')} stages. Machine: {env.get('cpu_model')}, {env.get('cpus_usable')} CPUs, "
             f"torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}; {run.get('finished_utc')}.", "",
             f"{table.data} Speed-ups: ONNX Runtime CPU, one thread, paired against the original FP32 in the same "
             "sessions, 95 % interval across 5 sessions (fresh processes) plus the run-to-run term. INT8: `ort-cpu` "
             "Q/DQ; its speed-up is against "
             f"the same model's FP32 and its {table.label} change against the same model's FP32 ONNX.", ""]
    head = ["model", "variant", "params M", "MMACs", f"{table.label} before pruning %", "right after %", "after FT %",
            "ORT fp32 speed-up b1", "ORT fp32 speed-up b8", "INT8 vs FP32 b1", f"INT8 {table.label} change (pts)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["studies"]:
        rows, lat = s["rows"], s["latency"]
        m = s["metric"]
        stem = m.removesuffix("_pct")
        original = rows[0]
        for r in rows:
            fp32 = [x for x in lat if x["variant"] == r["variant"] and x["precision"] == "fp32"
                    and x["format"] == "onnx"]
            int8_b1 = _row(lat, r["variant"], "int8", 1)
            fp32_b1 = _row(lat, r["variant"], "fp32", 1)
            change = int8_b1[m] - fp32_b1[m] if int8_b1 and fp32_b1 and None not in (int8_b1[m], fp32_b1[m]) \
                else None
            right_after, after_ft = r.get(f"{stem}_before_finetune_pct"), r[m]
            if r is not original and right_after is None:  # pruned without fine-tuning: its metric is right after
                right_after, after_ft = r[m], None
            lines.append("| " + " | ".join([
                s["name"], r["variant"], _f(r.get("params_m"), ".3f"), _f(r.get("macs_m"), ".1f"),
                _f(original[m]), _f(right_after) if r is not original else "-",
                _f(after_ft) if r is not original else "-",
                *[_speedup(next((x for x in fp32 if x["batch"] == b), None)) if r is not original
                  else ("1.00" if any(x["batch"] == b for x in fp32) else "-") for b in (1, 8)],
                _int8_speedup(lat, r["variant"], 1), _f(change, "+.2f")]) + " |")
    lines += ["", f"Scale: {(report['studies'][0].get('scale') or '').strip()}", ""]
    for s in report["studies"]:
        if s.get("description") and s["description"].strip() != (report.get("description") or "").strip():
            lines.append(f"- **{s['name']}**: {s['description'].strip()}")
    lines += ["", "The full per-artifact tables (every backend, precision and batch, memory where measured) are in the "
              "run's report.md (`deploycomp report RUN_DIR`).", ""]
    return "\n".join(lines)


def main(table: Table) -> int:
    ap = argparse.ArgumentParser(description=f"{table.title}: run benchmarks/recipes/{table.name}.yaml, render it")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / table.name)
    ap.add_argument("--no-run", action="store_true", help="render an existing run only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"{table.name}.md")
    ap.add_argument("--recipe", type=Path, default=ROOT / "benchmarks" / "recipes" / f"{table.name}.yaml")
    args = ap.parse_args()
    recipe = args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe
    command = f"deploycomp pipeline {recipe} -o {args.run_dir}"
    wall = None
    if not args.no_run:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "deploycomp", "pipeline", str(args.recipe), "-o", str(args.run_dir)],
                       check=True)
        wall = time.perf_counter() - t
    args.out.write_text(render(table, args.run_dir, command, wall))
    print(f"wrote {args.out}")
    return 0
