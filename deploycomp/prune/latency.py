"""Latency-aware pruning: prune until a latency *measured on the deployment backend* is reached.

MACs predict latency badly (on ONNX Runtime CPU, unrounded 10 % pruning of ResNet-50 cut MACs 19 % and
ran slower: benchmarks/results/pipeline_ts3/). So a target here is a measured speed-up
(``target_speedup`` with ``measured``) or a latency in milliseconds (``target_latency_ms``), on one
backend, device, batch size and thread count (:class:`~deploycomp.prune.probes.Setup`). The search:

1. **Latency table** (NetAdapt, Yang et al., arXiv:1804.03230; HALP, Shen et al., arXiv:2110.10811):
   every convolution and linear layer is timed alone on the backend at each pair of candidate input and
   output widths (the widths its groups may take: ``latency_widths`` fractions of the layer, multiples
   of ``round_to``), minus the backend's cost of an empty call. Entries are cached per backend, device,
   batch, threads, machine and library versions (:mod:`deploycomp.prune.latency_table`), so a second
   search on the same model measures nothing. The network as this model sees it (groups, layers,
   candidate widths) is :mod:`deploycomp.prune.structure`.
2. **Latency model**: a network's latency is proportional to the sum of its layers' entries at its
   widths, scaled so that the original's prediction equals its measured latency. The work outside the
   convolutions (additions, activations, pooling, layout changes) shrinks with the widths too, which a
   constant would miss: on the shipped baseline (busy 2-core machine) a constant predicted 2x for a
   measured 4.5x.
3. **Allocation** (:func:`deploycomp.prune.allocate.allocate`): the widths that keep the most
   importance within the latency budget. A group keeping ``w`` channels keeps the fraction ``f_g(w)`` of
   its importance (the chosen criterion's channel scores, best channels kept); the allocator maximises
   ``sum over layers of log f(input group) + log f(output group)``, i.e. ``sum_g n_g log f_g`` with
   ``n_g`` the number of layer inputs and outputs group ``g`` sets: the geometric mean, over layers, of
   the importance each layer keeps. Uniform pruning maximises it when every channel costs the same time;
   measured costs tilt it. HALP's plain sum of (normalised) scores counts a residual stream once however
   many layers it feeds, and cut the shipped baseline's streams to a quarter: at 2x predicted, 57 % top-1
   right after pruning against 90 % with this objective (and 87 % for uniform pruning at the sum's MACs).
   Widths a backend runs slowly (e.g. ONNX Runtime's non-multiples of 8) are simply worse entries of the
   table, so the allocator avoids them.
4. **Verification and correction**: the real pruned model is exported for the backend and timed
   against the original with the paired harness (:func:`deploycomp.bench.benchmark`). When the measured
   speed-up misses the target by more than ``latency_tolerance_pct``, the speed-up asked of the model is
   corrected (first proportionally, then by the secant through the last two measurements) and the
   allocation repeated, at most ``latency_iterations`` times in all. The candidate reported is the one
   within tolerance that keeps the most importance, else the one closest to the target (with a warning).

Depth pruning (``method="depth"``) uses the same table for each removable block (its layers' entries at
full width) and the same allocator (each block is kept or dropped; keeping it keeps its sensitivity).

Everything measured goes into the prune record under ``latency``: setup, table (every entry used, the
cache file), original latency, the model's constant, each iteration's widths, predicted and measured
speed-up with its 95 % interval, and the time spent.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.errors import UsageError, check
from deploycomp.prune.latency_table import measure_table
from deploycomp.prune.structure import (
    Structure,
    analyse_channels,
    layer_inputs,
    layer_spec,
    prune_to_widths,
)

DEFAULT_WIDTHS = 8  # candidate widths per group: 1/8, 2/8, ..., 8/8 of its channels
DEFAULT_ITERATIONS = 4  # timed candidates per search (the first allocation and up to 3 corrections)
DEFAULT_TOLERANCE_PCT = 5.0  # a measured speed-up within 5 % of the target ends the search
# One intra-op thread on the CPU unless asked: reproducible and cheap on a small machine. (Several
# multi-threaded ORT sessions used to slow each other by spinning; bench now stops that, see
# docs/latency-pruning.md.)
DEFAULT_CPU_THREADS = 1
# Each candidate is timed against the original in this many sessions (deploycomp bench's harness: each a
# fresh process loading both anew). A session's interval covers its own rounds only: loaded again, the same
# two models measure a different speed-up. For the baseline's 2x candidate (ORT CPU, one thread) 12 sessions
# in one process gave 1.71-1.87x with intervals of +-1 % each, and the search's single session had said
# 2.07x (docs/latency-pruning.md, "Sessions"). The speed-up is the geometric mean over the sessions, and its
# interval the Student-t interval across them (deploycomp.bench.paired.across_sessions). Three, not bench's
# five: a search times up to four candidates, and the final comparison of a benchmark uses bench itself.
VERIFY_SESSIONS = 3
MIN_BLOCK_VALUE = 1e-9  # a block whose skipping lowers the loss is still worth keeping when time allows

# PruneConfig fields that only mean something with a measured latency target
LATENCY_OPTIONS = {"latency_backend": "--latency-backend", "latency_device": "--latency-device",
                   "latency_batch": "--latency-batch", "latency_threads": "--latency-threads",
                   "latency_widths": "--latency-widths", "latency_iterations": "--latency-iterations",
                   "latency_tolerance_pct": "--latency-tolerance-pct", "latency_cache": "--latency-cache"}


# --------------------------------------------------------------------------------------------------
# Options (cheap: PruneConfig.validate calls these before anything heavy is imported)


def validate(cfg) -> None:
    """One-line errors for the latency options of a :class:`~deploycomp.prune.PruneConfig`."""
    import importlib.util

    from deploycomp.prune.probes import PROBES

    check(not cfg.measured or cfg.target_speedup is not None,
          "--measured says that --target-speedup is a measured speed-up; give --target-speedup X with it")
    check(cfg.target_latency_ms is None or 0 < cfg.target_latency_ms < math.inf,
          f"--target-latency-ms must be positive and finite, got {cfg.target_latency_ms}")
    given = [flag for name, flag in LATENCY_OPTIONS.items() if getattr(cfg, name) is not None]
    if not cfg.latency_target:
        check(not given, f"{given[0] if given else ''} applies to a measured latency target: add "
                         "--target-latency-ms MS or --target-speedup X --measured")
        return
    check(not cfg.global_pruning, "--global has no effect with a latency target: the latency search already "
                                  "allocates widths across all layers; drop --global")
    if cfg.latency_backend is not None:
        PROBES.get(cfg.latency_backend)
        if cfg.latency_backend == "trt" and importlib.util.find_spec("tensorrt") is None:
            from deploycomp.bench.backends import TRT_INSTALL_HINT
            from deploycomp.errors import MissingDependencyError

            raise MissingDependencyError(f"--latency-backend trt needs TensorRT, which is not installed; "
                                         f"{TRT_INSTALL_HINT}")
    for name, low in (("latency_batch", 1), ("latency_threads", 1), ("latency_iterations", 1),
                      ("latency_widths", 2)):
        v = getattr(cfg, name)
        check(v is None or (isinstance(v, int) and v >= low), f"{LATENCY_OPTIONS[name]} must be an integer "
                                                             f">= {low}, got {v!r}")
    tol = cfg.latency_tolerance_pct
    check(tol is None or 0 < tol < 50, f"--latency-tolerance-pct must be in (0, 50), got {tol}")


def default_backend() -> str:
    """TensorRT when it is installed and a GPU is present, else ONNX Runtime (on the CPU)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        from deploycomp.bench.backends import cuda_available

        if cuda_available():
            return "trt"
    return "ort"


def resolve_setup(cfg):
    """The :class:`~deploycomp.prune.probes.Setup` of ``cfg`` with every default filled in."""
    from deploycomp.prune.probes import Setup
    from deploycomp.train import resolve_device

    backend = cfg.latency_backend or default_backend()
    try:
        d = resolve_device(cfg.latency_device or ("cuda" if backend == "trt" else "cpu"))
    except UsageError as e:  # say which option asked for the device
        raise UsageError(str(e).replace("--device", "--latency-device")) from None
    device = "cpu" if d.type == "cpu" else f"cuda:{d.index or 0}"
    threads = cfg.latency_threads or (DEFAULT_CPU_THREADS if device == "cpu" else None)
    return Setup(backend, device, cfg.latency_batch or 1, threads)


# --------------------------------------------------------------------------------------------------
# The allocator's problem


def channel_problem(structure: Structure, entries: dict[str, float]):
    """The allocator's problem: one term per layer, its table over the candidates of its groups."""
    import numpy as np

    from deploycomp.prune.allocate import Problem, Term

    terms = []
    for layer in structure.layers:
        table = np.array([[entries[s.key] if s is not None else 0.0 for s in row]
                          for row in structure.layer_specs(layer)])
        terms.append(Term(layer.inp, layer.out, table))
    return Problem([g.values for g in structure.groups], terms)


# --------------------------------------------------------------------------------------------------
# The search: allocate for an asked speed-up, build, time against the original, correct


@dataclass
class _Target:
    speedup: float  # measured speed-up asked of the pruned model
    latency_ms: float | None  # when the user asked in milliseconds
    original_ms: float  # the original's median latency, measured at the start


class LatencySearch:
    """The loop shared by channel and depth pruning. ``describe(choice)`` names a candidate's structure;
    ``build(choice)`` returns a pruned deep copy of the checkpoint (the real model stays untouched)."""

    def __init__(self, ctx, probe, setup, problem, describe, build, workdir: Path):
        self.ctx, self.probe, self.setup, self.problem = ctx, probe, setup, problem
        self.describe, self.build, self.workdir = describe, build, workdir
        cfg = ctx.cfg
        self.tol = (cfg.latency_tolerance_pct or DEFAULT_TOLERANCE_PCT) / 100.0
        self.iterations = cfg.latency_iterations or DEFAULT_ITERATIONS
        self.original = None
        self.scale = 1.0  # measured original latency / sum of its table entries
        self.narrowest = "the narrowest widths"  # how the narrowest candidate is made, for messages
        self.history: list[dict[str, Any]] = []

    def measure_original(self) -> float:
        with console.status_line(f"timing the original on {self.setup.describe()}"):
            self.original = self.probe.artifact(self.ctx.ckpt, self.workdir, "original", self.setup)
            return self.probe.compare([self.original], self.setup, sessions=VERIFY_SESSIONS)[0].latency_ms

    def run(self, target: _Target) -> dict[str, Any]:
        from deploycomp.prune.allocate import allocate

        p = self.problem
        full_ms, min_ms = p.latency(p.widest), p.latency(p.narrowest)
        reachable = full_ms / min_ms
        x = target.speedup
        asked, timed = min(x, reachable), set()
        for i in range(self.iterations):
            t0 = time.perf_counter()
            alloc = allocate(p, full_ms / asked)
            if tuple(alloc.choice) in timed:  # the correction led back to a timed candidate: split the bracket
                asked = self._bisect(x, reachable)
                if asked is None:
                    break
                alloc = allocate(p, full_ms / asked)
                if tuple(alloc.choice) in timed:
                    break  # nothing new between the candidates timed so far
            timed.add(tuple(alloc.choice))
            rec = self._verify(i, asked, alloc, full_ms)
            rec["seconds"] = time.perf_counter() - t0
            self.history.append(rec)
            s = rec["measured_speedup"]
            if asked >= reachable and s < x * (1 - self.tol):
                self._unreachable(target, rec)
            if abs(s / x - 1) <= self.tol:
                break
            asked = min(max(self._next_ask(x), 1.0 + 1e-6), reachable)
        return self._pick(x)

    def _bisect(self, x: float, reachable: float) -> float | None:
        """The geometric middle of the asks just below and just above the target (None: no bracket yet)."""
        below = [r["asked_model_speedup"] for r in self.history if r["measured_speedup"] < x]
        above = [r["asked_model_speedup"] for r in self.history if r["measured_speedup"] >= x]
        lo = max(below, default=1.0)
        hi = min(above, default=reachable)
        if hi <= lo * (1 + 1e-6):
            return None
        return math.sqrt(lo * hi)

    def _unreachable(self, target: _Target, narrowest: dict[str, Any]) -> None:
        s, ci = narrowest["measured_speedup"], narrowest["measured_speedup_ci95"]
        interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        if target.latency_ms is not None:
            asked = f"a latency of {target.latency_ms:g} ms ({target.speedup:.3g}x the original's " \
                    f"{target.original_ms:.3g} ms)"
            best = f"{narrowest['measured_ms']:.3g} ms"
        else:
            asked, best = f"a measured speed-up of {target.speedup:g}x", f"{s:.2f}x"
        raise UsageError(f"{asked} is out of reach on {self.setup.describe()}: the narrowest network the search "
                         f"may build ({self.narrowest}) measures {s:.2f}x{interval} ({narrowest['measured_ms']:.3g} "
                         f"ms against {narrowest['original_ms']:.3g} ms); ask for {best} or less, or allow "
                         "narrower layers with a larger --latency-widths")

    def _verify(self, i: int, asked: float, alloc, full_ms: float) -> dict[str, Any]:
        from deploycomp.metrics import count_macs
        from deploycomp.prune.channels import one_thread

        trial = self.build(alloc.choice)
        with one_thread():
            macs = count_macs(trial.model, self.ctx.example)
        with console.status_line(f"latency search {i + 1}/{self.iterations}: timing a candidate against the "
                                 f"original on {self.setup.describe()}"):
            art = self.probe.artifact(trial, self.workdir, f"candidate{i}", self.setup)
            ref, cand = self.probe.compare([self.original, art], self.setup, sessions=VERIFY_SESSIONS)
        speedup, ci = cand.speedup, cand.speedup_ci95
        ref_ms, cand_ms = ref.latency_ms, cand.latency_ms
        predicted = full_ms / alloc.latency
        interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        console.info(f"latency search {i + 1}: asked the model for {asked:.3g}x, it predicts {predicted:.3g}x; "
                     f"measured {speedup:.3g}x{interval} over {len(cand.sessions)} sessions ({cand_ms:.3g} ms vs "
                     f"{ref_ms:.3g} ms), {macs / 1e9:.4g} G MACs")
        return {"iteration": i + 1, "asked_model_speedup": asked, "predicted_speedup": predicted,
                "predicted_ms": alloc.latency * self.scale, "value_kept": alloc.value, "measured_speedup": speedup,
                "measured_speedup_ci95": ci, "verdict": cand.verdict, "measured_ms": cand_ms,
                "measured_ms_ci95": cand.latency_ci95_ms, "original_ms": ref_ms, "macs": macs,
                "sessions": [{"speedup": c.get("speedup"), "speedup_ci95": c.get("speedup_ci95"),
                              "measured_ms": c.get("latency_median_ms"), "original_ms": r.get("latency_median_ms")}
                             for r, c in zip(ref.sessions, cand.sessions, strict=True)],
                "warnings": sorted(set(cand.warnings)), "choice": list(alloc.choice),
                **self.describe(alloc.choice)}

    def _next_ask(self, x: float) -> float:
        """The model speed-up to ask next, by regula falsi in log-log space on what was measured.

        Asking the model for 1x means no pruning, which runs at exactly 1x: that point is known without
        timing. With a measured speed-up on each side of the target, the next ask interpolates between the
        closest two; with all of them short of it, it extrapolates along the line through the two highest
        (the anchor included: a power law ``measured = asked ** b`` after one measurement).
        """
        lx = math.log(x)
        pts = [(0.0, 0.0)] + [(math.log(r["asked_model_speedup"]), math.log(r["measured_speedup"]))
                              for r in self.history]
        below = [p for p in pts if p[1] < lx]
        above = [p for p in pts if p[1] >= lx]
        if above:
            lo, hi = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        else:
            lo, hi = sorted(pts, key=lambda p: p[1])[-2:]
        if hi[1] - lo[1] < 1e-9 or (hi[0] - lo[0]) / (hi[1] - lo[1]) <= 0:
            last = self.history[-1]  # no usable slope (noise): correct proportionally
            return last["asked_model_speedup"] * x / last["measured_speedup"]
        return math.exp(lo[0] + (lx - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1]))

    def _pick(self, x: float) -> dict[str, Any]:
        inside = [r for r in self.history if abs(r["measured_speedup"] / x - 1) <= self.tol]
        if inside:
            best = max(inside, key=lambda r: (r["value_kept"], -r["iteration"]))
        else:
            best = min(self.history, key=lambda r: abs(math.log(r["measured_speedup"] / x)))
        return best


def _resolve_target(cfg, original_ms: float, setup) -> _Target:
    if cfg.target_latency_ms is None:
        return _Target(cfg.target_speedup, None, original_ms)
    if cfg.target_latency_ms >= original_ms:
        raise UsageError(f"the original already runs in {original_ms:.3g} ms on {setup.describe()}, within the "
                         f"target of {cfg.target_latency_ms:g} ms: nothing to prune; ask for less than "
                         f"{original_ms:.3g} ms")
    return _Target(original_ms / cfg.target_latency_ms, cfg.target_latency_ms, original_ms)


def _search(ctx, make_problem, describe, build, what_narrowest: str) -> tuple[dict[str, Any], Any]:
    """Table, model, target check, search; returns (the ``latency`` record, the chosen history entry)."""
    import tempfile

    from deploycomp.prune.probes import get_probe

    cfg = ctx.cfg
    t0 = time.perf_counter()
    setup = resolve_setup(cfg)
    probe = get_probe(setup.backend)
    probe.check(setup)
    with tempfile.TemporaryDirectory(prefix="deploycomp-latency-search-") as tmp:
        search = LatencySearch(ctx, probe, setup, None, describe, build, Path(tmp))
        t_orig = time.perf_counter()
        original_ms = search.measure_original()
        target = _resolve_target(cfg, original_ms, setup)  # refuses a target the original already meets
        seconds_original = time.perf_counter() - t_orig
        problem, table = make_problem(probe, setup)
        layers_ms = problem.latency(problem.widest)
        check(layers_ms > 0, f"the latency table of {ctx.ckpt.arch} on {setup.describe()} adds up to nothing: its "
                             "layers take no measurable time there, so widths cannot be chosen by latency")
        search.problem, search.scale, search.narrowest = problem, original_ms / layers_ms, what_narrowest
        full_ms, min_ms = problem.latency(problem.widest), problem.latency(problem.narrowest)
        t_search = time.perf_counter()
        chosen = search.run(target)
        seconds_search = time.perf_counter() - t_search
    achieved = chosen["measured_speedup"]
    within = abs(achieved / target.speedup - 1) <= search.tol
    if not within:
        msg = (f"the latency search reached {achieved:.3g}x for a target of {target.speedup:.3g}x on "
               f"{setup.describe()} after {len(search.history)} timed candidates (tolerance "
               f"{100 * search.tol:g}%); use more --latency-iterations or --latency-widths")
        console.warn(msg)
        ctx.notes.append(msg)
    record = {
        "setup": dataclasses.asdict(setup),
        "target_speedup": target.speedup, "target_latency_ms": target.latency_ms,
        "original_ms": original_ms, "tolerance_pct": 100 * search.tol,
        "achieved_speedup": achieved, "achieved_speedup_ci95": chosen["measured_speedup_ci95"],
        "achieved_ms": chosen["measured_ms"], "verdict": chosen["verdict"], "within_tolerance": within,
        "predicted_speedup": chosen["predicted_speedup"], "chosen_iteration": chosen["iteration"],
        "model": {"layers_ms": layers_ms, "scale": original_ms / layers_ms,
                  "best_reachable_speedup": full_ms / min_ms, "narrowest": what_narrowest},
        "table": table,
        "iterations": search.history,
        "seconds": {"table": table["seconds"], "original": seconds_original, "search": seconds_search,
                    "total": time.perf_counter() - t0},
    }
    return record, chosen


def _checkpoint_copy(ckpt, model, surgery: dict[str, Any]):
    """A candidate as a checkpoint (reloadable: the surgery is recorded); it comes from no file."""
    return dataclasses.replace(ckpt, model=model, metadata=copy.deepcopy(ckpt.metadata),
                               surgeries=[*ckpt.surgeries, surgery], source=None)


# --------------------------------------------------------------------------------------------------
# Reproducing the search's measurement with `deploycomp bench`

# Model options (run_prune's keyword arguments) -> the flag that gives them on the command line. Only the
# ones that shape the original network matter to its latency, but all are passed so the commands rebuild
# the same model (and refuse the same way).
MODEL_FLAGS = {"arch": "--arch", "num_classes": "--num-classes", "in_channels": "--in-channels",
               "model_kwargs": "--model-kwargs", "weights": "--weights", "trust_pickle": "--trust-pickle",
               "input_size": "--input-size", "data": "--data", "data_dir": "--data-dir"}
# what `deploycomp bench` itself accepts to rebuild a model (a torch-family backend times it as given)
BENCH_MODEL_FLAGS = ("arch", "input_size")
# options that change the original network's shape (weights do not change its latency)
SHAPE_FLAGS = ("num_classes", "in_channels", "model_kwargs", "data")
# what a pruned checkpoint still needs: the user code it was built from, and the size it was timed at
CHECKPOINT_FLAGS = ("arch", "input_size")


def _flag_value(key: str, value) -> str | None:
    import json

    if value is True:
        return None
    if key == "model_kwargs":
        return json.dumps(value, separators=(",", ":"))
    if key == "input_size":
        return "x".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
    return str(value)


def model_flags(options: dict[str, Any], keys=tuple(MODEL_FLAGS)) -> list[str]:
    """Command-line flags giving ``options`` (run_prune's model and data options) again."""
    out: list[str] = []
    for key in keys:
        value = options.get(key)
        if value is None or value is False or value == {}:
            continue
        out.append(MODEL_FLAGS[key])
        v = _flag_value(key, value)
        if v is not None:
            out.append(v)
    return out


def _cmd(*words: str) -> str:
    import shlex

    return " ".join(shlex.quote(str(w)) for w in words)


def _onnx_steps(setup, original: list[str], pruned: list[str], stem: str) -> tuple[list[str], list[str]]:
    """Both models exported the way the search exported them (fixed batch)."""
    files = [f"{stem}-original.onnx", f"{stem}.onnx"]
    return [_cmd("deploycomp", "export", *src, "--batch", setup.batch, "-o", f)
            for src, f in zip((original, pruned), files, strict=True)], files


def _engine_steps(setup, original: list[str], pruned: list[str], stem: str) -> tuple[list[str], list[str]]:
    """Exported, then built as FP32 engines for exactly the search's batch on its GPU."""
    steps, onnx_files = _onnx_steps(setup, original, pruned, stem)
    gpu = setup.device.split(":")[1] if ":" in setup.device else "0"
    engines = [f[:-len(".onnx")] + ".engine" for f in onnx_files]
    steps += [_cmd("deploycomp", "build", f, "-p", "fp32", "--min-batch", setup.batch, "--opt-batch", setup.batch,
                   "--max-batch", setup.batch, "--gpu", gpu, "-o", e) for f, e in zip(onnx_files, engines, strict=True)]
    return steps, engines


# latency backend -> how the original and the pruned checkpoint become what bench times on it (export / build
# steps and the files); absent: bench loads the checkpoints itself (torch, torch-compile)
BENCH_ARTIFACTS = {"ort": _onnx_steps, "trt": _engine_steps}


def bench_commands(setup, model: str | None, options: dict[str, Any], output: str) -> dict[str, Any]:
    """The commands that time the original and the pruned ``output`` the way the search did.

    ``model`` and ``options`` are what the original was loaded from (run_prune's arguments). Returns
    ``commands`` (any export / build steps, then ``deploycomp bench``), ``bench`` (that last command) and
    ``caveat`` (None, or why the commands do not rebuild the original exactly).
    """
    from deploycomp.checkpoint import default_model

    stem = output[:-len(".pt")] if output.endswith(".pt") else output
    ref = model or default_model()
    caveat, flags = None, []
    make = BENCH_ARTIFACTS.get(setup.backend)
    if make is None:  # bench rebuilds the original from its name with --arch / --input-size only
        steps, artifacts = [], [ref, output]
        flags = model_flags(options, BENCH_MODEL_FLAGS)
        lost = [MODEL_FLAGS[k] for k in SHAPE_FLAGS if model_flags({k: options.get(k)}, (k,))]
        if lost:
            caveat = (f"bench rebuilds {ref} from its name, without {' '.join(model_flags(options, SHAPE_FLAGS))}; "
                      "if that changes the network, bench a checkpoint of the original instead")
    else:
        steps, artifacts = make(setup, ["--model", ref, *model_flags(options)],
                                ["--model", output, *model_flags(options, CHECKPOINT_FLAGS)], stem)
    threads = ["--threads", setup.threads] if setup.threads else []
    bench = _cmd("deploycomp", "bench", *artifacts, "--backend", setup.backend, "--device", setup.device,
                 "--batch", setup.batch, *threads, *flags)
    return {"commands": [*steps, bench], "bench": bench, "caveat": caveat}


# --------------------------------------------------------------------------------------------------
# Strategies (the interface of deploycomp.prune's _Channels / _Blocks: plan once, then step)


class LatencyChannels:
    """Width pruning to a measured latency: table, allocation, verified search (see the module doc)."""

    def plan(self, ctx) -> None:
        cfg = ctx.cfg
        n = cfg.latency_widths or DEFAULT_WIDTHS
        model = ctx.ckpt.model
        self.structure = analyse_channels(model, ctx.example, ctx.criterion, ctx.ignored, cfg.round_to, n)
        s = self.structure
        check(s.groups, f"{ctx.ckpt.arch} has no channel group that {cfg.method} can prune (the classifier and "
                        "--ignore layers are kept)")
        for note in s.notes:
            ctx.notes.append(note)
        rankings = {g.root: g.ranking for g in s.groups}

        def make_problem(probe, setup):
            specs = s.specs()
            table = measure_table(probe, setup, specs, cfg.latency_cache)
            return channel_problem(s, table["entries"]), table

        def build(choice):
            trial = copy.deepcopy(model)
            history = prune_to_widths(trial, ctx.example, s.widths(choice), rankings)
            return _checkpoint_copy(ctx.ckpt, trial, {"op": "prune_channels", "history": history})

        def describe(choice):
            return {"widths": s.widths(choice)}

        narrowest = (f"every group at {1 / n:.0%} of its channels (multiples of {cfg.round_to}, "
                     f"--latency-widths {n})")
        ctx.latency, chosen = _search(ctx, make_problem, describe, build, narrowest)
        ctx.latency["groups"] = [{"root": g.root, "width": g.width, "candidates": g.candidates,
                                  "importance_kept": g.kept, "layer_sides": g.sides} for g in s.groups]
        self.final = s.widths(chosen["choice"])
        self.full = {g.root: g.width for g in s.groups}

    def step(self, ctx, step: int) -> dict[str, Any]:
        cfg = ctx.cfg
        model = ctx.ckpt.model
        if step == 0 and cfg.steps == 1:
            rankings = {g.root: g.ranking for g in self.structure.groups}
            widths = self.final
        else:  # rank again on the re-calibrated model; widths move a share of the way each step
            now = analyse_channels(model, ctx.example, ctx.criterion, ctx.ignored, cfg.round_to, 2)
            rankings = {g.root: g.ranking for g in now.groups}
            widths = {r: self._width_at(r, step, cfg) for r in self.final if r in rankings}
        history = prune_to_widths(model, ctx.example, widths, rankings)
        return {"widths": widths, "surgery": {"op": "prune_channels", "history": history}}

    def _width_at(self, root: str, step: int, cfg) -> int:
        full, final = self.full[root], self.final[root]
        if step == cfg.steps - 1:
            return final
        w = full - (full - final) * (step + 1) / cfg.steps
        return max(final, min(full, cfg.round_to * round(w / cfg.round_to)))


class LatencyBlocks:
    """Depth pruning to a measured latency: each removable block kept (its sensitivity) or dropped."""

    def plan(self, ctx) -> None:
        import numpy as np

        from deploycomp.prune.allocate import Problem, Term
        from deploycomp.prune.depth import drop_blocks, removable_blocks

        model = ctx.ckpt.model
        names = removable_blocks(model)
        if not names:
            raise UsageError(f"{ctx.ckpt.arch} has no residual blocks with an identity shortcut, so depth pruning "
                             "has nothing to remove; use a channel criterion such as --method magnitude")
        scores = ctx.criterion.block_scores(model, names)
        modules = dict(model.named_modules())
        shapes = layer_inputs(model, ctx.example)
        specs = {n: layer_spec(modules[n], shapes[n]) for n in shapes}
        inside = {b: [n for n in specs if n.startswith(b + ".")] for b in names}
        outside = [n for n in specs if not any(n.startswith(b + ".") for b in names)]

        def make_problem(probe, setup):
            table = measure_table(probe, setup, list({s.key: s for s in specs.values()}.values()),
                                  ctx.cfg.latency_cache)
            entries = table["entries"]
            block_ms = {b: sum(entries[specs[n].key] for n in inside[b]) for b in names}
            table["blocks_ms"] = block_ms
            values = [np.array([0.0, max(scores[b], MIN_BLOCK_VALUE)]) for b in names]
            terms = [Term(None, g, np.array([[0.0, block_ms[b]]])) for g, b in enumerate(names)]
            return Problem(values, terms, constant=sum(entries[specs[n].key] for n in outside)), table

        def dropped(choice):
            return [b for b, o in zip(names, choice, strict=True) if o == 0]

        def build(choice):
            trial = copy.deepcopy(model)
            drop_blocks(trial, dropped(choice))
            return _checkpoint_copy(ctx.ckpt, trial, {"op": "drop_blocks", "blocks": dropped(choice)})

        ctx.latency, chosen = _search(ctx, make_problem, lambda c: {"blocks_dropped": dropped(c)}, build,
                                      f"all {len(names)} removable blocks dropped")
        ctx.latency["sensitivity"] = scores
        order = sorted(dropped(chosen["choice"]), key=lambda b: scores[b])
        self.plan_blocks = order

    def step(self, ctx, step: int) -> dict[str, Any]:
        from deploycomp.prune.depth import drop_blocks

        cfg = ctx.cfg
        k0 = math.floor(len(self.plan_blocks) * step / cfg.steps + 0.5)
        k1 = math.floor(len(self.plan_blocks) * (step + 1) / cfg.steps + 0.5)
        chosen = self.plan_blocks[k0:k1]
        drop_blocks(ctx.ckpt.model, chosen)
        return {"blocks": chosen, "surgery": {"op": "drop_blocks", "blocks": chosen}}


STRATEGIES = {"channels": LatencyChannels, "blocks": LatencyBlocks}
