"""How latency-aware pruning times things on a deployment backend: one layer alone, or whole models.

A *probe* is registered per benchmark backend (``ort``, ``torch``, ``torch-compile``, ``trt``) and
answers two questions, always through the one timing harness of :mod:`deploycomp.bench`:

* :meth:`Probe.time_ops`: the latency of single layers (:class:`OpSpec`: a convolution or linear layer
  at given widths and input size), the entries of the latency table. Each layer becomes the backend's
  own artifact (an ONNX graph of that one node for ONNX Runtime and TensorRT, a module for PyTorch),
  batches of them are loaded together and timed in interleaved rounds by
  :func:`deploycomp.bench.timing.measure_rounds`, and the median of the round medians is kept;
* :meth:`Probe.compare`: whole models (the original and a pruned candidate, made into the backend's
  artifacts by :meth:`Probe.artifact`) timed together by :func:`deploycomp.bench.benchmark`, which pairs
  the speed-up round by round and gives its 95 % interval (``docs/bench-schema.md``).

Tests register a probe whose "timings" are a known function of the widths (no clock involved).
Importing this module is cheap: torch, onnx and the runtimes are imported where they are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.bench import median_ms
from deploycomp.registry import Registry

PROBES: Registry[type[Probe]] = Registry(
    "latency backend", hint="Latency targets are measured on ort, torch, torch-compile or trt.")
OPS_PER_SESSION = 24  # layers loaded and timed together in one interleaved session
OP_ONNX_OPSET = 17
OP_ONNX_IR = 8  # the IR version of opset 17: every ONNX Runtime and TensorRT that reads opset 17 reads it


def register_probe(name: str):
    """Class decorator registering a :class:`Probe` for the benchmark backend ``name``."""

    def wrap(cls):
        cls.name = name
        PROBES.register(name, cls)
        return cls

    return wrap


def get_probe(name: str) -> Probe:
    return PROBES.get(name)()


def list_probes() -> list[str]:
    return PROBES.names()


@dataclass(frozen=True)
class OpSpec:
    """One convolution or linear layer at given widths and input size: a latency table entry.

    ``kind`` is ``conv``, ``linear`` or ``identity`` (an empty graph: the backend's fixed cost of one
    call, subtracted from every layer's time). ``depthwise``: groups = c_in = c_out.
    """

    kind: str
    c_in: int
    c_out: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    in_hw: tuple[int, int] = (1, 1)  # input height and width (1 x 1 for a linear layer)
    groups: int = 1  # a grouped (not depthwise) convolution's fixed group count

    @property
    def key(self) -> str:
        """A stable text key (the latency cache is keyed by it)."""
        if self.kind == "linear":
            return f"linear {self.c_in}->{self.c_out}"
        if self.kind == "identity":
            return f"identity {self.c_in}x{self.in_hw[0]}x{self.in_hw[1]}"
        k, s, p, d = (f"{a}x{b}" for a, b in (self.kernel, self.stride, self.padding, self.dilation))
        dw = " dw" if self.depthwise else (f" g{self.groups}" if self.groups > 1 else "")
        return f"conv{dw} {self.c_in}->{self.c_out} k{k} s{s} p{p} d{d} @{self.in_hw[0]}x{self.in_hw[1]}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input shape (no batch axis)."""
        return (self.c_in,) if self.kind == "linear" else (self.c_in, *self.in_hw)

    def with_widths(self, c_in: int, c_out: int) -> OpSpec:
        return dataclasses.replace(self, c_in=c_in, c_out=c_out, groups=c_in if self.depthwise else self.groups)

    @property
    def conv_groups(self) -> int:
        return self.c_in if self.depthwise else self.groups

    def macs(self) -> int:
        """Multiply-accumulates of one sample (for messages and tests)."""
        if self.kind == "identity":
            return 0
        if self.kind == "linear":
            return self.c_in * self.c_out
        h, w = self.out_hw()
        per_out = self.c_in // self.conv_groups * self.kernel[0] * self.kernel[1]
        return self.c_out * h * w * per_out

    def out_hw(self) -> tuple[int, int]:
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                     for n, k, s, p, d in zip(self.in_hw, self.kernel, self.stride, self.padding, self.dilation,
                                              strict=True))

    def module(self):
        """The layer as a torch module (random weights; BatchNorm is folded into the bias at deployment)."""
        import torch.nn as nn

        if self.kind == "identity":
            return nn.Identity()
        if self.kind == "linear":
            return nn.Linear(self.c_in, self.c_out)
        return nn.Conv2d(self.c_in, self.c_out, self.kernel, self.stride, self.padding, self.dilation,
                         groups=self.conv_groups, bias=True)

    def onnx_bytes(self, batch: int) -> bytes:
        """The layer as a one-node ONNX graph (built directly: ~100x faster than exporting a module)."""
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *self.input_shape])
        y = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
        inits = []
        if self.kind == "identity":
            nodes = [helper.make_node("Identity", ["input"], ["output"])]
        elif self.kind == "linear":
            inits = [numpy_helper.from_array(rng.standard_normal((self.c_out, self.c_in), np.float32) * 0.01, "w"),
                     numpy_helper.from_array(np.zeros(self.c_out, np.float32), "b")]
            nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["output"], transB=1)]
        else:
            groups = self.conv_groups
            shape = (self.c_out, self.c_in // groups, *self.kernel)
            inits = [numpy_helper.from_array(rng.standard_normal(shape, np.float32) * 0.01, "w"),
                     numpy_helper.from_array(np.zeros(self.c_out, np.float32), "b")]
            nodes = [helper.make_node("Conv", ["input", "w", "b"], ["output"], kernel_shape=list(self.kernel),
                                      strides=list(self.stride), dilations=list(self.dilation), group=groups,
                                      pads=[self.padding[0], self.padding[1], self.padding[0], self.padding[1]])]
        graph = helper.make_graph(nodes, "layer", [x], [y], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OP_ONNX_OPSET)],
                                  producer_name="deploycomp-latency-probe")
        model.ir_version = OP_ONNX_IR
        return model.SerializeToString()


@dataclass(frozen=True)
class Setup:
    """Where latency is measured: backend, device, batch size, intra-op threads (None: the library's)."""

    backend: str
    device: str  # cpu or cuda:N
    batch: int = 1
    threads: int | None = None

    def bench_config(self, **timing):
        from deploycomp.bench import BenchConfig

        return BenchConfig(backend=self.backend, device=self.device, batches=(self.batch,), threads=self.threads,
                           **timing)

    def runner_options(self):
        from deploycomp.bench.backends import RunnerOptions

        return RunnerOptions(device=self.device, threads=self.threads)

    def describe(self) -> str:
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return f"{self.backend} on {self.device} (batch {self.batch}{threads})"


@dataclass
class ModelTiming:
    """A model timed against the first one of its run (paired speed-up, see docs/bench-schema.md)."""

    latency_ms: float  # median (over sessions: the geometric mean of the sessions' medians)
    latency_ci95_ms: list[float] | None
    speedup: float  # reference latency / this latency (1.0 for the reference)
    speedup_ci95: list[float] | None  # across sessions (one session: over its rounds)
    verdict: str | None  # faster / slower / same (None for the reference)
    warnings: list[str]
    sessions: list[dict] = field(default_factory=list)  # per session: latency_median_ms, speedup, speedup_ci95


# The harness settings for single layers: after a short warmup, one iteration per round, 8 rounds. Each
# round runs the other layers of the session in between, so a layer's weights and input are no longer in
# the caches when it runs, as inside a network; timed back to back instead, a 256->256 3x3 convolution of
# the baseline (2.4 MB of weights) ran 3x faster than inside the model on ONNX Runtime CPU (45 against
# 152 us, ORT's profiler, on a busy 2-core machine).
OP_TIMING = {"warmup_iters": 2, "warmup_ms": 0.0, "iters": 8, "duration_s": None, "rounds": 8}


class Probe:
    """Times layers and models on one backend. Subclasses make the backend's artifacts."""

    name = "base"

    def check(self, setup: Setup) -> None:
        """Raise a one-line error when the backend cannot run here (library or device missing)."""

    # -- layers ------------------------------------------------------------------------------------

    def op_runner(self, spec: OpSpec, setup: Setup, workdir: Path):
        """A bench runner (not yet entered) for one layer."""
        raise NotImplementedError

    def time_ops(self, specs: Sequence[OpSpec], setup: Setup, progress: Callable[[int], Any] | None = None
                 ) -> list[float]:
        """Median latency (ms) of each layer alone, timed in interleaved sessions of a few dozen layers.

        The layers are shuffled (seeded) first, so that each session mixes layers of every size.
        """
        import random

        from deploycomp.bench.timing import TimingConfig, measure_rounds

        timing = TimingConfig(**OP_TIMING)
        order = list(range(len(specs)))
        random.Random(0).shuffle(order)
        times: dict[int, float] = {}
        with tempfile.TemporaryDirectory(prefix="deploycomp-latency-") as tmp:
            for start in range(0, len(specs), OPS_PER_SESSION):
                idx = order[start:start + OPS_PER_SESSION]
                chunk = [specs[i] for i in idx]
                with contextlib.ExitStack() as stack:
                    runners = [stack.enter_context(self.op_runner(s, setup, Path(tmp))) for s in chunk]
                    for r in runners:
                        r.prepare(setup.batch)
                    timings = measure_rounds(runners, timing, final_reference=False)
                times.update({i: _median(t.block_medians_ms()) for i, t in zip(idx, timings, strict=True)})
                if progress is not None:
                    progress(len(times))
        return [times[i] for i in range(len(specs))]

    # -- whole models --------------------------------------------------------------------------------

    def artifact(self, ckpt, workdir: Path, name: str, setup: Setup) -> str:
        """Write ``ckpt`` as what this backend runs (ONNX, engine, checkpoint); return its path."""
        raise NotImplementedError

    def compare(self, artifacts: Sequence[str], setup: Setup, sessions: int | None = None) -> list[ModelTiming]:
        """Time the artifacts together with ``deploycomp bench``'s harness: ``sessions`` fresh processes, each
        timing them in interleaved rounds; speed-ups are against the first, with intervals across sessions."""
        from deploycomp.bench import benchmark

        results = benchmark(list(artifacts), setup.bench_config(sessions=sessions))
        return [ModelTiming(median_ms(r), r.get("latency_median_ci95_ms"), r["speedup"],
                            r.get("speedup_ci95"), r.get("verdict"), list(r.get("warnings") or []),
                            [{k: s.get(k) for k in ("latency_median_ms", "speedup", "speedup_ci95")}
                             for s in r.get("sessions") or []])
                for r in results]


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _op_path(workdir: Path, spec: OpSpec) -> Path:
    import hashlib

    return workdir / f"op-{hashlib.sha1(spec.key.encode()).hexdigest()[:16]}.onnx"


def _quiet():
    """Silence the info lines of the stages a probe calls (export, build); warnings still show."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        level = console.verbosity()
        console.set_verbosity(min(level, console.QUIET) if level < console.VERBOSE else level)
        try:
            yield
        finally:
            console.set_verbosity(level)

    return cm()


def _export(ckpt, path: Path, setup: Setup) -> Path:
    """The ONNX file ``deploycomp export`` would write (fixed batch, simplified), without the parity check."""
    from deploycomp.export import export_onnx

    with _quiet():
        export_onnx(ckpt, path, batch=setup.batch, parity=False)
    return path


@register_probe("ort")
class OrtProbe(Probe):
    """ONNX Runtime: each layer a one-node ONNX graph; models exported the way ``deploycomp export`` does."""

    def check(self, setup: Setup) -> None:
        from deploycomp.bench.backends import get_backend

        get_backend("ort").preload()

    def op_runner(self, spec, setup, workdir):
        from deploycomp.bench.backends import OrtRunner

        path = _op_path(workdir, spec)
        path.write_bytes(spec.onnx_bytes(setup.batch))
        return OrtRunner(str(path), setup.runner_options())

    def artifact(self, ckpt, workdir, name, setup):
        return str(_export(ckpt, workdir / f"{name}.onnx", setup))


@register_probe("trt")
class TrtProbe(Probe):
    """TensorRT (FP32 engines): each layer a one-node engine, models exported to ONNX and built.

    Every table entry is an engine build (seconds each): use a small ``--latency-widths`` with it.
    """

    def check(self, setup: Setup) -> None:
        from deploycomp.bench.backends import cuda_available, trt_module
        from deploycomp.errors import check

        trt_module().require_tensorrt()
        check(setup.device.startswith("cuda"), f"TensorRT runs on an NVIDIA GPU, not on --latency-device "
                                               f"{setup.device}; use --latency-device cuda")
        check(cuda_available(), "--latency-backend trt needs an NVIDIA GPU with CUDA, and none is available here")

    def _engine(self, onnx_path: Path, setup: Setup) -> Path:
        from deploycomp.trt import build_engine

        engine = onnx_path.with_suffix(".engine")
        index = int(setup.device.split(":")[1]) if ":" in setup.device else 0
        with _quiet():
            build_engine(onnx_path, engine, min_batch=setup.batch, opt_batch=setup.batch, max_batch=setup.batch,
                         device=index)
        return engine

    def op_runner(self, spec, setup, workdir):
        from deploycomp.bench.backends import TrtRunner

        onnx_path = _op_path(workdir, spec)
        onnx_path.write_bytes(spec.onnx_bytes(setup.batch))
        return TrtRunner(str(self._engine(onnx_path, setup)), setup.runner_options())

    def artifact(self, ckpt, workdir, name, setup):
        return str(self._engine(_export(ckpt, workdir / f"{name}.onnx", setup), setup))


def _module_runner_class(base):
    """A bench runner of ``base``'s family over an in-memory module (a layer has no checkpoint to load)."""

    class ModuleRunner(base):
        def __init__(self, module, input_shape, options):
            super().__init__("<layer>", options)
            self._module, self.input_shape = module, tuple(input_shape)

        def activate(self) -> None:
            # TorchRunner.activate minus the checkpoint loading (a bench hook could share the rest)
            import torch

            self._threads_before = torch.get_num_threads()
            if self.options.threads:
                torch.set_num_threads(self.options.threads)
            self.info = {"label": "layer", "input_shape": list(self.input_shape), "precision": "fp32"}
            self.model = self._wrap(self._module.eval().to(self.device))
            self._mode = torch.inference_mode()
            self._mode.__enter__()
            if self.device.startswith("cuda"):
                torch.backends.cudnn.benchmark = True
                self.stream = torch.cuda.current_stream(self.device)

    return ModuleRunner


@register_probe("torch")
class TorchProbe(Probe):
    """Eager PyTorch: each layer a module; models saved as deploycomp checkpoints and loaded by bench."""

    def check(self, setup: Setup) -> None:
        from deploycomp.train import resolve_device

        resolve_device(setup.device)  # asking for CUDA where there is none: one line

    def _runner_base(self):
        from deploycomp.bench.backends import TorchRunner

        return TorchRunner

    def op_runner(self, spec, setup, workdir):
        return _module_runner_class(self._runner_base())(spec.module(), spec.input_shape, setup.runner_options())

    def artifact(self, ckpt, workdir, name, setup):
        import dataclasses

        path = workdir / f"{name}.pt"
        dataclasses.replace(ckpt, source=None).save(path)
        return str(path)


@register_probe("torch-compile")
class TorchCompileProbe(TorchProbe):
    """torch.compile (inductor): every layer and model is compiled during its warmup (seconds each)."""

    def _runner_base(self):
        from deploycomp.bench.backends import TorchCompileRunner

        return TorchCompileRunner
