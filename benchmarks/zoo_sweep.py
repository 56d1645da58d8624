"""Zoo sweep: which models go prune -> reload -> ONNX export -> ORT parity with no dataset (issue 14).

Every torchvision classification model (and, with --timm, the timm models named) goes through
tests/test_zoo_conformance.py's ``roundtrip``: built with 10 classes at a small input size, BatchNorm
statistics set on random inputs, ``prune --data synthetic --method magnitude --ratio 0.3 --round-to 1``,
saved, reloaded, exported to ONNX with the parity check. Each model runs in its own process with a memory
cap and a time limit, so one model that blows up does not take the machine (or the sweep) with it.

    python benchmarks/zoo_sweep.py --mem-gib 16 --out benchmarks/results/zoo_sweep.md  # torchvision, all
    python benchmarks/zoo_sweep.py --models resnet18,alexnet --out /tmp/zoo.md        # a few
    python benchmarks/zoo_sweep.py --no-torchvision --timm sample --mem-gib 6 --out benchmarks/results/zoo_sweep_timm.md
    python benchmarks/zoo_sweep.py --models shufflenet_v2_x0_5 --update --out benchmarks/results/zoo_sweep.md
        # re-measure the models named and replace their rows; the other rows stay as recorded
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(ref: str) -> dict:
    """In the child process: one model through the round trip; the result as a dict."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT))
    from tests.test_zoo_conformance import DEFAULT_SIZE, KWARGS, SIZES, TIMM_KWARGS, TIMM_SIZES, roundtrip

    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    name = ref.split(":", 1)[-1]
    timm = ref.startswith("timm:")
    size = (TIMM_SIZES if timm else SIZES).get(name, DEFAULT_SIZE)
    kwargs = (TIMM_KWARGS if timm else KWARGS).get(name)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = roundtrip(ref, Path(d), size=size, model_kwargs=kwargs)
    return {**out, "size": size, "seconds": time.perf_counter() - t}


def sweep(refs: list[str], timeout: float, mem_gib: float) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from tests.test_zoo_conformance import EXCLUDED, NOT_RUN, TIMM_EXCLUDED, TIMM_NOT_RUN

    rows = []
    for ref in refs:
        name = ref.split(":", 1)[-1]
        timm = ref.startswith("timm:")
        excluded = (TIMM_EXCLUDED if timm else EXCLUDED).get(name)
        not_run = (TIMM_NOT_RUN if timm else NOT_RUN).get(name)
        if not_run:
            rows.append({"model": ref, "status": "excluded", "excluded": f"not run: {not_run}", "wall_seconds": 0.0})
            print(f"{ref:32s} not run", flush=True)
            continue

        def cap():
            limit = int(mem_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", ref], capture_output=True, text=True,
                                  timeout=timeout, preexec_fn=cap, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and lines:
                row = {"status": "ok", **json.loads(lines[-1][7:])}
            else:
                err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                memory = proc.returncode < 0 or any(m in proc.stderr for m in (
                    "MemoryError", "DefaultCPUAllocator", "Cannot allocate memory"))
                row = {"status": "out of memory" if memory else "FAILED", "error": err[-1][:300] if err else
                       f"exit code {proc.returncode}"}
        except subprocess.TimeoutExpired:
            row = {"status": "timeout", "error": f"over {timeout:.0f} s"}
        row.update(model=ref, wall_seconds=time.perf_counter() - t)
        if excluded:
            row["excluded"] = excluded
            if row["status"] != "ok":
                row["status"] = "excluded"
        rows.append(row)
        print(f"{ref:32s} {row['status']:10s} {row['wall_seconds']:6.1f} s  {row.get('error', '')[:120]}",
              flush=True)
    return rows


def table(rows: list[dict], args) -> str:
    from deploycomp.bench.env import capture

    env = capture("cpu")
    ok = sum(r["status"] == "ok" for r in rows)
    excluded = sum(r["status"] == "excluded" for r in rows)
    lines = [
        "# Zoo sweep: prune (magnitude 0.3) -> reload -> ONNX export -> ORT parity, no dataset",
        "",
        f"Command: `python benchmarks/zoo_sweep.py {' '.join(args.argv)}`",
        "",
        f"**{ok} of {len(rows)} models pass** ({100 * ok / max(len(rows), 1):.0f} %); {excluded} excluded with "
        "a reason (tests/test_zoo_conformance.py: EXCLUDED fail and are checked to fail, NOT_RUN would exhaust "
        f"memory and are not attempted); {len(rows) - ok - excluded} failing without one.",
        "",
        "Each model: 10 classes, the input size below, BatchNorm statistics set on random inputs, "
        "`prune --data synthetic --method magnitude --ratio 0.3 --round-to 1 --finetune-epochs 0`, saved, "
        "reloaded (outputs identical), exported (ONNX checker, onnxslim) and compared with ONNX Runtime "
        "(random and synthetic inputs, `atol 1e-4 + rtol 1e-3 x max |logit|`, top-1 agreement 100 %). "
        f"One process per model, {args.mem_gib:g} GiB address space, {args.timeout:.0f} s limit. "
        "Seconds are wall time of the whole round trip in the child process (one torch thread).",
        "",
        "| model | result | input | MACs reduction | max abs diff | seconds | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        size = f"{r['size']} px" if "size" in r else ""
        red = f"{r['macs_reduction_pct']:.1f} %" if "macs_reduction_pct" in r else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        secs = f"{r['seconds']:.1f}" if "seconds" in r else f"({r['wall_seconds']:.0f})"
        note = r.get("excluded") or r.get("error", "")
        lines.append(f"| {r['model']} | {r['status']} | {size} | {red} | {diff} | {secs} | {note} |")
    total = sum(r.get("seconds", r["wall_seconds"]) for r in rows)
    lines += [
        "",
        f"Total: {total / 60:.1f} min of round trips ({sum(r['wall_seconds'] for r in rows) / 60:.1f} min "
        "wall with process start-up).",
        "",
        "## Machine",
        "",
        f"- CPU: {env['cpu_model']} ({env['cpus_usable']} usable cores, one torch thread per model)"
        + ("; shared with other jobs while measured" if args.loaded else ""),
        f"- {env['os']}, Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"torch-pruning {_version('torch-pruning')}, onnxruntime {_version('onnxruntime-gpu', 'onnxruntime')}, "
        f"timm {_version('timm')}, deploycomp {env['deploycomp']}",
        f"- measured {env['time_utc']}" + (f" (the rows of {', '.join(args.updated)}; the other rows are kept "
                                          "from the previous record, measured earlier)" if args.update else ""),
        "",
    ]
    return "\n".join(lines)


def _version(*dists: str) -> str:
    from importlib import metadata

    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default=None, help="comma-separated torchvision names (default: all)")
    ap.add_argument("--no-torchvision", action="store_true", help="only the --timm models")
    ap.add_argument("--timm", default="", help="comma-separated timm model names, or 'sample' (TIMM_SAMPLE)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model")
    ap.add_argument("--mem-gib", type=float, default=12, help="address-space cap per model (GiB)")
    ap.add_argument("--loaded", action="store_true", help="say in the table that the machine was shared")
    ap.add_argument("--update", action="store_true", help="replace the named models' rows in --out's JSON record "
                    "and keep the other rows as recorded")
    ap.add_argument("--out", default="benchmarks/results/zoo_sweep.md")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
        return
    args.argv = sys.argv[1:]
    sys.path.insert(0, str(ROOT))
    from tests.test_zoo_conformance import torchvision_classifiers

    refs = [] if args.no_torchvision else (args.models.split(",") if args.models else torchvision_classifiers())
    from tests.test_zoo_conformance import TIMM_SAMPLE

    timm_names = TIMM_SAMPLE if args.timm == "sample" else [n for n in args.timm.split(",") if n]
    refs += [f"timm:{n}" for n in timm_names]
    rows = sweep(refs, args.timeout, args.mem_gib)
    if args.update:
        new = {r["model"]: r for r in rows}
        old = json.loads(Path(args.out).with_suffix(".json").read_text())
        rows = [new.pop(r["model"], r) for r in old] + list(new.values())
        args.updated = [r for r in refs]
    text = table(rows, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
