"""The KD report's comparison on real Fashion-MNIST, at a scale a small CPU can run.

Teacher: torchvision ResNet-18 (1 input channel, 28 px) trained from scratch. Students: light_resnet18 from
scratch vs distilled, a ResNet-18 student distilled; a temperature sweep {1.5, 2, 2.5, 3} and the three
alpha/lambda splits for the light student; then the parameter table (total / trainable / non-trainable
params, mult-adds, sizes) for the teacher, the light student and a frozen (stem + layer1) transfer model.

Everything goes through the library's one ``fit()``, ``evaluate()`` and ``kd_loss()``; rows run in
priority order and the rest are skipped (and listed as skipped) once ``--budget-s`` is spent.

    python benchmarks/kd_benchmark.py --train-samples 5000 --epochs 1 --teacher-epochs 2 --test-samples 2000 \\
        --out benchmarks/results/kd_fashion_mnist.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-samples", type=int, default=5000, help="training images (a fixed random subset)")
    ap.add_argument("--test-samples", type=int, default=2000, help="test images (a fixed random subset)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of every student row")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a machine shared with other jobs)")
    ap.add_argument("--budget-s", type=float, default=900, help="skip the remaining rows after this many seconds")
    ap.add_argument("--work-dir", default=None, help="where checkpoints go (default: a temporary directory)")
    ap.add_argument("--out", default="benchmarks/results/kd_fashion_mnist.md")
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kd-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    from deploycomp import console
    from deploycomp.checkpoint import Checkpoint, load_model
    from deploycomp.data import load_dataset, subset
    from deploycomp.distill import freeze_checkpoint, kd_loss
    from deploycomp.info import describe
    from deploycomp.metrics import count_macs, count_params
    from deploycomp.train import TrainConfig, evaluate, fit

    t_start = time.perf_counter()
    load_at_start = os.getloadavg()
    train_full, info = load_dataset("fashion-mnist", "train")
    test_full, _ = load_dataset("fashion-mnist", "test")
    train = subset(train_full, args.train_samples, seed=0)
    test = subset(test_full, args.test_samples, seed=1)
    x1 = torch.zeros(1, *info.input_shape)

    def config(epochs: int) -> TrainConfig:
        # weight_decay 0: the report's plain Adam / SGD; constant lr as in the report.
        return TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                           weight_decay=0.0, schedule="constant", seed=0, device="cpu")

    def build(arch: str) -> Checkpoint:
        ckpt = load_model(arch, num_classes=info.num_classes, in_channels=info.input_shape[0])
        ckpt.metadata.update(info.as_dict())
        return ckpt

    rows, skipped = [], []

    def run(label: str, arch: str, epochs: int, teacher=None, T=None, alpha=None, lam=None):
        if time.perf_counter() - t_start > args.budget_s and rows:
            skipped.append(label)
            console.warn(f"budget spent: skipping {label}")
            return None
        ckpt = build(arch)
        loss = kd_loss(teacher, T, alpha, lam) if teacher is not None else None
        console.info(f"== {label}")
        res = fit(ckpt.model, train, None, config(epochs), loss_fn=loss)
        acc = evaluate(ckpt.model, test, device="cpu")
        row = {"label": label, "arch": arch, "method": "KD" if teacher is not None else "scratch (CE)",
               "T": T, "alpha": alpha, "lambda": lam, "epochs": epochs, "top1_pct": acc["top1_pct"],
               "params": count_params(ckpt.model)["params_total"], "macs_m": count_macs(ckpt.model, x1) / 1e6,
               "train_s": res.seconds}
        rows.append(row)
        console.info(f"   top-1 {acc['top1_pct']:.2f}% in {res.seconds:.0f} s")
        ckpt.add_lineage("distill" if teacher is not None else "train",
                         **{k: row[k] for k in ("T", "alpha", "lambda", "epochs")})
        ckpt.metadata["metrics"] = {"test": acc}
        ckpt.save(work / f"{len(rows):02d}-{arch}.pt")
        return ckpt

    teacher = run("ResNet-18 teacher", "resnet18", args.teacher_epochs)
    t_model = teacher.model.eval()
    run("Light ResNet-18", "light_resnet18", args.epochs)
    run("KD -> Light ResNet-18", "light_resnet18", args.epochs, t_model, 2.0, 0.5, 0.5)
    run("KD -> ResNet-18", "resnet18", args.epochs, t_model, 2.0, 0.5, 0.5)
    for T in (1.5, 2.5, 3.0):
        run("KD -> Light ResNet-18", "light_resnet18", args.epochs, t_model, T, 0.5, 0.5)
    for a, lam in ((0.7, 0.3), (0.3, 0.7)):
        run("KD -> Light ResNet-18", "light_resnet18", args.epochs, t_model, 2.0, a, lam)
    run("ResNet-18 (student budget)", "resnet18", args.epochs)

    # Parameter table: teacher, light student, and the teacher frozen for transfer (stem + layer1).
    transfer = load_model(str(work / "01-resnet18.pt"))
    freeze_checkpoint(transfer, "stem,layer1")
    transfer.save(work / "transfer-frozen.pt")
    models = {"ResNet-18 teacher": work / "01-resnet18.pt",
              "Transfer (stem+layer1 frozen)": work / "transfer-frozen.pt",
              "Light ResNet-18": work / "02-light_resnet18.pt"}
    described = {name: describe(str(path)) for name, path in models.items()}
    total_s = time.perf_counter() - t_start
    write_report(Path(args.out), args, rows, skipped, described, total_s, load_at_start)
    console.info(f"wrote {args.out} ({total_s:.0f} s)")


def write_report(out: Path, args, rows, skipped, described, total_s, load_at_start) -> None:
    import torch
    import torch_pruning
    import torchvision

    def f(v, spec=""):
        return "-" if v is None else format(v, spec)

    cmd = "python benchmarks/kd_benchmark.py " + " ".join(sys.argv[1:])
    lines = [
        "# Knowledge distillation on Fashion-MNIST (the KD report's comparison, CPU scale)",
        "",
        f"Command: `{cmd}`",
        "",
        f"**Scale, stated plainly:** every model trains from scratch on a fixed random subset of "
        f"**{args.train_samples:,} of the 60,000** Fashion-MNIST training images (no augmentation), students for "
        f"**{args.epochs} epoch(s)**, the teacher for {args.teacher_epochs}; accuracy is top-1 on a fixed random "
        f"subset of **{args.test_samples:,} of the 10,000 test images** (one binomial standard error is about "
        f"{100 * (0.1 * 0.9 / args.test_samples) ** 0.5:.1f} points at 90 %). {args.optimizer.title()}, "
        f"lr {args.lr:g} constant, batch {args.batch_size}, weight decay 0, seed 0 (same initialisation and data "
        "order for every student). The report trained on all 60,000 images for many epochs on a GPU, so absolute "
        "numbers are far lower here and differences of a point or two between rows are within noise.",
        "",
        "Teacher: torchvision ResNet-18 with a 1-channel stem at 28 px (7x7/2 conv + max-pool, as in the report's "
        "~37 M mult-adds). Light student: `light_resnet18` (ResNet-18 at half width, 3x3 stem + max-pool). "
        "Loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + lambda * CE(s, y) (`deploycomp.distill.kd_loss`).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores "
        f"(shared with other jobs; load average {load_at_start[0]:.1f} at start), torch {torch.__version__} "
        f"(torch threads: {torch.get_num_threads()}), torchvision {torchvision.__version__}, torch-pruning "
        f"{torch_pruning.__version__}, Python {platform.python_version()}. Total wall time {total_s / 60:.1f} min.",
        "",
        "## Accuracy",
        "",
        "| model | method | T | alpha | lambda | epochs | test top-1 % | params | MACs (M) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['method']} | {f(r['T'], 'g')} | {f(r['alpha'], 'g')} | "
                     f"{f(r['lambda'], 'g')} | {r['epochs']} | {r['top1_pct']:.2f} | {r['params']:,} | "
                     f"{r['macs_m']:.2f} | {r['train_s']:.0f} |")
    if skipped:
        lines += ["", f"Skipped because the {args.budget_s:.0f} s budget was spent: {', '.join(skipped)}."]
    lines += ["", "MACs are multiply-accumulates of one 1x28x28 image (FLOPs = 2 x MACs).", "",
              "## Parameter table (as `deploycomp info --json` reports it)", "",
              "| measure | " + " | ".join(described) + " |", "|---|" + "---|" * len(described)]
    measures = [("total params", lambda d: f"{d['params_total']:,}"),
                ("trainable params", lambda d: f"{d['params_trainable']:,}"),
                ("non-trainable params", lambda d: f"{d['params_non_trainable']:,}"),
                ("total mult-adds (M)", lambda d: f"{d['macs'] / 1e6:.2f}"),
                ("FLOPs (G) = 2 x MACs", lambda d: f"{d['flops_g']:.4f}"),
                ("input size (MiB)", lambda d: f"{d['memory']['input_size_mib']:.4f}"),
                ("forward/backward pass size (MiB)", lambda d: f"{d['memory']['forward_backward_pass_mib']:.2f}"),
                ("params size (MiB)", lambda d: f"{d['memory']['params_size_mib']:.2f}"),
                ("estimated total size (MiB)", lambda d: f"{d['memory']['estimated_total_mib']:.2f}"),
                ("checkpoint file (MiB)", lambda d: f"{d['file_size_mib']:.2f}")]
    for name, get in measures:
        lines.append(f"| {name} | " + " | ".join(get(d) for d in described.values()) + " |")
    lines += ["", "The transfer model is the trained teacher with `--freeze stem,layer1` recorded as a `freeze` "
              "surgery (the report trained its transfer model with layers 2-4 open); its frozen parameters come "
              "back as non-trainable after reloading. The report started that model from ImageNet weights, which "
              "are not available offline here, so no transfer-learning accuracy row is given.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
