"""TensorRT: the pure parts everywhere (profiles, precision plan per major version, trtexec command lines,
sidecar checks, version parsing), the trtexec fallback end to end with a stand-in trtexec, the documented
error without TensorRT, and real builds/inference where TensorRT and a GPU exist (markers tensorrt, gpu)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from deploycomp import console
from deploycomp.errors import InputFileError, MissingDependencyError, UsageError
from deploycomp.trt import (
    Profile,
    check_engine_sidecar,
    default_engine_path,
    parse_workspace,
    plan_precision,
    profile_shapes,
    tensorrt_major,
    trtexec_command,
    version_from_banner,
)
from tests.conftest import assert_one_line_error, needs_fmnist

SHAPE = [None, 1, 28, 28]


@pytest.fixture(autouse=True)
def _quiet(quiet_console):
    """Progress lines off for every test here (conftest.quiet_console)."""


# -- pure parts -------------------------------------------------------------------------------------------


def test_parse_workspace():
    assert parse_workspace("512M") == 512 * 2**20
    assert parse_workspace("2G") == 2 * 2**30
    assert parse_workspace("1.5GiB") == int(1.5 * 2**30)
    assert parse_workspace("1024") == 2**30  # a bare number is MiB, like trtexec
    assert parse_workspace(None) is None
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(UsageError):
            parse_workspace(bad)


def test_profile_defaults_and_bounds():
    p = profile_shapes("input", SHAPE)
    assert (p.min, p.opt, p.max) == ((1, 1, 28, 28), (8, 1, 28, 28), (32, 1, 28, 28))
    assert profile_shapes("input", SHAPE, max_batch=4).batches() == (1, 4, 4)
    assert profile_shapes("input", SHAPE, min_batch=64).batches() == (64, 64, 64)
    assert profile_shapes("input", SHAPE, 2, 2, 2).batches() == (2, 2, 2)
    assert profile_shapes("input", [4, 1, 28, 28]) is None  # fixed batch: no profile
    assert profile_shapes("input", [4, 1, 28, 28], 4, 4, 4) is None


@pytest.mark.parametrize("bounds, message", [((4, 2, 8), "--min-batch 4 is larger than --opt-batch 2"),
                                             ((1, 16, 8), "--opt-batch 16 is larger than --max-batch 8"),
                                             ((None, 9, 4), "--opt-batch 9 is larger than --max-batch 4"),
                                             ((0, None, None), "positive")])
def test_profile_order_errors(bounds, message):
    with pytest.raises(UsageError, match=message):
        profile_shapes("input", SHAPE, *bounds)


def test_profile_of_fixed_batch_model_refuses_a_range():
    with pytest.raises(UsageError, match="fixed batch of 1.*--dynamic-batch"):
        profile_shapes("input", [1, 1, 28, 28], max_batch=8)
    with pytest.raises(InputFileError, match="only the batch axis"):
        profile_shapes("input", [None, 1, None, 28])


def test_precision_plan_trt10():
    assert plan_precision(None, "fp32", 10).builder_flags == ()
    fp16 = plan_precision("fp16", "fp32", 10)
    assert fp16.builder_flags == ("FP16",) and not fp16.strongly_typed and fp16.quantize_first is None
    int8 = plan_precision("int8", "fp32", 10)
    assert int8.quantize_first == "int8" and int8.builder_flags == ()  # explicit Q/DQ, never calibrators
    for p in ("fp16", "int8"):
        typed = plan_precision(None, p, 10)
        assert typed.precision == p and typed.strongly_typed and typed.builder_flags == ()


@pytest.mark.parametrize("major", [11, 12])
def test_precision_plan_trt11_is_strongly_typed(major):
    for p in ("fp16", "int8"):
        plan = plan_precision(p, "fp32", major)
        assert plan.quantize_first == p and plan.builder_flags == () and "strongly typed" in plan.notes[0]
        assert plan_precision(p, p, major).quantize_first is None
    assert plan_precision("fp32", "fp32", major).quantize_first is None


def test_precision_plan_errors():
    with pytest.raises(UsageError, match="already int8"):
        plan_precision("fp16", "int8", 10)
    with pytest.raises(MissingDependencyError, match="TensorRT 8"):
        plan_precision("fp32", "fp32", 8)


def test_trtexec_command_trt10_vs_trt11():
    profile = Profile("input", (1, 1, 28, 28), (8, 1, 28, 28), (32, 1, 28, 28))
    cmd10 = trtexec_command("m.onnx", "m.fp16.engine", plan_precision("fp16", "fp32", 10), profile,
                            workspace_bytes=2**30, timing_cache="t.cache", dla_core=0)
    assert cmd10[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.fp16.engine"]
    for arg in ("--minShapes=input:1x1x28x28", "--optShapes=input:8x1x28x28", "--maxShapes=input:32x1x28x28",
                "--fp16", "--memPoolSize=workspace:1024", "--timingCacheFile=t.cache", "--useDLACore=0",
                "--allowGPUFallback", "--skipInference"):
        assert arg in cmd10
    assert "--stronglyTyped" not in cmd10
    typed10 = trtexec_command("m.int8.onnx", "e", plan_precision("int8", "int8", 10))
    assert "--stronglyTyped" in typed10 and "--int8" not in typed10 and not any("Shapes" in a for a in typed10)
    cmd11 = trtexec_command("m.int8.onnx", "e", plan_precision("int8", "int8", 11), profile)
    removed = {"--fp16", "--int8", "--best", "--stronglyTyped"}  # gone (or a no-op) in TensorRT 11
    assert not removed & set(cmd11) and "--minShapes=input:1x1x28x28" in cmd11


def test_versions():
    assert tensorrt_major("10.3.0.30") == 10 and tensorrt_major("11.0.1") == 11
    assert version_from_banner("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec") == "10.3.0"
    assert version_from_banner("[TensorRT v110102]") == "11.1.2"
    with pytest.raises(MissingDependencyError):
        version_from_banner("usage: something else")


def test_engine_sidecar_mismatches():
    side = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "source_onnx": "m.onnx"}
    assert check_engine_sidecar(side, "10.3.0", "Orin", "8.7") == []
    with pytest.raises(InputFileError, match=r"built with TensorRT 10\.3\.0 but TensorRT 11\.0\.0.*deploycomp build"):
        check_engine_sidecar(side, "11.0.0", "Orin", "8.7", "m.engine")
    with pytest.raises(InputFileError, match="compute capability 8.7.*not portable"):
        check_engine_sidecar(side, "10.3.0", "NVIDIA H100", "9.0")
    warnings = check_engine_sidecar(side, "10.3.0", "Other Orin", "8.7")
    assert len(warnings) == 1 and "rebuild" in warnings[0]


def test_default_paths():
    assert default_engine_path("a/m.onnx", "fp32") == Path("a/m.engine")
    assert default_engine_path("a/m.onnx", "fp16") == Path("a/m.fp16.engine")
    assert default_engine_path("a/m.int8.onnx", "int8") == Path("a/m.int8.engine")


def test_require_tensorrt_names_the_install():
    from deploycomp.trt import require_tensorrt, tensorrt_available

    if tensorrt_available():
        pytest.skip(reason="TensorRT is installed here")
    with pytest.raises(MissingDependencyError, match=r'pip install "deploycomp\[tensorrt\]".*docker/'):
        require_tensorrt()


# -- build without TensorRT, and with a stand-in trtexec ---------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    from deploycomp.checkpoint import load_model
    from deploycomp.data import FASHION_MNIST_CLASSES
    from deploycomp.export import export_onnx

    console.set_verbosity(console.QUIET)
    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1, input_size=(28, 28))
    ckpt.metadata.update({"dataset": "fashion-mnist", "mean": [0.286], "std": [0.353],
                          "class_names": FASHION_MNIST_CLASSES})
    out = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_onnx(ckpt, out, dynamic_batch=True, simplify=False, parity=False)
    return out


@pytest.fixture()
def no_tensorrt(monkeypatch):
    import deploycomp.trt as trt

    monkeypatch.setattr(trt, "tensorrt_available", lambda: False)
    monkeypatch.setattr(trt, "trtexec_path", lambda: None)


def test_build_without_tensorrt_is_the_documented_error(cli, onnx_model, no_tensorrt):
    result = cli("build", onnx_model, ok=False)
    assert_one_line_error(result, "needs TensorRT", 'pip install "deploycomp[tensorrt]"', "docker/")
    assert result.exit_code == 1 and not Path(str(onnx_model).replace(".onnx", ".engine")).exists()


def test_build_errors_before_looking_for_tensorrt(cli, onnx_model, no_tensorrt):
    assert_one_line_error(cli("build", onnx_model, "--min-batch", "8", "--opt-batch", "2", ok=False),
                          "--min-batch 8 is larger than --opt-batch 2")
    assert_one_line_error(cli("build", onnx_model, "--workspace", "lots", ok=False), "--workspace")
    Path("junk.onnx").write_bytes(b"\x00\x01junk")
    assert_one_line_error(cli("build", "junk.onnx", ok=False), "not an ONNX model")


FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_VERSION}] # trtexec $*"
[ "$1" = "--help" ] && exit 0
echo "$*" >> "$FAKE_TRTEXEC_LOG"
for a in "$@"; do case "$a" in --saveEngine=*) printf 'not-a-real-engine' > "${a#--saveEngine=}";; esac; done
"""


@pytest.fixture()
def fake_trtexec(tmp_path, monkeypatch):
    """A stand-in trtexec on PATH that reports TensorRT ``version`` and records its command lines."""
    import deploycomp.trt as trt

    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    exe = bindir / "trtexec"
    exe.write_text(FAKE_TRTEXEC)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "trtexec.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TRTEXEC_LOG", str(log))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(trt, "tensorrt_available", lambda: False)  # force the fallback even where TRT exists

    def use(version: str) -> Path:
        monkeypatch.setenv("FAKE_TRT_VERSION", version)
        return log

    return use


def test_trtexec_fallback_trt10_fp16_flag(cli, onnx_model, fake_trtexec, tmp_path):
    log = fake_trtexec("100300")
    result = cli("build", onnx_model, "-o", "m.engine", "--precision", "fp16", "--max-batch", "16",
                 "--workspace", "1G", "--timing-cache", "t.cache")
    assert "trtexec" in result.output
    args = log.read_text().split()
    assert f"--onnx={onnx_model}" in args and "--fp16" in args and "--maxShapes=input:16x1x28x28" in args
    assert "--timingCacheFile=t.cache" in args and "--memPoolSize=workspace:1024" in args
    side = json.loads(Path("m.engine.json").read_text())
    assert side["tensorrt_version"] == "10.3.0" and side["builder"] == "trtexec" and side["precision"] == "fp16"
    assert side["profile"]["max"] == [16, 1, 28, 28] and side["source_onnx"] == str(onnx_model)
    assert side["mean"] == [0.286] and side["trtexec_command"].startswith("trtexec --onnx=")
    assert Path("m.engine").read_bytes() == b"not-a-real-engine"


def test_trtexec_fallback_trt11_quantizes_first(cli, onnx_model, fake_trtexec, tmp_path):
    log = fake_trtexec("110000")
    src = tmp_path / "m.onnx"
    src.write_bytes(onnx_model.read_bytes())
    result = cli("build", src, "--precision", "fp16")
    assert "strongly typed" in result.output and "deploycomp quantize" in result.output
    fp16 = tmp_path / "m.fp16.onnx"
    assert fp16.exists()
    args = log.read_text().split()
    assert f"--onnx={fp16}" in args and "--fp16" not in args and "--stronglyTyped" not in args
    side = json.loads((tmp_path / "m.fp16.engine.json").read_text())
    assert side["tensorrt_major"] == 11 and side["plan"]["onnx_precision"] == "fp16"
    assert side["timing_cache"].endswith("trt11.0.0-gpu.timing-cache")
    result = cli("build", src, "--precision", "fp16", "-o", "again.engine")  # the FP16 ONNX is reused
    assert "using" in result.output and "already quantized" in result.output


@needs_fmnist
def test_trtexec_fallback_int8_needs_qdq(cli, onnx_model, fake_trtexec, tmp_path):
    log = fake_trtexec("100300")
    src = tmp_path / "m.onnx"
    src.write_bytes(onnx_model.read_bytes())
    Path(f"{src}.json").write_text(Path(f"{onnx_model}.json").read_text())
    cli("build", src, "--precision", "int8", "--calib-samples", "32")
    args = log.read_text().split()
    made = tmp_path / "m.int8-tensorrt.onnx"  # quantized for TensorRT, not for ONNX Runtime's CPU kernels
    assert f"--onnx={made}" in args and "--stronglyTyped" in args and "--int8" not in args
    assert json.loads(Path(f"{made}.json").read_text())["quantization"]["target"] == "tensorrt"


# -- real TensorRT (skipped here: TensorRT and a GPU are needed) ---------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_build_and_run(onnx_model, tmp_path, precision):
    import torch

    from deploycomp.export import ort_run, ort_session
    from deploycomp.trt import EngineRunner, build_engine

    engine = tmp_path / f"m.{precision}.engine"
    rec = build_engine(onnx_model, engine, precision=precision, min_batch=1, opt_batch=4, max_batch=8,
                       workspace="512M", timing_cache=tmp_path / "t.cache")
    assert engine.exists() and (tmp_path / "t.cache").exists() and rec["builder"] == "python-api"
    assert rec["compute_capability"] and rec["profile"]["max"][0] == 8
    with EngineRunner(engine, 0) as runner:
        assert runner.batch_range == (1, 8) and runner.device_memory_bytes >= 0
        x = torch.randn(4, 1, 28, 28, device="cuda")
        out = runner.infer(x)
        runner.stream.synchronize()
        ref = ort_run(ort_session(onnx_model), x.cpu())
        tol = (1e-3 if precision == "fp32" else 5e-2) * np.abs(ref).max()
        np.testing.assert_allclose(out.float().cpu().numpy(), ref, atol=tol)
        with pytest.raises(UsageError, match="outside the engine's profile"):
            runner.infer(torch.randn(9, 1, 28, 28, device="cuda"))
    again = build_engine(onnx_model, tmp_path / "again.engine", precision=precision,
                         timing_cache=tmp_path / "t.cache")
    assert again["timing_cache_reused"]


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_from_another_tensorrt_is_refused(onnx_model, tmp_path):
    from deploycomp.trt import EngineRunner, build_engine

    engine = tmp_path / "m.engine"
    build_engine(onnx_model, engine)
    side_path = Path(f"{engine}.json")
    side = json.loads(side_path.read_text())
    side["tensorrt_version"] = "9.0.0"
    side_path.write_text(json.dumps(side))
    with pytest.raises(InputFileError, match="built with TensorRT 9.0.0"):
        EngineRunner(engine, 0)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_fmnist
def test_real_int8_build(onnx_model, tmp_path):
    from deploycomp.quantize import quantize_onnx
    from deploycomp.trt import EngineRunner, build_engine

    qdq = tmp_path / "m.int8.onnx"
    quantize_onnx(onnx_model, qdq, precision="int8", calib_samples=64, evaluate=False, target="tensorrt")
    rec = build_engine(qdq, tmp_path / "m.int8.engine")
    assert rec["precision"] == "int8"
    with EngineRunner(tmp_path / "m.int8.engine") as runner:
        assert runner.profile["opt"][0] == 8


# -- the Python API builder and the engine's tensor types, with a stand-in `tensorrt` module ----------------


class FakeTimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data + b"+tactics"


class FakeBuilderConfig:
    """Timing caches as TensorRT treats them: this GPU's are taken, another GPU's are refused (set_timing_cache
    returns False), a file that is no cache gives None; after a refusal get_timing_cache() may return None."""

    def __init__(self, module):
        self.module, self.cache = module, None

    def create_timing_cache(self, data: bytes):
        if data and not data.startswith(b"CACHE:"):
            return None
        return FakeTimingCache(data or b"CACHE:this-gpu")

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if not cache.data.startswith(b"CACHE:this-gpu") or self.module.refuse_every_cache:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return None if self.module.no_cache_after_build else self.cache

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        pass

    def add_optimization_profile(self, profile):
        pass


def fake_tensorrt_module():
    import enum
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.refuse_every_cache = trt.no_cache_after_build = False
    trt.DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64 INT4 FP4 E8M0")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16=1, INT8=2, GPU_FALLBACK=3)

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Profile:
        def set_shape(self, *args):
            pass

    class Builder:
        num_DLA_cores = 0

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return FakeBuilderConfig(trt)

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"fake-engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


@pytest.fixture()
def fake_tensorrt(monkeypatch, tmp_path):
    import sys

    trt = fake_tensorrt_module()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return trt


def _python_api_build(cli, onnx_model, cache: Path):
    console.set_verbosity(console.NORMAL)
    return cli("build", onnx_model, "--builder", "python-api", "--timing-cache", cache, "-o", "m.engine")


def _build_record() -> dict:
    return json.loads(Path("m.engine.json").read_text())


def test_python_api_build_reads_and_updates_this_gpus_timing_cache(cli, onnx_model, fake_tensorrt, tmp_path):
    cache = tmp_path / "my.cache"
    r = _python_api_build(cli, onnx_model, cache)
    assert "Warning" not in r.output and Path("m.engine").read_bytes() == b"fake-engine"
    assert cache.read_bytes() == b"CACHE:this-gpu+tactics"
    assert _build_record()["timing_cache_reused"] is False and _build_record()["timing_cache_rejected"] is False
    _python_api_build(cli, onnx_model, cache)
    assert cache.read_bytes() == b"CACHE:this-gpu+tactics+tactics"
    assert _build_record()["timing_cache_reused"] is True


@pytest.mark.parametrize("content", [b"CACHE:other-gpu", b"not a timing cache"])
def test_a_timing_cache_tensorrt_rejects_is_a_warning_and_the_engine_is_built(cli, onnx_model, fake_tensorrt,
                                                                               tmp_path, content):
    cache = tmp_path / "theirs.cache"
    cache.write_bytes(content)
    r = _python_api_build(cli, onnx_model, cache)
    warnings = [line for line in r.output.splitlines() if line.startswith("Warning:")]
    assert warnings == [f"Warning: TensorRT rejected the timing cache {cache} (made by another TensorRT version or "
                        "GPU, or not a timing cache): building with a fresh one and leaving that file as it is; "
                        "delete it, or give another --timing-cache, to keep this GPU's timings"]
    assert Path("m.engine").read_bytes() == b"fake-engine" and cache.read_bytes() == content
    assert _build_record()["timing_cache_rejected"] is True and _build_record()["timing_cache_reused"] is False


def test_no_timing_cache_after_a_build_keeps_the_engine(cli, onnx_model, fake_tensorrt, tmp_path):
    fake_tensorrt.no_cache_after_build = True
    cache = tmp_path / "my.cache"
    r = _python_api_build(cli, onnx_model, cache)
    assert f"Warning: TensorRT gave no timing cache after the build; {cache} is not updated (the engine is kept)" \
        in r.output.splitlines()
    assert Path("m.engine").read_bytes() == b"fake-engine" and not cache.exists()


def test_even_a_fresh_cache_refused_still_builds(cli, onnx_model, fake_tensorrt, tmp_path):
    fake_tensorrt.refuse_every_cache = True
    r = _python_api_build(cli, onnx_model, tmp_path / "my.cache")
    assert r.output.count("Warning: TensorRT rejected the timing cache") == 1
    assert Path("m.engine").read_bytes() == b"fake-engine" and not (tmp_path / "my.cache").exists()


def test_every_tensorrt_data_type_binds_or_is_refused_in_one_line():
    import torch

    from deploycomp.trt.engine import torch_dtype

    dt = fake_tensorrt_module().DataType
    expected = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT32": torch.int32,
                "BOOL": torch.bool, "UINT8": torch.uint8, "FP8": torch.float8_e4m3fn, "BF16": torch.bfloat16,
                "INT64": torch.int64, "E8M0": torch.float8_e8m0fnu}
    assert {m.name: torch_dtype(m, "x", "m.engine") for m in dt if m.name in expected} == expected
    for packed in ("INT4", "FP4"):
        with pytest.raises(InputFileError) as e:
            torch_dtype(dt[packed], "input_ids", "m.engine")
        assert str(e.value) == (f"m.engine: tensor 'input_ids' is {packed}, which deploycomp cannot bind to a torch "
                                "tensor (it binds FLOAT, HALF, BF16, INT8, UINT8, INT32, INT64, BOOL, FP8, E8M0); "
                                "export the model with that input or output in one of those")


def test_data_type_names_of_the_bindings_and_of_their_str():
    from deploycomp.trt.engine import dtype_name

    class PybindLike:  # str() is "DataType.INT64" and there is no .name on very old bindings
        def __str__(self):
            return "DataType.INT64"

    assert dtype_name(PybindLike()) == "INT64" and dtype_name(fake_tensorrt_module().DataType.UINT8) == "UINT8"
