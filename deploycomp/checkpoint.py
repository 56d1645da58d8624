"""Safe checkpoints: a plain ``.pt`` dict that ``torch.load(weights_only=True)`` reads.

A checkpoint holds the architecture name and constructor kwargs, the structural edits applied since
(channel pruning history, removed blocks, ...) as a list of *surgeries*, the state dict, and metadata
(dataset, input shape, classes, normalisation, lineage of operations, metrics). Loading rebuilds the
architecture, replays the surgeries in order, then loads the weights: nothing is unpickled.

A surgery is registered with :func:`register_surgery`; it edits a freshly built model in place the
same way the original operation did, so that the saved state dict fits.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp import __version__
from deploycomp.errors import CheckpointError, UsageError, first_line
from deploycomp.files import atomic_path, ensure_not_input, require_file
from deploycomp.registry import Registry

FORMAT = "deploycomp.checkpoint"
FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE = REPO_ROOT / "models" / "light_resnet18_fmnist.pt"

# name -> fn(model, record: dict, example_input: Tensor) -> None, editing ``model`` in place.
SURGERIES: Registry[Callable[..., None]] = Registry("model surgery")
# Modules that register surgeries; imported before a checkpoint is replayed.
SURGERY_MODULES = ("deploycomp.surgery",)


def register_surgery(name: str):
    return SURGERIES.register(name)


def default_model() -> str:
    """Path of the shipped baseline (``DEPLOYCOMP_BASELINE`` overrides it)."""
    return os.environ.get("DEPLOYCOMP_BASELINE", str(BASELINE))


@dataclass
class Checkpoint:
    """A model together with what is needed to rebuild it and what is known about it."""

    model: Any  # torch.nn.Module
    arch: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    surgeries: list[dict[str, Any]] = field(default_factory=list)  # replayed in order on load
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # where it was loaded from (None: built fresh)
    trusted_pickle: bool = False  # True: a whole pickled module; cannot be saved as a safe checkpoint

    @property
    def input_shape(self) -> tuple[int, int, int]:
        shape = self.metadata.get("input_shape")
        if shape:
            return tuple(shape)
        from deploycomp.zoo import get_spec

        spec = get_spec(self.arch)
        return (self.model_kwargs.get("in_channels") or spec.input_size[0], *spec.input_size[1:])

    @property
    def num_classes(self) -> int | None:
        return self.model_kwargs.get("num_classes")

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else self.arch

    def example_input(self, batch: int = 1):
        import torch

        return torch.zeros(batch, *self.input_shape)

    def add_surgery(self, op: str, **record) -> None:
        """Record a structural edit already applied to ``self.model`` (replayed on load)."""
        _import_surgeries()
        SURGERIES.get(op)  # fail early on an unregistered name
        self.surgeries.append({"op": op, **record})

    def add_lineage(self, op: str, **params) -> None:
        """Append an operation and its parameters to the metadata's lineage."""
        self.metadata.setdefault("lineage", []).append(
            {"op": op, "params": params, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "deploycomp": __version__})

    def to_dict(self) -> dict[str, Any]:
        if self.trusted_pickle:
            raise UsageError("a model loaded from a pickled module cannot be saved as a deploycomp checkpoint: "
                             "its architecture is unknown; load its state dict with --arch instead")
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "deploycomp": __version__,
                "arch": self.arch, "model_kwargs": dict(self.model_kwargs), "surgeries": list(self.surgeries),
                "state_dict": state, "metadata": dict(self.metadata)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path``; refuse to overwrite the checkpoint it was loaded from."""
        import torch

        ensure_not_input(path, self.source)
        payload = self.to_dict()
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return Path(path)


# --------------------------------------------------------------------------------------------------
# Loading


# Suffixes that make a --model value a file name even when the file does not exist (a clear "does not exist").
FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".onnx", ".engine", ".plan", ".trt", ".json", ".yaml", ".yml")


def _looks_like_path(ref: str) -> bool:
    return os.sep in ref or "/" in ref or Path(ref).suffix in FILE_SUFFIXES or os.path.lexists(ref)


def load_model(ref: str | None = None, *, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, weights: str | None = None, trust_pickle: bool = False,
               input_size: tuple[int, int] | None = None, **model_kwargs) -> Checkpoint:
    """Resolve ``ref`` into a :class:`Checkpoint`.

    ``ref`` is a deploycomp checkpoint, a plain state dict (with ``arch``), a pickled module (only with
    ``trust_pickle``), or a model name from the zoo (built fresh). ``None`` means the shipped baseline.
    """
    ref = ref or default_model()
    if _looks_like_path(ref):
        return load_checkpoint(ref, arch=arch, num_classes=num_classes, in_channels=in_channels,
                               trust_pickle=trust_pickle)
    from deploycomp.zoo import build_model, get_spec

    spec = get_spec(ref)
    kwargs = {k: v for k, v in dict(num_classes=num_classes, in_channels=in_channels, **model_kwargs).items()
              if v is not None}
    model = build_model(ref, weights=weights, **kwargs)
    kwargs.setdefault("num_classes", 1000 if spec.source == "torchvision" else 10)
    kwargs.setdefault("in_channels", spec.input_size[0])
    meta: dict[str, Any] = {}
    if input_size:
        meta["input_shape"] = [kwargs["in_channels"], *input_size]
    ckpt = Checkpoint(model, ref, kwargs, [], meta)
    if weights:
        ckpt.metadata["weights"] = weights
    return ckpt


def _torch_load_safe(path: Path) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if _is_pickle_container(path):  # a real pickle of classes/functions: refused by weights_only
            raise _PickledObjects() from None
        raise _not_a_checkpoint(path) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, IndexError, KeyError) as e:
        raise _not_a_checkpoint(path, e) from None


def _not_a_checkpoint(path: Path, e: BaseException | None = None) -> CheckpointError:
    """A file that torch.load cannot read: named for what it is (ONNX, an image, JSON) when that is known."""
    from deploycomp.files import describe_kind

    kind = describe_kind(path)
    if kind is None or kind.startswith(("a ZIP", "a Python pickle")):
        cause = f" ({first_line(e, 200)})" if e is not None else ""
        return CheckpointError(f"{path} is not a readable PyTorch checkpoint: it is truncated, damaged or of another "
                               f"kind{cause}")
    hint = "give the .pt checkpoint it was made from (bench, quantize and build take .onnx files)" \
        if kind == "an ONNX model" else "give a .pt checkpoint written by deploycomp or torch.save"
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint: it is {kind}; {hint}")


class _PickledObjects(Exception):
    pass


def _is_pickle_container(path: Path) -> bool:
    """A torch zip archive or a raw pickle stream (which starts with the PROTO opcode 0x80)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
        return zipfile.is_zipfile(path) or head[:1] == b"\x80"
    except OSError:
        return False


def load_checkpoint(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
                    in_channels: int | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Load a file: deploycomp checkpoint, plain state dict (needs ``arch``) or trusted pickled module."""
    path = require_file(path, "model file")
    try:
        payload = _torch_load_safe(path)
    except _PickledObjects:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} contains pickled Python objects, which can run arbitrary code when loaded; "
                "if you trust its origin pass --trust-pickle, or save its state_dict() and load that "
                "with --arch NAME") from None
        return _load_pickled_module(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return _from_payload(payload, path)
    if isinstance(payload, dict) and "state_dict" in payload and isinstance(payload["state_dict"], dict):
        payload = payload["state_dict"]  # common {"state_dict": ...} wrapper of training scripts
    if isinstance(payload, dict) and payload and all(hasattr(v, "shape") for v in payload.values()):
        return _from_state_dict(payload, path, arch, num_classes, in_channels)
    raise CheckpointError(f"{path} is neither a deploycomp checkpoint nor a state dict; "
                          "nothing in it can be turned into a model")


def _from_payload(payload: dict[str, Any], path: Path) -> Checkpoint:
    from deploycomp.zoo import build_model

    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer deploycomp ({payload.get('deploycomp')}); upgrade")
    try:
        model = build_model(payload["arch"], **payload["model_kwargs"])
    except KeyError as e:
        raise CheckpointError(f"{path} is a damaged deploycomp checkpoint (missing {e})") from None
    try:
        ckpt = Checkpoint(model, payload["arch"], dict(payload["model_kwargs"]), list(payload.get("surgeries", [])),
                          dict(payload.get("metadata", {})), str(path))
        replay_surgeries(ckpt)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} is a damaged deploycomp checkpoint ({first_line(e, 200)})") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt model ({first_line(e, 200)})") \
            from None
    model.eval()
    return ckpt


def _import_surgeries() -> None:
    import importlib

    for module in SURGERY_MODULES:
        importlib.import_module(module)


def replay_surgeries(ckpt: Checkpoint) -> None:
    """Apply the recorded surgeries of ``ckpt`` to its (freshly built) model, in order."""
    _import_surgeries()
    for record in ckpt.surgeries:
        fn = SURGERIES.get(record["op"])
        fn(ckpt.model, record, ckpt.example_input())


def _from_state_dict(state: dict[str, Any], path: Path, arch: str | None, num_classes, in_channels) -> Checkpoint:
    from deploycomp.zoo import build_model

    if arch is None:
        raise UsageError(f"{path} is a plain state dict; say which architecture it belongs to with --arch NAME")
    matrices = [v for v in state.values() if getattr(v, "ndim", 0) == 2]
    convs = [v for v in state.values() if getattr(v, "ndim", 0) == 4]
    num_classes = num_classes or (int(matrices[-1].shape[0]) if matrices else None)
    in_channels = in_channels or (int(convs[0].shape[1]) if convs else None)
    kwargs = {k: v for k, v in dict(num_classes=num_classes, in_channels=in_channels).items() if v is not None}
    model = build_model(arch, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit architecture {arch!r}: {first_line(e, 200)}") from None
    model.eval()
    return Checkpoint(model, arch, kwargs, [], {"imported_from": str(path)}, str(path))


def _load_pickled_module(path: Path) -> Checkpoint:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # anything can happen when unpickling foreign code
        raise CheckpointError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, torch.nn.Module):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    obj.eval()
    return Checkpoint(obj, type(obj).__name__, {}, [], {"imported_from": str(path)}, str(path), trusted_pickle=True)
