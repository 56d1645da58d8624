"""Does timing ONNX Runtime sessions in alternation distort a paired speed-up? (worker-thread spinning)

Each ORT session has its own intra-op thread pool whose workers spin for a while after a run. When two
multi-threaded sessions are timed in alternation, the workers of the one timed a moment ago may still be
spinning while the other runs. This script compares, on the same two models, repeated ``reps`` times:

- ``alone``    each model benchmarked in its own process (no other session exists), ratio of medians
- ``spinning`` the paired comparison with ORT's default spinning (what bench did before it stopped it)
- ``stopped``  the paired comparison as bench does it now (``session.force_spinning_stop`` = 1)
- ``nospin``   the paired comparison with spinning disabled (``session.intra_op.allow_spinning`` = 0)

Usage (idle machine; docs/bench-schema.md, "Sessions that spin", quotes its output):

    python benchmarks/ort_spinning.py A.onnx B.onnx [THREADS=2] [REPS=5]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

# Run in a fresh interpreter per measurement; MODE selects how the sessions are configured.
PAIRED = """
import json, sys
import onnxruntime as ort
from deploycomp import console
from deploycomp.bench import BenchConfig, benchmark
import deploycomp.bench.backends as backends

mode, a, b, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
entry = {"spinning": ("session.force_spinning_stop", "0"),
         "nospin": ("session.intra_op.allow_spinning", "0")}.get(mode)
if entry:
    class Options(ort.SessionOptions):
        def add_session_config_entry(self, key, value):
            if key == "session.force_spinning_stop":  # bench's own setting: replaced by the mode's
                return super().add_session_config_entry(*entry)
            return super().add_session_config_entry(key, value)
    ort.SessionOptions = Options
console.set_verbosity(0)
rows = benchmark([a, b], BenchConfig(threads=threads, backend="ort"))
print(json.dumps([rows[0]["latency_ms"]["median"], rows[1]["latency_ms"]["median"], rows[1]["speedup"]]))
"""


def alone(path: str, threads: int) -> float:
    out = subprocess.run([sys.executable, "-m", "deploycomp", "-q", "bench", path, "--backend", "ort",
                          "--threads", str(threads), "--json", "-"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["results"][0]["latency_ms"]["median"]


def paired(mode: str, a: str, b: str, threads: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", PAIRED, mode, a, b, str(threads)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    a, b = argv[0], argv[1]
    threads = int(argv[2]) if len(argv) > 2 else 2
    reps = int(argv[3]) if len(argv) > 3 else 5
    rows: dict[str, list[list[float]]] = {"alone": [], "spinning": [], "stopped": [], "nospin": []}
    for rep in range(reps):
        la, lb = alone(a, threads), alone(b, threads)
        rows["alone"].append([la, lb, la / lb])
        for mode in ("spinning", "stopped", "nospin"):
            rows[mode].append(paired(mode, a, b, threads))
        print(rep, {k: [round(x, 3) for x in v[-1]] for k, v in rows.items()}, flush=True)
    print(f"threads {threads}, {reps} repetitions; medians over repetitions")
    print("| how | A median ms | B median ms | speed-up (median) | speed-ups |")
    print("|---|---|---|---|---|")
    for how, values in rows.items():
        med = [statistics.median(v[i] for v in values) for i in range(3)]
        print(f"| {how} | {med[0]:.4f} | {med[1]:.4f} | {med[2]:.3f} | {[round(v[2], 3) for v in values]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
