"""Datasets: real Fashion-MNIST files, synthetic data labelled as such, deterministic calibration subsets."""

from __future__ import annotations

import pytest
import torch

from deploycomp.data import calibration_batches, list_datasets, load_dataset, subset
from deploycomp.errors import InputFileError, UsageError
from tests.conftest import needs_fmnist


def test_registry():
    assert list_datasets() == ["cifar10", "coco", "fashion-mnist", "fashion-scenes", "fashion-scenes-det",
                               "imagefolder", "synthetic", "voc"]


@needs_fmnist
def test_fashion_mnist_real_files():
    train, info = load_dataset("fashion-mnist", "train")
    test, _ = load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10 and not info.synthetic
    x, y = test[0]
    assert x.shape == (1, 28, 28) and int(y) == 9  # the first test image is an ankle boot
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    xs = torch.stack([test[i][0] for i in range(2000)])
    assert abs(float(xs.mean())) < 0.1 and abs(float(xs.std()) - 1) < 0.1  # normalised


@needs_fmnist
def test_resize_for_large_models():
    test, info = load_dataset("fashion-mnist", "test", input_size=(64, 64))
    assert test[0][0].shape == (1, 64, 64) and info.input_shape == (1, 64, 64)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(InputFileError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_synthetic_is_labelled_and_seeded():
    a, info = load_dataset("synthetic", "train")
    b, _ = load_dataset("synthetic", "train")
    assert info.synthetic and info.as_dict()["synthetic"] is True
    assert torch.equal(a[3][0], b[3][0])


def test_calibration_batches_are_deterministic():
    ds, _ = load_dataset("synthetic", "train")
    first = calibration_batches(ds, 100, 32, seed=0)
    again = calibration_batches(ds, 100, 32, seed=0)
    assert [len(x) for x, _ in first] == [32, 32, 32, 4]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    other = calibration_batches(ds, 100, 32, seed=1)
    assert not torch.equal(first[0][0], other[0][0])
    with pytest.raises(UsageError, match="exceeds the 512 samples"):
        calibration_batches(ds, 513, 32)


def test_subset_is_deterministic():
    ds, _ = load_dataset("synthetic", "test")
    assert subset(ds, 10, seed=3).indices == subset(ds, 10, seed=3).indices
    assert subset(ds, None) is ds


def test_synthetic_takes_the_model_shape_and_classes():
    from deploycomp.data import ModelInputs

    test, info = load_dataset("synthetic", "test", fit=ModelInputs(channels=1, size=(20, 24), num_classes=1000))
    assert info.input_shape == (1, 20, 24) and info.num_classes == 1000 and len(info.class_names) == 1000
    x, y = test[255]
    assert x.shape == (1, 20, 24) and 0 <= int(y) < 1000
    again = load_dataset("synthetic", "test", fit=ModelInputs(channels=1, size=(20, 24), num_classes=1000))[0]
    assert torch.equal(again[255][0], x) and int(again[255][1]) == int(y)
    assert load_dataset("synthetic", "test", input_size=(8, 8))[1].input_shape == (3, 8, 8)  # no model: 3 channels


def test_inputs_follow_the_model_on_synthetic_data():
    from deploycomp.inputs import load_inputs

    ckpt, data = load_inputs("resnet18", data="synthetic", need_train=False, input_size=(40, 48))
    assert ckpt.num_classes == 1000 and data.info.num_classes == 1000  # torchvision's own head, not 10
    assert data.info.input_shape == (3, 40, 48) and data.test[0][0].shape == (3, 40, 48)
    ckpt, data = load_inputs("light_resnet18", data="synthetic", need_train=False, num_classes=4, in_channels=1)
    assert data.info.input_shape == (1, 32, 32) and data.info.num_classes == 4


def _write_tree(root, images, labels, mode: str, suffix: str, classes):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        im = Image.fromarray(img.numpy(), mode="L").convert(mode)
        for split in ("train", "val"):
            im.save(root / split / classes[int(label)] / f"{i:04d}{suffix}")


@needs_fmnist
def test_imagefolder_grayscale_png_tree_equals_the_idx_files(tmp_path):
    """Fashion-MNIST written as 28 px grayscale PNGs: imagefolder yields the very tensors of the IDX loader."""
    from deploycomp.data import FASHION_MNIST_CLASSES, ModelInputs

    idx, info = load_dataset("fashion-mnist", "test")
    n = 60
    classes = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]
    _write_tree(tmp_path, idx.images[:n, 0], idx.labels[:n], "L", ".png", classes)
    fit = ModelInputs(channels=1, size=(28, 28), mean=info.mean, std=info.std)
    tree, tinfo = load_dataset("imagefolder", "test", tmp_path, fit=fit)
    assert tinfo.input_shape == (1, 28, 28) and tinfo.num_classes == 10 and tinfo.class_names == sorted(classes)
    # ImageFolder orders by class then file name; map back through the file names.
    for k, (path, _) in enumerate(tree.samples[:20]):
        i = int(path.rsplit("/", 1)[1][:4])
        x, y = tree[k]
        assert torch.allclose(x, idx[i][0], atol=1e-6)
        assert tinfo.class_names[y] == classes[int(idx.labels[i])]
    # Without a model to follow: channels from the files (grayscale), ImageNet's statistics averaged.
    _, auto = load_dataset("imagefolder", "train", tmp_path, input_size=(32, 32))
    assert auto.input_shape == (1, 32, 32) and auto.mean == (0.449,)


@needs_fmnist
def test_imagefolder_rgb_jpeg_tree_through_the_cli(cli, tmp_path):
    """An RGB JPEG tree (resized to the model's 32 px) evaluates and exports a 3-channel model."""
    idx, _ = load_dataset("fashion-mnist", "test")
    classes = [f"c{i}" for i in range(10)]
    _write_tree(tmp_path / "tree", idx.images[:40, 0], idx.labels[:40], "RGB", ".jpg", classes)
    _, info = load_dataset("imagefolder", "test", tmp_path / "tree", input_size=(32, 32))
    assert info.input_shape == (3, 32, 32) and info.mean == (0.485, 0.456, 0.406)
    r = cli("eval", "-m", "light_resnet18", "-d", "imagefolder", "--data-dir", tmp_path / "tree", "--input-size", "32",
            "--json")
    import json

    assert json.loads(r.stdout)["samples"] == 40
    with pytest.raises(InputFileError, match="is not a directory"):
        load_dataset("imagefolder", "test", tmp_path / "nowhere")
