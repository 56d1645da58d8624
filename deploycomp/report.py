"""Reports of a pipeline run: Markdown / CSV / JSON tables and PNG plots, rebuilt from the JSON records.

Everything here reads only ``RUN_DIR/run.json`` and the ``record.json`` of each stage, so a report
can be regenerated (or restyled) at any time without touching a model. Per study there are two tables:

* the comparison, one row per variant (the original first): top-1, change against the original,
  accuracy retained, size on disk and its reduction, parameters, MACs and their reduction, and the
  headline latency (median, p99, backend, batch, precision) with throughput and speed-up;
* deployment, one row per artifact x backend x batch: the latency of every measurement.

Speed-ups are against the original at the same precision, format, backend and batch. When both were
timed in the same interleaved session (the pipeline's bench stages time every artifact of a backend
together), the speed-up is paired round by round, with its 95 % interval and a verdict
(:func:`deploycomp.bench.paired.paired_speedup`); runs recorded before that have plain ratios.

Plots (PNG, one set per study): accuracy vs MACs, accuracy vs latency, latency vs batch, with the 95 %
intervals of the median latencies as error bars where they were measured. Accuracy vs latency has a log
latency axis (ONNX Runtime and PyTorch points differ tenfold), one colour per backend with its Pareto front,
and every point labelled where the label overlaps no other; drawn by :mod:`deploycomp.report_plots`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp.errors import InputFileError
from deploycomp.files import atomic_path, read_json, write_json
from deploycomp.report_plots import (  # noqa: F401  the plots live in report_plots; these names stay importable here
    _interval_err,
    _overlap,
    accuracy_latency_figure,
    accuracy_memory_figure,
    label_points,
    pareto_front,
    plot_study,
)

FORMATS = ("md", "csv", "json")

# (key, Markdown/CSV header, format) of the comparison table, in order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("variant", "variant", "s"),
    ("method", "method", "s"),
    ("top1_pct", "top-1 %", ".2f"),
    ("top1_change_pts", "Δ top-1 (pts)", "+.2f"),
    ("accuracy_retained_pct", "retained %", ".1f"),
    ("top1_before_finetune_pct", "top-1 before FT %", ".2f"),
    ("size_mib", "size MiB", ".2f"),
    ("size_reduction_pct", "size red. %", ".1f"),
    ("params_m", "params M", ".3f"),
    ("macs_m", "MMACs", ".1f"),
    ("macs_reduction_pct", "MACs red. %", ".1f"),
    ("latency_median_ms", "median ms", ".3f"),
    ("latency_p99_ms", "p99 ms", ".3f"),
    ("backend", "backend", "s"),
    ("precision", "precision", "s"),
    ("batch", "batch", "d"),
    ("throughput_ips", "img/s", ".0f"),
    ("speedup", "speed-up [95% interval]", "speedup"),
    ("verdict", "verdict", "s"),
    ("load_peak_rss_mib", "load peak MiB", ".1f"),
    ("steady_rss_mib", "steady MiB", ".1f"),
    ("memory_reduction_pct", "memory red. %", "memory_reduction"),
)

LATENCY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("variant", "variant", "s"),
    ("precision", "precision", "s"),
    ("format", "format", "s"),
    ("backend", "backend", "s"),
    ("batch", "batch", "d"),
    ("top1_pct", "top-1 %", ".2f"),
    ("size_mib", "size MiB", ".2f"),
    ("latency_median_ms", "median ms", ".3f"),
    ("latency_median_ci95_ms", "95% interval ms", "interval"),
    ("latency_p99_ms", "p99 ms", ".3f"),
    ("throughput_ips", "img/s", ".0f"),
    ("speedup", "speed-up [95% interval]", "speedup"),
    ("verdict", "verdict", "s"),
    ("speedup_vs_fp32", "vs original FP32", "speedup_vs_fp32"),
    ("load_peak_rss_mib", "load peak MiB", ".1f"),
    ("steady_rss_mib", "steady MiB", ".1f"),
    ("memory_reduction_pct", "memory red. %", "memory_reduction"),
)
# CSV-only columns: the intervals as numbers (the Markdown shows them inside the cells above)
CSV_EXTRA = ("speedup_ci95_low", "speedup_ci95_high", "paired", "latency_median_ci95_low_ms",
             "latency_median_ci95_high_ms", "interval")
MEMORY_KEYS = ("load_peak_rss_mib", "steady_rss_mib", "memory_reduction_pct", "memory_reduction_range_pct")
MEMORY_FIGURES = ("load_peak_rss_mib", "steady_rss_mib", "repeats")  # kept from a bench result's memory

FORMAT_OF_STAGE = {"export": "onnx", "quantize": "onnx", "build": "engine"}


@dataclass
class StudyReport:
    name: str
    description: str
    scale: str
    dataset: str | None
    synthetic: bool
    eval_samples: int | None
    rows: list[dict[str, Any]]
    latency_rows: list[dict[str, Any]]
    headline: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    model: str | None = None  # the original model: the checkpoint file or zoo name the run started from
    metric: str = "top1_pct"  # the task's headline metric (segmentation: miou_pct): the rows' accuracy keys
    metric_label: str = "top-1"  # how the tables name it

    @property
    def keys(self) -> tuple[str, str, str]:
        """The accuracy keys of a row: the metric, its change against the original, its value before fine-tuning."""
        return metric_keys(self.metric)


def metric_keys(metric: str) -> tuple[str, str, str]:
    """``top1_pct`` -> (``top1_pct``, ``top1_change_pts``, ``top1_before_finetune_pct``); likewise ``miou_pct``."""
    stem = metric.removesuffix("_pct")
    return metric, f"{stem}_change_pts", f"{stem}_before_finetune_pct"


def columns_for(s: StudyReport, columns: tuple) -> tuple:
    """``columns`` (written for classification) with the study's metric keys and name."""
    rename = dict(zip(metric_keys("top1_pct"), s.keys, strict=True))
    return tuple((rename.get(c[0], c[0]), c[1].replace("top-1", s.metric_label), *c[2:]) for c in columns)


# --------------------------------------------------------------------------------------------------
# Reading a run


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not os.path.lexists(path):
        raise InputFileError(f"{run_dir} is not a pipeline run (no run.json); run `deploycomp pipeline -o "
                             f"{run_dir}` first")
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != "deploycomp.pipeline":
        raise InputFileError(f"{path} is not a deploycomp pipeline run record")
    return doc


def _records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """stage id -> the stage's record (only stages that finished)."""
    out = {}
    stages = run_dir / "stages"
    if stages.is_dir():
        for d in stages.iterdir():
            rec = d / "record.json"
            if rec.exists():
                out[d.name] = read_json(rec)
    return out


def _get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def study_reports(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[StudyReport]]:
    """The run document and one :class:`StudyReport` per study, computed from the records."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    records = _records(run_dir)
    if not records and any(s.get("branches") for s in run.get("studies", [])):
        raise InputFileError(f"{run_dir} has no stage records (stages/*/record.json), which the report is built "
                             f"from; re-run the recipe into it: deploycomp pipeline {run.get('recipe')} -o {run_dir}")
    return run, [_study(s, records) for s in run.get("studies", [])]


def _study(study: dict[str, Any], records: dict[str, dict]) -> StudyReport:
    def rec(stage_id):
        return (records.get(stage_id) or {}).get("record") if stage_id else None

    head = dict(study.get("report") or {})
    backends = list(_get(study, "bench", "backends") or ["torch", "ort"])
    batches = list(_get(study, "bench", "batches") or [1])
    head.setdefault("backend", backends[0])
    head.setdefault("precision", "fp32")
    head.setdefault("batch", batches[0])

    latency_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    dataset, synthetic, eval_samples = None, False, None
    evals = [rec(b.get("evaluate")) for b in study.get("branches", [])]
    metric, label = next(((e["metric"], e.get("metric_label", e["metric"])) for e in evals if e and e.get("metric")),
                         ("top1_pct", "top-1"))
    m_value, _, m_before = metric_keys(metric)
    notes = list(study.get("notes") or [])
    for b in study.get("branches", []):
        ev = rec(b.get("evaluate"))
        prune = next((rec(s) for s in reversed(b.get("steps", [])) if s.startswith("prune-") and rec(s)), None)
        quant = {p: rec(s) for p, s in (b.get("quantize") or {}).items()}
        if ev:
            dataset = ev.get("dataset", dataset)
            synthetic = synthetic or bool(ev.get("synthetic"))
            eval_samples = _get(ev, "test", "samples", default=eval_samples)
        row: dict[str, Any] = {
            "variant": b["name"], "method": b.get("description", ""),
            m_value: _get(ev, "test", metric),
            m_before: _get(prune, "accuracy", "after_pruning", metric)
            if prune and _get(prune, "params", "finetune") is not None else None,
            "size_mib": _get(ev, "checkpoint_size_mib"),
            "params_m": ev["params_total"] / 1e6 if ev and ev.get("params_total") is not None else None,
            "macs_m": ev["macs"] / 1e6 if ev and ev.get("macs") is not None else None,
            "complete": ev is not None,
        }
        for item in b.get("bench", []):
            bench = rec(item["stage"])
            if not bench:
                continue
            stage_kind = item.get("source", "load")
            artifact_size = None
            top1 = None
            if stage_kind == "export":
                artifact_size = _get(rec(b.get("export")), "size_mib")
                top1 = next((_get(q, "accuracy", f"fp32_{metric}") for q in quant.values() if q), None)
            elif stage_kind == "quantize":
                q = quant.get(item["precision"])
                artifact_size, top1 = _get(q, "size_mib"), _get(q, "accuracy", metric)
            elif stage_kind == "build":
                artifact_size = _get(rec((b.get("build") or {}).get(item["precision"])), "size_mib")
            else:
                artifact_size, top1 = row["size_mib"], row[m_value]
            for r in bench.get("results", []):
                if r.get("source_stage", item.get("source_stage")) != item.get("source_stage"):
                    continue  # a paired bench stage holds every artifact of the study: this branch's only
                lat = r.get("latency_ms") or {}
                latency_rows.append({
                    "variant": b["name"], "precision": r.get("precision") or item["precision"],
                    "format": FORMAT_OF_STAGE.get(stage_kind, "pt"), "backend": r.get("backend", item["backend"]),
                    "batch": r.get("batch"), m_value: top1, "size_mib": artifact_size,
                    "latency_median_ms": r.get("latency_median_ms") or lat.get("median"),
                    "latency_p99_ms": lat.get("p99"),
                    "latency_cov_pct": lat.get("cov_pct"), "throughput_ips": r.get("throughput_ips"),
                    "latency_median_ci95_ms": r.get("latency_median_ci95_ms"),
                    "block_medians_ms": r.get("block_medians_ms"), "session": r.get("session"),
                    "sessions": r.get("sessions"), "interval": r.get("interval"),
                    **{k: (r.get("memory") or {}).get(k) for k in MEMORY_FIGURES if k != "repeats"},
                    "memory_repeats": (r.get("memory") or {}).get("repeats"),
                    "conditions": r.get("conditions") or {},
                    "threads": r.get("threads"), "device": r.get("device"), "warnings": r.get("warnings") or [],
                    "environment": r.get("environment") or {}})
        rows.append(row)

    _relative_to_original(rows, latency_rows, _get(study, "bench", "margin_pct"), metric)
    for row in rows:
        hit = next((r for r in latency_rows if r["variant"] == row["variant"] and r["backend"] == head["backend"]
                    and r["precision"] == head["precision"] and r["batch"] == head["batch"]), None)
        row.update({"latency_median_ms": _get(hit, "latency_median_ms"), "latency_p99_ms": _get(hit, "latency_p99_ms"),
                    "backend": head["backend"] if hit else None, "precision": head["precision"] if hit else None,
                    "batch": head["batch"] if hit else None, "throughput_ips": _get(hit, "throughput_ips"),
                    **{k: _get(hit, k) for k in ("speedup", "speedup_ci95", "verdict", "paired",
                                                 "latency_median_ci95_ms", "interval", *MEMORY_KEYS)}})
    if any(not r["complete"] for r in rows):
        notes.append("rows marked incomplete come from a run that has not finished all its stages")
    root = rec(study.get("root")) or {}
    model = f"{root['model']} ({root.get('arch')})" if root.get("model") else study.get("model")
    return StudyReport(study["name"], study.get("description", ""), study.get("scale", ""), dataset, synthetic,
                       eval_samples, rows, latency_rows, head, notes, model, metric, label)


def _ratio_pct(value, ref) -> float | None:
    if value is None or not ref:
        return None
    return 100.0 * value / ref


def _relative_to_original(rows: list[dict], latency_rows: list[dict], margin_pct: float | None = None,
                          metric: str = "top1_pct") -> None:
    """Change, retention and reductions against the first row (the original); speed-ups, paired when possible."""
    if not rows:
        return
    o = rows[0]
    for r in rows:
        m, change, _ = metric_keys(metric)
        r[change] = r[m] - o[m] if None not in (r[m], o[m]) else None
        r["accuracy_retained_pct"] = _ratio_pct(r[m], o[m])
        r["size_reduction_pct"] = 100.0 - _ratio_pct(r["size_mib"], o["size_mib"]) \
            if _ratio_pct(r["size_mib"], o["size_mib"]) is not None else None
        r["macs_reduction_pct"] = 100.0 - _ratio_pct(r["macs_m"], o["macs_m"]) \
            if _ratio_pct(r["macs_m"], o["macs_m"]) is not None else None
    refs = {(x["precision"], x["format"], x["backend"], x["batch"]): x for x in latency_rows
            if x["variant"] == o["variant"]}
    for x in latency_rows:
        ref = refs.get((x["precision"], x["format"], x["backend"], x["batch"]))
        x.update(speedup_against(ref, x, margin_pct) if ref else
                 {"speedup": None, "speedup_ci95": None, "verdict": None, "paired": None})
        x["memory_reduction_pct"], x["memory_reduction_range_pct"] = _memory_reduction(ref, x)
    _compound_speedups(o["variant"], latency_rows, margin_pct)


def _memory_reduction(ref: dict | None, x: dict) -> tuple[float | None, list[float] | None]:
    """Steady-state memory reduction of row ``x`` against the original at the same precision (paired repeats)."""
    from deploycomp.bench.memory import reduction

    if ref is None or ref is x:
        return None, None
    return reduction({"steady_rss_mib": ref.get("steady_rss_mib"), "repeats": ref.get("memory_repeats")},
                     {"steady_rss_mib": x.get("steady_rss_mib"), "repeats": x.get("memory_repeats")})


def _compound_speedups(original: str, latency_rows: list[dict], margin_pct: float | None) -> None:
    """``speedup_vs_fp32``: each row against the original FP32 artifact on the same backend and batch.

    What a deployer asks ("taylor-50 INT8 against what I run now"): pruning and quantization together,
    paired like every other speed-up when both were timed in the same bench run. Rows of a backend with no
    FP32 original (or the original FP32 itself) get none.
    """
    fp32 = {(x["backend"], x["batch"]): x for x in latency_rows
            if x["variant"] == original and x["precision"] == "fp32"}
    for x in latency_rows:
        ref = fp32.get((x["backend"], x["batch"]))
        if ref is None or ref is x:
            x.update({"speedup_vs_fp32": None, "speedup_vs_fp32_ci95": None})
            continue
        est = speedup_against(ref, x, margin_pct)
        x.update({"speedup_vs_fp32": est["speedup"], "speedup_vs_fp32_ci95": est["speedup_ci95"]})


def speedup_against(ref: dict, x: dict, margin_pct: float | None = None) -> dict[str, Any]:
    """Speed-up of latency row ``x`` over ``ref``: paired when both were timed in the same bench run
    (across its sessions, or over the rounds of its one session)."""
    from deploycomp.bench.paired import DEFAULT_MARGIN_PCT, paired_between

    if ref is x:
        return {"speedup": 1.0, "speedup_ci95": None, "verdict": None, "paired": None}
    est = paired_between(ref, x, DEFAULT_MARGIN_PCT if margin_pct is None else margin_pct)
    if est is not None:
        return {"speedup": est.speedup, "speedup_ci95": list(est.ci95) if est.ci95 else None,
                "verdict": est.verdict, "paired": True}
    ratio = ref["latency_median_ms"] / x["latency_median_ms"] \
        if ref.get("latency_median_ms") and x.get("latency_median_ms") else None
    return {"speedup": ratio, "speedup_ci95": None, "verdict": None, "paired": False}


# --------------------------------------------------------------------------------------------------
# Formatting


def fmt(value, spec: str, row: dict | None = None) -> str:
    """A cell: ``spec`` is a format spec, or ``speedup`` / ``interval`` (values with their 95 % interval)."""
    from deploycomp.bench.paired import fmt_speedup

    if value is None:
        return "-"
    if spec == "speedup":
        return fmt_speedup(value, (row or {}).get("speedup_ci95"))
    if spec == "speedup_vs_fp32":
        return fmt_speedup(value, (row or {}).get("speedup_vs_fp32_ci95"))
    if spec == "memory_reduction":
        rng = (row or {}).get("memory_reduction_range_pct")
        return f"{value:.1f}" + (f" [{rng[0]:.1f}, {rng[1]:.1f}]" if rng else "")
    if spec == "interval":
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    if spec == "s":
        return str(value)
    if spec == "d":
        return f"{int(value)}"
    return format(float(value), spec)


def _md_table(columns, rows: Sequence[dict]) -> str:
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    align = "|" + "|".join("---" if spec == "s" else "---:" for _, _, spec in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), spec, r).replace("|", "\\|") for k, _, spec in cols) + " |"
            for r in rows]
    return "\n".join([head, align, *body])


def environment_line(run: dict[str, Any]) -> str:
    e = run.get("environment") or {}
    return (f"{e.get('cpu_model') or e.get('device_name') or 'unknown CPU'} ({e.get('cpus_usable')} usable of "
            f"{e.get('cpu_count')} CPUs), {e.get('os')}, {e.get('machine')}, Python {e.get('python')}")


def versions_line(run: dict[str, Any]) -> str:
    v = {"deploycomp": run.get("deploycomp"), **(run.get("versions") or {})}
    return ", ".join(f"{k} {val}" if val else f"{k} not installed" for k, val in v.items())


def markdown(run: dict[str, Any], studies: list[StudyReport], plots: dict[str, list[str]] | None = None) -> str:
    lines = [f"# deploycomp pipeline: {run.get('name')}", ""]
    if run.get("description"):
        lines += [run["description"].strip(), ""]
    wall = run.get("wall_s")
    lines += [
        f"- recipe: `{run.get('recipe')}` (sha256 {str(run.get('recipe_sha256'))[:12]})",
        f"- machine: {environment_line(run)}",
        f"- versions: {versions_line(run)}",
        "- TensorRT: " + ("available" if run.get("tensorrt_available")
                          else "not installed here: no engines were built and the trt backend was not measured"),
        f"- run status: {run.get('status')} at {run.get('finished_utc')}; wall time of the last invocation "
        f"{'-' if wall is None else f'{wall:.0f} s'} ({run.get('stages_run', 0)} stages run, "
        f"{run.get('stages_cached', 0)} reused from earlier runs)",
        "",
    ]
    for s in studies:
        if len(studies) > 1 or s.name != run.get("name"):
            lines += [f"## {s.name}", ""]
        if s.description and s.description != run.get("description"):
            lines += [s.description.strip(), ""]
        facts = [f"dataset: {s.dataset or '-'}" + (f", {s.metric_label} on {s.eval_samples:,} test images"
                                                    if s.eval_samples else "")]
        if s.model:
            facts.insert(0, f"original model: {s.model}")
        if s.scale:
            facts.append(f"scale: {s.scale.strip()}")
        lines += [f"- {f}" for f in facts]
        if s.synthetic:
            lines += ["- **synthetic data**: the accuracies below are on seeded random tensors and mean nothing; "
                      "only size, MACs and latency are informative"]
        h = s.headline
        lines += [f"- latency columns: {h['backend']} backend, {h['precision']}, batch {h['batch']} "
                  "(median and p99 of the timed iterations after warmup); speed-up against the original at the "
                  "same precision, backend and batch" + _pairing_text(s.latency_rows),
                  ""]
        if any(r.get("steady_rss_mib") is not None for r in s.latency_rows):
            lines += ["- memory columns: what the model costs on its runtime, in MiB above a fresh process's "
                      "baseline after imports (ONNX Runtime processes do not import torch): load peak = peak "
                      "resident memory while the session is built; steady = resident after warmup and the timed "
                      "runs (weights as the runtime holds them, activations, input, output); memory red. = steady "
                      "state against the original at the same precision [range over the paired repeats]; median "
                      "of 3 processes per model (`deploycomp bench --memory`)", ""]
        lines += [_md_table(columns_for(s, COLUMNS), s.rows), ""]
        if s.latency_rows:
            lines += ["### Every measurement", "", _md_table(columns_for(s, LATENCY_COLUMNS), s.latency_rows), ""]
            env = s.latency_rows[0]
            lines += [f"Latency: {env.get('device')}, {env.get('threads') or 'default'} threads; "
                      "size is the file on disk (checkpoint, ONNX or engine).", ""]
            conditions = [r["conditions"] for r in s.latency_rows if r.get("conditions", {}).get("other_cpu_pct")
                          is not None]
            if conditions:
                busiest = max(c["other_cpu_pct"] for c in conditions)
                loads = [c.get("load_avg_1m_before") for c in conditions if c.get("load_avg_1m_before") is not None]
                lines += [f"Machine while timing: other processes used at most {busiest:.0f}% of the CPUs; load "
                          f"average {min(loads):.2f}-{max(loads):.2f} before the bench sessions.", ""]
            noisy = sorted({r["variant"] for r in s.latency_rows if r["warnings"]})
            if noisy:
                lines += [f"Timing warnings for: {', '.join(noisy)} (uncertain medians, drift or a busy machine); "
                          "they are in the bench stages' bench.json.", ""]
        for n in s.notes:
            lines += [f"Note: {n}", ""]
        for p in (plots or {}).get(s.name, []):
            lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _pairing_text(latency_rows: list[dict]) -> str:
    """How the speed-ups of a report were paired, and what their intervals cover."""
    paired = [r for r in latency_rows if r.get("paired")]
    if not paired:
        return ""
    covers = paired[0].get("interval") or "within one session"
    return (f"; every artifact of a backend was timed in alternation, so speed-ups are paired, with their 95 % "
            f"interval {covers} and a verdict (faster / slower / same, 2 % margin); 'vs original FP32' is the "
            "compound speed-up against the original's FP32 artifact on the same backend and batch")


def csv_text(studies: list[StudyReport], latency: bool = False) -> str:
    columns = LATENCY_COLUMNS if latency else COLUMNS
    if studies:  # one header: the first study's metric (a run's studies share a task)
        columns = columns_for(studies[0], columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [k for k, _, spec in columns if spec != "interval"]
    w.writerow(["study", *keys, *CSV_EXTRA])
    for s in studies:
        for r in (s.latency_rows if latency else s.rows):
            flat = {**r}
            for name, pair in (("speedup_ci95_{}", r.get("speedup_ci95")),
                               ("latency_median_ci95_{}_ms", r.get("latency_median_ci95_ms"))):
                flat[name.format("low")], flat[name.format("high")] = pair or (None, None)
            w.writerow([s.name, *("" if flat.get(k) is None else flat.get(k) for k in (*keys, *CSV_EXTRA))])
    return buf.getvalue()


def json_doc(run: dict[str, Any], studies: list[StudyReport]) -> dict[str, Any]:
    keep = ("name", "description", "recipe", "recipe_sha256", "status", "wall_s", "finished_utc", "deploycomp",
            "versions", "environment", "tensorrt_available", "stages_run", "stages_cached")
    return {"schema": "deploycomp.report", "schema_version": 1, **{k: run.get(k) for k in keep},
            "studies": [{"name": s.name, "model": s.model, "description": s.description, "scale": s.scale,
                         "dataset": s.dataset, "synthetic": s.synthetic, "eval_samples": s.eval_samples,
                         "metric": s.metric,
                         "headline": s.headline, "notes": s.notes, "rows": s.rows,
                         "latency": [{k: v for k, v in r.items()
                                      if k not in ("environment", "block_medians_ms", "sessions")}
                                     for r in s.latency_rows]}
                        for s in studies]}


# --------------------------------------------------------------------------------------------------
# Writing


def write_report(run_dir: str | os.PathLike, formats: Sequence[str] = ("md",), plots: bool = True) -> dict[str, Any]:
    """Write ``report.<fmt>`` (and the plots under ``plots/``) into ``run_dir``; returns what was written."""
    run_dir = Path(run_dir)
    run, studies = study_reports(run_dir)
    written: dict[str, Any] = {"files": [], "plots": {}, "studies": studies, "run": run}
    plot_paths: dict[str, list[str]] = {}
    if plots:
        for s in studies:
            prefix = f"{s.name}-" if len(studies) > 1 else ""
            paths = plot_study(s, run_dir / "plots", prefix)
            plot_paths[s.name] = [str(p.relative_to(run_dir)) for p in paths]
    written["plots"] = plot_paths
    for f in formats:
        if f == "md":
            path = run_dir / "report.md"
            with atomic_path(path) as tmp:
                tmp.write_text(markdown(run, studies, plot_paths))
            written["files"].append(path)
        elif f == "csv":
            for name, latency in (("report.csv", False), ("report-latency.csv", True)):
                with atomic_path(run_dir / name) as tmp:
                    tmp.write_text(csv_text(studies, latency))
                written["files"].append(run_dir / name)
        elif f == "json":
            written["files"].append(write_json(run_dir / "report.json", json_doc(run, studies)))
    return written


# The comparison at the terminal: (key, header). The variant, its top-1 and its speed-up are always shown;
# SUMMARY_OPTIONAL are left out, in that order, until the table fits the terminal (at 80 columns: the first four).
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("variant", "variant"), ("top1_pct", "top-1 %"), ("top1_change_pts", "Δ pts"), ("size_mib", "MiB"),
    ("macs_m", "MMACs"), ("latency_median_ms", "median ms"), ("latency_p99_ms", "p99 ms"),
    ("throughput_ips", "img/s"), ("speedup", "speed-up [95%]"), ("verdict", "verdict"),
)
SUMMARY_OPTIONAL = ("img/s", "p99 ms", "MMACs", "MiB", "Δ pts", "median ms", "verdict")


def summary_rows(s: StudyReport) -> tuple[list[str], list[list[Any]]]:
    """The comparison table for the terminal (print it with ``optional=SUMMARY_OPTIONAL``)."""
    specs = dict((k, spec) for k, _, spec in columns_for(s, COLUMNS))
    cols = columns_for(s, SUMMARY_COLUMNS)
    return [h for _, h in cols], [[fmt(r.get(k), specs[k], r) for k, _ in cols] for r in s.rows]


def summary_title(s: StudyReport) -> str:
    h = s.headline
    return f"{s.name}: {s.dataset or ''} (latency: {h['backend']} {h['precision']}, batch {h['batch']})"


def print_summary(s: StudyReport) -> None:
    """The comparison table and the study's notes on stdout, fitted to the terminal's width."""
    from deploycomp import console

    heads, rows = summary_rows(s)
    console.table(summary_title(s), heads, rows, optional=SUMMARY_OPTIONAL)
    for n in s.notes:
        console.result(console.wrapped(f"Note: {n}"))
