"""Every built-in model and a sample of torchvision ones: builds, forward shape, reported numbers."""

from __future__ import annotations

import pytest
import torch

from deploycomp.errors import UnknownNameError, UsageError
from deploycomp.metrics import count_macs, count_params, layer_channels
from deploycomp.zoo import MODELS, build_model, get_spec, list_models

BUILTINS = [n for n in list_models(include_torchvision=False) if get_spec(n).task == "classification"]
SEGMENTERS = [n for n in list_models(include_torchvision=False) if get_spec(n).task == "segmentation"]
TORCHVISION_SEGMENTATION = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
TORCHVISION_SAMPLE = ["resnet18", "mobilenet_v2", "vgg11_bn", "efficientnet_b0", "regnet_x_400mf"]


def test_builtins_registered():
    assert set(BUILTINS) >= {"light_resnet18", "resnet18_small", "resnet34_small", "resnet50_small",
                             "vgg16_bn_cifar"}


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_builtin_conformance(name, in_channels):
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    layers = layer_channels(model)
    assert layers[0]["in"] == in_channels and layers[-1]["out"] == 7
    assert count_macs(model, x[:1]) > 0


@pytest.mark.parametrize("name", SEGMENTERS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_builtin_segmenter_conformance(name, in_channels):
    """(N, classes, H, W) logits at the input's size, the classes in the last layer."""
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, 32, 48)
    with torch.no_grad():
        assert model(x).shape == (2, 7, 32, 48)
    layers = layer_channels(model)
    assert layers[0]["in"] == in_channels and layers[-1]["out"] == 7


@pytest.mark.parametrize("name", TORCHVISION_SEGMENTATION)
def test_torchvision_segmentation_returns_a_tensor(name):
    """torchvision's dict output becomes its 'out' logits; no auxiliary head; no backbone download."""
    model = build_model(name, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 64, 64)
    assert get_spec(name).task == "segmentation" and getattr(model.model, "aux_classifier", None) is None


def test_segmentation_models_listed_by_task():
    assert set(TORCHVISION_SEGMENTATION) <= set(list_models())
    assert get_spec("resnet18").task == "classification" and get_spec("light_unet").task == "segmentation"


@pytest.mark.parametrize("name", TORCHVISION_SAMPLE)
def test_torchvision_conformance(name):
    model = build_model(name, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    assert get_spec(name).source == "torchvision"


def test_light_resnet18_is_half_width_resnet18():
    model = build_model("light_resnet18", num_classes=10, in_channels=3)
    assert count_params(model)["params_total"] == 2_797_610  # ~2.8 M as in the KD report
    convs = [r["out"] for r in layer_channels(model) if r["type"] == "Conv2d"]
    assert sorted(set(convs)) == [32, 64, 128, 256]


def test_resnet50_numbers_match_torchvision():
    model = build_model("resnet50")
    assert count_params(model)["params_total"] == 25_557_032
    assert count_macs(model, torch.zeros(1, 3, 224, 224)) == pytest.approx(4.12e9, rel=0.01)


def test_grayscale_stem_keeps_pretrained_response():
    """A grayscale image repeated on RGB gives the same stem output as the adapted 1-channel stem."""
    from deploycomp.zoo import adapt_input_channels

    rgb = build_model("resnet18").eval()
    gray = build_model("resnet18").eval()
    gray.load_state_dict(rgb.state_dict())
    adapt_input_channels(gray, 1)
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(rgb.conv1(x.repeat(1, 3, 1, 1)), gray.conv1(x), atol=1e-5)


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("light_resnet18", object())


def test_unknown_names():
    with pytest.raises(UnknownNameError) as e:
        build_model("light_resnet81")
    assert e.value.closest == "light_resnet18"
    with pytest.raises(UsageError, match="valid: DEFAULT, IMAGENET1K_V1"):
        build_model("resnet18", weights="NOPE")
    with pytest.raises(UsageError, match="without published weights"):
        build_model("light_resnet18", weights="DEFAULT")
