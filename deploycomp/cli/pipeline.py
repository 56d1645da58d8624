"""deploycomp pipeline: a recipe (YAML) -> compress, fine-tune, evaluate, export, quantize, build, bench -> report."""

from __future__ import annotations

import click

from deploycomp.cli.options import json_option, pass_options, print_json


@click.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (stages, records, report). Default: runs/<recipe name>.")
@click.option("--force", is_flag=True, help="Redo every stage, even those a previous run finished.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG plots with the report.")
@click.option("--wait", is_flag=True,
              help="If another pipeline is using the run directory, wait for it to finish instead of refusing.")
@json_option
@pass_options
def pipeline(opts: dict) -> None:
    """Run a recipe: every variant through the whole road, then one comparison report.

    Without RECIPE it runs benchmarks/recipes/default.yaml: the shipped Fashion-MNIST baseline, a few
    pruning variants with a short fine-tune, ONNX export + INT8, torch and ONNX Runtime on the CPU
    (a few minutes on two cores). Stages are cached in the run directory by a hash of their
    inputs and options: running again skips what is done and continues an interrupted run. The run
    directory is locked while a pipeline works in it: a second one on it refuses (or waits, with --wait).

    A recipe may name your own model code (model: mynet.py:make, or model: my.pt with arch: mynet.py:make;
    distill.teacher_arch, prune.distill_from_arch for a teacher): naming it there is your consent to run it
    for that run, and run.json records it with its file's hash.

    \b
    Examples:
      deploycomp pipeline
      deploycomp pipeline benchmarks/recipes/ts3.yaml -o runs/ts3
    """
    from deploycomp import console
    from deploycomp.pipeline import run_pipeline
    from deploycomp.report import print_summary

    out = run_pipeline(opts["recipe"], opts["run_dir"], force=opts["force"], plots=opts["plots"],
                       wait=None if opts["wait"] else 0)
    run, paths = out["run"], out["report"]
    if opts["as_json"]:
        from deploycomp.report import json_doc

        print_json(json_doc(run, paths["studies"]))
        return
    for s in paths["studies"]:
        print_summary(s)
    console.result(f"{run['stages_run']} stages run, {run['stages_cached']} reused; wall time {run['wall_s']:.0f} s")
    for f in paths["files"]:
        console.result(f"wrote {f}")
    for group in paths["plots"].values():
        for p in group:
            console.result(f"wrote {out['run_dir'] / p}")
