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
              help="fp16: FP16 weights/compute, FP32 inputs and outputs; int8: static Q/DQ for --target.")
@click.option("--target", default=None, metavar="ort-cpu|tensorrt",
              help="INT8: the runtime the graph is shaped for. ort-cpu: U8S8 Q/DQ (uint8 activations, per-channel "
                   "int8 weights, int32 bias) on every layer ONNX Runtime has an integer kernel for, 7-bit weights "
                   "on x86 without VNNI; tensorrt: symmetric int8 (zero points 0), per-channel weights, FP32 bias, "
                   "Q/DQ on the inputs of Conv/Gemm only so TensorRT fuses conv+add, first conv and classifier in "
                   "float (ONNX Runtime runs it slower than FP32). Default: ort-cpu, the backend every machine has "
                   "and the one this command checks accuracy with; `build` and `bundle` quantize for tensorrt "
                   "themselves.")
@data_options
@int8_calibration_options()
@click.option("--calib-batch", type=int, default=None, callback=positive_int("--calib-batch"),
              help="INT8: calibration batch size (a static-batch model uses its own). Default: 32.")
@click.option("--eval-samples", type=int, default=None, callback=positive_int("--eval-samples"),
              help="Test images for the accuracy comparison. Default: the whole test split.")
@click.option("--quantize-all-layers", is_flag=True,
              help="INT8: keep no layer in float (by default the tensorrt target keeps the first convolution and "
                   "the classifier in float).")
@click.option("--max-drop", "max_drop", type=float, default=None, metavar="POINTS",
              help="INT8: keep the most sensitive layers (Conv/Gemm/MatMul; for ort-cpu also each operator type "
                   "between them, e.g. every Mul) in float until the drop of "
                   "the task's metric (top-1, mIoU, mAP) against FP32 on a validation subset of the training "
                   "split is at most POINTS; ranks every layer (one evaluation each), then bisects over how many "
                   "to keep (at most N + 3 + log2 N evaluations), reports the test split and, for ort-cpu, times "
                   "the result against full INT8 and FP32. A bound no INT8 variant meets is an error and writes "
                   "nothing.")
@click.option("--sensitivity", is_flag=True,
              help="INT8: per layer, the metric (top-1, mIoU, mAP) gained when only that layer stays float; writes "
                   "OUTPUT.sensitivity.md, .json and .png beside the output.")
@click.option("--rank-samples", type=int, default=None, callback=positive_int("--rank-samples"),
              help="--max-drop/--sensitivity: validation images from the training split (after the calibration "
                   "images). Default: 2000.")
@click.option("--no-bench", is_flag=True, help="--max-drop: skip the speed comparison.")
@click.option("--no-eval", is_flag=True, help="Skip the accuracy comparison on the dataset.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration/evaluation subsets.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="ONNX file to write. Default beside the input: MODEL.fp16.onnx, MODEL.int8.onnx (ort-cpu) or "
                   "MODEL.int8-tensorrt.onnx.")
@json_option
@pass_options
def quantize(opts: dict) -> None:
    """Convert an FP32 ONNX model (from `deploycomp export`) to FP16 or INT8 Q/DQ.

    The dataset is --data or the one recorded in MODEL.onnx.json. INT8 calibrates on the training
    split; both precisions report the task's metric (top-1, mIoU, mAP) of the converted model
    against the FP32 one on the test split with ONNX Runtime (CPU). INT8 is shaped for the runtime
    that will run it (--target): an INT8 graph made for one runtime can be slower than FP32 on
    another. TensorRT 11 takes precision only from the graph, so this is how FP16/INT8 engines are
    made (`deploycomp build MODEL.int8-tensorrt.onnx`, or `deploycomp build MODEL.onnx --precision int8`).

    \b
    Examples:
      deploycomp quantize model.onnx --precision int8                   # -> model.int8.onnx (ONNX Runtime CPU)
      deploycomp quantize model.onnx -p int8 --target tensorrt          # -> model.int8-tensorrt.onnx
      deploycomp quantize model.onnx --precision fp16
      deploycomp quantize model.onnx -p int8 --calib-samples 1024 --calib-method entropy
      deploycomp quantize model.onnx -p int8 --max-drop 0.5             # sensitive layers back to float
      deploycomp quantize model.onnx -p int8 --sensitivity              # + model.int8.sensitivity.md/.json/.png
    """
    from deploycomp import console
    from deploycomp.quantize import quantize_onnx, summary_line

    record = quantize_onnx(opts["onnx_model"], opts["output"], precision=opts["precision"], data=opts["data"],
                           data_dir=opts["data_dir"], calib_samples=opts["calib_samples"],
                           calib_batch=opts["calib_batch"], calib_method=opts["calib_method"],
                           eval_samples=opts["eval_samples"], evaluate=not opts["no_eval"], seed=opts["seed"],
                           quantize_all_layers=opts["quantize_all_layers"], target=opts["target"],
                           max_drop=opts["max_drop"], sensitivity=opts["sensitivity"],
                           rank_samples=opts["rank_samples"], bench=not opts["no_bench"])
    if opts["as_json"]:
        print_json(record)
    else:
        console.result(summary_line(record))
