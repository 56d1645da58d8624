"""Where does the session-to-session spread of a latency come from? (issue 21)

One process loads the *same* ONNX model into K fresh ONNX Runtime sessions and times all K in interleaved
rounds with deploycomp's harness (``measure_rounds``: every round times one block of each session, in an
order that changes), so the machine's drift lands on every session alike. If sessions were
interchangeable, their mean log latencies would differ only by the rounds' noise; the *session effect* is
the standard deviation between sessions beyond that (one-way random-effects ANOVA: the between-session
variance of the session means minus the within-session variance / rounds).

Each condition changes one thing that could make sessions differ, e.g.:

    python benchmarks/session_effect.py MODEL.onnx --threads 1 --conditions default,no-arena,no-prepack
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/session_effect.py MODEL.onnx --conditions default

``--processes P`` repeats the whole measurement in P fresh processes, which shows whether processes add a
level of their own on top of sessions (the spread of the per-process grand means against what the
sessions inside them predict).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

# name -> ORT session config entries / options applied to every session of the condition
CONDITIONS: dict[str, dict] = {
    "default": {},
    "no-arena": {"arena": False},
    "no-prepack": {"config": {"session.disable_prepacking": "1"}},
    "no-mem-pattern": {"mem_pattern": False},
    "initializers-device-allocator": {"config": {"session.use_device_allocator_for_initializers": "1"}},
}


class _Session:
    """A minimal runner for the harness: one ORT session with its input bound."""

    def __init__(self, path: str, threads: int | None, batch: int, condition: dict, interleaved: bool):
        import numpy as np
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if interleaved and threads != 1:
            so.add_session_config_entry("session.force_spinning_stop", "1")  # as bench does
        so.enable_cpu_mem_arena = condition.get("arena", True)
        so.enable_mem_pattern = condition.get("mem_pattern", True)
        for k, v in condition.get("config", {}).items():
            so.add_session_config_entry(k, v)
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        shape = [batch, *[d if isinstance(d, int) else 1 for d in inp.shape[1:]]]
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        self.binding = self.session.io_binding()
        self.binding.bind_cpu_input(inp.name, x)
        for o in self.session.get_outputs():
            self.binding.bind_output(o.name, "cpu")
        self.session.run_with_iobinding(self.binding)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def sync(self) -> None:
        return None


def session_effect(session_means: list[float], within_var: float, rounds: int) -> float:
    """SD (in log units) between sessions beyond the rounds' noise (0 when the noise explains it all)."""
    between = st.variance(session_means)
    return math.sqrt(max(0.0, between - within_var / rounds))


def measure(path: str, sessions: int, rounds: int, threads: int | None, batch: int, condition: str) -> dict:
    import numpy as np

    from deploycomp.bench.timing import TimingConfig, measure_rounds

    runners = [_Session(path, threads, batch, CONDITIONS[condition], sessions > 1) for _ in range(sessions)]
    timings = measure_rounds(runners, TimingConfig(rounds=rounds, duration_s=0.05 * rounds), final_reference=False)
    logs = np.log([t.block_medians_ms() for t in timings])  # sessions x rounds
    means = logs.mean(axis=1)
    # within-session variance after removing each round's common shift (drift): two-way residuals
    resid = logs - means[:, None] - logs.mean(axis=0)[None, :] + logs.mean()
    within = float((resid**2).sum() / ((sessions - 1) * (rounds - 1)))
    return {"condition": condition, "sessions": sessions, "rounds": rounds, "threads": threads, "batch": batch,
            "session_ms": [float(math.exp(m)) for m in means],
            "session_effect_pct": 100 * session_effect(list(means), within, rounds),
            "round_noise_pct": 100 * math.sqrt(within),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--conditions", default="default")
    ap.add_argument("--processes", type=int, default=1, help="repeat in this many fresh processes")
    ap.add_argument("--json", default=None, help="append the results (one JSON object a line) to this file")
    args = ap.parse_args()
    if args.processes > 1:
        child = [args.model, f"--sessions={args.sessions}", f"--rounds={args.rounds}", f"--batch={args.batch}",
                 f"--conditions={args.conditions}", *([f"--threads={args.threads}"] if args.threads else []),
                 *([f"--json={args.json}"] if args.json else [])]
        for _ in range(args.processes):
            subprocess.run([sys.executable, __file__, *child], check=True)
        return
    for cond in args.conditions.split(","):
        t = time.perf_counter()
        res = measure(args.model, args.sessions, args.rounds, args.threads, args.batch, cond)
        res["model"] = Path(args.model).name
        res["seconds"] = time.perf_counter() - t
        ms = res["session_ms"]
        print(f"{res['model']} {cond:>30} threads={args.threads} batch={args.batch}: sessions {min(ms):.3f}-"
              f"{max(ms):.3f} ms, session effect {res['session_effect_pct']:.1f} %, round noise "
              f"{res['round_noise_pct']:.1f} % ({res['seconds']:.0f} s)", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
