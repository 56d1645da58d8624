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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp import __version__
from deploycomp.errors import CheckpointError, MissingDependencyError, UsageError, first_line
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
        return (self.in_channels or spec.input_size[0], *spec.input_size[1:])

    @property
    def num_classes(self) -> int | None:
        """Classes the model predicts: its constructor argument, else the outputs of its last Linear layer."""
        from deploycomp.zoo import infer_num_classes

        return self.model_kwargs.get("num_classes") or infer_num_classes(self.model)

    @property
    def in_channels(self) -> int | None:
        """Input channels: the constructor argument, else those of the first convolution."""
        from deploycomp.zoo import infer_in_channels

        return self.model_kwargs.get("in_channels") or infer_in_channels(self.model)

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
        live = self.model.state_dict()
        state = OrderedDict((k, v.detach().cpu().clone()) for k, v in live.items())
        # Module versions (state_dict()._metadata): models such as MNASNet refuse a state dict without them.
        state._metadata = getattr(live, "_metadata", None)
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
FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".engine", ".plan", ".trt", ".json",
                 ".yaml", ".yml")


def _looks_like_path(ref: str) -> bool:
    """A file reference (checkpoint, state dict, or another kind of file named where a model is expected), as
    opposed to a zoo name, NAMESPACE:NAME or user code."""
    from deploycomp.zoo import NAMESPACES, is_user_code

    if is_user_code(ref) or ref.partition(":")[0] in NAMESPACES:
        return False
    return os.sep in ref or "/" in ref or Path(ref).suffix in FILE_SUFFIXES or os.path.lexists(ref)


WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def load_model(ref: str | None = None, *, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, weights: str | None = None, trust_pickle: bool = False,
               input_size: tuple[int, int] | None = None, model_kwargs: dict[str, Any] | None = None,
               code_option: str = "--arch", trust_option: str | None = None) -> Checkpoint:
    """Resolve ``ref`` into a :class:`Checkpoint`.

    ``ref`` is a deploycomp checkpoint, a plain state dict (with ``arch``), a pickled module (only with
    ``trust_pickle``), or a model built fresh: a zoo name, ``timm:NAME`` or user code
    (``file.py:factory``, ``package.module:factory``) called with ``model_kwargs``. ``None`` means the
    shipped baseline. ``weights`` is a local state-dict file, or the name of published weights
    (torchvision, timm). A checkpoint built from user code reloads only with that code named as ``arch``;
    ``code_option`` is how the caller's user names it (``--arch``, ``--teacher-arch``, a recipe key), and
    ``trust_option`` the flag that sets ``trust_pickle`` (None: the caller has none), for the messages.
    """
    ref = ref or default_model()
    if _looks_like_path(ref):
        if weights is not None:
            raise UsageError(f"--weights applies to a model built from a name or code; {ref} is a file that "
                             "brings its own weights")
        return load_checkpoint(ref, arch=arch, num_classes=num_classes, in_channels=in_channels,
                               trust_pickle=trust_pickle, model_kwargs=model_kwargs, code_option=code_option,
                               trust_option=trust_option)
    from deploycomp.files import sha256
    from deploycomp.zoo import build_model, get_spec, infer_in_channels

    spec = get_spec(ref)
    weights_file = weights if weights is not None and _looks_like_path(weights) else None
    kwargs = spec.build_kwargs(num_classes, in_channels, **(model_kwargs or {}))
    model = build_model(ref, num_classes=num_classes, in_channels=in_channels,
                        weights=None if weights_file else weights, **(model_kwargs or {}))
    channels = kwargs.get("in_channels") or infer_in_channels(model) or spec.input_size[0]
    meta: dict[str, Any] = {"input_shape": [channels, *(input_size or spec.input_size[1:])]}
    if spec.code_file:
        meta["code"] = {"entry": ref, "file": spec.code_file, "sha256": sha256(spec.code_file)}
    if weights_file:
        load_weights_file(model, weights_file, ref)
        meta.update(weights=str(weights_file), weights_sha256=sha256(weights_file))
    elif weights:
        meta["weights"] = weights
    return Checkpoint(model, ref, kwargs, [], meta)


def load_weights_file(model, path: str | os.PathLike, ref: str) -> None:
    """Load a local state dict (``.pt``/``.pth``/``.bin`` read with weights_only, or ``.safetensors``)."""
    path = require_file(path, "weights file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingDependencyError(f"{path} is a safetensors file; pip install safetensors") from None
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"--weights {path} is not a readable safetensors file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    else:
        try:
            payload = _torch_load_safe(path)
        except _PickledObjects:
            raise CheckpointError(f"--weights {path} contains pickled Python objects, not just tensors; save "
                                  "its state_dict() and pass that") from None
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            raise UsageError(f"--weights {path} is a deploycomp checkpoint; load it with --model {path}")
        state = _state_dict_of(payload)
        if state is None:
            raise CheckpointError(f"--weights {path} holds no state dict (a mapping of parameter names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"--weights {path} does not fit {ref}: {str(e).splitlines()[0][:200]}") from None


def _state_dict_of(payload: Any) -> dict[str, Any] | None:
    """The state dict in ``payload``: itself, or under "state_dict"/"model" (training scripts' wrappers)."""
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not (isinstance(payload, dict) and payload and all(hasattr(v, "shape") for v in payload.values())):
        return None
    prefix = "module."  # saved from DistributedDataParallel / DataParallel
    if all(k.startswith(prefix) for k in payload):
        payload = {k[len(prefix):]: v for k, v in payload.items()}
    return payload


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
                    in_channels: int | None = None, trust_pickle: bool = False,
                    model_kwargs: dict[str, Any] | None = None, code_option: str = "--arch",
                    trust_option: str | None = None) -> Checkpoint:
    """Load a file: deploycomp checkpoint, plain state dict (needs ``arch``) or trusted pickled module.

    A deploycomp checkpoint built from user code names that code but never runs it on its own: ``arch``
    must name the code (the recorded entry point, or where it lives now). ``code_option`` is the option
    (or recipe key) that gives ``arch`` where the caller's user types it, ``trust_option`` the flag that
    sets ``trust_pickle`` there (None: there is none); messages tell them to use these.
    """
    path = require_file(path, "model file")
    try:
        payload = _torch_load_safe(path)
    except _PickledObjects:
        if not trust_pickle:
            trust = f"if you trust its origin pass {trust_option}, or " if trust_option else ""
            raise CheckpointError(
                f"{path} contains pickled Python objects, which can run arbitrary code when loaded; "
                f"{trust}save its state_dict() and load that with {code_option} NAME") from None
        return _load_pickled_module(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if model_kwargs:
            raise UsageError(f"--model-kwargs: {path} is a deploycomp checkpoint that records its own constructor "
                             "arguments")
        return _from_payload(payload, path, arch, code_option)
    state = _state_dict_of(payload)
    if state is not None:
        return _from_state_dict(state, path, arch, num_classes, in_channels, model_kwargs or {}, code_option)
    raise CheckpointError(f"{path} is neither a deploycomp checkpoint nor a state dict; "
                          "nothing in it can be turned into a model")


def _from_payload(payload: dict[str, Any], path: Path, arch: str | None = None,
                  code_option: str = "--arch") -> Checkpoint:
    from deploycomp.zoo import build_model

    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer deploycomp ({payload.get('deploycomp')}); upgrade")
    try:
        recorded, kwargs = payload["arch"], dict(payload["model_kwargs"])
    except KeyError as e:
        raise CheckpointError(f"{path} is a damaged deploycomp checkpoint (missing {e})") from None
    metadata = dict(payload.get("metadata", {}))
    build_arch = _user_code_arch(recorded, arch, path, metadata, code_option)
    model = build_model(build_arch, **kwargs)
    try:
        ckpt = Checkpoint(model, build_arch, kwargs, list(payload.get("surgeries", [])), metadata, str(path))
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


def _user_code_arch(recorded: str, given: str | None, path: Path, metadata: dict[str, Any],
                    code_option: str = "--arch") -> str:
    """The architecture to rebuild: ``recorded``, unless it is user code, which must be named (``given``)."""
    from deploycomp import console
    from deploycomp.files import sha256
    from deploycomp.zoo import get_spec, is_user_code

    if not is_user_code(recorded):
        return recorded
    if given is None:
        raise CheckpointError(f"{path} was built by user code {recorded}; loading it imports and runs that code, "
                              f"so name it: {code_option} {recorded} (or where that code lives now)")
    if not is_user_code(given):
        raise UsageError(f"{code_option} {given}: {path} was built by user code {recorded}; name that code "
                         "(path/to/file.py:factory or package.module:factory)")
    spec = get_spec(given)
    before = (metadata.get("code") or {}).get("sha256")
    if spec.code_file:
        now = sha256(spec.code_file)
        if before and now != before:
            console.warn(f"{spec.code_file} changed since {path} was written; the weights are loaded into the "
                         "current code")
        metadata["code"] = {"entry": given, "file": spec.code_file, "sha256": now}
    return given


def recorded_code(path: str | os.PathLike) -> str | None:
    """The user code entry point a deploycomp checkpoint was built from, read without running it (else None)."""
    from deploycomp.zoo import is_user_code

    try:
        payload = _torch_load_safe(Path(path))
    except (CheckpointError, _PickledObjects):
        return None
    arch = payload.get("arch") if isinstance(payload, dict) and payload.get("format") == FORMAT else None
    return arch if isinstance(arch, str) and is_user_code(arch) else None


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


def _from_state_dict(state: dict[str, Any], path: Path, arch: str | None, num_classes, in_channels,
                     model_kwargs: dict[str, Any], code_option: str = "--arch") -> Checkpoint:
    from deploycomp.zoo import build_model, get_spec

    if arch is None:
        raise UsageError(f"{path} is a plain state dict; say which architecture it belongs to with {code_option} "
                         "NAME")
    matrices = [v for v in state.values() if getattr(v, "ndim", 0) == 2]
    convs = [v for v in state.values() if getattr(v, "ndim", 0) == 4]
    num_classes = num_classes or (int(matrices[-1].shape[0]) if matrices else None)
    in_channels = in_channels or (int(convs[0].shape[1]) if convs else None)
    spec = get_spec(arch)
    kwargs = spec.build_kwargs(num_classes, in_channels, **model_kwargs)
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
