"""deploycomp report: regenerate a pipeline run's tables and plots from its JSON records."""

from __future__ import annotations

import click

from deploycomp.cli.options import pass_options


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True,
              help="report.md, report.csv (+ report-latency.csv) or report.json in RUN_DIR; also printed.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write accuracy-vs-MACs, accuracy-vs-latency and latency-vs-batch PNGs under RUN_DIR/plots.")
@pass_options
def report(opts: dict) -> None:
    """Rebuild the report of a pipeline run from RUN_DIR/run.json and the stage records.

    Per variant (the original first): top-1 and its change, accuracy retained, size on disk and its
    reduction, MACs and their reduction, latency (median, p99) with backend and batch, throughput.
    """
    from deploycomp import console
    from deploycomp.report import write_report

    written = write_report(opts["run_dir"], formats=(opts["fmt"],), plots=opts["plots"])
    for f in written["files"]:
        console.result(f.read_text().rstrip("\n"))
    for f in written["files"]:
        console.info(f"wrote {f}")
    for group in written["plots"].values():
        for p in group:
            console.info(f"wrote {opts['run_dir']}/{p}")
