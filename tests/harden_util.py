"""Shared material of the hardening tests (tests/test_harden_*.py): bad files, tiny ONNX models, a
stub that stops a command before its heavy work, and subprocess runners for signals and other users."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "models" / "light_resnet18_fmnist.pt"
PNG = bytes.fromhex(  # a valid 1x1 grayscale PNG
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c636000000002000148afa4710000000049454e44ae426082")
JUNK = bytes(range(7, 256)) * 8  # no format starts like this


def tiny_onnx(path: Path, *, external: str | None = None, classes: int = 10) -> Path:
    """A real, tiny FP32 classifier (1x1x28x28 -> ``classes`` logits) that ONNX Runtime runs.

    ``external``: store the weights in this file (relative to the model) as ONNX external data.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "conv.weight")
    fc = numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "fc.weight")
    nodes = [helper.make_node("Conv", ["input", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.weight"], ["logits"], transB=1)]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])
    graph = helper.make_graph(nodes, "tiny", [x], [y], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="deploycomp-tests")
    model.ir_version = 8  # what every onnxruntime >= 1.14 reads
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external,
                  size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def synthetic_checkpoint(path: Path) -> Path:
    """An untrained light_resnet18 checkpoint for the synthetic dataset: loads with no dataset files at all."""
    from deploycomp.checkpoint import load_model
    from deploycomp.data import load_dataset

    ckpt = load_model("light_resnet18", num_classes=10, in_channels=3)
    ckpt.metadata.update(load_dataset("synthetic", "test")[1].as_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    return ckpt.save(path)


def set_external_location(path: Path, location: str) -> Path:
    """Point every external tensor of the ONNX file at ``path`` to ``location`` (rewrites the file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return path


def bad_files(d: Path, real: Path, wrong_kind: Path, suffix: str) -> dict[str, Path]:
    """Every way a file given to an option can be bad, named ``<kind><suffix>`` in ``d``.

    ``real``: a good file of the expected kind (cut in half for "truncated");
    ``wrong_kind``: a good file of another kind (an ONNX model where a checkpoint is expected, ...).
    """
    d.mkdir(parents=True, exist_ok=True)
    data = real.read_bytes()
    files = {
        "missing": d / f"missing{suffix}",
        "empty": d / f"empty{suffix}",
        "directory": d / f"directory{suffix}",
        "junk": d / f"junk{suffix}",
        "truncated": d / f"truncated{suffix}",
        "wrong-kind": d / f"wrong-kind{suffix}",
        "json": d / f"json{suffix}",
        "png": d / f"png{suffix}",
        "symlink-loop": d / f"loop{suffix}",
    }
    files["empty"].write_bytes(b"")
    files["directory"].mkdir(exist_ok=True)
    files["junk"].write_bytes(JUNK)
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["wrong-kind"].write_bytes(wrong_kind.read_bytes())
    files["json"].write_text('{"model": "light_resnet18", "weights": [1, 2, 3]}\n')
    files["png"].write_bytes(PNG)
    other = d / f"loop-other{suffix}"
    if not files["symlink-loop"].is_symlink():
        os.symlink(other.name, files["symlink-loop"])
        os.symlink(files["symlink-loop"].name, other)
    return files


# A recipe whose pipeline runs in seconds: no data files, no fine-tuning, no export, no timing.
TINY_RECIPE = """name: tiny
model: light_resnet18
data: {name: synthetic, eval_samples: 32, eval_batch: 32}
variants:
  - name: mag50
    prune: {method: magnitude, ratio: 0.5, finetune: null, recalibrate_bn: false}
"""

# What the one error line must say about each kind of bad file.
EXPECTED = {
    "missing": "does not exist",
    "empty": "is empty",
    "directory": "is a directory",
    "junk": "not a readable",
    "truncated": "truncated",
    "wrong-kind": "not",
    "json": "JSON",
    "png": "PNG image",
    "symlink-loop": "symbolic link loop",
}


def snapshot(*paths: Path) -> dict[str, bytes | None]:
    """The bytes of every regular file among ``paths`` (to check that a command left its inputs intact)."""
    out = {}
    for p in paths:
        try:
            out[str(p)] = p.read_bytes() if p.is_file() else None
        except OSError:
            out[str(p)] = None
    return out


def leftovers(d: Path) -> list[str]:
    """Temporary files or directories left behind in ``d`` (and below) by an interrupted or failed write."""
    return sorted(str(p.relative_to(d)) for p in d.rglob(".*") if p.name.endswith((".tmp", ".probe"))
                  or (p.is_dir() and p.name.startswith(".") and p.name not in (".", "..")))


# --------------------------------------------------------------------------------------------------
# Stopping a command before its heavy work


class Stopped(Exception):
    pass


STOP_POINTS = (  # (module, attribute): the first expensive step of each command
    ("deploycomp.inputs", "load_inputs"),
    ("deploycomp.checkpoint", "load_model"),
    ("deploycomp.checkpoint", "load_checkpoint"),
    ("deploycomp.data", "load_dataset"),
    ("deploycomp.bench", "benchmark"),
    ("deploycomp.pipeline.PipelineRun", "execute"),
)


def stop_before_work(monkeypatch) -> None:
    """Make every command stop with one ``Error:`` line where its real work (loading) would begin.

    What a command checks before that point (option values, file arguments given as plain paths) is
    still exercised; this is what the fuzz and number tests look at, at a few milliseconds per call.
    """
    import importlib

    from deploycomp.errors import DeploycompError

    class StopHere(DeploycompError):
        pass

    def stop(*args, **kwargs):
        raise StopHere("stopped before the work (test stub)")

    for module, attr in STOP_POINTS:
        if "." in module and module.rsplit(".", 1)[1][:1].isupper():
            mod_name, cls = module.rsplit(".", 1)
            target = getattr(importlib.import_module(mod_name), cls)
        else:
            target = importlib.import_module(module)
        monkeypatch.setattr(target, attr, stop)
    import deploycomp.inputs

    monkeypatch.setattr(deploycomp.inputs, "load_model", stop)


def invoke(*args, catch: bool = True):
    """Run ``deploycomp ARGS`` in this process; returns the click Result."""
    from click.testing import CliRunner

    from deploycomp.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch)


def assert_clean_exit(result, args=()) -> None:
    """Exit 0, or one line starting with ``Error:`` and a non-zero code; never a traceback."""
    import traceback

    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"deploycomp {' '.join(map(str, args))} raised:\n{tb}\n{result.output}")
    assert "Traceback" not in result.output, result.output
    if result.exit_code != 0:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, f"deploycomp {' '.join(map(str, args))}:\n{result.output}"


# --------------------------------------------------------------------------------------------------
# Subprocesses: real signals and another user

def half_writing(real, nth: int, failure):
    """A save function (``torch.save``-like, ``(obj, path)``) whose ``nth`` call to a file writes half of its
    output, then raises ``failure(path)``; calls to in-memory buffers and earlier calls go through."""
    calls = [0]

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):  # an in-memory buffer (sizes), not a file on the disk
            return real(obj, f, *args, **kwargs)
        calls[0] += 1
        if calls[0] < nth:
            return real(obj, f, *args, **kwargs)
        import io

        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise failure(f)

    return save


RUNNER = '''
import os, signal, sys, time
# What is simulated is Ctrl-C at a terminal. A test run started in the background by a non-interactive
# shell (nohup ... &) inherits SIGINT ignored, and Python then keeps ignoring it: restore the default.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
block_on, marker = os.environ.get("DEPLOYCOMP_TEST_BLOCK"), os.environ.get("DEPLOYCOMP_TEST_MARKER")
if block_on:
    # Write half of the artifact, say so, then hang: the test kills the process in the middle of the write.
    module, attr, nth = block_on.split(":")
    import importlib
    mod = importlib.import_module(module)
    real, calls = getattr(mod, attr), [0]
    def slow(obj, f, *a, **k):
        if not isinstance(f, (str, os.PathLike)):  # an in-memory buffer, not a file
            return real(obj, f, *a, **k)
        calls[0] += 1
        if calls[0] < int(nth):
            return real(obj, f, *a, **k)
        import io
        buf = io.BytesIO()
        real(obj, buf, *a, **k)
        data = buf.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
        open(marker, "w").close()
        time.sleep(600)
    setattr(mod, attr, slow)
from deploycomp.cli import main
sys.argv = ["deploycomp", *sys.argv[1:]]
main()
'''


def start(args, cwd: Path, *, block_on: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    """``deploycomp ARGS`` in a new process (optionally hanging in the middle of writing an artifact).

    ``block_on``: ``module:function:N`` - the N-th call of that save function (``torch.save``-like,
    ``(obj, path)``) writes half of its output, creates ``marker`` and sleeps.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if block_on:
        env.update(DEPLOYCOMP_TEST_BLOCK=block_on, DEPLOYCOMP_TEST_MARKER=str(marker))
    return subprocess.Popen([sys.executable, "-c", RUNNER.format(repo=str(REPO)), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Poll ``condition()`` until true; fail (with the process output) on timeout or an early exit."""
    end = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > end:
            if proc is not None:
                proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_without_privileges(script: str, cwd: Path, timeout: float = 120) -> list[dict]:
    """Run ``script`` (Python, printing one JSON list on its last line) where file permissions apply.

    Root reads and writes everything, so permission errors only happen without its privileges: as
    root, the process runs with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (``setpriv``); as
    another user, as is. Skips when root cannot drop them here.
    """
    import shutil

    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop the file-permission override")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], cwd=cwd, env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot run deploycomp without privileges here: {probe.stderr.strip()[-200:]}")
    done = subprocess.run([*prefix, sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


OTHER_USER_SCRIPT = '''
import json, sys
from click.testing import CliRunner
from deploycomp.cli import cli
results = []
for args in {commands!r}:
    r = CliRunner().invoke(cli, args)
    exc = r.exception if r.exception and not isinstance(r.exception, SystemExit) else None
    results.append({{"args": args, "exit_code": r.exit_code, "output": r.output,
                     "exception": repr(exc) if exc else None}})
print(json.dumps(results))
'''
