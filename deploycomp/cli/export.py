"""deploycomp export: a model or checkpoint to ONNX, checked against PyTorch before it is kept."""

from __future__ import annotations

import click

from deploycomp.cli.options import (
    data_options,
    json_option,
    model_kwargs,
    model_options,
    pass_options,
    positive_int,
    print_json,
)


@click.command()
@model_options
@data_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="ONNX file to write. Default: <model>.onnx in the current directory.")
@click.option("--opset", type=int, default=None, help="ONNX opset. Default: 17 (torchscript exporter).")
@click.option("--batch", type=int, default=None, callback=positive_int("--batch"),
              help="Fixed batch size of the exported input. Default: 1.")
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis dynamic (any batch size at run time).")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Simplify the graph with onnxslim.")
@click.option("--atol", type=float, default=None,
              help="Parity passes when max |ONNX Runtime - PyTorch| <= atol + rtol * max |logit|. Default: 1e-4.")
@click.option("--rtol", type=float, default=None, help="See --atol. Default: 1e-3.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default=None,
              help="torch exporter. Default: torchscript; dynamo needs onnxscript and opset >= 18.")
@click.option("--raw", is_flag=True,
              help="Detectors: export the head's raw output (N, points, 4 + classes) without post-processing.")
@click.option("--max-detections", type=int, default=None, callback=positive_int("--max-detections"),
              help="Detectors: detections per image after NMS (a fixed-size output, padded). Default: 100.")
@click.option("--score-threshold", type=float, default=None,
              help="Detectors: drop detections scoring below this, in [0, 1). Default: 0.05.")
@click.option("--iou-threshold", type=float, default=None,
              help="Detectors: NMS suppresses a box overlapping a better one of its class by more than this "
                   "IoU, in (0, 1]. Default: 0.5.")
@json_option
@pass_options
def export(opts: dict) -> None:
    """Export a model to ONNX, then check it: ONNX checker and ONNX Runtime vs PyTorch parity.

    Parity runs on random inputs and on real images of the model's dataset; it prints the max
    absolute difference and the argmax agreement (top-1 per image; per pixel for segmentation).
    Above tolerance the command fails and the file is kept only as MODEL.FAILED-parity.onnx. A JSON
    sidecar (MODEL.onnx.json) records input name and shape, normalisation, class names, the task,
    opset, the source checkpoint and its hash.

    Detectors export with their post-processing (class-wise NMS in the graph; outputs num_detections,
    boxes, scores, labels, at most --max-detections per image) and parity is judged by matched
    detections; --raw exports the head alone.

    \b
    Examples:
      deploycomp export -o baseline.onnx
      deploycomp export --model pruned.pt --dynamic-batch -o pruned.onnx
    """
    from pathlib import Path

    from deploycomp import console
    from deploycomp.errors import check
    from deploycomp.export import check_tolerances, export_onnx, resolve_exporter
    from deploycomp.inputs import load_inputs

    check(not (opts["dynamic_batch"] and opts["batch"]), "--batch and --dynamic-batch exclude each other")
    resolve_exporter(opts["exporter"], opts["opset"])  # a bad --opset fails before the model is loaded
    check_tolerances(opts["atol"], opts["rtol"])
    post = postprocess_options(opts)
    ckpt, data = load_inputs(opts["model"], data=opts["data"], data_dir=opts["data_dir"], need_train=False,
                             **model_kwargs(opts))
    output = Path(opts["output"] or f"{ckpt.name}.onnx")
    record = export_onnx(ckpt, output, opset=opts["opset"], batch=opts["batch"] or 1,
                         dynamic_batch=opts["dynamic_batch"], simplify=opts["simplify"], data=data.info.name,
                         data_dir=opts["data_dir"], atol=opts["atol"], rtol=opts["rtol"], exporter=opts["exporter"],
                         dataset=data.test, raw=opts["raw"], postprocess=post)
    if opts["as_json"]:
        print_json(record)
        return
    p = record["parity"]
    console.result(f"wrote {output} ({record['size_mib']:.2f} MiB, opset {record['opset']}, input "
                   f"{record['input_name']} {_shape(record['input_shape'])}): max |diff| {p['max_abs_diff']:.2e}, "
                   f"{p.get('agreement', 'top-1')} agreement {p['top1_agreement_pct']:.1f}% over {p['samples']} inputs")


def postprocess_options(opts: dict) -> dict:
    """--max-detections, --score-threshold, --iou-threshold as the detection task's attributes (given ones)."""
    import math

    from deploycomp.errors import check

    score, iou = opts["score_threshold"], opts["iou_threshold"]
    check(score is None or (math.isfinite(score) and 0 <= score < 1),
          f"--score-threshold must be in [0, 1), got {score}")
    check(iou is None or (math.isfinite(iou) and 0 < iou <= 1), f"--iou-threshold must be in (0, 1], got {iou}")
    post = {"max_det": opts["max_detections"], "score_threshold": score, "iou_threshold": iou}
    return {k: v for k, v in post.items() if v is not None}


def _shape(shape) -> str:
    return "x".join("N" if d is None else str(d) for d in shape)
