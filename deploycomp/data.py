"""Dataset registry: fashion-mnist, cifar10, imagefolder, synthetic; loaders and calibration subsets.

Every dataset comes with a :class:`DatasetInfo` (classes, input shape, normalisation, whether it is
synthetic). Results computed on synthetic data are labelled as such wherever they are reported.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp.errors import InputFileError, UsageError, check, first_line
from deploycomp.registry import Registry

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of the tensors the dataset yields
    mean: tuple[float, ...]  # normalisation applied to the inputs (per channel)
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    synthetic: bool = False  # True: accuracy on it means nothing

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "mean": list(self.mean), "std": list(self.std), "class_names": list(self.class_names),
                "synthetic": self.synthetic}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[..., Any]  # (split, data_dir, augment, input_size) -> (Dataset, DatasetInfo)
    description: str


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str, description: str):
    def wrap(fn):
        DATASETS.register(name, DatasetSpec(name, fn, description))
        return fn

    return wrap


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 augment: bool = False, input_size: tuple[int, int] | None = None):
    """Return ``(dataset, info)`` for ``split`` in {"train", "test"} of dataset ``name``.

    ``input_size`` (H, W) resizes images, e.g. to feed 28 px Fashion-MNIST to a 224 px model.
    """
    check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    dataset, info = DATASETS.get(name).loader(split=split, data_dir=data_dir, augment=augment)
    if input_size is not None and tuple(input_size) != info.input_shape[1:]:
        dataset = _Resized(dataset, tuple(input_size))
        info.input_shape = (info.input_shape[0], *input_size)
    return dataset, info


def dataset_info(name: str, data_dir: str | os.PathLike | None = None):
    """The :class:`DatasetInfo` of dataset ``name`` (loads its test split)."""
    return load_dataset(name, "test", data_dir)[1]


class _TensorImages:
    """Images held as one uint8 tensor (N, C, H, W), normalised on access, with optional augmentation."""

    def __init__(self, images, labels, mean, std, augment: bool, pad: int = 2):
        import torch

        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment, self.pad = augment, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        import torch

        x = self.images[i].float().div_(255)
        if self.augment:  # random crop with zero padding + horizontal flip (standard for 28-32 px sets)
            c, h, w = x.shape
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = padded[:, dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


class _Resized:
    def __init__(self, dataset, size: tuple[int, int]):
        self.dataset, self.size = dataset, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        import torch.nn.functional as F

        x, y = self.dataset[i]
        return F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False)[0], y


def _read_idx(path: Path, ndim: int | None = None):
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST.

    ``ndim``: the number of dimensions the file must have (3 for images, 1 for labels).
    """
    import zlib

    import numpy as np
    import torch

    from deploycomp.files import require_file

    require_file(path, "dataset file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise InputFileError(f"cannot read {path}: it is truncated or damaged ({first_line(e, 120)}); "
                             "download it again") from None
    check(len(data) > 0, f"{path} is empty once decompressed; download it again", InputFileError)
    magic = int.from_bytes(data[:4], "big")
    dims = magic & 0xFF
    check(len(data) >= 4 and magic >> 8 == 0x08, f"{path} is not an unsigned-byte IDX file (garbled header); "
          "download it again", InputFileError)
    check(ndim is None or dims == ndim, f"{path} has a garbled IDX header: {dims} dimensions where {ndim} are "
          "expected; download it again", InputFileError)
    check(len(data) >= 4 + 4 * dims, f"{path} is truncated inside its IDX header; download it again", InputFileError)
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    expected = int(np.prod(shape, dtype=object))
    check(array.size == expected, f"{path} holds {array.size:,} bytes of data but its header {shape} promises "
          f"{expected:,}: it is truncated or its header is garbled; download it again", InputFileError)
    return torch.from_numpy(array.reshape(shape).copy())


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem, directory / "raw" / f"{stem}.gz",
                      directory / "FashionMNIST" / "raw" / stem, directory / "FashionMNIST" / "raw" / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


@register_dataset("fashion-mnist", "Fashion-MNIST, 28x28 grayscale, 10 classes (Debian: dataset-fashion-mnist)")
def _fashion_mnist(split: str, data_dir=None, augment: bool = False):
    prefix = "train" if split == "train" else "t10k"
    dirs = [Path(data_dir)] if data_dir else [Path(os.environ.get("DEPLOYCOMP_FASHION_MNIST", FASHION_MNIST_DIRS[0]))]
    for d in dirs:
        images, labels = _find_idx(d, f"{prefix}-images-idx3-ubyte"), _find_idx(d, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            break
    else:
        raise InputFileError(
            f"Fashion-MNIST files not found in {', '.join(map(str, dirs))}; install them with "
            "`apt-get install dataset-fashion-mnist` or pass --data-dir DIR with the IDX files")
    x = _read_idx(images, ndim=3).unsqueeze(1)
    y = _read_idx(labels, ndim=1)
    check(len(x) == len(y), f"{images} holds {len(x):,} images but {labels} holds {len(y):,} labels; the two files "
          "do not belong together (download both again)", InputFileError)
    check(len(x) > 0, f"{images} holds no images", InputFileError)
    check(int(y.max()) < 10, f"{labels} has labels up to {int(y.max())} but Fashion-MNIST has 10 classes (0-9); "
          "it is damaged", InputFileError)
    info = DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), FASHION_MNIST_CLASSES)
    return _TensorImages(x, y, info.mean, info.std, augment and split == "train"), info


@register_dataset("cifar10", "CIFAR-10 in torchvision's layout (cifar-10-batches-py) under --data-dir")
def _cifar10(split: str, data_dir=None, augment: bool = False):
    import torch
    import torchvision

    check(data_dir is not None, "cifar10 needs --data-dir DIR containing cifar-10-batches-py")
    try:
        ds = torchvision.datasets.CIFAR10(str(data_dir), train=split == "train", download=False)
    except RuntimeError:
        raise InputFileError(f"CIFAR-10 not found in {data_dir} (expected {data_dir}/cifar-10-batches-py); "
                             "download it on a machine with internet and copy it there") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(ds.targets)
    info = DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                       CIFAR10_CLASSES)
    return _TensorImages(x, y, info.mean, info.std, augment and split == "train", pad=4), info


@register_dataset("imagefolder", "images in DIR/train/<class>/ and DIR/val/<class>/ (resized to 224 px)")
def _imagefolder(split: str, data_dir=None, augment: bool = False, size: int = 224):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    check(data_dir is not None, "imagefolder needs --data-dir DIR with train/ and val/ subfolders")
    sub = Path(data_dir) / ("train" if split == "train" else "val")
    check(sub.is_dir(), f"{sub} is not a directory; imagefolder expects DIR/train and DIR/val", InputFileError)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment and split == "train" else \
        [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    try:
        ds = ImageFolder(str(sub), T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)]), loader=_load_image)
    except FileNotFoundError as e:  # no class folders, or no image in them
        raise InputFileError(f"{sub} holds no images: {e} Put them in {sub}/<class>/*.jpg") from None
    info = DatasetInfo("imagefolder", len(ds.classes), (3, size, size), mean, std, list(ds.classes))
    return ds, info


def _load_image(path: str):
    """torchvision's PIL loader, with one line naming the file when it is not a readable image."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise InputFileError(f"{path} is not a readable image ({type(e).__name__}); remove or replace it") \
            from None


SYNTHETIC_SIZES = {"train": 512, "test": 256}


@register_dataset("synthetic", "seeded random tensors (3x32x32, 10 classes); accuracy on it means nothing")
def _synthetic(split: str, data_dir=None, augment: bool = False, shape=(3, 32, 32), classes: int = 10):
    import torch

    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = SYNTHETIC_SIZES[split]
    y = torch.randint(0, classes, (n,), generator=g)
    # Class-dependent mean so that training can at least move; the numbers still mean nothing.
    x = (torch.rand(n, *shape, generator=g) * 200 + y.view(-1, 1, 1, 1) * 5).to(torch.uint8)
    info = DatasetInfo("synthetic", classes, tuple(shape), (0.5,) * shape[0], (0.25,) * shape[0],
                       [f"class{i}" for i in range(classes)], synthetic=True)
    return _TensorImages(x, y, info.mean, info.std, False), info


# --------------------------------------------------------------------------------------------------
# Loaders and subsets


def subset(dataset, n: int | None, seed: int = 0):
    """A deterministic random subset of ``n`` samples (all of them when ``n`` is None)."""
    import torch

    if n is None or n >= len(dataset):
        return dataset
    check(n > 0, f"subset size must be positive, got {n}")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(dataset, idx.tolist())


def make_loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0, workers: int = 0,
                drop_last: bool = False):
    import torch

    check(batch_size > 0, f"batch size must be positive, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       num_workers=workers, drop_last=drop_last,
                                       persistent_workers=workers > 0)


def calibration_batches(dataset, samples: int, batch_size: int, seed: int = 0):
    """``samples`` inputs drawn deterministically from ``dataset``, as a list of (x, y) batches.

    The data-driven pruning criteria and INT8 calibration use this, so two runs with the same seed
    see the very same images in the very same order.
    """
    import torch

    check(samples > 0, f"--calib-samples must be positive, got {samples}")
    check(batch_size > 0, f"--calib-batch must be positive, got {batch_size}")
    if samples > len(dataset):
        raise UsageError(f"--calib-samples {samples} exceeds the {len(dataset)} samples of the dataset; "
                         f"use at most {len(dataset)}")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    batches = []
    for start in range(0, samples, batch_size):
        items = [dataset[i] for i in idx[start:start + batch_size]]
        batches.append((torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])))
    return batches
