"""deploycomp bundle: ONNX variants + preprocessing + exact trtexec commands for an edge device."""

from __future__ import annotations

import click

from deploycomp.cli.options import (
    data_options,
    int8_calibration_options,
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
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True,
              help="Directory to create (must not exist, or be empty).")
@click.option("--target", type=click.Choice(["jetson", "x86"]), default="jetson", show_default=True,
              help="Device the engine will be built on.")
@click.option("-p", "--precision", "precisions", type=click.Choice(["fp32", "fp16", "int8"]), multiple=True,
              help="Model variants to include (repeatable). Default: fp32, fp16 and int8.")
@click.option("--batch", type=int, default=None, callback=positive_int("--batch"),
              help="Fix the batch size. Default: a dynamic batch with a --min/--opt/--max-batch profile.")
@click.option("--min-batch", type=int, default=None, callback=positive_int("--min-batch"), help="Default: 1.")
@click.option("--opt-batch", type=int, default=None, callback=positive_int("--opt-batch"), help="Default: 8.")
@click.option("--max-batch", type=int, default=None, callback=positive_int("--max-batch"), help="Default: 32.")
@click.option("--opset", type=int, default=None, help="ONNX opset. Default: 17.")
@click.option("--workspace", default=None, metavar="SIZE", help="Workspace limit in the trtexec commands, e.g. 1G.")
@int8_calibration_options("INT8 variant")
@click.option("--eval-samples", type=int, default=None, callback=positive_int("--eval-samples"),
              help="Test images for the FP16/INT8 accuracy figures. Default: the whole test split.")
@json_option
@pass_options
def bundle(opts: dict) -> None:
    """Everything an edge device needs to build and run its own TensorRT engine.

    Engines are not portable across GPUs or TensorRT versions, so the bundle holds the checked ONNX
    model and its FP16 / INT8 Q/DQ variants, preprocess.json (input size, mean/std, class names),
    build_engine.sh with the exact trtexec commands for TensorRT 10 (JetPack) and TensorRT 11, a
    README and bundle.json (hashes, accuracy, parity).

    \b
    Example:
      deploycomp bundle --model pruned.pt --target jetson -o pruned-jetson/
    """
    from deploycomp import console
    from deploycomp.bundle import make_bundle
    from deploycomp.export import resolve_exporter
    from deploycomp.inputs import load_inputs

    resolve_exporter(None, opts["opset"])  # a bad --opset fails before the model is loaded
    ckpt, data = load_inputs(opts["model"], data=opts["data"], data_dir=opts["data_dir"], need_train=False,
                             **model_kwargs(opts))
    manifest = make_bundle(ckpt, opts["output"], target=opts["target"],
                           precisions=opts["precisions"] or ("fp32", "fp16", "int8"), batch=opts["batch"],
                           min_batch=opts["min_batch"], opt_batch=opts["opt_batch"], max_batch=opts["max_batch"],
                           opset=opts["opset"], data=data.info.name, data_dir=opts["data_dir"], dataset=data.test,
                           calib_samples=opts["calib_samples"], calib_method=opts["calib_method"],
                           eval_samples=opts["eval_samples"], workspace=opts["workspace"])
    if opts["as_json"]:
        print_json(manifest)
        return
    metric = manifest["metric"]
    figures = ", ".join(f"{p} {m[metric]:.2f}%" for p, m in manifest["models"].items() if m.get(metric) is not None)
    console.result(f"wrote {manifest['output']}/ for {manifest['target']}: {', '.join(manifest['files'])}"
                   + (f" ({manifest['metric_label']}: {figures})" if figures else ""))
