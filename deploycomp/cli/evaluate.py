"""deploycomp eval: accuracy of a model on its dataset's test split."""

from __future__ import annotations

import click

from deploycomp.cli.options import (
    data_options,
    device_option,
    json_option,
    model_kwargs,
    model_options,
    pass_options,
    print_json,
)


@click.command("eval")
@model_options
@data_options
@device_option
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--samples", type=int, default=None, help="Evaluate on a deterministic subset of N test images.")
@json_option
@pass_options
def evaluate(opts: dict) -> None:
    """The task's metrics and loss on the test split (default: the shipped baseline).

    Classification: top-1 and top-5 accuracy; segmentation: mIoU and pixel accuracy."""
    from deploycomp import console
    from deploycomp.errors import check
    from deploycomp.inputs import load_inputs
    from deploycomp.train import evaluate as run_eval

    check(opts["batch_size"] > 0, f"--batch-size must be positive, got {opts['batch_size']}")
    check(opts["samples"] is None or opts["samples"] > 0, f"--samples must be positive, got {opts['samples']}")
    ckpt, data = load_inputs(opts["model"], data=opts["data"], data_dir=opts["data_dir"], need_train=False,
                             **model_kwargs(opts))
    m = run_eval(ckpt.model, data.test, opts["batch_size"], opts["device"], samples=opts["samples"], task=data.task)
    record = {"model": ckpt.source or ckpt.arch, "dataset": data.info.name, "synthetic": data.info.synthetic, **m}
    if opts["as_json"]:
        print_json(record)
        return
    label = " (synthetic data: meaningless)" if data.info.synthetic else ""
    console.result(f"{record['model']} on {data.info.name} test ({m['samples']:,} images){label}: "
                   f"{data.task.summary(m)}" + (f"  loss {m['loss']:.4f}" if m["loss"] is not None else ""))
