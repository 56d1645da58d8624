"""How often does `deploycomp bench` misjudge a comparison? A/A and A/B runs of the real command (issue 11).

(a) A/A: the shipped baseline against a byte-identical copy of itself (ONNX on ONNX Runtime, checkpoint on
    torch), `--reps` repetitions of a default `deploycomp bench A COPY` (each a fresh process): how many
    verdicts say faster or slower (goal: at most 1 of 20). The old, sequential method (each model timed once,
    one after the other: `--rounds 1`, which is what `bench` did before) runs in the same repetitions, in
    alternating order with the new one; its "verdicts" are the speed-ups a reader would act on (beyond +-2 %,
    the new verdict's margin, and beyond +-5 %).
(b) A/B: torchvision ResNet-50 (224 px, random weights: speed only) against it pruned 50 % by magnitude,
    channels rounded to 8: verdict `faster` in every repetition? interval widths.
(c) the wall time of a default 2-artifact `deploycomp bench` (the whole command, imports included).

    python benchmarks/bench_ab.py --reps 20 --out benchmarks/results/bench_ab.md

Run it on an idle machine: it records the load average and the CPU time other processes used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARGINS = (2.0, 5.0)


def prepare(work: Path) -> dict[str, tuple[str, str]]:
    """The artifact pairs: name -> (A, B) paths."""
    import torch

    from deploycomp import console
    from deploycomp.checkpoint import default_model, load_model
    from deploycomp.export import export_onnx
    from deploycomp.prune import prune_channels
    from deploycomp.prune.criteria import get_criterion

    console.set_verbosity(console.QUIET)
    base = Path(default_model())
    shutil.copyfile(base, work / "baseline.pt")
    shutil.copyfile(base, work / "copy.pt")  # byte-identical
    export_onnx(load_model(str(base)), work / "baseline.onnx", dynamic_batch=True, parity=False)
    shutil.copyfile(work / "baseline.onnx", work / "copy.onnx")  # byte-identical (no sidecar: label "copy")

    r50 = load_model("resnet50", input_size=(224, 224))
    r50.save(work / "resnet50.pt")
    pruned = load_model(str(work / "resnet50.pt"))
    x = torch.zeros(1, 3, 224, 224)
    with torch.enable_grad():
        history = prune_channels(pruned.model, x, get_criterion("magnitude")(), 0.5, round_to=8)
    pruned.add_surgery("prune_channels", history=history)
    pruned.source = None
    pruned.save(work / "resnet50-mag50.pt")
    for name in ("resnet50", "resnet50-mag50"):
        export_onnx(load_model(str(work / f"{name}.pt")), work / f"{name}.onnx", dynamic_batch=True, parity=False)
    for p in work.glob("*"):
        assert p.is_file() and p.stat().st_size > 0, p
    assert (work / "baseline.onnx").read_bytes() == (work / "copy.onnx").read_bytes()
    return {"A/A ort": (str(work / "baseline.onnx"), str(work / "copy.onnx")),
            "A/A torch": (str(work / "baseline.pt"), str(work / "copy.pt")),
            "A/B ort": (str(work / "resnet50.onnx"), str(work / "resnet50-mag50.onnx")),
            "A/B torch": (str(work / "resnet50.pt"), str(work / "resnet50-mag50.pt"))}


def bench(a: str, b: str, extra: list[str], out: Path) -> dict:
    """One `deploycomp bench A B` in a fresh process; its JSON, the second row, and the wall time."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deploycomp", "-q", "bench", a, b, *extra, "--json", str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"deploycomp bench failed: {proc.stderr.strip()[-500:]}")
    ref, row = json.loads(out.read_text())["results"]
    return {"speedup": row["speedup"], "ci": row["speedup_ci95"], "verdict": row["verdict"], "wall_s": wall,
            "ref_median_ms": ref["latency_ms"]["median"], "median_ms": row["latency_ms"]["median"],
            # the round order is in bench's own JSON; here it would be most of the file
            "conditions": {k: v for k, v in (ref.get("conditions") or {}).items() if k != "order"},
            "warnings": ref["warnings"] + row["warnings"],
            "threads": row.get("threads")}


def sequential_reading(speedup: float, margin_pct: float) -> str:
    """What a reader of the old table concludes from a bare speed-up."""
    if speedup >= 1 + margin_pct / 100:
        return "faster"
    if speedup <= 1 / (1 + margin_pct / 100):
        return "slower"
    return "same"


def run(pairs: dict[str, tuple[str, str]], reps: int, work: Path, log) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in pairs}
    for i in range(reps):
        for name, (a, b) in pairs.items():
            new_first = i % 2 == 0  # alternate which method runs first in a repetition
            methods = [("new", []), ("old", ["--rounds", "1"])]
            rec = {}
            for method, extra in (methods if new_first else methods[::-1]):
                rec[method] = bench(a, b, extra, work / "out.json")
            out[name].append(rec)
            log(f"[{i + 1}/{reps}] {name}: new {rec['new']['speedup']:.3f} {rec['new']['ci']} {rec['new']['verdict']}"
                f" ({rec['new']['wall_s']:.1f} s); old {rec['old']['speedup']:.3f}; other CPU "
                f"{rec['new']['conditions'].get('other_cpu_pct')} %")
    return out


def report(results: dict[str, list[dict]], args, env: dict, seconds: float) -> str:
    lines = ["# Paired comparisons: A/A and A/B runs of `deploycomp bench` (issue 11)", "",
             f"Command: `python benchmarks/bench_ab.py --reps {args.reps}` ({seconds / 60:.1f} min). Each repetition "
             "is a fresh `deploycomp bench A B` process with default options (20 interleaved rounds, >= 1 s per "
             "model, the library's default threads), plus the old sequential method (`--rounds 1`: each model "
             "timed once, one after the other, as `bench` did before) in the same repetition, the two methods in "
             "alternating order.", "",
             f"Machine: {env['cpu_model']}, {env['cpus_usable']} usable CPUs, torch {env['torch']}, onnxruntime "
             f"{env['onnxruntime']}, deploycomp {env['deploycomp']}; {env['time_utc']}.", ""]
    others = [r["new"]["conditions"].get("other_cpu_pct") for rs in results.values() for r in rs]
    others = [o for o in others if o is not None]
    loads = [r["new"]["conditions"].get("load_avg_1m_before") for rs in results.values() for r in rs]
    loads = [x for x in loads if x is not None]
    if others:
        lines += [f"Load while measuring: other processes used {min(others):.0f}-{max(others):.0f} % of the CPUs "
                  f"(median {st.median(others):.0f} %); 1-minute load average {min(loads):.2f}-{max(loads):.2f} "
                  "before each bench (it includes the previous repetition's own work).", ""]
    lines += ["## Verdicts", "",
              "| pair | backend | new: faster / same / slower | new: speed-up range | new: median interval width | "
              "old: speed-up range | old: read as faster/slower (>2 % / >5 %) |",
              "|---|---|---|---|---:|---|---|"]
    for name, rs in results.items():
        kind, backend = name.split()
        new = [r["new"] for r in rs]
        old = [r["old"] for r in rs]
        counts = "/".join(str(sum(r["verdict"] == v for r in new)) for v in ("faster", "same", "slower"))
        widths = [r["ci"][1] - r["ci"][0] for r in new if r["ci"]]
        wrong = []
        for m in MARGINS:
            readings = [sequential_reading(r["speedup"], m) for r in old]
            expected = "same" if kind == "A/A" else "faster"
            wrong.append(sum(x != expected for x in readings))
        lines.append(f"| {kind} | {backend} | {counts} | {min(r['speedup'] for r in new):.3f}-"
                     f"{max(r['speedup'] for r in new):.3f} | {st.median(widths):.3f} | "
                     f"{min(r['speedup'] for r in old):.3f}-{max(r['speedup'] for r in old):.3f} | "
                     f"{wrong[0]} / {wrong[1]} of {len(old)} wrong |")
    walls = [r["new"]["wall_s"] for name, rs in results.items() if name.startswith("A/A") for r in rs]
    walls_b = [r["new"]["wall_s"] for name, rs in results.items() if name.startswith("A/B") for r in rs]
    lines += ["", "## Wall time of a default two-model `deploycomp bench` (whole command, imports included)", "",
              f"- baseline A/A (about 1 ms per image): median {st.median(walls):.1f} s (range {min(walls):.1f}-"
              f"{max(walls):.1f} s)",
              f"- ResNet-50 A/B (224 px): median {st.median(walls_b):.1f} s (range {min(walls_b):.1f}-"
              f"{max(walls_b):.1f} s)", "",
              *warning_summary(results), "",
              "## Every repetition", "",
              "| pair | rep | new speed-up [95 % interval] | verdict | old speed-up | other CPU % | warnings |",
              "|---|---:|---|---|---:|---:|---:|"]
    for name, rs in results.items():
        for i, r in enumerate(rs, 1):
            n = r["new"]
            ci = f"[{n['ci'][0]:.3f}, {n['ci'][1]:.3f}]" if n["ci"] else "-"
            lines.append(f"| {name} | {i} | {n['speedup']:.3f} {ci} | {n['verdict']} | {r['old']['speedup']:.3f} | "
                         f"{n['conditions'].get('other_cpu_pct')} | {len(n['warnings'])} |")
    return "\n".join(lines) + "\n"


def warning_summary(results: dict[str, list[dict]]) -> list[str]:
    """How many of the new method's runs carried each kind of warning (its text up to the first colon)."""
    kinds: dict[str, int] = {}
    for rs in results.values():
        for r in rs:
            for w in {re.sub(r"within \d+%.*", "within more than 5 %", w.split(":")[0]) for w in r["new"]["warnings"]}:
                kinds[w] = kinds.get(w, 0) + 1
    total = sum(len(rs) for rs in results.values())
    drifts = sorted(round(r["new"]["conditions"]["drift_pct"]) for rs in results.values() for r in rs
                    if r["new"]["conditions"].get("drift_pct") is not None)
    lines = ["## Warnings of the new method", "", f"Runs (of {total}) with each kind of warning:", ""]
    lines += [f"- {n}: {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])] or ["- none"]
    if drifts:
        lines += ["", f"The reference's drift (`conditions.drift_pct`) over the runs: {drifts[0]} % to {drifts[-1]} % "
                  f"(median {st.median(drifts):.0f} %)."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--pairs", default="A/A ort,A/A torch,A/B ort,A/B torch",
                    help="comma-separated subset of the pairs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_ab.md"))
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite the report from a recorded JSON (this script's) to --out")
    args = ap.parse_args()
    if args.render:
        rec = json.loads(Path(args.render).read_text())
        args.reps = rec["reps"]
        Path(args.out).write_text(report(rec["results"], args, rec["environment"], rec["seconds"]))
        return

    from deploycomp.bench.env import capture

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        pairs = prepare(work)
        wanted = [p.strip() for p in args.pairs.split(",")]
        pairs = {k: v for k, v in pairs.items() if k in wanted}
        results = run(pairs, args.reps, work, lambda m: print(m, flush=True))
    env, seconds = capture("cpu"), time.perf_counter() - t0
    text = report(results, args, env, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    keep = {k: env.get(k) for k in ("cpu_model", "cpus_usable", "torch", "onnxruntime", "deploycomp", "time_utc")}
    out.with_suffix(".json").write_text(json.dumps({"reps": args.reps, "seconds": seconds, "environment": keep,
                                                    "results": results}))
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
