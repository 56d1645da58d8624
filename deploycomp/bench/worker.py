"""Fresh processes for benchmark work: one session of timing, or one memory measurement.

A *session* loads every artifact anew, warms them up and times them in interleaved rounds. Run in a fresh
process (``python -m deploycomp.bench.worker JOB OUT``), a session starts from nothing the previous one
left: new allocations of the weights, new thread pools, new address-space layout. Sessions are the unit a
re-run of the benchmark varies by (:mod:`deploycomp.bench.sessions`), and a memory figure needs a process
in which nothing else has happened (:mod:`deploycomp.bench.memory`).

The child imports only what its backend needs: an ONNX Runtime or TensorRT job never imports torch, so
neither its start-up time nor its resident memory carries torch's hundreds of MiB. It answers through a
JSON file; a one-line error it raised comes back as the same one-line error here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from deploycomp.errors import DeploycompError

JOB_KINDS = ("timing", "memory")


def run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job (``kind``: ``timing``, the default, or ``memory``) in a fresh Python process."""
    with tempfile.TemporaryDirectory(prefix="deploycomp-bench-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "deploycomp.bench.worker", str(job_path), str(out_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if out_path.exists():
            result = json.loads(out_path.read_text())
            if "error" in result:
                err = DeploycompError(result["error"])
                err.exit_code = result.get("exit_code", 1)
                raise err
            return result
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
        what = job["artifacts"][0][0] if "artifacts" in job else job.get("artifact")
        raise DeploycompError(f"the benchmark process for {what} died (exit code {proc.returncode})"
                              f"{': ' + tail[0] if tail else ''}")


def _run(job: dict[str, Any]) -> dict[str, Any]:
    kind = job.get("kind", "timing")
    if kind == "memory":
        from deploycomp.bench.memory import measure_job

        return measure_job(job)
    if kind != "timing":
        raise DeploycompError(f"unknown benchmark job kind {kind!r}; valid: {', '.join(JOB_KINDS)}")
    from deploycomp.bench.run import run_job

    return run_job(job)


def _main(job_path: str, out_path: str) -> int:
    from deploycomp import console
    from deploycomp.files import write_json

    console.set_verbosity(console.QUIET)
    job = json.loads(Path(job_path).read_text())
    try:
        result = _run(job)
    except DeploycompError as e:
        write_json(out_path, {"error": str(e), "exit_code": e.exit_code})
        return 0
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
