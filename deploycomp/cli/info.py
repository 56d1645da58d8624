"""deploycomp info: what a model is and costs (params, size, MACs/FLOPs, channels, memory)."""

from __future__ import annotations

import click

from deploycomp.cli.options import json_option, model_kwargs, model_options, pass_options, print_json


@click.command()
@model_options
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size for the memory estimate.")
@click.option("--layers", is_flag=True, help="Also list every convolution/linear layer with its channels.")
@click.option("--list-models", is_flag=True, help="List the model names the zoo knows and exit.")
@click.option("--list-datasets", is_flag=True, help="List the dataset names and exit.")
@json_option
@pass_options
def info(opts: dict) -> None:
    """Parameters (total / trainable / non-trainable), size, MACs and FLOPs, memory estimate.

    MACs are multiply-accumulates of one forward pass at batch 1; FLOPs = 2 x MACs. Sizes are MiB.
    """
    from deploycomp import console
    from deploycomp.info import describe, list_registered

    if opts["list_models"] or opts["list_datasets"]:
        for line in list_registered(models=opts["list_models"], datasets=opts["list_datasets"]):
            console.result(line)
        return
    report = describe(opts["model"], batch=opts["batch"], **model_kwargs(opts))
    if opts["as_json"]:
        print_json(report)
        return
    console.table(f"{report['model']} ({report['arch']})", ["measure", "value"], _rows(report))
    if opts["layers"]:
        console.table("layers", ["layer", "type", "in", "out", "groups"],
                      [[r["layer"], r["type"], r["in"], r["out"], r["groups"]] for r in report["layers"]])


def _rows(r: dict) -> list[list]:
    rows = [["task", r.get("task") or "follows the data"],
            ["input shape (C, H, W)", " x ".join(map(str, r["input_shape"]))],
            ["total params", r["params_total"]], ["trainable params", r["params_trainable"]],
            ["non-trainable params", r["params_non_trainable"]],
            ["MACs (G)", f"{r['macs_g']:.4f}"], ["FLOPs (G) = 2 x MACs", f"{r['flops_g']:.4f}"],
            ["weights size (MiB)", f"{r['weights_size_mib']:.2f}"]]
    if r.get("file_size_mib") is not None:
        rows.append(["file size (MiB)", f"{r['file_size_mib']:.2f}"])
    mem = r["memory"]
    rows += [[f"input size (MiB, batch {r['batch']})", f"{mem['input_size_mib']:.3f}"],
             ["forward/backward pass size (MiB)", f"{mem['forward_backward_pass_mib']:.2f}"],
             ["params size (MiB)", f"{mem['params_size_mib']:.2f}"],
             ["estimated total size (MiB)", f"{mem['estimated_total_mib']:.2f}"]]
    for key in ("dataset", "metrics", "lineage"):
        if r.get(key):
            rows.append([key, _short(r[key])])
    return rows


def _short(value) -> str:
    if isinstance(value, list):
        return " -> ".join(step["op"] for step in value)
    if isinstance(value, dict):
        test = value.get("test", value)
        if isinstance(test, dict) and "top1_pct" in test:
            return f"test top-1 {test['top1_pct']:.2f}%"
        if isinstance(test, dict) and "miou_pct" in test:
            return f"test mIoU {test['miou_pct']:.2f}%"
        if "test" in value and test is None:
            return "test accuracy not measured"
    return str(value)
