"""INT8 that keeps its accuracy: per-layer quantization sensitivity, and ``--max-drop`` (layers back to float).

Post-training INT8 costs some models (depthwise convolutions, hard-swish, SiLU) a point or more. Most of
that loss usually sits in a few layers. A *candidate* is what can be kept "in float": quantizing the
model with its nodes in onnxruntime's ``nodes_to_exclude``, so their Q/DQ go and they run in FP32.
Candidates are

* each weighted operator the target quantizes (Conv, ConvTranspose, Gemm, MatMul: a *layer*), and
* for a target that also quantizes the operators between them (``ort-cpu``: Add, Mul, Sigmoid,
  GlobalAveragePool, Concat, ...), each such operator *type* as one group ("every Mul"): squeeze-excite
  and SiLU/hard-swish products lose INT8 accuracy there, not in the convolutions, and a group keeps the
  number of candidates (and evaluations) small.

* Sensitivity: the metric on a *validation* subset when only one layer stays float, minus the metric of
  the fully quantized model (points gained by keeping that layer in float). One quantization and one
  evaluation per layer.
* ``max_drop``: rank the layers by that gain; keep the ``k`` most sensitive in float, with the smallest
  ``k`` whose validation drop against FP32 is within the bound, found by bisection over ``k`` (the
  prefix of all layers is tried first: when even it misses the bound, only FP32 meets it and nothing is
  written). Evaluations on the validation subset: FP32 and full INT8 (2), one per layer (N), all layers
  float (1), bisection (at most ceil(log2 N)): at most ``N + 3 + ceil(log2 N)``; then FP32 and the
  result once each on the test split, which gives the reported number.

The validation subset is taken from the *training* split, disjoint from the calibration images (the
same seeded permutation, the images after the calibration ones); the test split is never used to choose.
All variants share one activation calibration (the ranges are calibrated once and reused), so they
differ only in which layers are float.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.errors import UsageError, check

DEFAULT_RANK_SAMPLES = 2000  # validation images that rank the layers and decide the bound
BENCH_LAYERS = 4  # --max-drop times each float layer on its own only up to this many of them


def check_max_drop(value: float | None) -> None:
    """A bound in points: finite and non-negative."""
    if value is None:
        return
    check(isinstance(value, (int, float)) and math.isfinite(value),
          f"--max-drop must be a finite number of points, got {value}")
    check(value >= 0, f"--max-drop must be 0 or more points (a drop, not a gain), got {value}")


@contextmanager
def _quietly():
    level = console.verbosity()
    console.set_verbosity(min(level, console.QUIET))
    try:
        yield
    finally:
        console.set_verbosity(level)


def validation_subset(train, skip: int, n: int, seed: int = 0):
    """``n`` training samples after the first ``skip`` of the seeded permutation that calibration draws from."""
    import torch

    check(n > 0, f"--rank-samples must be positive, got {n}")
    avail = len(train) - skip
    if avail <= 0:
        raise UsageError(f"no training images are left for validation after {skip} calibration images; lower "
                         "--calib-samples")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[skip:skip + n]
    return torch.utils.data.Subset(train, idx.tolist())


@dataclass(frozen=True)
class Candidate:
    """What --max-drop may keep in float: one weighted layer, or every node of one operator type."""

    name: str  # the node's name, or "every Mul (12 nodes)"
    op_type: str
    nodes: tuple[str, ...]

    @property
    def is_group(self) -> bool:
        return len(self.nodes) != 1 or self.nodes[0] != self.name


def float_nodes(float_layers: list[dict[str, Any]]) -> list[str]:
    """The graph nodes of the guard's ``float_layers`` entries (each a layer or an operator group)."""
    return [n for entry in float_layers for n in entry["nodes"]]


def candidate_layers(src: Path, opts) -> list[Candidate]:
    """The weighted operators the target quantizes, in graph order, then (for a target that quantizes every
    operator onnxruntime has an integer kernel for) one group per other quantized operator type."""
    import tempfile

    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from deploycomp.quantize import INT8_TARGETS, WEIGHTED_OPS, postprocessing_nodes

    target = INT8_TARGETS.get(opts.target)
    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        with _quietly():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
    kept = set() if opts.quantize_all_layers else set(target.float_layers(model))
    kept |= set(postprocessing_nodes(model))
    nodes = [n for n in model.graph.node if n.name and n.name not in kept]
    found = [Candidate(n.name, n.op_type, (n.name,)) for n in nodes if n.op_type in WEIGHTED_OPS]
    if target.op_types is None:  # onnxruntime's default set: the operators between the layers are INT8 too
        quantized = (set(QDQRegistry) | set(QLinearOpsRegistry)) - set(WEIGHTED_OPS)
        by_type: dict[str, list[str]] = {}
        for n in nodes:
            if n.op_type in quantized:
                by_type.setdefault(n.op_type, []).append(n.name)
        found += [Candidate(f"every {op} ({len(names)} node{'s' if len(names) > 1 else ''})", op, tuple(names))
                  for op, names in by_type.items()]
    return found


@dataclass
class Variants:
    """INT8 variants of one FP32 model that differ only in their float layers, evaluated on one subset."""

    src: Path
    opts: Any  # QuantizeOptions with ranges_cache set
    data: Any  # the validation subset
    work: Path
    task: Any = None  # the deploycomp.tasks.Task whose headline metric ranks and bounds (None: classification)
    evaluations: int = 0
    paths: dict[tuple[str, ...], Path] = field(default_factory=dict)
    scores: dict[tuple[str, ...], float] = field(default_factory=dict)

    def path(self, float_nodes) -> Path:
        from deploycomp.quantize import PRECISIONS

        key = tuple(sorted(float_nodes))
        if key not in self.paths:
            out = self.work / f"variant{len(self.paths)}.onnx"
            with _quietly():
                PRECISIONS.get("int8").convert(self.src, out, replace(self.opts, extra_float_nodes=key))
            self.paths[key] = out
        return self.paths[key]

    def score(self, float_nodes) -> float:
        from deploycomp.quantize import evaluate_onnx

        key = tuple(sorted(float_nodes))
        if key not in self.scores:
            path = self.path(key)
            with _quietly():
                self.scores[key] = evaluate_onnx(path, self.data, task=self.task)[metric_of(self.task)]
            self.evaluations += 1
        return self.scores[key]


def rank_layers(variants: Variants, layers: list[Candidate], full_score: float) -> list[dict[str, Any]]:
    """Per candidate, the points gained on the validation subset when only it stays float; most sensitive first."""
    rows = []
    for i, c in enumerate(layers):
        score = variants.score(c.nodes)
        rows.append({"layer": c.name, "op_type": c.op_type, "graph_index": i, "score_float_only": score,
                     "gain_points": score - full_score, **({"nodes": list(c.nodes)} if c.is_group else {})})
        console.debug(f"  {c.name}: {score - full_score:+.2f} points in float")
        if (i + 1) % 10 == 0 or i + 1 == len(layers):
            console.info(f"sensitivity: {i + 1}/{len(layers)} candidates evaluated")
    rows.sort(key=lambda r: (-r["gain_points"], r["graph_index"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def smallest_prefix(meets: Callable[[int], bool], n: int) -> int:
    """Smallest k in 1..n with meets(k), by bisection, given meets(n) and not meets(0) (ceil(log2 n) calls)."""
    lo, hi = 0, n  # meets(lo) is False, meets(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def metric_of(task) -> str:
    """The metric key that ranks layers and bounds the drop: the task's headline metric."""
    return task.metric if task is not None else "top1_pct"


def search(src: Path, opts, val, work: Path, fp32_score: float, max_drop: float | None,
           sensitivity: bool, task=None) -> dict[str, Any]:
    """Rank the layers and, with ``max_drop``, choose the float ones. Returns the record (see the module doc).

    Raises UsageError when even every layer in float misses ``max_drop`` (only FP32 meets it).
    """
    layers = candidate_layers(src, opts)
    check(len(layers) > 0, f"{src} has no quantized weighted layer (Conv/Gemm/MatMul) to keep in float")
    nodes_of = {c.name: c.nodes for c in layers}
    variants = Variants(src, opts, val, work, task=task)
    variants.evaluations = 1  # the FP32 evaluation the caller made
    full = variants.score([])
    drop_full = fp32_score - full
    record: dict[str, Any] = {
        "metric": metric_of(task), "split": "train (validation subset, disjoint from calibration)",
        "samples": len(val), "fp32": fp32_score, "int8": full, "int8_drop_points": drop_full,
        "layers_considered": len(layers), "groups_considered": sum(c.is_group for c in layers),
        "max_drop_points": max_drop}
    need_ranking = sensitivity or (max_drop is not None and drop_full > max_drop)
    ranking = rank_layers(variants, layers, full) if need_ranking else []
    if sensitivity:
        record["sensitivity"] = ranking
    if max_drop is None:
        record["evaluations"] = variants.evaluations
        return record
    record["evaluation_bound"] = len(layers) + 3 + math.ceil(math.log2(max(len(layers), 1)))
    chosen: list[str] = []

    def nodes(names: list[str]) -> list[str]:
        return [n for name in names for n in nodes_of[name]]

    if drop_full > max_drop:
        order = [r["layer"] for r in ranking]
        groups = record["groups_considered"]
        what = f"{len(order) - groups} weighted layers" + (f" and {groups} operator groups" if groups else "")
        all_float = fp32_score - variants.score(nodes(order))
        if all_float > max_drop:
            _only_fp32(max_drop, f"with all {what} in float INT8 still loses {all_float:.2f} points", task, val,
                       drop_full, src)
        k = smallest_prefix(lambda k: fp32_score - variants.score(nodes(order[:k])) <= max_drop, len(order))
        if k == len(order):  # nothing is left INT8 but what no candidate covers: that is the FP32 model
            _only_fp32(max_drop, f"only all {what} in float meet it, and that is the FP32 model", task, val,
                       drop_full, src)
        chosen = order[:k]
    gains = {r["layer"]: r for r in ranking}
    final = variants.score(nodes(chosen))
    record.update({
        "float_layers": [{"layer": n, "op_type": gains[n]["op_type"], "rank": gains[n]["rank"],
                          "gain_points": gains[n]["gain_points"], "nodes": list(nodes_of[n])} for n in chosen],
        "validation_score": final, "validation_drop_points": fp32_score - final,
        "evaluations": variants.evaluations, "search": "sensitivity ranking, then bisection over the prefix length"})
    record["_variants"] = variants  # for the speed comparison; removed before the sidecar is written
    return record


def _only_fp32(max_drop: float, why: str, task, val, drop_full: float, src: Path):
    raise UsageError(f"--max-drop {max_drop:g}: only FP32 meets it; {why} ({metric_of(task)} on {len(val)} "
                     f"validation images; full INT8 loses {drop_full:.2f}); nothing written: use the FP32 model "
                     f"{src}, or allow a larger drop")


def speed(fp32: Path, variants: Variants, chosen: list[dict[str, Any]], sessions: int = 5) -> dict[str, Any]:
    """Paired ort-cpu latency of FP32, full INT8, the guarded model and (up to BENCH_LAYERS) each float candidate
    alone; ``chosen`` are the guard's ``float_layers`` entries (``layer``, ``nodes``)."""
    from deploycomp.bench import BenchConfig, benchmark

    arts = [("fp32", fp32), ("int8", variants.path([]))]
    if chosen:
        arts.append(("guarded", variants.path(float_nodes(chosen))))
        if 1 < len(chosen) <= BENCH_LAYERS:
            arts += [(f"float:{c['layer']}", variants.path(c["nodes"])) for c in chosen]
    config = BenchConfig(backend="ort", device="cpu", sessions=sessions, rounds=6, duration_s=0.3, threads=1)
    with console.status_line(f"timing {len(arts)} models on ort-cpu (paired)"):
        results = benchmark([str(p) for _, p in arts], config, names=[n for n, _ in arts])
    by_name = {r["name"]: r for r in results}
    out: dict[str, Any] = {"backend": "ort", "device": "cpu", "threads": 1, "batch": 1, "sessions": sessions,
                           "models": {}}
    for name, _ in arts:
        r = by_name[name]
        out["models"][name] = {"latency_ms_median": r["latency_ms"]["median"], "speedup_vs_fp32": r["speedup"],
                               "speedup_ci95": r.get("speedup_ci95"), "verdict": r.get("verdict")}
    if chosen:
        full = out["models"]["int8"]["speedup_vs_fp32"]
        guarded = out["models"]["guarded"]["speedup_vs_fp32"]
        out["guarded_share_of_int8_speedup"] = (guarded - 1) / (full - 1) if full > 1 else None
    return out


def summary_lines(guard: dict[str, Any]) -> list[str]:
    """Console lines: the layers --max-drop left in float and what they cost in speed."""
    lines = []
    if guard.get("max_drop_points") is not None:
        layers = guard.get("float_layers") or []
        lines.append(f"--max-drop {guard['max_drop_points']:g}: {len(layers)} of {guard['layers_considered']} "
                     f"candidates kept in float; validation drop {guard['validation_drop_points']:.2f} points "
                     f"(full INT8 {guard['int8_drop_points']:.2f}) on {guard['samples']} images, "
                     f"{guard['evaluations']} evaluations (bound {guard['evaluation_bound']})")
        models = (guard.get("speed") or {}).get("models", {})
        for r in layers:
            m = models.get(f"float:{r['layer']}")
            cost = f"; alone {_speed_text(m)} vs FP32" if m else ""
            lines.append(f"  float: {r['layer']} ({r['op_type']}, rank {r['rank']}, "
                         f"{r['gain_points']:+.2f} points alone{cost})")
        for name in ("int8", "guarded"):
            if name in models:
                lines.append(f"  {name}: {_speed_text(models[name])} vs FP32 (ort-cpu, batch 1, paired)")
        share = (guard.get("speed") or {}).get("guarded_share_of_int8_speedup")
        if share is not None:
            lines.append(f"  the guarded model keeps {100 * share:.0f} % of full INT8's speed-up")
    for path in (guard.get("sensitivity_files") or {}).values():
        lines.append(f"wrote {path}")
    return lines


def _speed_text(m: dict[str, Any]) -> str:
    ci = m.get("speedup_ci95")
    return f"{m['speedup_vs_fp32']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown(record: dict[str, Any], model: str) -> str:
    rows = record.get("sensitivity") or []
    lines = [f"# INT8 sensitivity of {model}", "",
             f"{record['metric']} on {record['samples']} validation images ({record['split']}): FP32 "
             f"{record['fp32']:.2f}, full INT8 {record['int8']:.2f} ({record['int8_drop_points']:+.2f} points drop).",
             "Gain: points won back when only that layer (or every node of that operator type) stays float "
             "(everything else INT8).", "",
             "| rank | layer | op | float-only score | gain (points) |", "|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | `{r['layer']}` | {r['op_type']} | {r['score_float_only']:.2f} | "
                     f"{r['gain_points']:+.2f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path, model: str, top: int = 30) -> Path:
    """Horizontal bars of the ``top`` largest gains (lazy matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (record.get("sensitivity") or [])[:top]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(rows) + 1.2))
    ax.barh([r["layer"] for r in rows][::-1], [r["gain_points"] for r in rows][::-1], color="tab:blue")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"{record['metric']} gained with only this layer in float (points)")
    ax.set_title(f"INT8 sensitivity: {model} (full INT8 {-record['int8_drop_points']:+.2f} points)", fontsize=9)
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the temporary name has no .png
    plt.close(fig)
    return path
