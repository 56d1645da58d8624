"""deploycomp prune: structured pruning (channels or residual blocks), then fine-tuning with the shared fit()."""

from __future__ import annotations

import click

from deploycomp.cli.options import (
    compose,
    data_options,
    device_option,
    json_option,
    model_kwargs,
    model_options,
    pass_options,
    print_json,
)
from deploycomp.cli.train import train_config, train_options


def latency_options(fn):
    """Where and how a measured latency target (--target-latency-ms, --target-speedup X --measured) is searched."""
    return compose(
        click.option("--latency-backend", default=None, metavar="ort|torch|torch-compile|trt",
                     help="Backend the latency target is measured on. Default: trt when TensorRT and a GPU are "
                          "present, else ort."),
        click.option("--latency-device", default=None, metavar="cpu|cuda|cuda:N",
                     help="Device of the latency backend. Default: cpu (cuda for trt)."),
        click.option("--latency-batch", type=int, default=None, metavar="N", help="Batch size timed. Default: 1."),
        click.option("--latency-threads", type=int, default=None, metavar="N",
                     help="Intra-op threads on the CPU. Default: 1, not bench's every core: reproducible on a "
                          "shared machine (see docs/latency-pruning.md)."),
        click.option("--latency-widths", type=int, default=None, metavar="N",
                     help="Candidate widths per layer group in the latency table: 1/N, 2/N, ..., N/N of its "
                          "channels, multiples of --round-to. Default: 8 (fewer: a smaller table, coarser steps)."),
        click.option("--latency-iterations", type=int, default=None, metavar="N",
                     help="Pruned candidates timed against the original at most. Default: 4."),
        click.option("--latency-tolerance-pct", type=float, default=None, metavar="PCT",
                     help="A measured speed-up within PCT % of the target ends the search. Default: 5."),
        click.option("--latency-cache", default=None, metavar="DIR|off",
                     help="Where measured layer latencies are cached and reused. Default: "
                          "~/.cache/deploycomp/latency ($DEPLOYCOMP_CACHE_DIR/latency); off: measure every time."),
    )(fn)


def finetune_options(fn):
    """train's options (--batch-size, --optimizer, --lr, ...) except --epochs, which here is --finetune-epochs."""
    donor = train_options(lambda: None)  # fresh Option objects, ours to adjust
    for p in donor.__click_params__:
        if p.name == "lr":
            p.help = "Fine-tuning learning rate. Default: 0.01 for SGD, 1e-3 for Adam."
    fn.__dict__.setdefault("__click_params__", []).extend(p for p in donor.__click_params__ if p.name != "epochs")
    return fn


@click.command()
@model_options
@data_options
@device_option
@click.option("--method", required=True, metavar="NAME",
              help="Criterion: magnitude, taylor, wanda, coverage, lrp, hybrid, slimming, random, depth.")
@click.option("--ratio", type=float, default=None,
              help="Fraction of channels to remove per layer (with --global: overall), in (0, 1); "
                   "for depth: fraction of the removable residual blocks.")
@click.option("--target-macs", "target_macs_g", type=float, default=None, metavar="G",
              help="Instead of --ratio: prune until the model has G x 1e9 MACs (within 2 %).")
@click.option("--target-speedup", type=float, default=None, metavar="X",
              help="Instead of --ratio: prune until MACs before / MACs after = X (within 2 %); with --measured, "
                   "until the pruned model runs X times faster on the latency backend.")
@click.option("--measured", is_flag=True,
              help="--target-speedup is a speed-up measured on the latency backend (paired against the original), "
                   "not a MACs ratio. It holds for the search's conditions only: backend, device, batch and "
                   "threads (default: ort, CPU, batch 1, one thread, while bench defaults to every core); the "
                   "output and the record give the deploycomp bench command that measures under them.")
@click.option("--target-latency-ms", type=float, default=None, metavar="MS",
              help="Instead of --ratio: prune until the model runs in MS milliseconds on the latency backend "
                   "(the original's latency is measured first).")
@click.option("--global", "global_pruning", is_flag=True,
              help="Rank channels across layers (layers end up with unequal ratios). Default: layer-wise.")
@latency_options
@click.option("--steps", type=int, default=1, show_default=True,
              help="Prune in N steps, re-calibrating and fine-tuning between them.")
@click.option("--round-to", type=int, default=8, show_default=True,
              help="Keep channel counts at multiples of K (8 suits tensor cores and SIMD); 1 disables.")
@click.option("--calib-samples", type=int, default=512, show_default=True,
              help="Calibration inputs (drawn deterministically from the training split) for data-driven criteria.")
@click.option("--calib-batch", type=int, default=64, show_default=True)
@click.option("--norm", type=click.Choice(["l1", "l2"]), default="l1", show_default=True,
              help="Weight norm of magnitude and hybrid.")
@click.option("--coverage-threshold", type=float, default=0.25, show_default=True,
              help="coverage: a channel is covered when its scaled activation exceeds this.")
@click.option("--ignore", multiple=True, metavar="LAYER",
              help="Never prune this layer's output channels (repeatable); the classifier never is.")
@click.option("--recalibrate-bn/--no-recalibrate-bn", default=None,
              help="Re-estimate BatchNorm statistics on the calibration images right after pruning (adaptive BN). "
                   "Default: on, except on synthetic data (where it is refused).")
@click.option("--finetune-epochs", type=int, default=None,
              help="Fine-tuning epochs after pruning; 0: none. Default: 1, except on synthetic data (0).")
@finetune_options
@click.option("--distill-from", default=None, metavar="TEACHER",
              help="Fine-tune with knowledge distillation from this checkpoint (e.g. the unpruned model).")
@click.option("--distill-from-arch", default=None, metavar="NAME|CODE",
              help="The user code (path/to/file.py:factory) a --distill-from checkpoint was built from, or the "
                   "architecture of a plain state dict; loading runs that code, so it is never taken from the file "
                   "alone.")
@click.option("--temperature", "-T", type=float, default=2.0, show_default=True, help="Distillation temperature.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Weight of the distillation (KL) term.")
@click.option("--lambda", "lam", type=float, default=0.5, show_default=True, help="Weight of the cross-entropy term.")
@click.option("--eval-samples", type=int, default=None, help="Measure accuracy on N test images (default: all).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to write. Default: <model>-pruned-<method>.pt in the current directory.")
@json_option
@pass_options
def prune(opts: dict) -> None:
    """Prune a model structurally, fine-tune it, and write the smaller checkpoint and a JSON record.

    Prints params, size, MACs before -> after, accuracy before / right after pruning / after
    fine-tuning, and the time of each stage. The pruned checkpoint reloads safely and exports as is.

    \b
    Examples:
      deploycomp prune --method taylor --ratio 0.1
      deploycomp prune --method wanda --target-speedup 2 --calib-samples 1024 --finetune-epochs 3
      deploycomp prune --method taylor --target-speedup 2 --measured          # 2x faster on ONNX Runtime CPU
      deploycomp prune --model resnet50 --method magnitude --target-latency-ms 40 --latency-threads 2
      deploycomp prune --model resnet50 --num-classes 1000 --input-size 224 --data synthetic \\
          --method magnitude --ratio 0.1 --round-to 1        (data-free: no dataset needed)
      deploycomp prune --model my_net.py:build --weights my_net.pth --data synthetic --input-size 64 \\
          --method magnitude --ratio 0.3
    """
    from deploycomp.prune import PruneConfig, finetune_config, run_prune

    epochs = opts["finetune_epochs"]
    ft = train_config({**opts, "epochs": max(epochs or 1, 1)})
    ft = finetune_config(1 if epochs is None else epochs, **{k: v for k, v in vars(ft).items() if k != "epochs"})
    keys = ("method", "ratio", "target_macs_g", "target_speedup", "target_latency_ms", "measured",
            *(k for k in opts if k.startswith("latency_")), "global_pruning", "steps", "round_to",
            "calib_samples", "calib_batch", "norm", "coverage_threshold", "distill_from", "distill_from_arch",
            "temperature", "alpha", "lam", "eval_samples", "seed", "device", "recalibrate_bn")
    config = PruneConfig(**{k: opts[k] for k in keys}, ignore=tuple(opts["ignore"]), finetune=ft,
                         finetune_on_synthetic=epochs is not None)
    record = run_prune(opts["model"], config, output=opts["output"], data=opts["data"], data_dir=opts["data_dir"],
                       **model_kwargs(opts))
    if opts["as_json"]:
        print_json(record)
    else:
        summary(record)


def summary(record: dict) -> None:
    """The rich table of a prune record: size and cost before -> after, accuracy per stage, time per stage."""
    from deploycomp import console

    b, a, acc, sec = record["before"], record["after"], record["accuracy"], record["seconds"]

    def arrow(x, y, fmt="{:,}"):
        return f"{fmt.format(x)} -> {fmt.format(y)}"

    metric, label = record.get("metric", "top1_pct"), record.get("metric_label", "top-1")

    def top1(d):
        return f"{d[metric]:.2f}" if d else "-"

    rows = [
        ("params", arrow(b["params_total"], a["params_total"]),
         f"{100 * (1 - a['params_total'] / b['params_total']):.1f}% fewer"),
        ("size (MiB)", arrow(b["weights_size_mib"], a["weights_size_mib"], "{:.2f}"), ""),
        ("MACs (G)", arrow(b["macs_g"], a["macs_g"], "{:.4f}"),
         f"-{record['macs_reduction_pct']:.1f}% (asked -{record['macs_reduction_asked_pct']:.1f}%)"),
        ("channels removed", f"{record['channels_removed_pct']:.1f}%", f"{len(record['removed_blocks'])} blocks"
         if record["removed_blocks"] else ""),
        (f"{label} before (%)", top1(acc["before"]), ""),
        (f"{label} right after pruning (%)", top1(acc["after_pruning"]),
         "BatchNorm re-estimated" if record["params"].get("recalibrate_bn") else ""),
        (f"{label} after fine-tuning (%)", top1(acc["after_finetuning"]),
         _epochs(record["params"]["finetune"])),
        ("time: calibration (s)", f"{sec['calibration']:.1f}", ""),
        ("time: pruning (s)", f"{sec['pruning']:.1f}", ""),
        ("time: fine-tuning (s)", f"{sec['finetuning']:.1f}", ""),
    ]
    rows += latency_rows(record.get("latency"))
    synthetic = " (synthetic data: no accuracy, nothing learnt from it)" if record["synthetic"] else ""
    console.table(f"prune --method {record['method']}: {record['model']} -> {record.get('output', '-')}{synthetic}",
                  ["", "value", "note"], rows)
    for line in reproduce_lines(record.get("latency")):
        console.result(line)


def reproduce_lines(lat: dict | None) -> list[str]:
    """Where the latency target holds, and the commands that measure the pruned model there."""
    if not lat or not lat.get("reproduce"):
        return []
    from deploycomp.bench.sessions import DEFAULT_SESSIONS
    from deploycomp.prune.latency import DEFAULT_CPU_THREADS, VERIFY_SESSIONS
    from deploycomp.prune.probes import Setup

    s, r = lat["setup"], lat["reproduce"]
    lines = [f"The latency target holds for the search's conditions: {Setup(**s).describe()}."]
    if s["threads"]:
        lines.append(f"bench's defaults differ: prune searches at {DEFAULT_CPU_THREADS} thread unless "
                     "--latency-threads (reproducible on a shared machine); bench runs on every core unless --threads.")
    lines.append(f"Measure it under them (the search's speed-up is over {VERIFY_SESSIONS} sessions; bench's over "
                 f"{DEFAULT_SESSIONS}, each a fresh process):")
    lines += [f"  {c}" for c in r["commands"]]
    if r["caveat"]:
        lines.append(f"Note: {r['caveat']}")
    return lines


def latency_rows(lat: dict | None) -> list[tuple[str, str, str]]:
    """Rows for a measured latency target: target, achieved with its interval, the model, the search's time."""
    if not lat:
        return []
    from deploycomp.bench.paired import fmt_speedup

    s = lat["setup"]
    where = f"{s['backend']} {s['device']}, batch {s['batch']}" + (f", {s['threads']} threads" if s["threads"] else "")
    target = f"{lat['target_speedup']:.3g}x"
    if lat["target_latency_ms"]:
        target += f" ({lat['target_latency_ms']:g} ms)"
    table, sec = lat["table"], lat["seconds"]
    return [
        ("latency target", target, where),
        ("latency achieved (speed-up)", fmt_speedup(lat["achieved_speedup"], lat["achieved_speedup_ci95"],
                                                    lat["verdict"]),
         f"{lat['achieved_ms']:.3g} ms vs {lat['original_ms']:.3g} ms" +
         ("" if lat["within_tolerance"] else f"; outside +-{lat['tolerance_pct']:g}%")),
        ("latency predicted (speed-up)", f"{lat['predicted_speedup']:.3g}x",
         f"candidate {lat['chosen_iteration']} of {len(lat['iterations'])} timed"),
        ("latency table (layers)", f"{table['layers_measured']} measured, {table['layers_cached']} cached",
         table["cache"] or "not cached"),
        ("time: latency search (s)", f"{sec['total']:.1f}", f"table {sec['table']:.1f}, timing {sec['search']:.1f}"),
    ]


def _epochs(finetune: dict | None) -> str:
    if not finetune:
        return "no fine-tuning"
    n = finetune["epochs"]
    subset = f" on {finetune['train_samples']:,} images" if finetune.get("train_samples") else ""
    return f"{n} epoch{'s' if n != 1 else ''}{subset}"
