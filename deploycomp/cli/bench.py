"""deploycomp bench: latency, throughput and memory of checkpoints, ONNX files and TensorRT engines."""

from __future__ import annotations

import click

from deploycomp.cli.options import device_option, input_size_option, pass_options


def _batches(text: str) -> tuple[int, ...]:
    from deploycomp.errors import UsageError

    try:
        values = tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise UsageError(f"--batch must be positive integers separated by commas, e.g. 1,8,32; got {text!r}")
    return values


@click.command()
@click.argument("artifacts", nargs=-1, metavar="[ARTIFACT]...")
@click.option("--backend", default="auto", show_default=True, metavar="auto|torch|torch-compile|ort|trt",
              help="auto: checkpoints and zoo names -> torch, .onnx -> ort, .engine/.trt/.plan -> trt.")
@device_option
@click.option("--provider", default=None, metavar="cpu|cuda|tensorrt",
              help="ONNX Runtime execution provider. Default: follows --device.")
@click.option("--batch", "batch", default="1", show_default=True, metavar="N[,N...]",
              help="Batch size(s), e.g. 1,8,32.")
@click.option("--warmup", type=int, default=None, metavar="N", help="Warmup iterations (default 5).")
@click.option("--warmup-ms", type=float, default=None, metavar="MS",
              help="Minimum warmup time in ms (default 200); with --warmup, both must be reached.")
@click.option("--iters", type=int, default=None, metavar="N",
              help="Timed iterations per model and session, over its rounds. Alone: exactly N; with --duration-s: "
                   "at least N.")
@click.option("--duration-s", type=float, default=None, metavar="S",
              help="Minimum timed seconds per model and session. Default (neither given): >= 10 iterations and "
                   ">= 0.3 s in each session.")
@click.option("--sessions", type=int, default=None, metavar="N",
              help="Sessions (default 5), each a fresh process that loads every model anew and times them in "
                   "interleaved rounds; intervals are across sessions, so a re-run lands inside them. More "
                   "sessions: narrower intervals, longer runs. 1: one session in this process (its interval "
                   "covers its own rounds only).")
@click.option("--rounds", type=int, default=None, metavar="N",
              help="Interleaved rounds per session (default 10): each round times a short block of every model, "
                   "in an order that changes between rounds, so speed-ups are paired round by round. 1: one "
                   "after another.")
@click.option("--budget-s", type=float, default=None, metavar="S",
              help="In each session, start no new round once the timed rounds of a batch size took S seconds "
                   "(default: no limit).")
@click.option("--margin-pct", type=float, default=None, metavar="PCT",
              help="Speed-ups within PCT % of 1 are 'same' even when significant (default 2).")
@click.option("--pin-cores", default=None, metavar="CPUS",
              help="Run on these CPUs only, e.g. 1 or 0,1 or 2-3 (Linux); sets --threads to their number "
                   "unless given.")
@click.option("--threads", type=int, default=None, metavar="N",
              help="Intra-op threads (torch.set_num_threads / ORT intra_op_num_threads).")
@click.option("--io", type=click.Choice(["device", "host"]), default="device", show_default=True,
              help="device: inputs already on the device; host: also time host<->device copies, separately.")
@click.option("--cuda-graph", is_flag=True,
              help="Replay a captured CUDA graph: torch on CUDA, or the ORT CUDA EP (enable_cuda_graph).")
@click.option("--memory", is_flag=True,
              help="Also measure what each model costs in memory on its runtime: load peak and steady-state RSS "
                   "above a fresh process's baseline (ONNX Runtime/TensorRT processes without torch), torch "
                   "weights, CUDA allocator / TensorRT / NVML figures; 3 processes per model, reductions paired.")
@input_size_option
@click.option("--arch", default=None, metavar="NAME|FILE.py:FN",
              help="Architecture of a plain state dict, or the user code a checkpoint made from it needs "
                   "(named again on purpose: loading it runs that code).")
@click.option("--json", "json_file", default=None, metavar="FILE", help="Write results as JSON ('-': stdout).")
@click.option("--csv", "csv_file", default=None, metavar="FILE", help="Write results as CSV ('-': stdout).")
@pass_options
def bench(opts: dict) -> None:
    """Time models properly: warmup, synchronised iterations, statistics, environment.

    ARTIFACT is a checkpoint, a zoo model name, an .onnx file or a TensorRT engine (default: the shipped
    baseline). In each session (a fresh process) all are loaded together and timed in interleaved rounds,
    so the machine's drift lands on every model alike; sessions are repeated (--sessions, default 5)
    because a model loaded again runs at a slightly different speed, and the intervals are across them:
    they hold for a re-run on the same machine. Several artifacts give a comparison against the first on
    the same backend and batch: the speed-up (geometric mean over sessions of each session's paired
    speed-up) with its 95 % interval and a verdict (faster / slower / same), and, when MACs are known
    for both, speed-up efficiency = speed-up / MACs reduction. Latency excludes host<->device copies
    unless --io host (which times them separately).
    """
    from deploycomp import console
    from deploycomp.bench import BenchConfig, benchmark, describe_environment, tables, write_csv, write_json
    from deploycomp.bench.conditions import parse_cpu_list
    from deploycomp.files import check_output

    for out in (opts["json_file"], opts["csv_file"]):
        if out not in (None, "-"):
            check_output(out, *opts["artifacts"])  # before the timing: never over an artifact, and writable

    config = BenchConfig(backend=opts["backend"], device=opts["device"], provider=opts["provider"],
                         batches=_batches(opts["batch"]), warmup=opts["warmup"], warmup_ms=opts["warmup_ms"],
                         iters=opts["iters"], duration_s=opts["duration_s"], threads=opts["threads"], io=opts["io"],
                         cuda_graph=opts["cuda_graph"], memory=opts["memory"],
                         input_size=opts["input_size"], rounds=opts["rounds"], sessions=opts["sessions"],
                         budget_s=opts["budget_s"],
                         margin_pct=opts["margin_pct"],
                         pin_cores=tuple(parse_cpu_list(opts["pin_cores"])) if opts["pin_cores"] else None,
                         arch=opts["arch"])
    config.validate()  # every option checked before anything is loaded
    results = benchmark(list(opts["artifacts"]) or None, config)
    if opts["json_file"]:
        write_json(opts["json_file"], results)
    if opts["csv_file"]:
        write_csv(opts["csv_file"], results)
    if "-" in (opts["json_file"], opts["csv_file"]):
        return
    for title, cols, rows, optional in tables(results, with_memory=config.memory):
        console.table(title, cols, rows, optional=optional)
    console.info(describe_environment(results))
    if config.io == "host":
        console.table("host <-> device copies (ms, median)", ["model", "batch", "H2D", "D2H"],
                      [[r["label"], r["batch"], r["h2d_ms"]["median"], r["d2h_ms"]["median"]] for r in results])
