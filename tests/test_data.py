"""Datasets: real Fashion-MNIST files, synthetic data labelled as such, deterministic calibration subsets."""

from __future__ import annotations

import pytest
import torch

from deploycomp.data import calibration_batches, list_datasets, load_dataset, subset
from deploycomp.errors import InputFileError, UsageError
from tests.conftest import needs_fmnist


def test_registry():
    assert list_datasets() == ["cifar10", "fashion-mnist", "imagefolder", "synthetic"]


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
