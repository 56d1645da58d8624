"""The latency table of latency pruning: every layer timed alone at its candidate widths, and its cache.

Entries are milliseconds minus the backend's cost of an empty call, measured through a probe
(:mod:`deploycomp.prune.probes`) and cached per setup, machine and library versions in a JSON file
(:class:`LatencyCache`), so that a second search on the same model measures nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.errors import UsageError, check

CACHE_SCHEMA = "deploycomp.latency-table"
CACHE_VERSION = 1
CACHE_OFF = "off"


def default_cache_dir() -> Path:
    """``$DEPLOYCOMP_CACHE_DIR/latency``, else ``$XDG_CACHE_HOME/deploycomp/latency``, else ``~/.cache/...``."""
    if os.environ.get("DEPLOYCOMP_CACHE_DIR"):
        return Path(os.environ["DEPLOYCOMP_CACHE_DIR"]) / "latency"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "deploycomp" / "latency"



class LatencyCache:
    """Measured layer latencies of one setup on one machine, in a JSON file keyed by a hash of the setup.

    The file lives in ``directory`` (default :func:`default_cache_dir`) and is named
    ``<backend>-<device>-b<batch>-t<threads>-<hash>.json``; the hash covers the setup, the machine (CPU
    model and usable cores, or GPU name), the library versions and the way layers are timed, and the file
    repeats all of it. A file that does not match, does not parse or holds a bad entry is ignored (and
    replaced); writes are atomic and merge with what another process may have written meanwhile.
    """

    def __init__(self, directory: str | os.PathLike | None, setup, context: dict[str, Any]):
        import hashlib

        self.enabled = directory != CACHE_OFF
        self.context = context
        digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        threads = setup.threads if setup.threads else "default"
        name = f"{setup.backend}-{setup.device.replace(':', '')}-b{setup.batch}-t{threads}-{digest}.json"
        self.path = (Path(directory) if directory and self.enabled else default_cache_dir()) / name

    def load(self) -> dict[str, float]:
        if not self.enabled or not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            check(isinstance(doc, dict) and doc.get("schema") == CACHE_SCHEMA
                  and doc.get("version") == CACHE_VERSION and doc.get("context") == self.context, "mismatch")
            entries = {str(k): float(v) for k, v in doc["entries"].items()}
            check(all(math.isfinite(v) and v >= 0 for v in entries.values()), "bad entry")
            return entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError):
            console.warn(f"ignoring the latency cache {self.path}: it does not match this setup or is damaged; "
                         "measuring again")
            return {}

    def save(self, entries: dict[str, float]) -> None:
        if not self.enabled:
            return
        from deploycomp.files import write_json

        merged = {**self.load(), **entries}
        try:
            write_json(self.path, {"schema": CACHE_SCHEMA, "version": CACHE_VERSION, "context": self.context,
                                   "entries": dict(sorted(merged.items()))})
        except OSError as e:
            console.warn(f"could not write the latency cache {self.path} ({e}); the next search measures again")


def cache_context(setup) -> dict[str, Any]:
    """What a cached latency depends on besides the layer: setup, machine, versions, timing method."""
    from deploycomp.bench.env import capture
    from deploycomp.prune.probes import OP_TIMING

    env = capture(setup.device)
    keys = ("device_name", "cpu_model", "cpus_usable", "torch", "onnxruntime", "tensorrt", "cuda_runtime",
            "driver", "machine")
    return {"backend": setup.backend, "device": setup.device, "batch": setup.batch, "threads": setup.threads,
            **{k: env.get(k) for k in keys}, "op_timing": OP_TIMING}


def measure_table(probe, setup, specs: list, cache_dir: str | None) -> dict[str, Any]:
    """Latency (ms, minus the cost of an empty call) of every spec, from the cache or measured now."""
    from deploycomp.prune.probes import OpSpec

    t0 = time.perf_counter()
    cache = LatencyCache(cache_dir, setup, cache_context(setup))
    cached = cache.load()
    empty = OpSpec("identity", 1, 1)
    todo = [s for s in [empty, *specs] if s.key not in cached]
    fresh: dict[str, float] = {}
    if todo:
        console.info(f"latency table: {len(specs)} layer shapes on {setup.describe()}; {len(specs) + 1 - len(todo)} "
                     f"cached, measuring {len(todo)}")
        with console.status_line(f"timing {len(todo)} layers alone on {setup.describe()}") as show:
            times = probe.time_ops(todo, setup, progress=lambda n: show(f"{n}/{len(todo)}"))
        fresh = {s.key: t for s, t in zip(todo, times, strict=True)}
        cache.save(fresh)
    raw = {**cached, **fresh}
    overhead = raw[empty.key]
    entries = {s.key: max(raw[s.key] - overhead, 0.0) for s in specs}
    return {"entries": entries, "overhead_ms": overhead, "layers_measured": len(fresh),
            "layers_cached": len(specs) + 1 - len(fresh), "cache": str(cache.path) if cache.enabled else None,
            "seconds": time.perf_counter() - t0}
