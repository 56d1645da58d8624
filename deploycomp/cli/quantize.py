"""deploycomp quantize: an FP32 ONNX model to FP16 or INT8 Q/DQ, with its accuracy against FP32."""

from __future__ import annotations

import click

from deploycomp.cli.options import (
    data_options,
    int8_calibration_options,
    json_option,
    pass_options,
    positive_int,
    print_json,
)


@click.command()
@click.argument("onnx_model", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("-p", "--precision", type=click.Choice(["fp16", "int8"]), required=True,
              help="fp16: FP16 weights/compute, FP32 inputs and outputs; int8: static Q/DQ (TensorRT explicit).")
@data_options
@int8_calibration_options()
@click.option("--calib-batch", type=int, default=None, callback=positive_int("--calib-batch"),
              help="INT8: calibration batch size (a static-batch model uses its own). Default: 32.")
@click.option("--eval-samples", type=int, default=None, callback=positive_int("--eval-samples"),
              help="Test images for the accuracy comparison. Default: the whole test split.")
@click.option("--quantize-all-layers", is_flag=True,
              help="INT8: quantize the first convolution and the classifier too (default: they stay in float).")
@click.option("--no-eval", is_flag=True, help="Skip the accuracy comparison on the dataset.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration/evaluation subsets.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="ONNX file to write. Default: MODEL.fp16.onnx or MODEL.int8.onnx beside the input.")
@json_option
@pass_options
def quantize(opts: dict) -> None:
    """Convert an FP32 ONNX model (from `deploycomp export`) to FP16 or INT8 Q/DQ.

    The dataset is --data or the one recorded in MODEL.onnx.json. INT8 calibrates on the training
    split; both precisions report top-1 of the converted model against the FP32 one on the test
    split with ONNX Runtime (CPU). TensorRT 11 takes precision only from the graph, so this is how
    FP16/INT8 engines are made (`deploycomp build MODEL.int8.onnx`).

    \b
    Examples:
      deploycomp quantize model.onnx --precision fp16
      deploycomp quantize model.onnx --precision int8 --calib-samples 1024 --calib-method entropy
    """
    from deploycomp import console
    from deploycomp.quantize import quantize_onnx, summary_line

    record = quantize_onnx(opts["onnx_model"], opts["output"], precision=opts["precision"], data=opts["data"],
                           data_dir=opts["data_dir"], calib_samples=opts["calib_samples"],
                           calib_batch=opts["calib_batch"], calib_method=opts["calib_method"],
                           eval_samples=opts["eval_samples"], evaluate=not opts["no_eval"], seed=opts["seed"],
                           quantize_all_layers=opts["quantize_all_layers"])
    if opts["as_json"]:
        print_json(record)
    else:
        console.result(summary_line(record))
