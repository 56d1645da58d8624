"""INT8 that keeps its accuracy: FP32, full post-training INT8 and INT8 with --max-drop, per model
-> benchmarks/results/int8_accuracy.md (+ .json).

Models (``--models``): the shipped baseline (light_resnet18, Fashion-MNIST, 28 px); ``edge``, a small
MobileNetV3-style CNN (benchmarks/edge_net.py: depthwise convolutions, hard-swish, squeeze-excite) and
``mobilenet``, torchvision mobilenet_v3_small at 32 px, each trained briefly on Fashion-MNIST on the CPU
(the kind of edge model whose full INT8 loses points). Each is exported once (`deploycomp export`), then
quantized for ort-cpu twice through the CLI: full INT8 (`quantize -p int8`) and
`quantize -p int8 --max-drop D` (which ranks the layers on a validation subset of the training split,
keeps the most sensitive in float, reports the test split, and times FP32, full INT8 and the guarded model
together on ONNX Runtime CPU, batch 1, 1 thread, paired, 2 sessions). Top-1 is on all 10,000 test images.

QAT (``--qat-epochs``, default 1; 0 skips it): ``deploycomp train --qat ort-cpu`` on each model (SGD, a
hundredth of the default learning rate, ``--qat-samples`` training images), then export and
``quantize -p int8`` as for any model; its top-1 against the original FP32, and FP32 / full PTQ INT8 / QAT
INT8 timed together (``deploycomp bench``, ORT CPU, batch 1, 1 thread, 5 sessions).

Usage: python benchmarks/int8_accuracy.py [--workdir /tmp/deploycomp-int8acc] [--max-drop 0.5[,0.1]]
       [--models baseline,edge,mobilenet,effnet] [--train-samples 15000] [--epochs 3]
       [--qat-epochs 1] [--qat-samples 15000]
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

GOAL_MAX_DROP = 0.5
GOAL_SPEEDUP_SHARE = 0.8  # the guarded model keeps at least this share of full INT8's speed-up


class Refused(Exception):
    """deploycomp exited with a one-line error (e.g. a --max-drop only FP32 meets)."""


def deploycomp(*args: str, json_out: bool = True) -> dict:
    """Run ``deploycomp ARGS --json`` in a subprocess (the same code path as a user); returns its JSON."""
    cmd = [sys.executable, "-m", "deploycomp", *args, *(["--json"] if json_out else [])]
    print("$ deploycomp " + " ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    if proc.returncode == 2 and len(errors) == 1:
        raise Refused(errors[0])
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout) if json_out else {}


EDGE_NET = str(ROOT / "benchmarks" / "edge_net.py") + ":build"
TRAIN = {  # model key -> deploycomp train arguments (without -o)
    "mobilenet": ["--model", "mobilenet_v3_small", "--data", "fashion-mnist", "--input-size", "32",
                  "--optimizer", "adam", "--lr", "2e-3"],
    "edge": ["--model", EDGE_NET, "--data", "fashion-mnist", "--optimizer", "adam", "--lr", "3e-3"],
    "effnet": ["--model", "efficientnet_b0", "--data", "fashion-mnist", "--input-size", "32",
               "--optimizer", "adam", "--lr", "2e-3"],
}
NAMES = {"baseline": "light_resnet18 (shipped baseline)", "mobilenet": "mobilenet_v3_small (32 px)",
         "edge": "edge_net (benchmarks/edge_net.py: depthwise, hard-swish, SE)",
         "effnet": "efficientnet_b0 (32 px)"}
GOAL_QAT_POINTS = 0.3  # QAT's INT8 ends within this many points of FP32


def train(key: str, out: Path, train_samples: int, epochs: int) -> list[str]:
    args = ["train", *TRAIN[key], "--epochs", str(epochs), "--train-samples", str(train_samples),
            "--val-samples", "2000", "-o", str(out)]
    if not out.exists():
        deploycomp(*args, json_out=False)
    return args


def quantize(onnx: Path, out: Path, *args: str) -> dict:
    """``deploycomp quantize`` unless ``out`` and its sidecar exist already (a re-run continues)."""
    side = Path(f"{out}.json")
    if out.exists() and side.exists():
        return json.loads(side.read_text())
    return deploycomp("quantize", str(onnx), "-p", "int8", *args, "-o", str(out))


def run_model(name: str, onnx: Path, max_drop: float) -> dict:
    full = quantize(onnx, onnx.with_suffix(".int8.onnx"))
    try:
        guarded = quantize(onnx, onnx.with_suffix(f".int8-maxdrop{max_drop:g}.onnx"), "--max-drop",
                           str(max_drop), "--sensitivity")
    except Refused as e:
        return {"model": name, "full": full, "refused": str(e), "max_drop": max_drop}
    return {"model": name, "full": full, "guarded": guarded, "max_drop": max_drop}


def run_qat(key: str, args: list[str], onnx: Path, work: Path, epochs: int, samples: int,
            guarded: Path | None = None) -> dict:
    """QAT for ort-cpu, export, quantize; then FP32, full PTQ INT8, the --max-drop model (``guarded``, when it
    keeps layers in float) and QAT INT8 timed together (one paired bench, 5 sessions)."""
    import onnx as onnx_lib

    qat_pt, qat_onnx = work / f"{key}_qat.pt", work / f"{key}_qat.onnx"
    args = args or ["--model", str(ROOT / "models" / "light_resnet18_fmnist.pt")]  # the shipped baseline
    arch = args[args.index("--arch"):args.index("--arch") + 2] if "--arch" in args else []
    if not qat_pt.exists():
        deploycomp("train", *args, "--qat", "ort-cpu", "--epochs", str(epochs), "--train-samples", str(samples),
                   "--val-samples", "2000", "-o", str(qat_pt), json_out=False)
    trained = json.loads(Path(f"{qat_pt}.json").read_text())
    if not qat_onnx.exists():
        deploycomp("export", "--model", str(qat_pt), *arch, "-o", str(qat_onnx), json_out=False)
    ptq, qat = onnx.with_suffix(".int8.onnx"), qat_onnx.with_suffix(".int8.onnx")
    record = quantize(qat_onnx, qat)
    timing = work / f"{key}_qat.bench.json"
    models = [("fp32", onnx), ("ptq", ptq), *([("guarded", guarded)] if guarded else []), ("qat", qat)]
    if not timing.exists():
        deploycomp("bench", *[str(p) for _, p in models], "--threads", "1", "--sessions", "5", "--json",
                   str(timing), json_out=False)
    results = {Path(r["artifact"]).name: r for r in json.loads(timing.read_text())["results"]}

    def ops(path: Path) -> list[str]:
        return sorted(n.op_type for n in onnx_lib.load(str(path)).graph.node)

    return {"key": key, "epochs": epochs, "samples": samples, "train_seconds": trained["train_seconds"],
            "simulated_top1_pct": trained["test"]["top1_pct"], "accuracy": record["accuracy"],
            "same_ops_as_ptq": ops(ptq) == ops(qat),
            "speed": {name: {"speedup_vs_fp32": results[p.name]["speedup"],
                             "speedup_ci95": results[p.name]["speedup_ci95"],
                             "median_ms": results[p.name]["latency_median_ms"]}
                      for name, p in models if p.name in results},
            "commands": [f"deploycomp train {' '.join(args)} --qat ort-cpu --epochs {epochs} --train-samples {samples} "
                         f"--val-samples 2000 -o {qat_pt.name}",
                         " ".join(["deploycomp export --model", qat_pt.name, *arch, "-o", qat_onnx.name]),
                         f"deploycomp quantize {qat_onnx.name} -p int8",
                         f"deploycomp bench {' '.join(p.name for _, p in models)} --threads 1 --sessions 5"]}


def qat_lines(qats: list[dict], rows: list[dict]) -> list[str]:
    """The QAT table: FP32, full PTQ, QAT (all INT8 top-1 on the test split, speed-ups from one paired run)."""
    if not qats:
        return []
    full = {r["model"]: r["full"]["accuracy"] for r in rows}
    lines = ["## Quantization-aware training (ort-cpu)", "",
             "`deploycomp train --qat ort-cpu` on the same FP32 checkpoint (SGD, lr 1e-3, cosine), then "
             "`export` and `quantize -p int8` exactly as for PTQ. Drops are against the original FP32 model. "
             "Speed: FP32, full PTQ INT8 and QAT INT8 timed together (`deploycomp bench`, ORT CPU, batch 1, 1 "
             "thread, 5 sessions), speed-up vs FP32 with its 95 % interval.", "",
             "| model | FP32 top-1 | full PTQ top-1 (drop) | QAT | QAT INT8 top-1 (drop) | simulated in training | "
             "PTQ speed-up | QAT speed-up | same graph ops as PTQ | goal |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for q in qats:
        name = NAMES[q["key"]]
        fa = full[name]
        fp32 = fa["fp32_top1_pct"]
        top1 = q["accuracy"]["top1_pct"]
        drop = fp32 - top1
        sp = q["speed"]
        met = drop <= GOAL_QAT_POINTS and q["same_ops_as_ptq"]
        lines.append(f"| {name} | {fp32:.2f} | {fa['top1_pct']:.2f} ({fa['top1_drop_points']:+.2f}) | "
                     f"{q['epochs']} epoch x {q['samples']:,} images, {q['train_seconds'] / 60:.1f} min | "
                     f"{top1:.2f} ({drop:+.2f}) | {q['simulated_top1_pct']:.2f} | {_ci(sp['ptq'])} | "
                     f"{_ci(sp['qat'])} | {'yes' if q['same_ops_as_ptq'] else 'NO'} | "
                     f"{'met' if met else 'MISSED'} |")
    lines += ["", f"Goal: QAT's INT8 within {GOAL_QAT_POINTS:g} points of FP32 at full INT8 speed (the same "
              "operators as the PTQ graph: QAT changes weights, not the graph).", "", *QAT_NOTES, ""]
    return lines


QAT_NOTES = [  # what the 2026-12-06 run showed (hand-written: read it against the table above)
    "Recorded 2026-12-06:",
    "",
    "- EfficientNet-B0 at 32 px (3 epochs, Adam 2e-3 on 15,000 images; 70.62 % FP32) is the model whose full "
    "INT8 loses a point: 5.03. Its loss is spread over the network: one candidate alone wins back at most "
    "1.6 points on validation, and --max-drop 0.5 needs 74 of 87 candidates in float (validation 0.45, test "
    "0.52: missed by 0.02), which runs slower than FP32. Ranking single candidates cannot find a small float "
    "set for error this distributed; QAT is what helps such a model.",
    "- QAT, 1 epoch: 69.27 % (drop 1.35, 3.7 of the 5.03 points won back) at full INT8 speed. Its first "
    "version rounded only the inputs of Conv/Gemm (TensorRT's placement): simulated INT8 then lost 0.9 points "
    "where ONNX Runtime lost 5.0, and QAT reached only 66.14 %. Rounding the tensors ort-cpu also quantizes "
    "(BatchNorm outputs, SiLU's sigmoid and product, activations, pooling) brought it to 69.27 %. The gap "
    "left between the simulated 71.27 % and 69.27 % in ONNX Runtime is what is still not simulated "
    "(squeeze-excite products and residual sums written as code); the goal (within 0.3 points) is missed on "
    "this model and met on the baseline (+0.00) and edge_net (+0.28).",
    "- The baseline's QAT time (8.8 min) was taken while another QAT run shared the 2 cores; alone it took "
    "0.7-0.9 min in earlier runs. A 3-epoch QAT of EfficientNet-B0 was started and stopped for time: not "
    "measured.",
    "- Why deploycomp's own QAT and not NNCF or ModelOpt: benchmarks/results/qat_libraries.md.",
]


def _float_text(floats: list[dict]) -> str:
    """The float candidates, named when few, counted when many."""
    if len(floats) <= 4:
        return ", ".join(f"`{f['layer']}`" for f in floats) or "none"
    groups = [f["layer"] for f in floats if f["layer"].startswith("every ")]
    return f"{len(floats) - len(groups)} layers" + (f" + {', '.join(groups)}" if groups else "")


def _ci(m: dict) -> str:
    ci = m.get("speedup_ci95")
    return f"{m['speedup_vs_fp32']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _goal_line(r: dict, share_override: float | None = None) -> str:
    max_drop = r["max_drop"]
    if "refused" in r:
        return f"- {r['model']}, --max-drop {max_drop:g}: refused, nothing written: `{r['refused']}`"
    fa, ga = r["full"]["accuracy"], r["guarded"]["accuracy"]
    g = r["guarded"]["quantization"]["guard"]
    share = share_override if share_override is not None else \
        (g.get("speed") or {}).get("guarded_share_of_int8_speedup")
    parts = [f"full INT8 loses {fa['top1_drop_points']:.2f} points "
             f"({'>= 1: a goal model' if fa['top1_drop_points'] >= 1 else '< 1: not a goal model'})",
             f"--max-drop {max_drop:g} test drop {ga['top1_drop_points']:.2f} "
             f"({'met' if ga['top1_drop_points'] <= max_drop else 'MISSED'})"]
    if share is not None:
        parts.append(f"keeps {100 * share:.0f} % of the INT8 speed-up "
                     f"({'met' if share >= GOAL_SPEEDUP_SHARE else 'MISSED'})")
    return f"- {r['model']}: " + "; ".join(parts)


def findings(rows: list[dict]) -> list[str]:
    """What the rows show, from the rows: which model is the goal model and what --max-drop kept in float."""
    out = []
    for r in rows:
        if "refused" in r or r["full"]["accuracy"]["top1_drop_points"] < 1:
            continue
        g = r["guarded"]["quantization"]["guard"]
        floats = g["float_layers"]
        groups = [f for f in floats if f["layer"].startswith("every ")]
        out.append(f"- {r['model']} loses {r['full']['accuracy']['top1_drop_points']:.2f} points under full INT8: "
                   f"--max-drop {r['max_drop']:g} keeps {len(floats)} of {g['layers_considered']} candidates in "
                   f"float ({len(groups)} operator groups: {', '.join(f['layer'] for f in groups) or 'none'}), "
                   f"found in {g['evaluations']} evaluations on {g['samples']} validation images.")
    return out or ["- No model here loses 1 point under full INT8: --max-drop has nothing to return to float."]


def markdown(rows: list[dict], max_drop: str, commands: list[str], minutes: float, load: tuple,
             qats: list[dict] = (), models: str = "baseline,edge") -> str:
    import platform

    from deploycomp import __version__
    from deploycomp.quantize import has_vnni

    lines = ["# INT8 that keeps its accuracy (ort-cpu): full PTQ, --max-drop and QAT", "",
             f"Generated by `python benchmarks/int8_accuracy.py --models {models} --max-drop {max_drop}` in "
             f"{minutes:.1f} min on "
             f"{time.strftime('%Y-%m-%d')} (a re-run reuses the checkpoints, ONNX files and quantized models "
             "already in the workdir).", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, VNNI: {has_vnni()}; deploycomp {__version__}",
             f"- load average when this script started {load[0]:.1f}, when it ended {load[1]:.1f} (2 cores; "
             "artifacts reused from the workdir were made earlier and say so in the notes below). Speed-ups are "
             "paired (every round times all models in alternation), so their intervals hold under load; "
             "absolute milliseconds do not.",
             "- top-1 on all 10,000 Fashion-MNIST test images (ONNX Runtime CPU); --max-drop decides on 2,000 "
             "training images disjoint from the 512 calibration images; speed: ORT CPU, batch 1, 1 thread, "
             "speed-up vs FP32 with its 95 % interval, from one paired `deploycomp bench` of FP32, full INT8, "
             "the --max-drop model and the QAT model (5 sessions; the rows of a second bound use quantize's own "
             "timing, 5 sessions x 6 rounds)", "",
             "| model | FP32 top-1 | full INT8 top-1 (drop) | full INT8 speed-up | --max-drop | top-1 (drop) | "
             "layers in float | guarded speed-up | share of INT8 speed-up | evaluations |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    shares: dict[int, float | None] = {}  # the share the table shows, for the goal lines
    for r in rows:
        if "refused" in r:
            fa = r["full"]["accuracy"]
            lines.append(f"| {r['model']} | {fa['fp32_top1_pct']:.2f} | {fa['top1_pct']:.2f} "
                         f"({fa['top1_drop_points']:+.2f}) | - | {r['max_drop']:g} | refused: only FP32 meets it "
                         "(see below) | - | - | - | - |")
            continue
        fa, ga = r["full"]["accuracy"], r["guarded"]["accuracy"]
        g = r["guarded"]["quantization"]["guard"]
        sp = (g.get("speed") or {}).get("models", {})
        share = (g.get("speed") or {}).get("guarded_share_of_int8_speedup")
        five = next((q["speed"] for q in qats if NAMES[q["key"]] == r["model"]), None)
        if five and r["max_drop"] == float(max_drop.split(",")[0]):  # the 5-session paired bench (run_qat)
            sp = {"int8": five["ptq"], **({"guarded": five["guarded"]} if "guarded" in five else {})}
            full_x = five["ptq"]["speedup_vs_fp32"]
            share = ((five["guarded"]["speedup_vs_fp32"] - 1) / (full_x - 1)
                     if "guarded" in five and full_x > 1 else None)
        shares[id(r)] = share
        floats = _float_text(g["float_layers"])
        lines.append(
            f"| {r['model']} | {fa['fp32_top1_pct']:.2f} | {fa['top1_pct']:.2f} ({fa['top1_drop_points']:+.2f}) | "
            f"{_ci(sp['int8']) if 'int8' in sp else '-'} | {r['max_drop']:g} | "
            f"{ga['top1_pct']:.2f} ({ga['top1_drop_points']:+.2f}) | "
            f"{floats} | {_ci(sp['guarded']) if 'guarded' in sp else '= full INT8'} | "
            f"{'-' if share is None else f'{100 * share:.0f} %'} | "
            f"{g['evaluations']} (bound {g['evaluation_bound']}) |")
    lines += ["", "Share of INT8 speed-up = (guarded speed-up - 1) / (full INT8 speed-up - 1), from the same paired "
              "run. Drops are FP32 minus INT8 in points (positive: INT8 lost). Per-layer sensitivity (points won "
              "back with only that layer in float) is in the `.sensitivity.md` files beside each model in the "
              "workdir and in int8_accuracy.json.", "",
              f"Goals: drop with --max-drop {GOAL_MAX_DROP:g} at most {GOAL_MAX_DROP:g} points; the guarded model "
              f"keeps at least {100 * GOAL_SPEEDUP_SHARE:.0f} % of full INT8's speed-up.", "",
              "Goal check:", "",
              *[_goal_line(r, shares.get(id(r))) for r in rows], "",
              *findings(rows), "",
              "Earlier run (2026-12-06, workdir since lost; `--models mobilenet`): torchvision mobilenet_v3_small "
              "at 32 px (3 epochs on 15,000 images, BatchNorm statistics re-estimated with "
              "benchmarks/bn_reestimate.py because torchvision's momentum of 0.01 leaves them behind after 351 "
              "steps) lost 0.24 points under full INT8; with --max-drop 0.1 even all 54 Conv/Gemm in float lost "
              "0.35 points on validation: the loss sat in the squeeze-excite and hard-swish operators between "
              "the layers, which is why --max-drop now also considers each operator type (every Mul, Add, ...) "
              "as one candidate on ort-cpu.", "",
              *qat_lines(list(qats), rows),
              "## Commands", "", "```", *commands, "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/deploycomp-int8acc")
    ap.add_argument("--max-drop", default=str(GOAL_MAX_DROP), help="bounds, comma-separated, e.g. 0.5,0.1: "
                    "the first for every model, the others for the trained edge models only")
    ap.add_argument("--models", default="baseline,edge", help="of baseline, edge, mobilenet (trained into the "
                    "workdir when WORKDIR/KEY_fmnist.pt is missing)")
    ap.add_argument("--train-samples", type=int, default=15000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs per model (0: no QAT)")
    ap.add_argument("--qat-samples", type=int, default=15000, help="training images of the QAT run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_accuracy.md"))
    a = ap.parse_args()
    work = Path(a.workdir)
    drops = [float(d) for d in a.max_drop.split(",")]
    work.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    commands, rows, qats = [], [], []
    for key in a.models.split(","):
        args: list[str] = []
        if key != "baseline":
            ckpt = work / f"{key}_fmnist.pt"
            raw = work / f"{key}_raw.pt" if key == "mobilenet" else ckpt
            if key == "mobilenet" and ckpt.exists():
                commands.append("deploycomp " + " ".join(["train", *TRAIN[key], "--epochs", str(a.epochs),
                                                          "--train-samples", str(a.train_samples),
                                                          "--val-samples", "2000", "-o", str(raw)]))
            else:
                commands.append("deploycomp " + " ".join(train(key, raw, a.train_samples, a.epochs)))
            if key == "mobilenet":  # BatchNorm momentum 0.01: a short run's eval-mode statistics are unusable
                bn = ["benchmarks/bn_reestimate.py", str(raw), str(ckpt), "--input-size", "32"]
                if not ckpt.exists():
                    subprocess.run([sys.executable, str(ROOT / bn[0]), *bn[1:]], check=True)
                commands.append("python " + " ".join(bn))
            args = ["--model", str(ckpt)] + (["--arch", EDGE_NET] if key == "edge" else [])
        onnx = work / f"{key}.onnx"
        if not onnx.exists():
            deploycomp("export", *args, "-o", str(onnx), json_out=False)
        commands += [" ".join(["deploycomp export", *args, "-o", onnx.name]),
                     f"deploycomp quantize {onnx.name} -p int8",
                     *[f"deploycomp quantize {onnx.name} -p int8 --max-drop {d:g} --sensitivity" for d in drops
                       if d == drops[0] or key != "baseline"]]
        rows += [run_model(NAMES[key], onnx, d) for d in drops if d == drops[0] or key != "baseline"]
        if a.qat_epochs > 0:
            first = next((r for r in rows if r["model"] == NAMES[key] and "guarded" in r), None)
            floats = first and first["guarded"]["quantization"]["guard"]["float_layers"]
            guarded = onnx.with_suffix(f".int8-maxdrop{drops[0]:g}.onnx") if floats else None
            qats.append(run_qat(key, args, onnx, work, a.qat_epochs, a.qat_samples, guarded))
            commands += qats[-1]["commands"]
    minutes = (time.time() - t0) / 60
    out = Path(a.out)
    commands = [c.replace(str(ROOT) + "/", "") for c in commands]
    out.write_text(markdown(rows, a.max_drop, commands, minutes, (load0, os.getloadavg()[0]), qats, a.models))
    out.with_suffix(".json").write_text(json.dumps({"ptq": rows, "qat": qats}, indent=2, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
