"""deploycomp build: a TensorRT engine from an ONNX model (TensorRT 10 or 11; Python API or trtexec)."""

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
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Engine to write. Default: MODEL.engine (MODEL.PRECISION.engine) beside the ONNX.")
@click.option("-p", "--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Engine precision. Default: the graph's own (FP32, or what `deploycomp quantize` made).")
@click.option("--min-batch", type=int, default=None, callback=positive_int("--min-batch"),
              help="Smallest batch of the optimisation profile (dynamic-batch ONNX). Default: 1.")
@click.option("--opt-batch", type=int, default=None, callback=positive_int("--opt-batch"),
              help="Batch TensorRT tunes kernels for. Default: 8 (within min..max).")
@click.option("--max-batch", type=int, default=None, callback=positive_int("--max-batch"),
              help="Largest batch of the profile. Default: 32.")
@click.option("--workspace", default=None, metavar="SIZE",
              help="Workspace memory pool limit, e.g. 512M or 2G (a bare number is MiB). Default: TensorRT's.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache to read and update. Default: ~/.cache/deploycomp/trt<version>-sm<arch>.timing-cache.")
@click.option("--dla-core", type=int, default=None, help="Build for this DLA core (Jetson), with GPU fallback.")
@click.option("--builder", type=click.Choice(["python-api", "trtexec"]), default=None,
              help="How to build. Default: the TensorRT Python API, else trtexec on PATH.")
@data_options
@int8_calibration_options("When INT8 needs quantizing first")
@click.option("--gpu", "device", type=int, default=0, show_default=True, help="CUDA device index.")
@json_option
@pass_options
def build(opts: dict) -> None:
    """Build a TensorRT engine from an ONNX model and print the equivalent trtexec command.

    TensorRT 11 is strongly typed and takes precision only from the graph: asked for fp16/int8 from
    an FP32 ONNX, build runs `deploycomp quantize` first (and says so). TensorRT 10 builds FP16 from
    FP32 with its FP16 flag; INT8 always comes from Q/DQ nodes. The engine gets a JSON sidecar
    (TensorRT version, GPU and compute capability, profile, precision, source ONNX hash).

    \b
    Examples:
      deploycomp build model.onnx --max-batch 16
      deploycomp build model.onnx --precision int8 --data fashion-mnist
    """
    from deploycomp import console
    from deploycomp.trt import build_engine

    record = build_engine(opts["onnx_model"], opts["output"], precision=opts["precision"],
                          min_batch=opts["min_batch"], opt_batch=opts["opt_batch"], max_batch=opts["max_batch"],
                          workspace=opts["workspace"], timing_cache=opts["timing_cache"], dla_core=opts["dla_core"],
                          builder=opts["builder"], data=opts["data"], data_dir=opts["data_dir"],
                          calib_samples=opts["calib_samples"], calib_method=opts["calib_method"], device=opts["device"])
    if opts["as_json"]:
        print_json(record)
        return
    gpu = record["gpu_name"] or "an unidentified GPU"
    console.result(f"wrote {record['engine']} ({record['precision']}, {record['size_mib']:.2f} MiB) with TensorRT "
                   f"{record['tensorrt_version']} ({record['builder']}) on {gpu} in {record['build_seconds']:.1f} s")
