"""Dataset registry: fashion-mnist, cifar10, imagefolder, synthetic; loaders and calibration subsets.

Every dataset comes with a :class:`DatasetInfo` (classes, input shape, normalisation, whether it is
synthetic). Results computed on synthetic data are labelled as such wherever they are reported.
"""

from __future__ import annotations

import functools
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
    task: str = "classification"  # a name in deploycomp.tasks.TASKS: what a target is (a label, a mask, boxes)
    ignore_index: int | None = None  # segmentation: the mask value that is not scored (VOC: 255)

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "mean": list(self.mean), "std": list(self.std), "class_names": list(self.class_names),
                "synthetic": self.synthetic, "task": self.task, "ignore_index": self.ignore_index}


@dataclass(frozen=True)
class ModelInputs:
    """What a model takes, for datasets that adapt to it (all fields optional).

    ``synthetic`` takes everything from it; ``imagefolder`` converts images to ``channels`` and
    normalises with the model's ``mean``/``std`` (those of the data it was trained on).
    """

    channels: int | None = None
    size: tuple[int, int] | None = None  # (H, W)
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[..., Any]  # (split, data_dir, augment, input_size, fit) -> (Dataset, DatasetInfo)
    description: str
    follows_model: bool = False  # True: classes, channels and size come from the model (``fit``), not from files


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str, description: str, follows_model: bool = False):
    """Decorator registering ``loader(split, data_dir, augment, input_size, fit) -> (dataset, DatasetInfo)``.

    A loader may ignore ``input_size`` (the images are then resized for it) and ``fit``.
    """

    def wrap(fn):
        DATASETS.register(name, DatasetSpec(name, fn, description, follows_model))
        return fn

    return wrap


def list_datasets() -> list[str]:
    return DATASETS.names()


def get_dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(name)


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 augment: bool = False, input_size: tuple[int, int] | None = None,
                 fit: ModelInputs | None = None):
    """Return ``(dataset, info)`` for ``split`` in {"train", "test"} of dataset ``name``.

    ``input_size`` (H, W) resizes images, e.g. to feed 28 px Fashion-MNIST to a 224 px model. ``fit``
    describes the model, for the datasets that adapt to it (synthetic, imagefolder).
    """
    check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    size = tuple(input_size) if input_size is not None else None
    dataset, info = DATASETS.get(name).loader(split=split, data_dir=data_dir, augment=augment, input_size=size,
                                              fit=fit or ModelInputs())
    if size is not None and size != info.input_shape[1:]:
        dataset = _Resized(dataset, size)
        info.input_shape = (info.input_shape[0], *size)
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
        old = tuple(x.shape[-2:])
        x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False)[0]
        if getattr(y, "ndim", 0) == 2 and y.shape[-1] == 5 and y.is_floating_point():  # detection: boxes scale
            from deploycomp.tasks.coco import resize_targets

            y = resize_targets(y, old, self.size)
        elif getattr(y, "ndim", 0) == 2:  # a segmentation mask: resized with its image, nearest class per pixel
            y = F.interpolate(y[None, None].float(), size=self.size, mode="nearest")[0, 0].to(y.dtype)
        return x, y


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
def _fashion_mnist(split: str, data_dir=None, augment: bool = False, **_):
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
def _cifar10(split: str, data_dir=None, augment: bool = False, **_):
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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)  # ImageNet's statistics averaged over the channels
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
EVAL_CROP = 0.875  # evaluation: resize to size / 0.875, centre-crop size (ImageNet's 256 -> 224)


@register_dataset("imagefolder", "images in DIR/train/<class>/ and DIR/val/<class>/ (224 px unless --input-size; "
                                 "grayscale trees give 1 channel)")
def _imagefolder(split: str, data_dir=None, augment: bool = False, input_size=None, fit: ModelInputs = ModelInputs()):
    """An image tree, converted to the model's channels and normalised with the model's statistics.

    Without a model to follow, the channels are those of the first image (1 for grayscale, else 3) and
    the statistics ImageNet's. Evaluation resizes to size / 0.875 and centre-crops, except that images
    already at the input size are used as they are; training uses a random resized crop and flip.
    """
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    check(data_dir is not None, "imagefolder needs --data-dir DIR with train/ and val/ subfolders")
    sub = Path(data_dir) / ("train" if split == "train" else "val")
    check(sub.is_dir(), f"{sub} is not a directory; imagefolder expects DIR/train and DIR/val", InputFileError)
    size = tuple(input_size or fit.size or (224, 224))
    channels = fit.channels or _tree_channels(sub)
    check(channels in (1, 3), f"imagefolder gives 1 (grayscale) or 3 (RGB) channels; the model takes {channels}")
    default_mean, default_std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    mean = tuple(fit.mean) if fit.mean and len(fit.mean) == channels else default_mean
    std = tuple(fit.std) if fit.std and len(fit.std) == channels else default_std
    ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment and split == "train" else \
        [_ResizeCrop(size)]
    mode = "L" if channels == 1 else "RGB"
    try:
        ds = ImageFolder(str(sub), T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)]),
                         loader=functools.partial(_open_image, mode=mode))
    except FileNotFoundError as e:  # no class folders, or no image in them
        raise InputFileError(f"{sub} holds no images: {e} Put them in {sub}/<class>/*.jpg") from None
    except OSError as e:
        raise InputFileError(f"{sub}: {e}") from None
    info = DatasetInfo("imagefolder", len(ds.classes), (channels, *size), mean, std, list(ds.classes))
    return ds, info


def _open_image(path: str, mode: str):
    """torchvision's PIL loader in ``mode``, with one line naming the file when it is not a readable image."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise InputFileError(f"{path} is not a readable image ({type(e).__name__}); remove or replace it") \
            from None


def _tree_channels(root: Path) -> int:
    """1 when the first image under ``root`` is grayscale, else 3."""
    from PIL import Image

    first = next((p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES), None)
    if first is None:
        return 3  # ImageFolder itself says that the tree has no images
    try:
        with Image.open(first) as im:
            return 1 if im.mode in GRAY_MODES else 3
    except (OSError, ValueError, SyntaxError) as e:  # the same one line as the loader's
        raise InputFileError(f"{first} is not a readable image ({type(e).__name__}); remove or replace it") \
            from None


class _ResizeCrop:
    """Resize to size / EVAL_CROP and centre-crop ``size``; an image already at ``size`` passes unchanged."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image):
        import torchvision.transforms.functional as F

        if (image.height, image.width) == self.size:
            return image
        image = F.resize(image, int(max(self.size) / EVAL_CROP))
        return F.center_crop(image, list(self.size))


@register_dataset("fashion-scenes", "segmentation: 64x64 scenes of 1-3 Fashion-MNIST garments, 11 classes "
                                    "(background + 10), generated deterministically (docs/segmentation-data.md)")
def _fashion_scenes(split: str, data_dir=None, augment: bool = False, **_):
    from deploycomp.tasks.scenes import load_scenes

    return load_scenes(split, data_dir, augment)


@register_dataset("voc", "segmentation: your images and PNG masks in Pascal VOC's layout under --data-dir "
                         "(255 = not scored; 256 px unless --input-size)")
def _voc(split: str, data_dir=None, augment: bool = False, input_size=None, **_):
    from deploycomp.tasks.voc import load_voc

    return load_voc(split, data_dir, augment, input_size)


SYNTHETIC_SIZES = {"train": 512, "test": 256}
SYNTHETIC_SHAPE, SYNTHETIC_CLASSES = (3, 32, 32), 10  # when there is no model to follow


@register_dataset("fashion-scenes-det", "detection: the fashion-scenes (64x64, 1-3 Fashion-MNIST garments) with "
                                        "their boxes; 10 classes, at most 3 boxes an image (written once as COCO "
                                        "in the cache, then read like --data coco)")
def _fashion_scenes_det(split: str, data_dir=None, augment: bool = False, input_size=None, **_):
    from deploycomp.tasks.coco import load_scenes_det

    return load_scenes_det(split, data_dir, augment, input_size)


@register_dataset("coco", "detection: your images and COCO instances JSON under --data-dir "
                          "(DIR/annotations/instances_{train,val}.json, images in DIR/train/ and DIR/val/)")
def _coco(split: str, data_dir=None, augment: bool = False, input_size=None, fit: ModelInputs = ModelInputs()):
    from deploycomp.tasks.coco import load_coco

    return load_coco(split, data_dir, augment, input_size, fit)


@register_dataset("synthetic", "seeded random tensors in the model's shape and classes (3x32x32, 10 classes "
                               "without a model); accuracy on it means nothing", follows_model=True)
def _synthetic(split: str, data_dir=None, augment: bool = False, input_size=None, fit: ModelInputs = ModelInputs()):
    channels = fit.channels or SYNTHETIC_SHAPE[0]
    shape = (channels, *(input_size or fit.size or SYNTHETIC_SHAPE[1:]))
    classes = fit.num_classes or SYNTHETIC_CLASSES
    check(classes >= 1, f"synthetic data needs at least one class, got {classes}")
    info = DatasetInfo("synthetic", classes, shape, (0.5,) * channels, (0.25,) * channels,
                       [f"class{i}" for i in range(classes)], synthetic=True)
    return _SyntheticImages(SYNTHETIC_SIZES[split], shape, classes, 0 if split == "train" else 1), info


class _SyntheticImages:
    """Seeded random images made on access (any size costs no memory up front), normalised like uint8 images.

    The label shifts the mean a little, so that training can at least move; the numbers still mean nothing.
    """

    def __init__(self, n: int, shape: tuple[int, ...], classes: int, seed: int):
        self.n, self.shape, self.classes, self.seed = n, shape, classes, seed
        self.step = min(5.0, 55.0 / max(classes - 1, 1))  # the class offset stays within uint8's range

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        import torch

        if not -self.n <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i % self.n)
        y = torch.randint(0, self.classes, (), generator=g)
        x = (torch.rand(self.shape, generator=g) * 200 + float(y) * self.step).floor_().div_(255)
        return (x - 0.5) / 0.25, y


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
