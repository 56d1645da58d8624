"""Benchmark backends: one small runner interface (Polygraphy style), one registry.

A runner is a context manager: entering it loads the artifact (``activate``), leaving it frees it.
In between, the harness (:mod:`deploycomp.bench.timing`) calls:

* ``prepare(batch)``: make a random input of that batch *on the device* (and anything else that
  must exist before timing: IO bindings, CUDA graphs);
* ``run()``: launch one inference on the prepared input (may return before the device is done);
* ``sync()``: wait until the launched work is finished (no-op on synchronous CPU backends);
* ``upload()`` / ``download()``: host->device copy of the input / device->host copy of the output,
  timed separately with ``--io host``;
* ``memory()``: what the backend knows about its memory (torch peaks, engine size).

``stream`` (a ``torch.cuda.Stream`` or None) lets the harness record CUDA events; ``asynchronous``
says whether ``run()`` only enqueues work. New backends register with ``@register_backend(name)``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp.errors import InputFileError, MissingDependencyError, UsageError, check, first_line
from deploycomp.files import read_json, require_file, sidecar_path
from deploycomp.registry import Registry

BACKENDS: Registry[type[Runner]] = Registry(
    "benchmark backend", hint="'auto' picks torch for checkpoints and zoo names, ort for .onnx, trt for engines.")
TRT_INSTALL_HINT = 'install it with pip install "deploycomp[tensorrt]" on a machine with an NVIDIA GPU, or use docker/'


def register_backend(name: str):
    """Class decorator registering a :class:`Runner` subclass under ``name`` (refuses duplicates)."""

    def wrap(cls):
        BACKENDS.register(name, cls)
        cls.name = name
        cls.family = cls.family or name
        return cls

    return wrap


def list_backends() -> list[str]:
    return BACKENDS.names()


def get_backend(name: str) -> type[Runner]:
    return BACKENDS.get(name)


def backend_for(artifact: str) -> str:
    """The backend ``auto`` picks: the one claiming the file's suffix, else torch (checkpoint or zoo name)."""
    suffix = Path(artifact).suffix.lower()
    by_suffix = {s: name for name in BACKENDS.names() for s in BACKENDS.get(name).suffixes}
    return by_suffix.get(suffix, "torch")


@dataclass
class RunnerOptions:
    """What a runner needs besides the artifact. ``None`` means the backend's default."""

    device: str | None = None  # cpu, cuda, cuda:N (None: CUDA when present, else CPU)
    provider: str | None = None  # ONNX Runtime execution provider: cpu, cuda, tensorrt (None: follows device)
    threads: int | None = None  # intra-op threads (torch.set_num_threads / ORT intra_op_num_threads)
    cuda_graph: bool = False  # torch on CUDA: capture the forward pass in a CUDA graph
    input_size: tuple[int, int] | None = None  # (H, W) for torch models whose size is not fixed by the file
    seed: int = 0
    arch: str | None = None  # torch: the architecture (or user code entry point) a checkpoint needs to rebuild
    interleaved: bool = False  # other runners are loaded in this process and timed in alternation with this one


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_device(device: str | None) -> str:
    """'cpu' or 'cuda:N'; asking for CUDA where there is none is a one-line error.

    Without torch loaded and without an NVIDIA driver, ``None`` is the CPU without importing torch, so
    that an ONNX Runtime benchmark process stays torch-free (its memory figures must not carry torch).
    """
    import sys

    if device == "cpu" or (device is None and "torch" not in sys.modules
                           and not Path("/proc/driver/nvidia/version").exists()):
        return "cpu"
    from deploycomp.train import resolve_device

    d = resolve_device(device)
    return "cpu" if d.type == "cpu" else f"cuda:{d.index or 0}"


def _sidecar(artifact: str) -> dict[str, Any]:
    side = sidecar_path(artifact)
    if not side.exists():
        return {}
    try:
        data = read_json(side)
    except InputFileError:
        return {}
    return data if isinstance(data, dict) else {}


class Runner:
    """Base class: a context manager around one artifact on one device."""

    name = "base"
    family: str | None = None  # backends of one family read the same artifacts (torch, torch-compile)
    kind = "a file"  # what the backend reads, for messages
    suffixes: tuple[str, ...] = ()  # file suffixes ``auto`` maps to this backend
    asynchronous = False  # True: run() only enqueues; sync() waits for the device
    stream: Any = None  # torch.cuda.Stream the work runs on (CUDA events are recorded on it)

    def __init__(self, artifact: str, options: RunnerOptions | None = None):
        self.artifact = str(artifact)
        self.options = options or RunnerOptions()
        self.device = self.resolve_device(self.options)
        self.batch: int | None = None
        self.info: dict[str, Any] = {}  # label, arch, macs, params_total, input_shape, precision, ...

    @classmethod
    def resolve_device(cls, options: RunnerOptions) -> str:
        return _resolve_device(options.device)

    @classmethod
    def preload(cls) -> None:
        """Import the backend's libraries (so a memory baseline taken next excludes them)."""
        import torch  # noqa: F401
        import torch_pruning  # noqa: F401
        import torchvision  # noqa: F401

        import deploycomp.checkpoint  # noqa: F401
        import deploycomp.metrics  # noqa: F401
        import deploycomp.zoo  # noqa: F401

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load the artifact; fill ``self.info``."""

    def deactivate(self) -> None:
        """Free what ``activate`` loaded."""

    @classmethod
    def memory_artifact(cls, artifact: str, options: RunnerOptions, workdir: Path) -> str | None:
        """In the parent, before a memory process starts: work the measurement must not count (file checks,
        deploycomp's own rebuilding of a model). Returns a file for :meth:`load_for_memory`, or None."""
        return None

    def load_for_memory(self, prepared: str | None) -> None:
        """In the memory process, after its baseline: load what a deployment loads (default: :meth:`activate`)."""
        self.activate()

    @classmethod
    def configure_process(cls, options: RunnerOptions) -> None:
        """In the memory process, before its baseline: process-wide settings (thread pools) a deployment makes
        at start-up, so that changing them is not counted as the model's memory."""

    def prepare(self, batch: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for the work ``run()`` launched (nothing to wait for on a synchronous backend)."""

    def upload(self) -> None:
        raise UsageError(f"--io host is not supported by the {self.name} backend")

    def download(self) -> None:
        raise UsageError(f"--io host is not supported by the {self.name} backend")

    def memory(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts about the runner for the result record (device, provider, threads, precision, ...)."""
        return {"backend": self.name, "device": self.device, **self.info}


def _check_batch(batch: int) -> None:
    check(isinstance(batch, int) and batch > 0, f"--batch must be a positive integer, got {batch!r}")


# --------------------------------------------------------------------------------------------------
# PyTorch


@register_backend("torch")
class TorchRunner(Runner):
    """Eager PyTorch on CPU or CUDA (optionally with the forward pass captured in a CUDA graph)."""

    family = "torch"
    kind = "a checkpoint or zoo model"
    capture_cuda_graph = True  # --cuda-graph: capture model(x) in prepare() and replay it in run()

    def activate(self) -> None:
        import torch

        from deploycomp.checkpoint import load_model
        from deploycomp.metrics import count_macs, count_params

        check(not self.options.cuda_graph or self.device.startswith("cuda"),
              "--cuda-graph needs --device cuda (CUDA graphs replay GPU work; on CPU there is nothing to capture)")
        self._threads_before = torch.get_num_threads()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        # Another torch runner may already be active (interleaved comparisons load every artifact first)
        # and have inference mode on; replaying a pruning history needs autograd, so load outside it.
        with torch.inference_mode(False), torch.enable_grad():
            ckpt = load_model(self.artifact, input_size=self.options.input_size, arch=self.options.arch)
        shape = tuple(ckpt.input_shape)
        if self.options.input_size and ckpt.source:  # a checkpoint keeps its channels, takes the new size
            shape = (shape[0], *self.options.input_size)
        self.input_shape = shape
        from deploycomp.tasks import get_task, task_of_checkpoint

        # What the exported graph runs: a detector with its post-processing (end to end), others as they are.
        model, _ = get_task(task_of_checkpoint(ckpt), ckpt.num_classes or 1).export_module(ckpt.model.eval())
        self.info = {"label": ckpt.name, "arch": ckpt.arch, "input_shape": list(shape), "precision": "fp32",
                     "macs": count_macs(ckpt.model, torch.zeros(1, *shape)),
                     "params_total": count_params(ckpt.model)["params_total"], "threads": torch.get_num_threads()}
        self.model = self._wrap(model.to(self.device))
        self._mode = torch.inference_mode()
        self._mode.__enter__()
        if self.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True  # autotuning happens in warmup, never in timed iterations
            self.stream = torch.cuda.current_stream(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _wrap(self, model):
        return model

    @classmethod
    def memory_artifact(cls, artifact: str, options: RunnerOptions, workdir: Path) -> str | None:
        """Rebuild the model here (deploycomp replays the pruning history, counts MACs) and save the module:
        the memory process then measures ``torch.load`` of a module, what a deployment does, not our rebuild."""
        import torch

        with cls(artifact, options) as runner:
            path = workdir / f"module-{abs(hash((artifact, str(workdir)))):x}.pt"
            torch.save({"module": getattr(runner.model, "_orig_mod", runner.model), "info": runner.info,
                        "input_shape": runner.input_shape}, path)
        return str(path)

    @classmethod
    def configure_process(cls, options: RunnerOptions) -> None:
        import torch

        if options.threads:
            torch.set_num_threads(options.threads)

    def load_for_memory(self, prepared: str | None) -> None:
        import torch

        if prepared is None:
            self.activate()
            return
        self._threads_before = torch.get_num_threads()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        saved = torch.load(prepared, weights_only=False)  # written by memory_artifact in the parent process
        self.info, self.input_shape = saved["info"], tuple(saved["input_shape"])
        self.model = self._wrap(saved["module"].eval().to(self.device))
        self._mode = torch.inference_mode()
        self._mode.__enter__()

    def deactivate(self) -> None:
        import torch

        if getattr(self, "_mode", None) is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self.model = self.x = self.out = None
        torch.set_num_threads(self._threads_before)

    def prepare(self, batch: int) -> None:
        import torch

        _check_batch(batch)
        self.batch = batch
        gen = torch.Generator().manual_seed(self.options.seed)
        self.x_host = torch.randn(batch, *self.input_shape, generator=gen)
        if self.device.startswith("cuda"):
            self.x_host = self.x_host.pin_memory()
        self.x = self.x_host.to(self.device)
        self.out = None
        self._graph = None
        if self.options.cuda_graph and self.capture_cuda_graph:
            self._capture_graph()

    def _capture_graph(self) -> None:
        import torch

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # lazy init and cuDNN autotuning must happen before capture
                self.model(self.x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.out = self.model(self.x)

    def run(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self.out = self.model(self.x)

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    @property
    def asynchronous(self) -> bool:  # type: ignore[override]
        return self.device.startswith("cuda")

    def upload(self) -> None:
        self.x.copy_(self.x_host, non_blocking=True)

    def download(self) -> None:
        out = self.out if self.out is not None else self.model(self.x)
        if isinstance(out, (tuple, list)):  # a detector's post-processed outputs
            self.out_host = [o.to("cpu", non_blocking=False) for o in out]
        else:
            self.out_host = out.to("cpu", non_blocking=False)

    def memory(self) -> dict[str, Any]:
        """Parameters and buffers counted exactly; on CUDA the caching allocator's peaks."""
        import torch

        model = getattr(self.model, "_orig_mod", self.model)
        tensors = [*model.parameters(), *model.buffers()]
        out: dict[str, Any] = {"weights_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20}
        if self.device.startswith("cuda"):
            out.update({"torch_peak_allocated_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                        "torch_peak_reserved_mib": torch.cuda.max_memory_reserved(self.device) / 2**20})
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cuda_graph": bool(self.options.cuda_graph)}


@register_backend("torch-compile")
class TorchCompileRunner(TorchRunner):
    """``torch.compile`` (inductor). Compilation happens on the first calls, i.e. inside the warmup;
    each new batch size compiles again (static shapes). ``--cuda-graph`` selects mode="reduce-overhead"."""

    capture_cuda_graph = False  # mode="reduce-overhead" captures its own graphs

    def _wrap(self, model):
        import torch

        mode = "reduce-overhead" if self.options.cuda_graph else None
        self.info["compile_mode"] = mode or "default"
        return torch.compile(model, mode=mode, dynamic=False)


# --------------------------------------------------------------------------------------------------
# ONNX Runtime

# provider name -> (execution providers in priority order, ORT device type of the IO binding)
ORT_PROVIDERS: dict[str, tuple[tuple[str, ...], str]] = {
    "cpu": (("CPUExecutionProvider",), "cpu"),
    "cuda": (("CUDAExecutionProvider", "CPUExecutionProvider"), "cuda"),
    "tensorrt": (("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), "cuda"),
}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


@register_backend("ort")
class OrtRunner(Runner):
    """ONNX Runtime with IO binding: inputs and outputs stay on the device (CUDA EP) between runs."""

    suffixes = (".onnx",)
    kind = "an ONNX file"

    @classmethod
    def preload(cls) -> None:
        """ONNX Runtime and onnx (the file check), not torch: its processes stay small and start fast."""
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        import deploycomp.export  # noqa: F401

    @classmethod
    def resolve_device(cls, options: RunnerOptions) -> str:
        provider = options.provider
        if provider is not None and provider not in ORT_PROVIDERS:
            raise UsageError(f"unknown --provider {provider!r}; valid: {', '.join(ORT_PROVIDERS)}")
        if provider is None:
            return _resolve_device(options.device)
        wants_gpu = ORT_PROVIDERS[provider][1] == "cuda"
        if options.device is not None and options.device.startswith("cuda") != wants_gpu:
            raise UsageError(f"--provider {provider} does not run on --device {options.device}")
        return _resolve_device(options.device or ("cuda" if wants_gpu else "cpu"))

    def activate(self) -> None:
        import onnxruntime as ort

        from deploycomp.export import check_onnx_file

        # the file check parses the whole protobuf: a memory measurement does it before its baseline
        path = Path(self.artifact) if getattr(self, "_file_checked", False) else check_onnx_file(self.artifact)
        provider = self.options.provider or ("cuda" if self.device.startswith("cuda") else "cpu")
        names, self.ort_device = ORT_PROVIDERS[provider]
        self.device_id = int(self.device.split(":")[1]) if ":" in self.device else 0
        missing = [n for n in names[:1] if n not in ort.get_available_providers()]
        if missing:
            raise MissingDependencyError(f"ONNX Runtime here has no {missing[0]} (available: "
                                         f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
            so.inter_op_num_threads = 1
        stop_spinning = self.options.interleaved and self.options.threads != 1 and self.ort_device == "cpu"
        if stop_spinning:
            # Each session has its own thread pool, whose workers spin for a while after a run. Timed in
            # alternation, the spinning workers of the session timed a moment ago compete with the one timed
            # now: on 2 idle cores a paired speed-up read 1.64x against 1.51x for the two models timed alone,
            # each in its own process (medians of 4 repetitions; sessions themselves vary by a few percent,
            # so this is suggestive rather than proven). Stopping the spinning at the end of each run (ORT's
            # session.force_spinning_stop) keeps it within a run and gave 1.50x, with the same absolute
            # latencies as alone (docs/bench-schema.md, "How comparisons are made").
            so.add_session_config_entry("session.force_spinning_stop", "1")
        check(not self.options.cuda_graph or self.ort_device == "cuda",
              "--cuda-graph with ONNX Runtime needs --provider cuda (it sets the CUDA EP's enable_cuda_graph)")
        cuda_opts: dict[str, Any] = {"device_id": self.device_id}
        trt_opts: dict[str, Any] = {"device_id": self.device_id}
        if self.options.cuda_graph:  # valid with IO binding: the bound buffers keep their addresses
            cuda_opts["enable_cuda_graph"] = "1"
            trt_opts["trt_cuda_graph_enable"] = "1"
        ep_options = {"CUDAExecutionProvider": cuda_opts, "TensorrtExecutionProvider": trt_opts}
        providers = [(n, ep_options[n]) if n in ep_options else n for n in names]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # ORT raises its own exception types for corrupt or unsupported files
            raise InputFileError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None
        active = self.session.get_providers()
        if active[0] != names[0]:
            raise MissingDependencyError(f"ONNX Runtime could not use {names[0]} for {path} (it fell back to "
                                         f"{active[0]}); check the CUDA/cuDNN/TensorRT libraries")
        inputs = self.session.get_inputs()
        check(len(inputs) == 1, f"{path} has {len(inputs)} inputs; bench supports single-input models",
              InputFileError)
        inp = inputs[0]
        self.input_name = inp.name
        self.dtype = _ORT_TYPES.get(inp.type)
        check(self.dtype is not None, f"{path}: unsupported input type {inp.type}", InputFileError)
        side = _sidecar(self.artifact)
        dims = list(inp.shape)
        self.fixed_batch = dims[0] if isinstance(dims[0], int) else None
        rest = dims[1:]
        if not all(isinstance(d, int) for d in rest):
            known = side.get("input_shape")
            if known:
                rest = list(known)[-len(rest):]
            elif self.options.input_size and len(rest) == 3:
                rest = [rest[0] if isinstance(rest[0], int) else 3, *self.options.input_size]
            check(all(isinstance(d, int) for d in rest),
                  f"{path} has a dynamic input shape {dims}; give the image size with --input-size HxW", UsageError)
        self.input_shape = tuple(int(d) for d in rest)
        precision = side.get("precision") or {"float16": "fp16", "float32": "fp32"}.get(self.dtype, self.dtype)
        # None: ORT's default, one intra-op thread per physical core (the cores this process may use)
        threads = self.options.threads or _ort_default_threads()
        self.info = {"label": side.get("label") or Path(self.artifact).stem, "arch": side.get("arch"),
                     "input_shape": list(self.input_shape), "precision": precision, "provider": provider,
                     "execution_providers": active, "macs": side.get("macs"),
                     "params_total": side.get("params_total"), "threads": threads,
                     "ort_spinning": "stopped after each run" if stop_spinning else "ORT default"}

    def deactivate(self) -> None:
        self.session = self.binding = self.x_ort = self.outputs = None

    @classmethod
    def memory_artifact(cls, artifact: str, options: RunnerOptions, workdir: Path) -> str | None:
        """The file check parses the whole protobuf; done here, in the parent, its garbage stays out of the figure."""
        from deploycomp.export import check_onnx_file

        check_onnx_file(artifact)
        return None

    def load_for_memory(self, prepared: str | None) -> None:
        self._file_checked = True  # by memory_artifact, in the parent
        self.activate()

    def prepare(self, batch: int) -> None:
        import numpy as np
        import onnxruntime as ort

        _check_batch(batch)
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise UsageError(f"{self.artifact} was exported with a fixed batch of {self.fixed_batch}; bench it with "
                             f"--batch {self.fixed_batch} or export it with a dynamic batch")
        self.batch = batch
        rng = np.random.default_rng(self.options.seed)
        self.x_np = rng.standard_normal((batch, *self.input_shape)).astype(self.dtype)
        self.x_ort = ort.OrtValue.ortvalue_from_numpy(self.x_np, self.ort_device, self.device_id)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.input_name, self.x_ort)
        out_names = [o.name for o in self.session.get_outputs()]
        for name in out_names:
            self.binding.bind_output(name, self.ort_device, self.device_id)
        self.session.run_with_iobinding(self.binding)  # learn the output shapes, then keep those buffers bound
        self.outputs = self.binding.get_outputs()
        for name, value in zip(out_names, self.outputs, strict=True):
            self.binding.bind_ortvalue_output(name, value)
        self._run = self.session.run_with_iobinding
        if self.ort_device == "cpu":
            self.sync = _noop  # CPU EP runs synchronously: nothing to wait for

    def run(self) -> None:
        self._run(self.binding)

    def sync(self) -> None:
        self.binding.synchronize_outputs()

    def upload(self) -> None:
        self.x_ort.update_inplace(self.x_np)

    def download(self) -> None:
        self.out_host = self.outputs[0].numpy()


def _noop() -> None:
    return None


def _ort_default_threads() -> int:
    """The intra-op threads ONNX Runtime uses by default: one per physical core this process may run on."""
    import os

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f, \
                    open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as g:
                cores.add((g.read().strip(), f.read().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return max(1, len(cores))


# --------------------------------------------------------------------------------------------------
# TensorRT


def trt_module():
    """deploycomp.trt, or a one-line error saying how to get TensorRT."""
    try:
        import deploycomp.trt as trt_mod
    except ImportError:
        if importlib.util.find_spec("tensorrt") is None:
            raise MissingDependencyError(f"TensorRT is not installed; {TRT_INSTALL_HINT}") from None
        raise MissingDependencyError("deploycomp.trt (the TensorRT runtime wrapper) is not available") from None
    return trt_mod


def profile_batch_range(profile: Any) -> tuple[int, int]:
    """(min, max) batch of an optimisation profile given as (min, opt, max) shapes or a dict of them."""
    lo, _, hi = _profile_shapes(profile)
    return int(lo[0]), int(hi[0])


@register_backend("trt")
class TrtRunner(Runner):
    """A TensorRT engine via deploycomp.trt's EngineRunner (execute_async_v3 on its own stream)."""

    suffixes = (".engine", ".trt", ".plan")
    kind = "a TensorRT engine"
    asynchronous = True

    @classmethod
    def resolve_device(cls, options: RunnerOptions) -> str:
        if options.device is not None and not options.device.startswith("cuda"):
            raise UsageError(f"TensorRT engines run on an NVIDIA GPU, not on --device {options.device}")
        # CUDA itself is checked in activate(), after TensorRT, so that the install hint comes first
        device = options.device or "cuda"
        return device if ":" in device else f"{device}:0"

    def activate(self) -> None:
        path = require_file(self.artifact, "TensorRT engine")
        trt = trt_module()
        trt.require_tensorrt()
        check(cuda_available(), f"{path} is a TensorRT engine, which needs an NVIDIA GPU, and CUDA is not "
                                "available here")
        check(not self.options.cuda_graph, "--cuda-graph applies to the torch backends only")
        self.device_index = int(self.device.split(":")[1]) if ":" in self.device else 0
        self.engine = trt.EngineRunner(str(path), self.device_index)
        self.stream = self.engine.stream
        side = _sidecar(self.artifact)
        opt_shape = _profile_shapes(self.engine.profile)[1]
        self.input_shape = tuple(int(d) for d in opt_shape[1:])
        self.info = {"label": side.get("label") or Path(self.artifact).stem, "arch": side.get("arch"),
                     "input_shape": list(self.input_shape), "precision": side.get("precision"),
                     "macs": side.get("macs"), "params_total": side.get("params_total"),
                     "tensorrt_version": side.get("tensorrt_version")}

    def deactivate(self) -> None:
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            close()
        self.engine = self.x = self.out = None
        self.stream = None

    def prepare(self, batch: int) -> None:
        import torch

        _check_batch(batch)
        lo, hi = profile_batch_range(self.engine.profile)
        if not lo <= batch <= hi:
            raise UsageError(f"batch {batch} is outside the optimisation profile of {self.artifact} "
                             f"(batch {lo} to {hi}); rebuild the engine with a larger maximum batch or use "
                             f"--batch {hi}")
        self.batch = batch
        dtype = getattr(self.engine, "input_dtype", torch.float32)
        gen = torch.Generator().manual_seed(self.options.seed)
        self.x_host = torch.randn(batch, *self.input_shape, generator=gen).to(dtype).pin_memory()
        self.x = self.x_host.to(f"cuda:{self.device_index}")
        self.out = None

    def run(self) -> None:
        self.out = self.engine.infer(self.x)

    def sync(self) -> None:
        self.stream.synchronize()

    def upload(self) -> None:
        with _torch_stream(self.stream):
            self.x.copy_(self.x_host, non_blocking=True)

    def download(self) -> None:
        out = self.out if self.out is not None else self.engine.infer(self.x)
        with _torch_stream(self.stream):
            if isinstance(out, tuple):  # a detector's four outputs
                self.out_host = [o.to("cpu", non_blocking=False) for o in out]
            else:
                self.out_host = out.to("cpu", non_blocking=False)

    def memory(self) -> dict[str, Any]:
        def mib(attr):
            size = getattr(self.engine, attr, None)
            return size / 2**20 if size is not None else None

        return {"trt_engine_device_memory_mib": mib("device_memory_bytes"), "trt_engine_file_mib": mib("engine_bytes"),
                "trt_engine_weights_mib": mib("weights_bytes")}


def _profile_shapes(profile: Any) -> tuple[Any, Any, Any]:
    """(min, opt, max) shapes from a tuple of three shapes, a {"min","opt","max"} dict or {input: (...)}."""
    if isinstance(profile, dict):
        if {"min", "max"} <= set(profile):
            return profile["min"], profile.get("opt", profile["max"]), profile["max"]
        return tuple(next(iter(profile.values())))
    return tuple(profile)


def _torch_stream(stream):
    import torch

    return torch.cuda.stream(stream)
