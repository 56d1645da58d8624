"""Every pruning criterion on the shipped baseline at one ratio, with the same short fine-tune (issue 3, benchmark 2).

For each registered criterion: prune the baseline (light_resnet18 on Fashion-MNIST) layer-wise at
``--ratio`` with the default rounding (multiples of 8), fine-tune it with the shared ``fit()`` for
``--finetune-epochs`` on ``--train-samples`` training images (SGD, lr 0.01, cosine), and measure
top-1 before / right after pruning / after fine-tuning on a fixed test subset, with params, MACs and
the wall time of each stage. One markdown table.

    python benchmarks/prune_criteria_baseline.py --ratio 0.5 --finetune-epochs 1 --train-samples 5000 \\
        --eval-samples 2000 --threads 1 --out benchmarks/results/prune_criteria_baseline.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped baseline)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--methods", default=None, help="comma-separated criteria (default: all registered)")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--train-samples", type=int, default=None, help="fine-tune on a fixed subset (default: all)")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=None, help="fixed test subset (default: all 10,000)")
    ap.add_argument("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
                    help="keep the BatchNorm statistics of the unpruned model (default: re-estimate them)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/prune_criteria_baseline.md")
    args = ap.parse_args()

    import torch

    from deploycomp import console
    from deploycomp.bench.env import capture
    from deploycomp.checkpoint import default_model, load_model
    from deploycomp.inputs import load_inputs
    from deploycomp.prune import PruneConfig, finetune_config, prune_checkpoint
    from deploycomp.prune.criteria import list_criteria

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or default_model()
    _, data = load_inputs(model)
    methods = args.methods.split(",") if args.methods else list_criteria()
    rows, t_all = [], time.perf_counter()
    for method in methods:
        console.info(f"== {method}")
        ft = finetune_config(args.finetune_epochs, train_samples=args.train_samples, seed=0)
        cfg = PruneConfig(method=method, ratio=args.ratio, calib_samples=args.calib_samples,
                          calib_batch=args.calib_batch, finetune=ft, eval_samples=args.eval_samples,
                          recalibrate_bn=args.recalibrate_bn)
        _, r = prune_checkpoint(load_model(model), data, cfg)
        acc, s = r["accuracy"], r["seconds"]
        rows.append([method, f"{acc['before']['top1_pct']:.2f}", f"{acc['after_pruning']['top1_pct']:.2f}",
                     f"{acc['after_finetuning']['top1_pct']:.2f}" if ft else "-",
                     f"{r['before']['params_total']:,} -> {r['after']['params_total']:,}",
                     f"{r['before']['macs_g'] * 1e3:.1f} -> {r['after']['macs_g'] * 1e3:.1f}",
                     f"{r['macs_reduction_pct']:.1f}", f"{r['channels_removed_pct']:.1f}"
                     + (f" ({len(r['removed_blocks'])} blocks)" if r["removed_blocks"] else ""),
                     f"{s['calibration']:.1f}", f"{s['pruning']:.1f}", f"{s['finetuning']:.1f}"])
        console.info(" | ".join(rows[-1]))
    env = capture("cpu")
    header = ["method", "top-1 before", "after pruning", "after fine-tune", "params", "MACs (M)",
              "MACs -%", "channels -%", "calib s", "prune s", "fine-tune s"]
    flags = [f"--ratio {args.ratio}", f"--finetune-epochs {args.finetune_epochs}",
             f"--train-samples {args.train_samples}" if args.train_samples else "",
             f"--calib-samples {args.calib_samples}", f"--calib-batch {args.calib_batch}",
             f"--eval-samples {args.eval_samples}" if args.eval_samples else "",
             "" if args.recalibrate_bn else "--no-recalibrate-bn", f"--threads {args.threads}" if args.threads else "",
             f"--model {args.model}" if args.model else ""]
    cmd = " ".join(["python benchmarks/prune_criteria_baseline.py", *[f for f in flags if f]])
    if args.finetune_epochs:
        subset = f"a fixed subset of {args.train_samples:,} training images" if args.train_samples else \
            "the full training split"
        finetune = f"fine-tuning {args.finetune_epochs} epoch(s) of SGD (lr 0.01, cosine, batch 128) on {subset}"
    else:
        finetune = "no fine-tuning"
    evaluated = f"a fixed subset of {args.eval_samples:,}" if args.eval_samples else "all 10,000"
    bn = " BatchNorm statistics re-estimated on the calibration images right after pruning (the default)." \
        if args.recalibrate_bn else " BatchNorm statistics *not* re-estimated after pruning."
    lines = [
        f"# Every criterion on the shipped baseline at ratio {args.ratio} (issue 3, benchmark 2)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Model: `{model}`. Layer-wise pruning, channel counts rounded to multiples of 8 (balanced), "
        f"calibration {args.calib_samples} training images in batches of {args.calib_batch} (the same images for "
        f"every criterion); {finetune}; top-1 (%) on {evaluated} test images.{bn} For depth, ratio is the fraction "
        "of removable residual blocks. MACs per image (FLOPs = 2 x MACs). Times are wall seconds per stage.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        f"Total {time.perf_counter() - t_all:.0f} s.",
        "",
        "## Machine",
        "",
        f"- CPU: {env['cpu_model']} ({env['cpus_usable']} usable cores, torch threads {env['torch_threads']}); "
        "shared with other jobs while measured, so the times are upper bounds",
        f"- {env['os']}, Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"torch-pruning {_version('torch-pruning')}, zennit {_version('zennit')}, deploycomp {env['deploycomp']}",
        f"- measured {env['time_utc']}",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


if __name__ == "__main__":
    main()
