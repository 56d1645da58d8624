"""Model registry: deploycomp's built-ins plus every torchvision classification model, by name.

Built-ins are registered with :func:`register_model`; torchvision's classification models are added to
the same registry the first time it is read, so ``get_model("resnet50")`` and
``get_model("light_resnet18")`` go through one path.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deploycomp.errors import DeploycompError, UsageError, check
from deploycomp.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., Any]  # (num_classes, in_channels, **kwargs) -> nn.Module
    input_size: tuple[int, int, int]  # (C, H, W) the architecture is designed for
    description: str = ""
    source: str = "deploycomp"  # "deploycomp" or "torchvision"
    defaults: dict[str, Any] = field(default_factory=dict)


MODELS: Registry[ModelSpec] = Registry("model", hint="See `deploycomp info --list-models`.")
# Far beyond any classification set (ImageNet-21k: 21,841 classes) or image (hyperspectral: hundreds of
# bands); refusing more keeps a typo from allocating terabytes for one layer.
MAX_CLASSES, MAX_IN_CHANNELS = 1_000_000, 10_000
_torchvision_added = False


def register_model(name: str, *, input_size: tuple[int, int, int], description: str = "", **defaults):
    """Decorator registering a builder ``fn(num_classes, in_channels, **kwargs) -> nn.Module``."""

    def wrap(fn):
        MODELS.register(name, ModelSpec(name, fn, input_size, description, "deploycomp", defaults))
        return fn

    return wrap


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
                                            "torchvision classification model", "torchvision"))


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        _add_torchvision_models()
    return MODELS.get(name)


def list_models(include_torchvision: bool = True) -> list[str]:
    if include_torchvision:
        _add_torchvision_models()
    return [n for n in MODELS.names() if include_torchvision or MODELS.get(n).source == "deploycomp"]


def build_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                weights: str | None = None, **kwargs):
    """Build model ``name`` with ``num_classes`` outputs for ``in_channels``-channel input.

    ``weights`` names torchvision weights (``"DEFAULT"``, ``"IMAGENET1K_V2"`` or
    ``"ResNet50_Weights.IMAGENET1K_V2"``); they are only read from torch's cache or downloaded when
    online, and the error says where to put the file when neither works.
    """
    spec = get_spec(name)
    if num_classes is None:
        num_classes = 1000 if spec.source == "torchvision" else 10
    in_channels = spec.input_size[0] if in_channels is None else in_channels
    check(1 <= num_classes <= MAX_CLASSES, f"--num-classes must be in 1..{MAX_CLASSES:,}, got {num_classes}")
    check(1 <= in_channels <= MAX_IN_CHANNELS, f"--in-channels must be in 1..{MAX_IN_CHANNELS:,}, got {in_channels}")
    if weights is not None and spec.source != "torchvision":
        raise UsageError(f"--weights applies to torchvision models only; {name!r} is a deploycomp built-in")
    model = spec.builder(num_classes=num_classes, in_channels=in_channels, weights=weights,
                         **{**spec.defaults, **kwargs})
    return model


# --------------------------------------------------------------------------------------------------
# torchvision models


def _torchvision_builder(name: str):
    def build(num_classes: int, in_channels: int, weights: str | None = None, **kwargs):
        import torchvision.models as tvm

        if weights is None:
            model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        else:
            model = tvm.get_model(name, weights=_resolve_weights(name, weights), **kwargs)
            if num_classes != _output_features(model):
                replace_classifier(model, num_classes)
        if in_channels != 3:
            adapt_input_channels(model, in_channels)
        return model

    return build


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


def _output_features(model) -> int:
    import torch.nn as nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else -1


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
