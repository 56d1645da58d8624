"""Does a `deploycomp bench` interval hold when the benchmark is run again? A/A and A/B runs (issues 11, 21).

For each pair, each thread setting (the library's default threads, and `--threads 1`) and each version of
deploycomp (`before`: another source tree, e.g. a worktree of an older commit, given with `--before`;
`after`: this tree), `--reps` separate `deploycomp bench A B` invocations (each a fresh process, default
options otherwise). The two versions alternate within a repetition, in alternating order.

Pairs (the shipped baseline, 28 px Fashion-MNIST; speed only, no fine-tuning):
- A/A ort / torch: the baseline against a byte-identical copy (ONNX Runtime / torch);
- A/B ort / torch: the baseline against it pruned 30 % by magnitude, channels rounded to 8.

Reported per (pair, threads, version):
- A/B: how many runs' 95 % interval holds the geometric mean of the *other* runs' speed-ups (goal: 17 of 20),
  and the median half-width of the intervals (goal: at most 8 %);
- A/A: verdict `same` (goal: 19 of 20) and interval holding 1.0 (goal: 18 of 20);
- the wall time of the whole command.
For the `after` version each run's per-session speed-ups are kept, so the coverage with fewer sessions
(the first k of each run) is computed too: the measurement behind the default number of sessions.

    git worktree add /tmp/before <old commit>
    python benchmarks/bench_ab.py --before /tmp/before --reps 20 --out benchmarks/results/bench_ab.md

Run it on an idle machine: it records the load average and the CPU time other processes used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = {"default threads": [], "--threads 1": ["--threads", "1"]}


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
    pruned = load_model(str(base))
    x = torch.zeros(1, *pruned.input_shape)
    with torch.enable_grad():
        history = prune_channels(pruned.model, x, get_criterion("magnitude")(), 0.3, round_to=8)
    pruned.add_surgery("prune_channels", history=history)
    pruned.source = None
    pruned.save(work / "magnitude-30.pt")
    for name in ("baseline", "magnitude-30"):
        export_onnx(load_model(str(work / f"{name}.pt")), work / f"{name}.onnx", dynamic_batch=True, parity=False)
    shutil.copyfile(work / "baseline.onnx", work / "copy.onnx")  # byte-identical (no sidecar: label "copy")
    assert (work / "baseline.onnx").read_bytes() == (work / "copy.onnx").read_bytes()
    return {"A/A ort": (str(work / "baseline.onnx"), str(work / "copy.onnx")),
            "A/A torch": (str(work / "baseline.pt"), str(work / "copy.pt")),
            "A/B ort": (str(work / "baseline.onnx"), str(work / "magnitude-30.onnx")),
            "A/B torch": (str(work / "baseline.pt"), str(work / "magnitude-30.pt"))}


def bench(code: Path, a: str, b: str, extra: list[str], out: Path) -> dict:
    """One `deploycomp bench A B` of the deploycomp in ``code``, in a fresh process; its second row and wall time."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deploycomp", "-q", "bench", a, b, *extra, "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=str(code))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"deploycomp bench ({code}) failed: {proc.stderr.strip()[-500:]}")
    ref, row = json.loads(out.read_text())["results"]
    sessions = [s.get("speedup") for s in row.get("sessions") or [] if isinstance(s, dict)]
    return {"speedup": row["speedup"], "ci": row["speedup_ci95"], "verdict": row["verdict"], "wall_s": wall,
            "interval": row.get("interval", "within one session (schema 2)"),
            "session_speedups": sessions, "rounds": row.get("rounds"),
            "conditions": {k: v for k, v in (ref.get("conditions") or {}).items() if k != "order"},
            "threads": row.get("threads"), "warnings": len(ref["warnings"]) + len(row["warnings"])}


def run(pairs, versions: dict[str, Path], reps: int, work: Path, log) -> dict[str, list[dict]]:
    """results[f"{pair} | {threads} | {version}"] = one record per repetition."""
    out: dict[str, list[dict]] = {}
    names = list(versions)
    for i in range(reps):
        for pair, (a, b) in pairs.items():
            for setting, extra in THREADS.items():
                order = names if i % 2 == 0 else names[::-1]
                for version in order:
                    rec = bench(versions[version], a, b, extra, work / "out.json")
                    out.setdefault(f"{pair} | {setting} | {version}", []).append(rec)
                    ci = f"[{rec['ci'][0]:.3f}, {rec['ci'][1]:.3f}]" if rec["ci"] else "-"
                    log(f"[{i + 1}/{reps}] {pair}, {setting}, {version}: {rec['speedup']:.3f} {ci} {rec['verdict']} "
                        f"({rec['wall_s']:.1f} s, other CPU {rec['conditions'].get('other_cpu_pct')} %)")
    return out


def geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rs: list[dict], kind: str) -> dict:
    """Coverage, widths, verdicts of one (pair, threads, version)."""
    held_others = 0
    for i, r in enumerate(rs):
        others = geomean([x["speedup"] for j, x in enumerate(rs) if j != i])
        held_others += bool(r["ci"]) and r["ci"][0] <= others <= r["ci"][1]
    half = [100 * (math.sqrt(r["ci"][1] / r["ci"][0]) - 1) for r in rs if r["ci"]]
    return {"n": len(rs), "held_others": held_others, "held_one": sum(bool(r["ci"]) and r["ci"][0] <= 1 <= r["ci"][1]
                                                                      for r in rs),
            "verdicts": {v: sum(r["verdict"] == v for r in rs) for v in ("faster", "same", "slower")},
            "range": (min(r["speedup"] for r in rs), max(r["speedup"] for r in rs)),
            "median_half_width_pct": st.median(half) if half else None,
            "wall_s": st.median(r["wall_s"] for r in rs), "kind": kind}


def with_run_term(rs: list[dict], run_spread_pct: float | None = None) -> list[dict]:
    """The runs' intervals and verdicts recomputed from their sessions' speed-ups the way bench combines them
    now (``paired.across_sessions``: the sessions' t term plus the run-level term)."""
    from deploycomp.bench.paired import RUN_SPREAD_PCT, across_sessions

    spread = RUN_SPREAD_PCT if run_spread_pct is None else run_spread_pct
    out = []
    for r in rs:
        est = across_sessions(r["session_speedups"], rounds=r.get("rounds") or 0, run_spread_pct=spread)
        out.append({**r, "speedup": est.speedup, "ci": list(est.ci95), "verdict": est.verdict})
    return out


def fewer_sessions(rs: list[dict], k: int) -> dict | None:
    """The A/B coverage and width had each run used only its first ``k`` sessions."""
    from deploycomp.bench.paired import across_sessions

    if not rs or any(len(r["session_speedups"]) < k for r in rs):
        return None
    ests = [across_sessions(r["session_speedups"][:k], rounds=0) for r in rs]  # with the run-level term
    held = 0
    for i, e in enumerate(ests):
        others = geomean([x.speedup for j, x in enumerate(ests) if j != i])
        held += e.ci95[0] <= others <= e.ci95[1]
    half = st.median(100 * (math.sqrt(e.ci95[1] / e.ci95[0]) - 1) for e in ests)
    same = sum(e.verdict == "same" for e in ests)
    holds_one = sum(e.ci95[0] <= 1 <= e.ci95[1] for e in ests)
    return {"held_others": held, "median_half_width_pct": half, "same": same, "held_one": holds_one, "n": len(ests)}


def levels(rs: list[dict]) -> dict | None:
    """How far the runs' estimates spread, against what their sessions predict (log units, as %).

    ``between_runs_pct``: SD of the runs' log speed-ups; ``predicted_pct``: the root mean of each run's
    between-session variance / n (what the runs would spread if sessions were all that varied). A larger
    first figure means a level above the session (minutes apart on the machine) adds variance of its own.
    """
    runs = [[math.log(x) for x in r["session_speedups"]] for r in rs if len(r["session_speedups"]) >= 2]
    if len(runs) < 3:
        return None
    means = [sum(v) / len(v) for v in runs]
    predicted = st.mean(st.variance(v) / len(v) for v in runs)
    between = st.variance(means)
    return {"between_runs_pct": 100 * math.sqrt(between), "predicted_pct": 100 * math.sqrt(predicted),
            "session_sd_pct": 100 * math.sqrt(st.mean(st.variance(v) for v in runs)),
            "extra_pct": 100 * math.sqrt(max(0.0, between - predicted))}


def report(results: dict[str, list[dict]], args, env: dict, seconds: float) -> str:
    from deploycomp.bench.paired import RUN_SPREAD_PCT

    derived = {}
    for key, rs in results.items():
        derived[key] = rs
        if key.endswith("| after") and all(len(r["session_speedups"]) >= 2 for r in rs):
            derived[key.replace("| after", "| after + run term")] = with_run_term(rs)
    results = derived
    lines = ["# Does a `deploycomp bench` interval hold when the benchmark is run again? (issues 11, 21)", "",
             f"Command: `python benchmarks/bench_ab.py --before {args.before_label} --reps {args.reps}` "
             f"({seconds / 60:.1f} min). Each run is a separate `deploycomp bench A B` process with default options "
             "(plus `--threads 1` in the one-thread rows); `before` is deploycomp at "
             f"{args.before_label} (one session of 20 interleaved rounds), `after` this tree (5 sessions, each a fresh "
             "process, of 10 rounds; the interval across sessions, as recorded: `after`). `after + run term` is the "
             "same runs' intervals recomputed from their sessions' speed-ups with the formula bench uses now: the "
             f"sessions' t term plus a run-level term of {RUN_SPREAD_PCT} % (`deploycomp.bench.paired.RUN_SPREAD_PCT`, "
             "chosen from the `Levels` section below). The versions alternate within each repetition.",
             "", f"Machine: {env['cpu_model']}, {env['cpus_usable']} usable CPUs, torch {env['torch']}, onnxruntime "
             f"{env['onnxruntime']}; {env['time_utc']}.", ""]
    others = [r["conditions"].get("other_cpu_pct") for rs in results.values() for r in rs]
    others = [o for o in others if o is not None]
    loads = [r["conditions"].get("load_avg_1m_before") for rs in results.values() for r in rs]
    loads = [x for x in loads if x is not None]
    if others:
        lines += [f"Load while measuring: other processes used {min(others):.0f}-{max(others):.0f} % of the CPUs "
                  f"(median {st.median(others):.0f} %); 1-minute load average {min(loads):.2f}-{max(loads):.2f} "
                  "before each bench (it includes the previous run's own work).", ""]
    lines += ["## A/B: the baseline against its magnitude-30 model", "",
              "Goal (after): each run's 95 % interval holds the geometric mean of the other runs' speed-ups in at "
              "least 17 of 20; median half-width at most 8 %.", "",
              "| backend | threads | version | interval holds the others' mean | median half-width | speed-ups over "
              "the runs | verdicts faster/same/slower | wall time (median) |",
              "|---|---|---|---:|---:|---|---|---:|"]
    table_rows(lines, results, "A/B")
    lines += ["", "## A/A: the baseline against its byte-identical copy", "",
              "Goal (after): verdict `same` in at least 19 of 20, interval holds 1.0 in at least 18 of 20.", "",
              "| backend | threads | version | verdict same | interval holds 1.0 | median half-width | speed-ups over "
              "the runs | wall time (median) |",
              "|---|---|---|---:|---:|---:|---|---:|"]
    table_rows(lines, results, "A/A")
    lines += ["", "## How many sessions? (after: the first k sessions of each run)", "",
              "| pair | threads | k | A/B: holds the others' mean | A/B: median half-width | A/A: same | "
              "A/A: holds 1.0 |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for backend in ("ort", "torch"):
        for setting in THREADS:
            ab = results.get(f"A/B {backend} | {setting} | after", [])
            aa = results.get(f"A/A {backend} | {setting} | after", [])
            for k in (2, 3, 4, 5):
                b, a = fewer_sessions(ab, k), fewer_sessions(aa, k)
                if b is None or a is None:
                    continue
                lines.append(f"| {backend} | {setting} | {k} | {b['held_others']} of {b['n']} | "
                             f"{b['median_half_width_pct']:.1f} % | {a['same']} of {a['n']} | "
                             f"{a['held_one']} of {a['n']} |")
    lines += ["", "## Levels: sessions against runs (after)", "",
              "SD of the runs' log speed-ups against what their sessions predict (each run's between-session "
              "variance / sessions): a larger first column means something slower than a session (minutes on "
              "the machine) varies too.", "",
              "| pair | threads | runs | SD between sessions | SD between runs | predicted from sessions | "
              "beyond the sessions |",
              "|---|---|---|---:|---:|---:|---:|"]
    for key, rs in results.items():
        pair, setting, version = key.split(" | ")
        if version != "after":
            continue
        half = len(rs) // 2
        for which, subset in (("all", rs), (f"1-{half}", rs[:half]), (f"{half + 1}-{len(rs)}", rs[half:])):
            lv = levels(subset)
            if lv:
                lines.append(f"| {pair} | {setting} | {which} | {lv['session_sd_pct']:.2f} % | "
                             f"{lv['between_runs_pct']:.2f} % | {lv['predicted_pct']:.2f} % | "
                             f"{lv['extra_pct']:.2f} % |")
    lines += ["", "## Every run", "", "| pair | threads | version | rep | speed-up [95 % interval] | verdict | "
              "sessions' speed-ups | other CPU % | wall s |", "|---|---|---|---:|---|---|---|---:|---:|"]
    for key, rs in results.items():
        pair, setting, version = key.split(" | ")
        for i, r in enumerate(rs, 1):
            ci = f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] else "-"
            ss = ", ".join(f"{x:.3f}" for x in r["session_speedups"]) or "-"
            lines.append(f"| {pair} | {setting} | {version} | {i} | {r['speedup']:.3f} {ci} | {r['verdict']} | {ss} | "
                         f"{r['conditions'].get('other_cpu_pct')} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def table_rows(lines: list[str], results: dict[str, list[dict]], kind: str) -> None:
    for key, rs in results.items():
        pair, setting, version = key.split(" | ")
        if not pair.startswith(kind):
            continue
        s = summary(rs, kind)
        backend = pair.split()[1]
        counts = "/".join(str(s["verdicts"][v]) for v in ("faster", "same", "slower"))
        width = f"{s['median_half_width_pct']:.1f} %" if s["median_half_width_pct"] is not None else "-"
        spread = f"{s['range'][0]:.3f}-{s['range'][1]:.3f}"
        if kind == "A/B":
            lines.append(f"| {backend} | {setting} | {version} | {s['held_others']} of {s['n']} | {width} | {spread} | "
                         f"{counts} | {s['wall_s']:.1f} s |")
        else:
            lines.append(f"| {backend} | {setting} | {version} | {s['verdicts']['same']} of {s['n']} | "
                         f"{s['held_one']} of {s['n']} | {width} | {spread} | {s['wall_s']:.1f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--before", default=None, metavar="DIR",
                    help="source tree of the older deploycomp to compare with (e.g. a git worktree)")
    ap.add_argument("--before-label", default=None, help="how the report names it (default: its git commit)")
    ap.add_argument("--pairs", default="A/A ort,A/A torch,A/B ort,A/B torch", help="comma-separated subset")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_ab.md"))
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite the report from a recorded JSON (this script's) to --out")
    args = ap.parse_args()
    if args.render:
        rec = json.loads(Path(args.render).read_text())
        args.reps, args.before_label = rec["reps"], rec.get("before_label")
        Path(args.out).write_text(report(rec["results"], args, rec["environment"], rec["seconds"]))
        return

    from deploycomp.bench.env import capture

    versions = {"after": ROOT}
    if args.before:
        versions = {"before": Path(args.before).resolve(), "after": ROOT}
        if args.before_label is None:
            head = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True)
            args.before_label = head.stdout.strip() or args.before
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        pairs = prepare(work)
        wanted = [p.strip() for p in args.pairs.split(",")]
        pairs = {k: v for k, v in pairs.items() if k in wanted}
        results = run(pairs, versions, args.reps, work, lambda m: print(m, flush=True))
    env, seconds = capture("cpu"), time.perf_counter() - t0
    text = report(results, args, env, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    keep = {k: env.get(k) for k in ("cpu_model", "cpus_usable", "torch", "onnxruntime", "deploycomp", "time_utc")}
    out.with_suffix(".json").write_text(json.dumps({"reps": args.reps, "seconds": seconds, "environment": keep,
                                                    "before_label": args.before_label, "results": results}))
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
