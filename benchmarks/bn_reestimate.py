"""Re-estimate a checkpoint's BatchNorm statistics on training images (a short run's eval-mode fix).

torchvision's MobileNetV3 uses BatchNorm momentum 0.01: after a few hundred steps the running statistics
still trail the weights and the model in eval mode predicts at chance (mobilenet_v3_small, 3 epochs on
15,000 Fashion-MNIST images: 9.0 % -> 77.3 % on 1,000 test images after re-estimation). This resets the
statistics, runs N training images through the model in train mode without gradients (cumulative
average), and saves a new checkpoint with the step in its lineage metadata.

Usage: python benchmarks/bn_reestimate.py IN.pt OUT.pt [--samples 2000] [--input-size 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from deploycomp.checkpoint import load_model
    from deploycomp.data import load_dataset, make_loader, subset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--input-size", type=int, default=None)
    a = ap.parse_args()
    ck = load_model(a.src)
    size = (a.input_size, a.input_size) if a.input_size else None
    train, _ = load_dataset(ck.metadata.get("dataset", "fashion-mnist"), "train", input_size=size)
    for mod in ck.model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the batches below
    ck.model.train()
    with torch.no_grad():
        for x, _ in make_loader(subset(train, a.samples, seed=3), 100):
            ck.model(x)
    for mod in ck.model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = 0.01
    ck.model.eval()
    ck.metadata["bn_reestimated"] = {"samples": a.samples, "split": "train", "seed": 3}
    ck.save(a.dst)
    print(f"wrote {a.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
