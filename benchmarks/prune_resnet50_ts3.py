"""TS3's structure on torchvision ResNet-50 (1000 classes, 224 px), and the time to prune it by magnitude.

Issue 3, benchmarks 1 and 3. The TS3 report pruned ResNet-50 10 % layer-wise and reported
97.70 -> 79.67 MiB and 4.13 -> 3.34 G (MACs). No ImageNet is needed for the structure: magnitude
pruning uses weights only, and which channels go does not change the counts of layer-wise pruning.

Rows:
- ``round_to 1`` (the TS3 setting): deploycomp.prune.prune_channels, timed (graph tracing + pruning);
- ``round_to 8`` (deploycomp's default): the full library path prune_checkpoint (without data-driven
  calibration, evaluation on 8 synthetic images, no fine-tuning), where balanced rounding and the
  ratio search keep the MACs reduction near what ratio 0.1 asks for.

    python benchmarks/prune_resnet50_ts3.py --out benchmarks/results/prune_resnet50_ts3.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of the magnitude pruning")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/prune_resnet50_ts3.md")
    args = ap.parse_args()

    import torch

    from deploycomp import console
    from deploycomp.bench.env import capture
    from deploycomp.checkpoint import load_model
    from deploycomp.data import load_dataset
    from deploycomp.inputs import Data
    from deploycomp.metrics import count_macs, count_params, state_dict_size_mib
    from deploycomp.prune import PruneConfig, prune_channels, prune_checkpoint
    from deploycomp.prune.criteria import get_criterion

    if args.threads:
        torch.set_num_threads(args.threads)
    console.set_verbosity(console.QUIET)
    x = torch.zeros(1, 3, 224, 224)

    def measure(model):
        return {"params": count_params(model)["params_total"], "macs_g": count_macs(model, x) / 1e9,
                "size_mib": state_dict_size_mib(model)}

    before = measure(load_model("resnet50").model)
    times, after = [], None
    for _ in range(args.repeats):
        model = load_model("resnet50").model.eval()
        t = time.perf_counter()
        prune_channels(model, x, get_criterion("magnitude")(), args.ratio, round_to=1)
        times.append(time.perf_counter() - t)
        after = measure(model)

    ckpt = load_model("resnet50", input_size=(224, 224))
    test, info = load_dataset("synthetic", "test", input_size=(224, 224))
    t = time.perf_counter()
    _, rec8 = prune_checkpoint(ckpt, Data(info, test, None),
                               PruneConfig(method="magnitude", ratio=args.ratio, finetune=None, eval_samples=8))
    total8 = time.perf_counter() - t
    after8 = {"params": rec8["after"]["params_total"], "macs_g": rec8["after"]["macs_g"],
              "size_mib": rec8["after"]["weights_size_mib"]}

    env = capture("cpu")
    red = 100 * (1 - after["macs_g"] / before["macs_g"])
    lines = [
        "# ResNet-50, TS3 structure: 10 % layer-wise magnitude pruning (issue 3, benchmarks 1 and 3)",
        "",
        f"Command: `python benchmarks/prune_resnet50_ts3.py --ratio {args.ratio} --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "") + "`",
        "",
        "torchvision ResNet-50, 1000 classes, input 1x3x224x224. MACs from torch-pruning's counter "
        "(FLOPs = 2 x MACs); size = serialised state dict in MiB.",
        "",
        "| | params | MACs (G) | size (MiB) | MACs reduction |",
        "|---|---:|---:|---:|---:|",
        "| TS3 report, before | - | 4.13 | 97.70 | |",
        "| TS3 report, after | - | 3.34 | 79.67 | 19.1 % |",
        f"| deploycomp, before | {before['params']:,} | {before['macs_g']:.3f} | {before['size_mib']:.2f} | |",
        f"| deploycomp, after (`--round-to 1`, as TS3) | {after['params']:,} | {after['macs_g']:.3f} | "
        f"{after['size_mib']:.2f} | {red:.1f} % |",
        f"| deploycomp, after (`--round-to 8`, default) | {after8['params']:,} | {after8['macs_g']:.3f} | "
        f"{after8['size_mib']:.2f} | {rec8['macs_reduction_pct']:.1f} % "
        f"(asked {rec8['macs_reduction_asked_pct']:.1f} %) |",
        "",
        f"Time to prune by magnitude (`--round-to 1`: dependency graph tracing + importance + pruning, "
        f"{args.repeats} runs): min {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s, "
        f"max {max(times):.2f} s (target: under 10 s).",
        f"With `--round-to 8` the whole prune_checkpoint took {total8:.1f} s, of which pruning "
        f"{rec8['seconds']['pruning']:.1f} s (including the dry runs of the ratio search); "
        "the rest is MACs counting and evaluation of 8 synthetic images.",
        "",
        "Analytically, ratio r removes about 1 - (1 - r)^2 of a plain CNN's MACs when every layer keeps "
        f"(1 - r) of its channels: {100 * (1 - (1 - args.ratio) ** 2):.1f} % for r = {args.ratio}.",
        "",
        "## Machine",
        "",
        f"- CPU: {env['cpu_model']} ({env['cpus_usable']} usable cores, torch threads {env['torch_threads']}); "
        "shared with other jobs while measured",
        f"- {env['os']}, Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"torch-pruning {_version('torch-pruning')}, deploycomp {env['deploycomp']}",
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
