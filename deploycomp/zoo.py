"""Model registry: deploycomp's built-ins, every torchvision classification model, timm, and user code.

Built-ins are registered with :func:`register_model`; torchvision's classification models are added to
the same registry the first time it is read, so ``get_model("resnet50")`` and
``get_model("light_resnet18")`` go through one path. Two more kinds of reference resolve to a
:class:`ModelSpec` on demand:

- ``NAMESPACE:NAME`` for a registered namespace (``timm:resnet18`` when timm is installed);
- a user entry point, ``path/to/file.py:factory`` or ``package.module:factory`` (like a console-script
  entry point): a callable returning an ``nn.Module``. Resolving it imports (runs) that code, so it
  happens only for a reference the user typed; a checkpoint naming one reloads only when the user
  names the code again (see :mod:`deploycomp.checkpoint`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp.errors import DeploycompError, MissingDependencyError, UsageError, check
from deploycomp.registry import Registry

DEFAULT_SIZE = (224, 224)  # (H, W) of a model that declares no input size (user code)
IO_ARGS = ("num_classes", "in_channels")  # the constructor arguments deploycomp fills from the dataset


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., Any]  # (num_classes, in_channels, weights, **kwargs) -> nn.Module
    input_size: tuple[int, int, int]  # (C, H, W) the architecture is designed for
    description: str = ""
    source: str = "deploycomp"  # "deploycomp", "torchvision", "timm" or "user code"
    defaults: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10  # classes of the architecture when none are asked for
    takes: tuple[str, ...] = IO_ARGS  # which of IO_ARGS the builder accepts (user code may take neither)
    fills_defaults: bool = True  # False: pass num_classes/in_channels only when asked (user code)
    code_file: str | None = None  # user code: the file it was imported from (recorded with checkpoints)
    task: str | None = "classification"  # a name in deploycomp.tasks.TASKS; None: the data's (user code, timm)

    def build_kwargs(self, num_classes: int | None = None, in_channels: int | None = None,
                     **kwargs) -> dict[str, Any]:
        """The keyword arguments the builder gets: defaults filled, arguments it does not take dropped."""
        io = {"num_classes": num_classes, "in_channels": in_channels}
        if self.fills_defaults:
            io = {"num_classes": num_classes or self.num_classes, "in_channels": in_channels or self.input_size[0]}
        return {**{k: v for k, v in io.items() if k in self.takes and v is not None}, **kwargs}


MODELS: Registry[ModelSpec] = Registry("model", hint="See `deploycomp info --list-models`.")
# Far beyond any classification set (ImageNet-21k: 21,841 classes) or image (hyperspectral: hundreds of
# bands); refusing more keeps a typo from allocating terabytes for one layer.
MAX_CLASSES, MAX_IN_CHANNELS = 1_000_000, 10_000
# "timm" -> fn(name) -> ModelSpec, for references spelled NAMESPACE:NAME.
NAMESPACES: Registry[Callable[[str], ModelSpec]] = Registry("model namespace")
_torchvision_added = False
_resolved: dict[str, ModelSpec] = {}  # namespace and user-code references already resolved


def register_model(name: str, *, input_size: tuple[int, int, int], description: str = "",
                   task: str = "classification", **defaults):
    """Decorator registering a builder ``fn(num_classes, in_channels, **kwargs) -> nn.Module`` for ``task``."""

    def wrap(fn):
        def build(weights: str | None = None, **kwargs):
            if weights is not None:
                raise UsageError(f"--weights {weights!r}: {name} is a deploycomp built-in without published weights "
                                 "(named weights are for torchvision and timm models only); give a weights file "
                                 "(--weights FILE.pth)")
            return fn(**kwargs)

        MODELS.register(name, ModelSpec(name, build, input_size, description, "deploycomp", defaults, task=task))
        return fn

    return wrap


def register_namespace(prefix: str):
    """Decorator registering ``fn(name) -> ModelSpec`` for model references ``PREFIX:NAME``."""
    return NAMESPACES.register(prefix)


def _add_torchvision_models() -> None:
    global _torchvision_added
    if _torchvision_added:
        return
    _torchvision_added = True
    import torchvision.models as tvm

    for name in tvm.list_models(module=tvm):
        if name not in MODELS:
            size = 299 if name == "inception_v3" else 224
            MODELS.register(name, ModelSpec(name, _torchvision_builder(name), (3, size, size),
                                            "torchvision classification model", "torchvision", num_classes=1000))
    for name in tvm.list_models(module=tvm.segmentation):
        if name not in MODELS:
            MODELS.register(name, ModelSpec(name, _torchvision_builder(name, dense=True), (3, 224, 224),
                                            "torchvision segmentation model (its 'out' logits)", "torchvision",
                                            num_classes=21, task="segmentation"))
    _add_torchvision_detectors(tvm)


def _torchvision_detector_builder(name: str):
    def build(num_classes: int, in_channels: int, weights: str | None = None, **kwargs):
        from deploycomp.tasks.tv_detection import build_torchvision_detector

        return build_torchvision_detector(name, num_classes, in_channels, weights=weights, **kwargs)

    return build


def _add_torchvision_detectors(tvm) -> None:
    """torchvision's detectors, end to end (their own post-processing; deploycomp.tasks.tv_detection);
    mask and keypoint models are listed and refused in one line when built."""
    from deploycomp.tasks.tv_detection import DETECTORS

    for name in tvm.list_models(module=tvm.detection):
        if name not in MODELS:
            family = DETECTORS.get(name)
            size = family.native_size if family else (800, 800)
            what = ("torchvision detector (end to end: its own post-processing)" if family else
                    "torchvision mask/keypoint model (refused: use its fasterrcnn counterpart)")
            MODELS.register(name, ModelSpec(name, _torchvision_detector_builder(name), (3, *size), what,
                                            "torchvision", num_classes=80, task="detection"))


def get_spec(name: str) -> ModelSpec:
    """The spec of a zoo name, a ``NAMESPACE:NAME`` reference or a user entry point (imported here)."""
    if name in MODELS:
        return MODELS.get(name)
    if name in _resolved:
        return _resolved[name]
    prefix, sep, rest = name.partition(":")
    if sep and prefix in NAMESPACES:
        _resolved[name] = NAMESPACES.get(prefix)(rest)
        return _resolved[name]
    if is_user_code(name):
        _resolved[name] = _user_code_spec(name)
        return _resolved[name]
    _add_torchvision_models()
    return MODELS.get(name)


def list_models(include_torchvision: bool = True) -> list[str]:
    if include_torchvision:
        _add_torchvision_models()
    return [n for n in MODELS.names() if include_torchvision or MODELS.get(n).source == "deploycomp"]


def build_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                weights: str | None = None, **kwargs):
    """Build model ``name`` with ``num_classes`` outputs for ``in_channels``-channel input.

    ``name`` is anything :func:`get_spec` resolves. ``weights`` names published weights (torchvision:
    ``"DEFAULT"``, ``"IMAGENET1K_V2"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``; timm: ``"DEFAULT"``);
    they are only read from the cache or downloaded when online, and the error says what to do when
    neither works. A model that does not end up with the classes or channels asked for is an error.
    """
    spec = get_spec(name)
    check(num_classes is None or 1 <= num_classes <= MAX_CLASSES,
          f"--num-classes must be in 1..{MAX_CLASSES:,}, got {num_classes}")
    check(in_channels is None or 1 <= in_channels <= MAX_IN_CHANNELS,
          f"--in-channels must be in 1..{MAX_IN_CHANNELS:,}, got {in_channels}")
    try:
        model = spec.builder(weights=weights, **spec.build_kwargs(num_classes, in_channels,
                                                                  **{**spec.defaults, **kwargs}))
    except TypeError as e:
        if not kwargs:
            raise
        raise UsageError(f"{name} cannot be built with {kwargs}: {_first_line(e)}; check --model-kwargs") from None
    _check_built(model, spec, num_classes, in_channels)
    return model


def _check_built(model, spec: ModelSpec, num_classes: int | None, in_channels: int | None) -> None:
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec.name} returned a {type(model).__name__}, not a torch.nn.Module")
    for what, asked, got in (("classes", num_classes, infer_num_classes(model)),
                             ("input channels", in_channels, infer_in_channels(model))):
        if asked is not None and got is not None and asked != got:
            arg = "num_classes" if what == "classes" else "in_channels"
            how = "" if arg in spec.takes else f" (its factory takes no {arg} argument)"
            raise UsageError(f"{spec.name} builds a model with {got} {what}, not the {asked} asked for{how}; "
                             f"pick a matching --data or --{arg.replace('_', '-')}")


def infer_num_classes(model) -> int | None:
    """Outputs of the last Linear layer (the classifier of most networks); None when there is none. A
    detector that says its classes (torchvision's, wrapped) is taken at its word."""
    import torch.nn as nn

    if hasattr(model, "detection_loss") and isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes  # a detector: its classes, not its box regressors' outputs

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def infer_in_channels(model) -> int | None:
    """Input channels of the first convolution; None when the model has none (or what a wrapped
    torchvision detector says: it repeats a grey channel to the RGB its backbone takes)."""
    import torch.nn as nn

    if getattr(model, "returns_detections", False) and hasattr(model, "in_channels"):
        return model.in_channels

    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


# --------------------------------------------------------------------------------------------------
# User code: path/to/file.py:factory or package.module:factory

_IDENT = r"[A-Za-z_]\w*"
_ENTRY = re.compile(rf"^(?P<target>.+\.py|{_IDENT}(?:\.{_IDENT})*):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$")


def is_user_code(ref: str) -> bool:
    """True for ``file.py:factory`` and ``package.module:factory`` (not for a registered namespace)."""
    m = _ENTRY.match(ref or "")
    return bool(m) and m.group("target") not in NAMESPACES


def _user_code_spec(ref: str) -> ModelSpec:
    m = _ENTRY.match(ref)
    target, attr = m.group("target"), m.group("attr")
    module, code_file = _import_user_module(ref, target)
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"user code {ref}: {target} has no attribute {part!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"user code {ref}: {attr} is a {type(factory).__name__}, not a callable returning a model")
    takes = _accepted(factory)
    c, hw = _declared_size(factory)
    return ModelSpec(ref, _user_code_builder(ref, factory), (c, *hw), f"user code ({code_file or target})",
                     "user code", takes=takes, fills_defaults=False, code_file=code_file,
                     task=getattr(factory, "task", None))


def _import_user_module(ref: str, target: str):
    """Import ``target`` (a .py file or a module name); one-line errors when it cannot be imported."""
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"user code {ref}: {target} does not exist (paths are relative to the current "
                             "directory)")
        name = f"deploycomp_user_code_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            if str(path.parent) not in sys.path:  # so that the file can import its neighbours
                sys.path.insert(0, str(path.parent))
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise UsageError(f"user code {ref}: importing {target} failed: {_first_line(e)}") from None
        return sys.modules[name], str(path)
    try:
        module = importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise UsageError(f"user code {ref}: no module named {e.name!r} (install it or put it on PYTHONPATH; "
                         "a file is given as path/to/file.py:factory)") from None
    except Exception as e:
        raise UsageError(f"user code {ref}: importing {target} failed: {_first_line(e)}") from None
    return module, getattr(module, "__file__", None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _accepted(factory) -> tuple[str, ...]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: pass nothing we were not asked to
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return IO_ARGS
    return tuple(a for a in IO_ARGS if a in params)


def _declared_size(factory) -> tuple[int, tuple[int, int]]:
    """(C, (H, W)) from an ``input_size`` attribute of the factory ((C, H, W) or (H, W)); else 3 x 224 x 224."""
    size = getattr(factory, "input_size", None)
    if isinstance(size, (tuple, list)) and len(size) in (2, 3) and all(isinstance(v, int) for v in size):
        return (size[0] if len(size) == 3 else 3), tuple(size[-2:])
    return 3, DEFAULT_SIZE


def _user_code_builder(ref: str, factory):
    def build(weights: str | None = None, **kwargs):
        if weights is not None:
            raise UsageError(f"--weights {weights!r}: user code {ref} has no named weights; give a weights file "
                             "(--weights FILE.pth)")
        try:
            return factory(**kwargs)
        except TypeError as e:
            raise UsageError(f"user code {ref} cannot be called with {kwargs}: {_first_line(e)}; "
                             "check --model-kwargs") from None
        except DeploycompError:
            raise
        except Exception as e:
            raise UsageError(f"user code {ref} failed: {_first_line(e)}") from None

    return build


# --------------------------------------------------------------------------------------------------
# timm (optional): timm:NAME


def _import_timm():
    try:
        import timm
    except ImportError:
        raise MissingDependencyError('timm models need timm: pip install "deploycomp[timm]"') from None
    return timm


@register_namespace("timm")
def _timm_spec(name: str) -> ModelSpec:
    timm = _import_timm()
    if not name or not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown timm model {name!r}{hint} List them with: python -c \"import timm; "
                         f"print(timm.list_models('*{name.split('.')[0][:8]}*'))\"")
    cfg = timm.models.get_pretrained_cfg(name)
    size = tuple(getattr(cfg, "input_size", None) or (3, *DEFAULT_SIZE))
    return ModelSpec(f"timm:{name}", _timm_builder(name), size, f"timm {timm.__version__} model", "timm",
                     num_classes=getattr(cfg, "num_classes", None) or 1000)


def _timm_builder(name: str):
    def build(num_classes: int, in_channels: int, weights: str | None = None, **kwargs):
        timm = _import_timm()
        check(weights in (None, "DEFAULT"), f"--weights {weights!r}: timm models take DEFAULT (timm's pretrained "
                                            "weights) or a weights file")
        try:
            return timm.create_model(name, pretrained=weights == "DEFAULT", num_classes=num_classes,
                                     in_chans=in_channels, **kwargs)
        except TypeError as e:
            raise UsageError(f"timm:{name} cannot be built with {kwargs}: {_first_line(e)}; "
                             "check --model-kwargs") from None
        except Exception as e:  # a pretrained download offline, mostly
            if weights is None:
                raise
            raise DeploycompError(f"could not get timm's pretrained weights for {name} ({_first_line(e)}); "
                                  "when offline, download them elsewhere and pass --weights FILE") from None

    return build


# --------------------------------------------------------------------------------------------------
# torchvision models


def _torchvision_builder(name: str, dense: bool = False):
    """``dense``: a segmentation model, built without its backbone's published weights unless ``weights``
    names some, without the auxiliary head, and wrapped so that it returns its ``out`` logits."""

    def build(num_classes: int, in_channels: int, weights: str | None = None, **kwargs):
        import torchvision.models as tvm

        if dense:
            kwargs.setdefault("weights_backbone", None)  # never a download behind the user's back
            kwargs.setdefault("aux_loss", False)
        if weights is None:
            model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        else:
            model = tvm.get_model(name, weights=_resolve_weights(name, weights), **kwargs)
            if not dense and num_classes != infer_num_classes(model):
                replace_classifier(model, num_classes)
            check(not dense or _dense_classes(model) == num_classes,
                  f"--weights {weights} of {name} predict {_dense_classes(model)} classes, not {num_classes}; "
                  "train from scratch or use data with those classes")
        if in_channels != 3:
            adapt_input_channels(model, in_channels)
        if dense:
            from deploycomp.tasks.nets import DenseOutput

            return DenseOutput(model)
        return model

    return build


def _dense_classes(model) -> int | None:
    import torch.nn as nn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


def _resolve_weights(name: str, weights: str):
    import torchvision.models as tvm

    enum = tvm.get_model_weights(name)
    key = weights.split(".")[-1]
    try:
        w = enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        valid = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise UsageError(f"unknown --weights {weights!r} for {name}; valid: {valid}") from None
    _ensure_weights_available(w)
    return w


def _ensure_weights_available(weights) -> None:
    """Fetch the weight file into torch's cache, failing fast (not hanging) when offline."""
    import os
    from urllib.parse import urlparse

    import torch.hub

    filename = os.path.basename(urlparse(weights.url).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.exists(cached):
        return
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as e:  # URLError, timeout, hash mismatch: all mean "not available here"
        raise DeploycompError(
            f"could not get weights {weights} ({type(e).__name__}: {e}); when offline, put {filename} "
            f"into {os.path.dirname(cached)} or train without --weights") from None
    finally:
        socket.setdefaulttimeout(old)


def _set_submodule(model, path: str, module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_classifier(model, num_classes: int) -> None:
    """Replace the last Linear layer (the classifier of torchvision models) by a fresh one."""
    import torch.nn as nn

    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    _set_submodule(model, name, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def adapt_input_channels(model, in_channels: int) -> None:
    """Make the first convolution take ``in_channels`` inputs (e.g. 1 for grayscale).

    Pretrained RGB filters are summed over their input channels and repeated, the usual way to
    keep a pretrained stem useful on grayscale images.
    """
    import torch
    import torch.nn as nn

    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        mean = conv.weight.sum(dim=1, keepdim=True) / in_channels
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_submodule(model, name, new)


# --------------------------------------------------------------------------------------------------
# Built-ins


def _resnet(block_name: str, layers: list[int], widths: tuple[int, int, int, int], stem: str,
            num_classes: int, in_channels: int):
    """A torchvision ResNet with configurable widths and a stem for small or large images.

    Blocks are torchvision's own ``BasicBlock``/``Bottleneck``, so everything that understands
    torchvision ResNets (torch-pruning, zennit canonizers, stochastic depth, block dropping) works.
    """
    import torch.nn as nn
    from torchvision.models import resnet as tvr

    check(stem in STEMS, f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")
    block = {"basic": tvr.BasicBlock, "bottleneck": tvr.Bottleneck}[block_name]
    model = tvr.ResNet(block, layers, num_classes=num_classes)
    # Rebuild the body with the requested widths (torchvision hard-codes 64..512).
    model.inplanes = widths[0]
    model.conv1, model.maxpool = STEMS[stem](in_channels, widths[0])
    model.bn1 = nn.BatchNorm2d(widths[0])
    model.layer1 = model._make_layer(block, widths[0], layers[0])
    model.layer2 = model._make_layer(block, widths[1], layers[1], stride=2)
    model.layer3 = model._make_layer(block, widths[2], layers[2], stride=2)
    model.layer4 = model._make_layer(block, widths[3], layers[3], stride=2)
    model.fc = nn.Linear(widths[3] * block.expansion, num_classes)
    for m in model.modules():  # the same initialisation torchvision uses
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _stem_imagenet(cin, cout):
    import torch.nn as nn

    return nn.Conv2d(cin, cout, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)


def _stem_small(cin, cout):
    import torch.nn as nn

    return nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.Identity()


def _stem_small_pool(cin, cout):
    import torch.nn as nn

    return nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.MaxPool2d(3, 2, 1)


# imagenet: 7x7/2 conv + max-pool (224 px); small: 3x3/1 conv, no pool (28-32 px, CIFAR-style);
# small-pool: 3x3/1 conv + max-pool (28-32 px at a quarter of the cost; the KD report's layout).
STEMS = {"imagenet": _stem_imagenet, "small": _stem_small, "small-pool": _stem_small_pool}


@register_model("light_resnet18", input_size=(3, 32, 32), stem="small-pool",
                description="ResNet-18 at half width (32/64/128/256), ~2.8 M params; the KD report's light student")
def light_resnet18(num_classes, in_channels, weights=None, stem="small-pool"):
    return _resnet("basic", [2, 2, 2, 2], (32, 64, 128, 256), stem, num_classes, in_channels)


def _register_small_resnet(name: str, block: str, layers: list[int]):
    @register_model(name, input_size=(3, 32, 32), stem="small",
                    description=f"torchvision {name[:-6]} with a 3x3 stem and no max-pool, for 28-32 px images")
    def build(num_classes, in_channels, weights=None, stem="small"):
        return _resnet(block, layers, (64, 128, 256, 512), stem, num_classes, in_channels)


_register_small_resnet("resnet18_small", "basic", [2, 2, 2, 2])
_register_small_resnet("resnet34_small", "basic", [3, 4, 6, 3])
_register_small_resnet("resnet50_small", "bottleneck", [3, 4, 6, 3])

# Network-slimming / relevance-pruning VGG-16 for 32 px inputs: 13 conv+BN+ReLU, no big FC stack.
VGG16_CIFAR_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


@register_model("vgg16_bn_cifar", input_size=(3, 32, 32),
                description="VGG-16 with BatchNorm for 32 px (network slimming / relevance pruning studies)")
def vgg16_bn_cifar(num_classes, in_channels, weights=None):
    import torch.nn as nn

    layers: list[nn.Module] = []
    cin = in_channels
    for v in VGG16_CIFAR_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*layers))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("classifier", nn.Linear(cin, num_classes))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)  # network slimming starts gamma at 0.5
            nn.init.zeros_(m.bias)
    return model


@register_model("light_unet", input_size=(1, 64, 64), task="segmentation",
                description="a small UNet (16/32/64 at half resolution, 0.12 M params, 31 MMACs at 64 px); "
                            "the shipped segmenter")
def light_unet(num_classes, in_channels, weights=None):
    from deploycomp.tasks.nets import LightUNet

    return LightUNet(num_classes, in_channels, (16, 32, 64))


@register_model("light_det", input_size=(1, 64, 64), task="detection",
                description="a small single-stage anchor-free detector (stride 8/16 FPN, decoupled head, 0.41 M "
                            "params, 21 MMACs at 64 px); the shipped detector")
def light_det(num_classes, in_channels, weights=None):
    from deploycomp.tasks.nets import LightDet

    return LightDet(num_classes, in_channels)
