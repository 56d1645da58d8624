"""Hardening, concurrent runs: two pipelines on one run directory never write it at once.

The second refuses with one line naming the process that holds the directory, or waits for it with
--wait; a lock left behind by a killed run is stale and taken over; the finished stages of the first
run are reused as they were (the cache is never corrupted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploycomp import lock
from deploycomp.errors import BusyError
from tests.harden_util import REPO, TINY_RECIPE, invoke, leftovers, start, wait_for

HOLD = """
import sys, time
from deploycomp.lock import directory_lock
with directory_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(d: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the lock on ``d`` for ``seconds`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(d), str(seconds)], env={**os.environ,
                            "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    proc = hold(tmp_path / "run", 30)
    try:
        with pytest.raises(BusyError) as e, lock.directory_lock(tmp_path / "run", what="run directory"):
            pass
        assert f"deploycomp process {proc.pid} on " in str(e.value) and "run directory" in str(e.value)
        assert e.value.exit_code == 3
    finally:
        proc.kill()
        proc.wait()


def test_waiting_for_the_holder(tmp_path):
    proc = hold(tmp_path, 1.0)
    t0 = time.monotonic()
    with lock.directory_lock(tmp_path, wait=60) as path:
        assert proc.poll() is not None or time.monotonic() - t0 > 0.5  # got it only after the holder let go
        assert json.loads(path.read_text())["pid"] == os.getpid()
    proc.wait()
    proc = hold(tmp_path, 30)
    t0 = time.monotonic()
    try:
        with pytest.raises(BusyError), lock.directory_lock(tmp_path, wait=0.3):
            pass
    finally:
        proc.kill()
        proc.wait()
    assert 0.3 <= time.monotonic() - t0 < 10  # waited as long as asked, then gave up


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = hold(tmp_path, 60)
    proc.kill()  # SIGKILL: no cleanup, the lock file stays
    proc.wait()
    assert (tmp_path / lock.LOCK_NAME).exists()
    with lock.directory_lock(tmp_path, wait=0) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / lock.LOCK_NAME).exists()  # released: nothing left in the directory


def test_without_fcntl_a_dead_holder_is_stale_and_a_live_one_is_not(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(lock, "fcntl", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / lock.LOCK_NAME
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "deploycomp x"}))
    with lock.directory_lock(tmp_path, wait=0):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "deploycomp y"}))
    with pytest.raises(BusyError, match=f"process {os.getppid()}"), lock.directory_lock(tmp_path, wait=0):
        pass
    assert path.exists()  # someone else's lock is not removed


def test_pipeline_refuses_a_run_directory_in_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    proc = hold(tmp_path / "run", 30)
    try:
        result = invoke("pipeline", "tiny.yaml", "-o", "run", "--no-plots")
    finally:
        proc.kill()
        proc.wait()
    assert result.exit_code == 3 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"in use by deploycomp process {proc.pid}" in errors[0], result.output
    assert "--wait" in errors[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [lock.LOCK_NAME]  # nothing else written


def test_two_real_pipelines_on_one_run_directory(tmp_path, monkeypatch):
    """A is mid-run (blocked writing the prune stage's model). B is refused; B --wait waits; A is then
    killed (SIGKILL): B takes over the stale lock, reuses A's finished stages byte for byte, and finishes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    marker = tmp_path / "writing"
    a = start(["pipeline", "tiny.yaml", "-o", "run", "--no-plots"], tmp_path, block_on="torch:save:2", marker=marker)
    wait_for(marker.exists, 300, a, "pipeline A writing its prune stage")
    run = tmp_path / "run"
    finished = {p.parent.name: p.read_bytes() for p in (run / "stages").glob("*/record.json")}
    assert sorted(k.split("-")[0] for k in finished) == ["evaluate", "load"]
    before = {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    refused = invoke("pipeline", "tiny.yaml", "-o", "run", "--no-plots")
    assert refused.exit_code == 3 and f"deploycomp process {a.pid}" in refused.output, refused.output
    assert {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # B wrote nothing

    threading.Timer(1.0, a.kill).start()
    waited = invoke("pipeline", "tiny.yaml", "-o", "run", "--no-plots", "--wait")
    a.wait(timeout=60)
    assert waited.exit_code == 0, waited.output
    assert f"waiting for deploycomp process {a.pid}" in waited.output
    log = {e["stage"]: e["status"] for e in json.loads((run / "run.json").read_text())["log"]}
    assert all(log[k] == "cached" for k in finished) and list(log.values()).count("ran") == 2, log
    for stage, data in finished.items():
        assert (run / "stages" / stage / "record.json").read_bytes() == data
    assert not (run / lock.LOCK_NAME).exists()
    assert [p for p in leftovers(run) if "prune-" not in p] == []  # only A's killed write left a temporary
