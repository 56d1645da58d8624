"""Running a TensorRT engine (the benchmark's TensorRT backend sits on this)."""

from __future__ import annotations

import os
from typing import Any

from deploycomp import console
from deploycomp.errors import DeploycompError, InputFileError, MissingDependencyError, UsageError, check
from deploycomp.files import sidecar_path
from deploycomp.trt.plan import check_engine_sidecar


def read_engine_sidecar(engine: str | os.PathLike) -> dict[str, Any]:
    from deploycomp.files import read_json

    side = sidecar_path(engine)
    return read_json(side) if side.exists() else {}


class EngineRunner:
    """A deserialized engine with one execution context, bound to torch CUDA tensors.

    ``infer(x)`` enqueues on :attr:`stream` and returns the output tensor without synchronising:
    the caller synchronises (``runner.stream.synchronize()``) before reading it or stopping a clock.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int = 0):
        import torch

        from deploycomp.trt import gpu_info, require_tensorrt

        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise MissingDependencyError("running a TensorRT engine needs a CUDA GPU and a CUDA build of torch; "
                                         "none is visible here")
        from deploycomp.files import require_file

        self.path = require_file(engine_path, "TensorRT engine")
        self.device = torch.device("cuda", device)
        self.sidecar = read_engine_sidecar(self.path)
        gpu = gpu_info(device)
        for warning in check_engine_sidecar(self.sidecar, trt.__version__, gpu["gpu_name"],
                                            gpu["compute_capability"], self.path):
            console.warn(warning)
        if not self.sidecar:
            console.warn(f"{self.path} has no sidecar ({sidecar_path(self.path)}); cannot check which TensorRT/GPU "
                         "built it")
        self.trt_version = trt.__version__
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise InputFileError(f"TensorRT {trt.__version__} cannot deserialize {self.path}: not an engine, or "
                                     "built by another TensorRT version/GPU; rebuild it with `deploycomp build`")
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            check(len(inputs) == 1 and len(outputs) >= 1, f"{self.path} has inputs {inputs} and outputs {outputs}; "
                  "deploycomp runs single-input models", InputFileError)
            # every output is bound (TensorRT executes only when all I/O tensors have addresses): a detector
            # with its NMS has four (num_detections, boxes, scores, labels), all of fixed shapes
            self.input_name, self.output_names = inputs[0], outputs
            self.output_name = outputs[0]
            self.input_dtype = torch_dtype(self.engine.get_tensor_dtype(self.input_name), self.input_name, self.path)
            self.output_dtypes = [torch_dtype(self.engine.get_tensor_dtype(n), n, self.path) for n in outputs]
            self.output_dtype = self.output_dtypes[0]
            shape = tuple(self.engine.get_tensor_shape(self.input_name))
            if shape[0] == -1:
                lo, opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            else:
                lo = opt = hi = shape
            self.profile = {"min": lo, "opt": opt, "max": hi}
            # TensorRT 11 removed device_memory_size; device_memory_size_v2 exists since 10.1.
            self.device_memory_bytes = int(getattr(self.engine, "device_memory_size_v2", None)
                                           or getattr(self.engine, "device_memory_size", 0))
            self.weights_bytes = None  # TensorRT reports no total weight size for a regular engine
            self.engine_bytes = self.path.stat().st_size
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self._out: Any = None  # the first output (one tensor) or every output (a tuple), as infer() returns
        self._outs: list = []
        self._inputs_alive: Any = None

    @property
    def batch_range(self) -> tuple[int, int]:
        return int(self.profile["min"][0]), int(self.profile["max"][0])

    def infer(self, x):
        """Enqueue one inference of ``x`` (a CUDA tensor, NCHW) on :attr:`stream`; no synchronisation."""
        import torch

        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise UsageError(f"batch {x.shape[0]} is outside the engine's profile ({lo}..{hi}); rebuild with "
                             f"`deploycomp build --min-batch/--max-batch` covering it")
        if tuple(x.shape[1:]) != tuple(self.profile["max"][1:]):
            raise UsageError(f"input shape {tuple(x.shape)} does not fit the engine's "
                             f"{('N', *self.profile['max'][1:])}")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x may still be being written
        with torch.cuda.stream(self.stream):
            if x.device != self.device or x.dtype != self.input_dtype or not x.is_contiguous():
                x = x.to(self.device, self.input_dtype).contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            shapes = [tuple(self.context.get_tensor_shape(n)) for n in self.output_names]
            if [tuple(o.shape) for o in self._outs] != shapes:
                self._outs = [torch.empty(s, dtype=d, device=self.device)
                              for s, d in zip(shapes, self.output_dtypes, strict=True)]
                self._out = self._outs[0] if len(self._outs) == 1 else tuple(self._outs)
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            for name, out in zip(self.output_names, self._outs, strict=True):
                self.context.set_tensor_address(name, out.data_ptr())
            self._inputs_alive = x  # keep the (possibly converted) input alive until the next call
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise DeploycompError(f"TensorRT failed to enqueue {self.path} (execute_async_v3 returned False)")
        return self._out

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# TensorRT DataType member -> torch dtype, by name (members an older TensorRT or torch lacks simply never
# match). INT4 and FP4 are packed two to a byte and have no torch tensor to bind: refused in one line.
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8_e4m3fn",
                "E8M0": "float8_e8m0fnu"}


def dtype_name(dtype) -> str:
    """``DataType.INT64`` -> ``INT64`` (pybind11 enums have .name; str() is the fallback)."""
    return getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]


def torch_dtype(dtype, tensor: str, engine: str | os.PathLike):
    """The torch dtype of a TensorRT tensor, or a one-line error naming the tensor and its type."""
    import torch

    name = dtype_name(dtype)
    found = getattr(torch, TORCH_DTYPES.get(name, ""), None)
    if not isinstance(found, torch.dtype):
        usable = ", ".join(k for k, v in TORCH_DTYPES.items() if isinstance(getattr(torch, v, None), torch.dtype))
        raise InputFileError(f"{engine}: tensor {tensor!r} is {name}, which deploycomp cannot bind to a torch tensor "
                             f"(it binds {usable}); export the model with that input or output in one of those")
    return found
