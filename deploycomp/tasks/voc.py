"""voc: your own segmentation data in Pascal VOC's directory layout.

    DIR/JPEGImages/<id>.jpg (or .png)          the images (any mode; converted to RGB)
    DIR/SegmentationClass/<id>.png             the masks: one class id per pixel (palette or grayscale PNG);
                                               255 = not scored (object borders in VOC)
    DIR/ImageSets/Segmentation/train.txt       the ids of the training images, one per line
    DIR/ImageSets/Segmentation/val.txt         the ids of the test images (split "test")
    DIR/classes.txt                            optional: the class names, one per line, background first;
                                               without it, VOC's 21 names

Every image and mask of a split is read and checked when the dataset is built, before any work: a
missing or damaged file, a mask of another size than its image, or a class id above the declared count
is a one-line error naming the file. Images are resized to ``input_size`` (default 256 x 256, bilinear)
and masks with it (nearest), so that they batch; normalisation is ImageNet's.
"""

from __future__ import annotations

from pathlib import Path

from deploycomp.errors import InputFileError, UsageError, check

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
IGNORE_INDEX = 255
DEFAULT_SIZE = (256, 256)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLIT_FILES = {"train": "train.txt", "test": "val.txt"}


def class_names(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.exists():
        return list(VOC_CLASSES)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    check(len(names) >= 2, f"{path} names {len(names)} class(es); a segmentation set needs the background and at "
          "least one more, one name per line", InputFileError)
    return names


def split_ids(root: Path, split: str) -> list[str]:
    path = root / "ImageSets" / "Segmentation" / SPLIT_FILES[split]
    check(path.exists(), f"{path} not found: a VOC directory lists the ids of its {split} images there, one per "
          "line", InputFileError)
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    check(len(ids) > 0, f"{path} lists no image; write one image id per line", InputFileError)
    return ids


def _image_file(root: Path, image_id: str) -> Path:
    for suffix in (".jpg", ".jpeg", ".png"):
        p = root / "JPEGImages" / f"{image_id}{suffix}"
        if p.exists():
            return p
    raise InputFileError(f"image {image_id} listed in the split file is missing: no {root / 'JPEGImages' / image_id}"
                         ".jpg or .png")


def _open(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputFileError(f"{what} {path} cannot be read ({type(e).__name__}): it is damaged or not an image; "
                             "replace it or remove its id from the split file") from None


def read_pair(root: Path, image_id: str, size: tuple[int, int], num_classes: int):
    """One image (uint8 (3, H, W)) and its mask (uint8 (H, W)) at ``size``, checked."""
    import numpy as np
    import torch
    from PIL import Image

    image = _open(_image_file(root, image_id), "image")
    mask_path = root / "SegmentationClass" / f"{image_id}.png"
    check(mask_path.exists(), f"the mask of image {image_id} is missing: no {mask_path}; every listed image needs "
          "one", InputFileError)
    mask = _open(mask_path, "mask")
    check(mask.size == image.size, f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image is "
          f"{image.size[0]}x{image.size[1]}; a mask must have its image's size", InputFileError)
    if mask.mode not in ("P", "L"):
        raise InputFileError(f"mask {mask_path} is a {mask.mode} image; a mask holds one class id per pixel "
                             "(a palette or grayscale PNG)")
    m = np.asarray(mask)
    bad = m[(m != IGNORE_INDEX) & (m >= num_classes)]
    check(bad.size == 0, f"mask {mask_path} holds class id {int(bad.max()) if bad.size else 0} but there are "
          f"{num_classes} classes (0..{num_classes - 1}, {IGNORE_INDEX} ignored); list every class in "
          f"{root / 'classes.txt'}", InputFileError)
    w, h = size[1], size[0]
    rgb = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR))
    m = np.asarray(mask.resize((w, h), Image.NEAREST))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous(), torch.from_numpy(m.copy())


def load_voc(split: str, data_dir=None, augment: bool = False, input_size=None, **_):
    """The ``voc`` dataset: (SegmentationImages, DatasetInfo) of ``data_dir``'s split."""
    import torch

    from deploycomp import console
    from deploycomp.data import DatasetInfo
    from deploycomp.tasks.scenes import SegmentationImages

    if data_dir is None:
        raise UsageError("--data voc reads your own VOC-style directory: pass --data-dir DIR (DIR/JPEGImages, "
                         "DIR/SegmentationClass, DIR/ImageSets/Segmentation/{train,val}.txt)")
    root = Path(data_dir)
    check(root.is_dir(), f"--data-dir {root} is not a directory", InputFileError)
    names = class_names(root)
    size = tuple(input_size) if input_size else DEFAULT_SIZE
    ids = split_ids(root, split)
    images, masks = [], []
    with console.status_line(f"reading {len(ids)} {split} images and masks from {root}") as show:
        for k, image_id in enumerate(ids):
            show(f"{k + 1}/{len(ids)}")
            x, y = read_pair(root, image_id, size, len(names))
            images.append(x)
            masks.append(y)
    info = DatasetInfo("voc", len(names), (3, *size), IMAGENET_MEAN, IMAGENET_STD, names, task="segmentation",
                       ignore_index=IGNORE_INDEX)
    return SegmentationImages(torch.stack(images), torch.stack(masks), IMAGENET_MEAN, IMAGENET_STD, augment,
                              IGNORE_INDEX), info
