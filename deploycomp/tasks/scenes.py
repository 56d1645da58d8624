"""fashion-scenes: the embedded segmentation (and, next, detection) benchmark, made from real garments.

Every scene is a 64 x 64 grayscale canvas holding one to three Fashion-MNIST garments (real images),
each scaled and placed at random, later garments occluding earlier ones, on a faint textured background.
The mask gives every pixel its class: 0 for background, 1 + the Fashion-MNIST label for a garment's own
pixels (those brighter than ``GARMENT_THRESHOLD`` after scaling). The boxes are the tight boxes of each
garment's *visible* pixels, for the detection task.

It is a benchmark: generation is fixed by the constants and seeds below and is deterministic (the same
bytes on every machine; a test pins a checksum). Changing any of it changes every recorded number.

- train scenes: ``SCENES["train"]`` = 8,000, garments drawn from the Fashion-MNIST *train* split, seed 1
- test scenes: ``SCENES["test"]`` = 1,000, garments drawn from the *test* split, seed 2 (no garment image
  of the test scenes was ever seen in training)
- per scene: 1, 2 or 3 garments (equally likely); scale 0.75-1.5 (bilinear; 21-42 px); position uniform
  with the garment fully inside the canvas; a scene in which some garment keeps fewer than
  ``MIN_VISIBLE`` visible pixels is drawn again from the same generator
- background: a constant level 8-40 plus pixel noise of +-8 (uint8), so "background" is not all zeros
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

SCENE_SIZE = 64
SCENES = {"train": 8000, "test": 1000}
SEEDS = {"train": 1, "test": 2}
MAX_GARMENTS = 3
SCALE_RANGE = (0.75, 1.5)
GARMENT_THRESHOLD = 40  # a scaled garment pixel above this (of 255) belongs to the garment
MIN_VISIBLE = 40  # pixels a garment must keep visible after occlusion
BACKGROUND_LEVEL = (8, 40)
BACKGROUND_NOISE = 8
# Normalisation: mean and std of the 8,000 train scenes' pixels (scaled to [0, 1]), computed once.
MEAN, STD = (0.1948,), (0.2317,)


def scene_classes() -> list[str]:
    from deploycomp.data import FASHION_MNIST_CLASSES

    return ["background", *FASHION_MNIST_CLASSES]


@dataclass
class Scenes:
    images: Any  # uint8 (N, 1, H, W)
    masks: Any  # uint8 (N, H, W): 0 background, 1..10 garment classes
    boxes: list  # per scene: float32 (k, 4) xyxy in pixels (x2, y2 exclusive) of each visible garment
    labels: list  # per scene: int64 (k,) class ids 1..10, in the order the garments were placed


def make_scenes(split: str, n: int | None = None, size: int = SCENE_SIZE, seed: int | None = None,
                data_dir=None) -> Scenes:
    """Generate ``n`` scenes (default: the benchmark's count) from the garments of ``split``; deterministic."""
    from deploycomp.errors import check

    check(split in SCENES, f"split must be 'train' or 'test', got {split!r}")
    n = SCENES[split] if n is None else n
    seed = SEEDS[split] if seed is None else seed
    check(n > 0, f"the number of scenes must be positive, got {n}")
    check(size >= 48, f"scenes need at least 48 px to hold a scaled garment, got {size}")
    garments, labels = _garments(split, str(data_dir) if data_dir else None)
    return _generate(garments, labels, n, size, seed)


@functools.lru_cache(maxsize=4)
def _garments(split: str, data_dir: str | None):
    from deploycomp.data import _fashion_mnist

    ds, _ = _fashion_mnist(split, data_dir)
    return ds.images, ds.labels  # uint8 (N, 1, 28, 28), int64 (N,)


def _generate(garments, garment_labels, n: int, size: int, seed: int) -> Scenes:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 1, size, size, dtype=torch.uint8)
    masks = torch.empty(n, size, size, dtype=torch.uint8)
    all_boxes, all_labels = [], []
    for i in range(n):
        while True:  # redrawn (from the same generator) until every garment stays visible enough
            level = int(torch.randint(BACKGROUND_LEVEL[0], BACKGROUND_LEVEL[1] + 1, (), generator=g))
            noise = torch.randint(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, (size, size), generator=g)
            canvas = (noise + level).clamp(0, 255).double()
            instance = torch.zeros(size, size, dtype=torch.long)  # 0: background, k: the k-th garment
            k = int(torch.randint(1, MAX_GARMENTS + 1, (), generator=g))
            picks = torch.randint(0, len(garments), (k,), generator=g)
            for j, idx in enumerate(picks.tolist(), start=1):
                scale = SCALE_RANGE[0] + float(torch.rand((), generator=g)) * (SCALE_RANGE[1] - SCALE_RANGE[0])
                side = round(28 * scale)
                # float64, rounded to whole grey levels at once: the same bytes on every CPU
                img = F.interpolate(garments[idx][None].double(), size=(side, side), mode="bilinear",
                                    align_corners=False)[0, 0].round()
                y0 = int(torch.randint(0, size - side + 1, (), generator=g))
                x0 = int(torch.randint(0, size - side + 1, (), generator=g))
                on = img > GARMENT_THRESHOLD
                region = (slice(y0, y0 + side), slice(x0, x0 + side))
                canvas[region] = torch.where(on, img, canvas[region])
                instance[region] = torch.where(on, torch.tensor(j), instance[region])
            visible = torch.bincount(instance.flatten(), minlength=k + 1)[1:]
            if int(visible.min()) >= MIN_VISIBLE:
                break
        cls = torch.cat([torch.zeros(1, dtype=torch.long), garment_labels[picks] + 1])
        images[i, 0] = canvas.round().clamp(0, 255).to(torch.uint8)
        masks[i] = cls[instance].to(torch.uint8)
        boxes = []
        for j in range(1, k + 1):
            ys, xs = torch.nonzero(instance == j, as_tuple=True)
            boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32))
        all_labels.append(cls[1:].clone())
    return Scenes(images, masks, all_boxes, all_labels)


class SegmentationImages:
    """Images and masks held as uint8 tensors, normalised on access; ``augment``: a joint horizontal flip."""

    def __init__(self, images, masks, mean, std, augment: bool = False, ignore_index: int | None = None):
        import torch

        self.images, self.masks = images, masks
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment, self.ignore_index = augment, ignore_index

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i):
        import torch

        x = self.images[i].float().div_(255)
        y = self.masks[i].long()
        if self.augment and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return (x - self.mean) / self.std, y


@functools.lru_cache(maxsize=4)
def cached_scenes(split: str, data_dir: str | None) -> Scenes:
    return make_scenes(split, data_dir=data_dir)


def load_scenes(split: str, data_dir=None, augment: bool = False, **_):
    """The ``fashion-scenes`` dataset: (SegmentationImages, DatasetInfo)."""
    from deploycomp.data import DatasetInfo

    s = cached_scenes(split, str(data_dir) if data_dir else None)
    info = DatasetInfo("fashion-scenes", len(scene_classes()), (1, SCENE_SIZE, SCENE_SIZE), MEAN, STD,
                       scene_classes(), task="segmentation")
    return SegmentationImages(s.images, s.masks, MEAN, STD, augment), info


def write_coco(scenes: Scenes, images_dir, json_path) -> dict[str, Any]:
    """Write ``scenes`` as PNG files and a COCO instances JSON (bbox xywh, categories 1..10), for the
    detection task's COCO reader. Returns the JSON document."""
    from pathlib import Path

    from PIL import Image

    from deploycomp.files import write_json

    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"images": [], "annotations": [],
                           "categories": [{"id": c, "name": name} for c, name in enumerate(scene_classes()) if c]}
    for i in range(len(scenes.masks)):
        name = f"scene_{i:05d}.png"
        Image.fromarray(scenes.images[i, 0].numpy(), mode="L").save(images_dir / name)
        h, w = scenes.masks[i].shape
        doc["images"].append({"id": i + 1, "file_name": name, "height": int(h), "width": int(w)})
        for box, label in zip(scenes.boxes[i].tolist(), scenes.labels[i].tolist(), strict=True):
            x1, y1, x2, y2 = box
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": i + 1, "category_id": int(label),
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                       "iscrowd": 0})
    write_json(json_path, doc)
    return doc
