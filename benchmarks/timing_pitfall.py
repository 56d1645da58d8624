"""The pitfall behind "0.027 ms vs 1.33 ms": timing without warmup and without synchronisation.

Times one model on whatever device is present, three ways:

1. naive, cold: ``time.time()`` around the very first call (what a one-off measurement in a notebook
   does): includes lazy initialisation, memory allocation, kernel/primitive selection;
2. naive loop: ``perf_counter`` around each call, no warmup, **no synchronisation**;
3. the deploycomp harness: warmup, then ``perf_counter_ns`` around ``run()`` + ``sync()``.

On CPU every PyTorch call is synchronous: the Python call returns only when the result is computed,
so (2) and (3) agree apart from warmup, and what the demo shows is the cost of the first calls.
On CUDA a call only *enqueues* kernels and returns: (2) then measures the launch overhead (tens of
microseconds, whatever the model's size: the "0.027 ms"), until the launch queue is full and the
host is forced to wait, at which point single iterations suddenly cost whole batches of queued work.
Only (3) is the latency of the model; CUDA events give the same number from the GPU's side.

Usage: python benchmarks/timing_pitfall.py [--model resnet18] [--device cpu|cuda] [--threads 1] [--iters 30]
Writes benchmarks/results/bench_timing_pitfall.md (device-specific).
"""

from __future__ import annotations

import argparse
import statistics as st
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPLAIN = {
    "cpu": [
        "On CPU, PyTorch runs every operator before the call returns, so there is no asynchronous work to "
        "synchronise: the naive loop (no sync) and the harness agree once the first calls are over. What goes "
        "wrong without warmup is the first call(s): allocator growth, oneDNN primitive creation and lazy "
        "initialisation land in the measurement. A single cold `time.time()` measurement is therefore well above "
        "the real latency (the ratio is printed above), and an average over few iterations is pulled up by it.",
        "What this run cannot show here: on CUDA the naive loop measures only the kernel *launch* (enqueue) "
        "time, typically tens of microseconds for any model size, because `model(x)` returns before the GPU has "
        "done the work. That is the likely way a ResNet-50 was reported at 0.027 ms while a same-size model (whose "
        "timing happened to include a synchronising call such as `.item()`, `.cpu()`, or a full launch queue) "
        "was reported at 1.33 ms. Run this script on a GPU machine to see it.",
    ],
    "cuda": [
        "On CUDA, `model(x)` enqueues kernels and returns. The naive loop therefore reports the launch time per "
        "iteration, not the model's latency; once the launch queue is full the host blocks, and single "
        "iterations absorb the queued work, so the numbers are both too small and erratic. With warmup "
        "(cuDNN autotuning, allocator, lazy CUDA context are excluded) and a synchronisation per iteration, the "
        "harness measures the time until the result exists; CUDA events on the same stream agree with it.",
    ],
}


def naive_cold(model, x) -> float:
    t = time.time()  # the wall clock the student scripts used (adjustable, coarse on some systems)
    model(x)
    return (time.time() - t) * 1e3


def naive_loop(model, x, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(x)  # no synchronisation: on CUDA this returns as soon as the kernels are queued
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_timing_pitfall.md"))
    args = ap.parse_args()

    import torch

    from deploycomp.bench import BenchConfig, benchmark
    from deploycomp.bench.env import capture
    from deploycomp.checkpoint import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    ckpt = load_model(args.model)
    model = ckpt.model.eval().to(device)
    x = torch.randn(1, *ckpt.input_shape, device=device)
    with torch.inference_mode():
        cold = naive_cold(model, x)
        loop = naive_loop(model, x, args.iters)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    (r,) = benchmark(args.model, BenchConfig(device=device, threads=args.threads, iters=args.iters))
    lat = r["latency_ms"]
    rows = [("1. naive: time.time() around the first call", cold, "-"),
            ("2. naive loop, no warmup, no sync: first iteration", loop[0], "-"),
            (f"2. naive loop, no warmup, no sync: mean of {len(loop)}", st.mean(loop), f"{st.median(loop):.3f}"),
            (f"3. deploycomp harness: warmup + sync, mean of {r['iterations']}", lat["mean"], f"{lat['median']:.3f}"),
            ("3. deploycomp harness: host enqueue time of run()", r["enqueue_ms"]["mean"],
             f"{r['enqueue_ms']['median']:.3f}")]
    if r.get("device_ms"):
        rows.append(("3. CUDA events around run()", r["device_ms"]["mean"], f"{r['device_ms']['median']:.3f}"))
    env = capture(device)
    lines = [f"# Timing pitfall: {args.model} at batch 1 on {env['device_name']} ({device})", "",
             f"`python benchmarks/timing_pitfall.py --model {args.model} --threads {args.threads} --iters {args.iters}`"
             f"; torch {env['torch']}, {args.threads} thread(s), {env['time_utc']}.", "",
             "| measurement | mean ms | median ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {mean:.3f} | {med} |" for name, mean, med in rows]
    lines += ["", f"Cold first call / harness median: {cold / lat['median']:.1f}x. "
              f"Naive-loop mean / harness median: {st.mean(loop) / lat['median']:.2f}x.", ""]
    lines += [p + "\n" for p in EXPLAIN["cuda" if device.startswith("cuda") else "cpu"]]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
