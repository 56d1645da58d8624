"""Latency-aware pruning to measured speed-up targets on ONNX Runtime CPU, against uniform pruning (issue 12).

For each model and each target X (a speed-up measured on ONNX Runtime, CPU, batch 1):

1. ``deploycomp prune --target-speedup X --measured`` (the library call ``prune_checkpoint``): latency
   table of the model's layers on ORT CPU (measured once per model, then reused from the cache), width
   allocation by the criterion's importance, candidates timed against the original until the measured
   speed-up is within the tolerance;
2. uniform layer-wise pruning (every layer the same ratio, channels rounded to multiples of 8) to the
   *same MACs* as the latency-aware model (``--target-macs``);
3. the original and both pruned models exported to ONNX and timed together in interleaved sessions (3 by
   default, each loading the models anew; speed-ups combined across sessions)
   (``deploycomp.bench.benchmark``: paired speed-ups with 95 % intervals).

Reported per row: the speed-up the search measured and the one of the final sessions (with intervals),
MACs, top-1 right after pruning and after fine-tuning (the shipped baseline on Fashion-MNIST only; the
ResNet-50 is torchvision's architecture with random weights at 224 px, timed only), the search's time,
and the same for the uniform model. Goal: the final speed-up within 10 % of every target.

Recorded run (about 25-30 minutes on 2 idle cores: ResNet-50's latency table ~6 min at one thread, its
searches, uniform prunings and exports ~7 min, the baseline's six 1-epoch fine-tunes ~9 min; the tables are
cached, so a re-run skips them):

    python benchmarks/prune_latency.py --out benchmarks/results/prune_latency.md

Smoke test at a tiny scale (minutes; the numbers mean nothing):

    python benchmarks/prune_latency.py --targets 1.5 --train-samples 256 --eval-samples 256 --latency-widths 4 \\
        --resnet-size 64 --rounds 5 --cache /tmp/latency-cache --out /tmp/prune_latency.md
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="baseline,resnet50", help="comma-separated: baseline, resnet50")
    ap.add_argument("--targets", default="1.5,2,3", help="measured speed-ups to ask for")
    ap.add_argument("--method", default="magnitude", help="pruning criterion (both latency-aware and uniform)")
    ap.add_argument("--threads", type=int, default=1,
                    help="ORT intra-op threads (1: see docs/latency-pruning.md); torch uses 2 for fine-tuning")
    ap.add_argument("--latency-widths", type=int, default=6,
                    help="candidate widths per group in the table (6: ResNet-50's table in minutes)")
    ap.add_argument("--latency-iterations", type=int, default=6)
    ap.add_argument("--tolerance-pct", type=float, default=5.0, help="the search's own tolerance")
    ap.add_argument("--finetune-epochs", type=int, default=1, help="baseline only")
    ap.add_argument("--train-samples", type=int, default=None, help="fine-tune on a fixed subset (default: all)")
    ap.add_argument("--eval-samples", type=int, default=None, help="baseline: test subset (default: all 10,000)")
    ap.add_argument("--resnet-size", type=int, default=224, help="ResNet-50 input size (224 for the record)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of each final timing session")
    ap.add_argument("--sessions", type=int, default=3,
                    help="final timing sessions (each loads the three models anew; speed-ups combined across them)")
    ap.add_argument("--cache", default=None, help="latency table cache directory (default: deploycomp's)")
    ap.add_argument("--out", default="benchmarks/results/prune_latency.md")
    args = ap.parse_args()

    import torch

    from deploycomp import console
    from deploycomp.bench.env import capture

    torch.set_num_threads(max(args.threads, 2))
    targets = [float(t) for t in args.targets.split(",")]
    t_all = time.perf_counter()
    load_before = _loadavg()
    sections, dump = [], {}
    for name in args.models.split(","):
        console.info(f"== {name}")
        rows, records = run_model(name, targets, args)
        sections.append((name, rows))
        dump[name] = records
    minutes = (time.perf_counter() - t_all) / 60
    env = capture("cpu")
    text = render(sections, args, env, minutes, load_before, _loadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(compact(dump), default=str) + "\n")
    print(text)


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    except OSError:
        return "-"


def load(name: str, args):
    """(checkpoint, data, is_baseline) for a model name."""
    from deploycomp.checkpoint import load_model
    from deploycomp.data import load_dataset
    from deploycomp.inputs import Data, load_inputs

    if name == "baseline":
        ckpt, data = load_inputs(None)
        return ckpt, data, True
    if name == "resnet50":
        size = (args.resnet_size, args.resnet_size)
        ckpt = load_model("resnet50", input_size=size)  # torchvision architecture, random weights
        test, info = load_dataset("synthetic", "test", input_size=size)
        train, _ = load_dataset("synthetic", "train", input_size=size)
        return ckpt, Data(info, test, train), False
    raise SystemExit(f"unknown model {name!r}: use baseline or resnet50")


def compact(dump: dict) -> dict:
    """What the JSON keeps of the timing sessions: no round orders, the environment once per model."""
    for records in dump.values():
        for rec in records["targets"].values():
            for one in rec["session"]:
                for r in one:
                    records.setdefault("environment", r.pop("environment", None))
                    (r.get("conditions") or {}).pop("order", None)
    return dump


def run_model(name: str, targets: list[float], args):
    import tempfile

    from deploycomp.bench import BenchConfig, benchmark
    from deploycomp.export import export_onnx
    from deploycomp.prune import PruneConfig, finetune_config, prune_checkpoint

    ckpt0, data, baseline = load(name, args)
    common = dict(method=args.method, calib_samples=512 if baseline else 8, calib_batch=64 if baseline else 8,
                  recalibrate_bn=baseline, eval_samples=args.eval_samples if baseline else 8,
                  finetune=finetune_config(args.finetune_epochs, train_samples=args.train_samples) if baseline
                  else None)
    rows, records = [], {"table": None, "targets": {}}
    with tempfile.TemporaryDirectory(prefix="prune-latency-") as tmp:
        original = Path(tmp) / "original.onnx"
        export_onnx(copy.deepcopy(ckpt0), original, parity=False)
        for x in targets:
            t0 = time.perf_counter()
            lat_ckpt, lat = prune_checkpoint(copy.deepcopy(ckpt0), data, PruneConfig(
                **common, target_speedup=x, measured=True, latency_backend="ort", latency_device="cpu",
                latency_batch=1, latency_threads=args.threads, latency_widths=args.latency_widths,
                latency_iterations=args.latency_iterations, latency_tolerance_pct=args.tolerance_pct,
                latency_cache=args.cache))
            lat_s = time.perf_counter() - t0
            uni_ckpt, uni = prune_checkpoint(copy.deepcopy(ckpt0), data, PruneConfig(
                **common, target_macs_g=lat["after"]["macs_g"]))
            paths = []
            for tag, c in (("latency", lat_ckpt), ("uniform", uni_ckpt)):
                p = Path(tmp) / f"{tag}-{x:g}.onnx"
                export_onnx(c, p, parity=False)
                paths.append(str(p))
            session = [benchmark([str(original), *paths], BenchConfig(
                backend="ort", device="cpu", threads=args.threads, batches=(1,), rounds=args.rounds))
                for _ in range(args.sessions)]
            table = lat["latency"].pop("table")
            records["table"] = {k: v for k, v in table.items() if k != "entries"} | {"entries": len(table["entries"])}
            records["targets"][str(x)] = {"latency_aware": lat, "uniform": uni, "session": session}
            rows.append(row(x, lat, uni, session, lat_s, table, baseline))
    return rows, records


def over_sessions(speedups: list[float]):
    """Geometric mean and the interval across sessions, the way the latency search combines its sessions."""
    from deploycomp.prune.latency import _over_sessions

    return _over_sessions(speedups)


def row(x, lat, uni, session, lat_s, table, baseline):
    from deploycomp.bench.paired import fmt_speedup

    lr = lat["latency"]
    s_lat, s_uni = (over_sessions([one[i]["speedup"] for one in session]) for i in (1, 2))

    def acc(rec, stage):
        return f"{rec['accuracy'][stage]['top1_pct']:.2f}" if baseline else "-"

    return {
        "target": f"{x:g}x",
        "search": fmt_speedup(lr["achieved_speedup"], lr["achieved_speedup_ci95"]),
        "final": fmt_speedup(*s_lat),
        "within": "yes" if abs(s_lat[0] / x - 1) <= 0.10 else "no",
        "macs": f"{lat['after']['macs_g']:.3f} ({lat['macs_reduction_pct']:.0f} % cut)",
        "acc": f"{acc(lat, 'after_pruning')} / {acc(lat, 'after_finetuning')}",
        "timed": f"{len(lr['iterations'])}",
        "time": f"{lr['seconds']['total']:.0f} ({table['seconds']:.0f} table, {table['layers_measured']} layers "
                f"measured)",
        "uni_final": fmt_speedup(*s_uni),
        "uni_macs": f"{uni['after']['macs_g']:.3f}",
        "uni_acc": f"{acc(uni, 'after_pruning')} / {acc(uni, 'after_finetuning')}",
        "total_s": lat_s,
    }


def render(sections, args, env, minutes, load_before, load_after) -> str:
    cmd = "python benchmarks/prune_latency.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out") + \
        f" --out {args.out}"
    lines = [
        "# Latency-aware pruning to measured speed-ups on ONNX Runtime CPU (issue 12)",
        "",
        f"Command: `{cmd}` ({minutes:.1f} min).",
        "",
        f"Criterion `{args.method}`; latency on ONNX Runtime's CPU EP, batch 1, {args.threads} intra-op threads. "
        "*search*: the speed-up the latency search measured for the model it chose (paired against the original, "
        "95 % interval across its sessions); *final*: the original, the latency-aware and the uniform model timed "
        f"again together in {args.sessions} fresh interleaved sessions of {args.rounds} rounds (geometric mean of "
        "the sessions' speed-ups, 95 % interval across sessions: one session's interval does not cover the "
        "next session, see docs/latency-pruning.md, Sessions). *uniform*: layer-wise pruning, every layer the "
        "same ratio (channels rounded to multiples of 8), searched to the latency-aware model's MACs. Top-1 (%) "
        "right after pruning / after fine-tuning; MACs in G (FLOPs = 2 x MACs). Time: the latency search's wall "
        "seconds (table measurement included; the table is measured for the first target and reused from the cache "
        "for the others). *within 10 %*: the final speed-up within 10 % of the target.",
        "",
    ]
    for name, rows in sections:
        title = {"baseline": "Shipped baseline (light_resnet18, Fashion-MNIST, 28 px)",
                 "resnet50": f"ResNet-50 (torchvision, random weights, {args.resnet_size} px: timed only)"}[name]
        train = f"{args.train_samples:,}" if args.train_samples else "all 60,000"
        test = f"{args.eval_samples:,} images" if args.eval_samples else "all 10,000"
        ft = (f"fine-tuning: {args.finetune_epochs} epoch(s) SGD lr 0.01 on {train} training images; test {test}"
              if name == "baseline" else "no accuracy: random weights")
        lines += [f"## {title}", "", ft, "",
                  "| target | search | final | within 10 % | MACs | top-1 | timed | search s | uniform: final | "
                  "uniform MACs | uniform top-1 |",
                  "|---|---|---|---|---|---|---:|---|---|---:|---|"]
        for r in rows:
            lines.append(f"| {r['target']} | {r['search']} | {r['final']} | {r['within']} | {r['macs']} | {r['acc']} | "
                         f"{r['timed']} | {r['time']} | {r['uni_final']} | {r['uni_macs']} | {r['uni_acc']} |")
        lines.append("")
    lines += [
        "## Machine",
        "",
        f"- CPU: {env['cpu_model']}, {env['cpus_usable']} usable cores; load average (1/5/15 min) at start "
        f"{load_before}, at end {load_after}",
        f"- {env['os']}, Python {env['python']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"deploycomp {env['deploycomp']}",
        f"- measured {env['time_utc']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
