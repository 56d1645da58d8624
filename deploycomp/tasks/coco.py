"""coco: detection data in COCO's format: your own (``--data coco``) and the embedded ``fashion-scenes-det``.

Your data, under ``--data-dir DIR``::

    DIR/annotations/instances_train.json   the train split
    DIR/annotations/instances_val.json     the test split (instances_test.json when there is no _val file)
    DIR/train/<file_name>                  the images of the train split, at each image's "file_name"
    DIR/val/<file_name>                    the images of the test split (DIR/test/ for instances_test.json)
    DIR/images/<file_name>                 instead of DIR/train/ and DIR/val/: one folder for both splits

An instances file is COCO's detection JSON: ``images`` (``id``, ``file_name``, ``width``, ``height``),
``annotations`` (``image_id``, ``category_id``, ``bbox`` = [x, y, w, h] in pixels, ``iscrowd``) and
``categories`` (``id``, ``name``). What the reader makes of it:

- classes: the categories in ascending ``id`` order become 0..C-1 (ids 3, 7, 42 -> 0, 1, 2); the class
  names follow that order. There is no background class.
- boxes: ``[x, y, x + w, y + h]``, clipped to the image; a box with zero or negative width or height, or
  with nothing left inside the image, is dropped. Either is one warning line with its count, not an error.
- ``iscrowd: 1`` annotations (COCO's crowd regions) are ignored: they are neither trained on nor scored.
- images without annotations are kept: they are negatives (every target row is padding).
- channels: those of the first image (1 for a grayscale mode such as "L", else 3: RGB); every image is
  converted to them. Normalisation: ImageNet's mean/std for RGB, their channel average (0.449 / 0.226)
  for grayscale (as ``imagefolder``). A model's own channels and statistics win where it declares them.
- size: every image is resized (plain bilinear resize, no crop or padding; boxes scaled with it) to
  ``--input-size`` if given, else to the model's input size, else to the size all images of the split
  share when they do and it is at most 640 px a side, else to 320 x 320. Give train and test the same
  ``--input-size`` when their images differ in size.
- targets: float32 (M, 5) per image, rows ``[label, x1, y1, x2, y2]`` in pixels of the resized image,
  in the file's annotation order, then padding rows ``[-1, 0, 0, 0, 0]``; M is the largest box count of
  an image of the split (at least 1), so that batches stack.

Checks, each a one-line error naming the file and what to do, before any work and with nothing written:
a JSON that is not a COCO instances file (no ``images``/``annotations``/``categories`` list, or an
entry without its fields), no category, a duplicate image or category id, an annotation naming an image
or category id that is not listed, a malformed bbox, and an image file that does not exist. Images are
decoded when first used; one that cannot be decoded, or whose size differs from its ``width``/``height``,
is then a one-line :class:`InputFileError` naming it.

``fashion-scenes-det`` is the embedded benchmark's detection view: the scenes of
:mod:`deploycomp.tasks.scenes` are written once as a COCO directory (PNGs and an instances JSON, by
:func:`scenes.write_coco`) in the cache (``$DEPLOYCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/deploycomp``,
else ``~/.cache/deploycomp``), keyed by a digest of the generation constants, and read back through this
same reader. Beside the JSON lies ``images.npy``, the decoded images: the reader takes the pixels from it
instead of decoding 8,000 PNGs, and still takes every box from the JSON.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp.errors import InputFileError, UsageError, check

DEFAULT_SIZE = (320, 320)  # (H, W) when the images of a split differ in size or are large
MAX_NATIVE_SIDE = 640  # images sharing one size are kept at it up to this many pixels a side
SPLIT_FILES = {"train": ("train",), "test": ("val", "test")}  # instances_<name>.json, images in DIR/<name>/
SCENES_MAX_OBJECTS = 3  # scenes.MAX_GARMENTS
SCENES_CACHE_VERSION = 1  # bump when the cached layout changes


@dataclass
class CocoSplit:
    """One split of a COCO directory, parsed and checked; boxes in pixels of the original images."""

    json_path: Path
    files: list[Path]  # per image, in the JSON's order
    sizes: list[tuple[int, int]]  # per image: (height, width) of the file
    image_ids: list[int]
    boxes: list[Any]  # per image: float32 (k, 4) xyxy, clipped to the image
    labels: list[Any]  # per image: int64 (k,) class ids 0..C-1
    class_names: list[str]  # the categories in ascending id order
    category_ids: list[int]  # class c is COCO category category_ids[c]


# --------------------------------------------------------------------------------------------------
# Reading and checking an instances file


def coco_paths(root: Path, split: str) -> tuple[Path, Path]:
    """``(instances JSON, image folder)`` of ``split`` under ``root`` (see the layout above)."""
    names = SPLIT_FILES[split]
    jsons = [root / "annotations" / f"instances_{n}.json" for n in names]
    found = next(((p, n) for p, n in zip(jsons, names, strict=True) if p.exists()), None)
    if found is None:
        wanted = " or ".join(str(p) for p in jsons)
        raise InputFileError(f"{wanted} not found: a COCO directory holds the {split} split's annotations there "
                             "(DIR/annotations/instances_{train,val}.json, images in DIR/train/ and DIR/val/)")
    json_path, name = found
    folders = [root / name, root / "images"]
    image_dir = next((d for d in folders if d.is_dir()), None)
    check(image_dir is not None, f"no image folder for {json_path.name}: put its images in {folders[0]} (or "
          f"{folders[1]})", InputFileError)
    return json_path, image_dir


def _entries(doc: Any, key: str, path: Path) -> list[dict]:
    fix = "export the annotations in COCO's detection format (lists 'images', 'annotations', 'categories')"
    if not isinstance(doc, dict):
        raise InputFileError(f"{path} is not a COCO instances file: it holds a JSON {type(doc).__name__}, not an "
                             f"object; {fix}")
    value = doc.get(key)
    if not isinstance(value, list):
        has = "is not a list" if key in doc else "is missing"
        raise InputFileError(f"{path} is not a COCO instances file: its '{key}' list {has}; {fix}")
    bad = next((i for i, e in enumerate(value) if not isinstance(e, dict)), None)
    check(bad is None, f"{path} is not a COCO instances file: '{key}'[{bad}] is not an object; {fix}",
          InputFileError)
    return value


def _field(entry: dict, key: str, kind, path: Path, where: str):
    value = entry.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    check(ok, f"{path}: {where} has no valid '{key}' (got {value!r}); every entry of a COCO instances file "
          f"needs one", InputFileError)
    return value


def _categories(doc: Any, path: Path) -> tuple[list[int], list[str]]:
    cats = _entries(doc, "categories", path)
    check(len(cats) > 0, f"{path} lists no category; add one entry {{\"id\": 1, \"name\": \"...\"}} per class to "
          "its 'categories'", InputFileError)
    named = {}
    for k, c in enumerate(cats):
        cid = _field(c, "id", int, path, f"category {k}")
        check(cid not in named, f"{path}: category id {cid} is listed twice; give every category its own id",
              InputFileError)
        named[cid] = str(c.get("name", f"category {cid}"))
    ids = sorted(named)
    return ids, [named[i] for i in ids]


def _images(doc: Any, path: Path, image_dir: Path) -> tuple[list[int], list[Path], list[tuple[int, int] | None]]:
    ids, files, sizes, seen = [], [], [], set()
    for k, im in enumerate(_entries(doc, "images", path)):
        iid = _field(im, "id", int, path, f"image {k}")
        check(iid not in seen, f"{path}: image id {iid} is listed twice; give every image its own id",
              InputFileError)
        seen.add(iid)
        file = image_dir / _field(im, "file_name", str, path, f"image {iid}")
        check(file.is_file(), f"{path}: the file of image {iid} does not exist: {file}; put it there or remove the "
              "image (and its annotations) from the file", InputFileError)
        w, h = im.get("width"), im.get("height")
        known = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h))
        ids.append(iid)
        files.append(file)
        sizes.append((h, w) if known else None)
    check(len(ids) > 0, f"{path} lists no image; a split needs at least one", InputFileError)
    return ids, files, sizes


def _bbox(ann: dict, path: Path, where: str) -> list[float]:
    box = ann.get("bbox")
    ok = isinstance(box, list) and len(box) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    check(ok, f"{path}: {where} has a malformed 'bbox' {box!r}; COCO boxes are [x, y, width, height] in pixels",
          InputFileError)
    return [float(v) for v in box]


def read_coco(json_path: Path, image_dir: Path) -> CocoSplit:
    """Parse and check one instances file and the existence of its images (see the module docstring)."""
    import torch

    from deploycomp import console
    from deploycomp.files import read_json

    json_path, image_dir = Path(json_path), Path(image_dir)
    doc = read_json(json_path)
    category_ids, names = _categories(doc, json_path)
    label_of = {cid: c for c, cid in enumerate(category_ids)}
    ids, files, sizes = _images(doc, json_path, image_dir)
    sizes = [s if s is not None else _header(f)[1:] for s, f in zip(sizes, files, strict=True)]
    index = {iid: k for k, iid in enumerate(ids)}
    rows: list[list[list[float]]] = [[] for _ in ids]
    degenerate = clipped = outside = crowd = 0
    for k, ann in enumerate(_entries(doc, "annotations", json_path)):
        where = f"annotation {ann.get('id', k)}"
        iid = _field(ann, "image_id", int, json_path, where)
        check(iid in index, f"{json_path}: {where} names image id {iid}, which its 'images' list lacks; add the "
              "image or remove the annotation", InputFileError)
        cid = _field(ann, "category_id", int, json_path, where)
        check(cid in label_of, f"{json_path}: {where} names category id {cid}, which its 'categories' list lacks; "
              "add the category or remove the annotation", InputFileError)
        x, y, w, h = _bbox(ann, json_path, where)
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        if w <= 0 or h <= 0:
            degenerate += 1
            continue
        height, width = sizes[index[iid]]
        box = [min(max(x, 0.0), width), min(max(y, 0.0), height), min(x + w, width), min(y + h, height)]
        if box[2] <= box[0] or box[3] <= box[1]:
            outside += 1
            continue
        clipped += box != [x, y, x + w, y + h]
        rows[index[iid]].append([float(label_of[cid]), *box])
    if degenerate:
        console.warn(f"{json_path}: {degenerate} box(es) with zero or negative width or height dropped; fix or "
                     "remove those annotations")
    if clipped or outside:
        console.warn(f"{json_path}: {clipped + outside} box(es) reach outside their image: {clipped} clipped to "
                     f"it, {outside} with nothing inside dropped; check those annotations")
    if crowd:
        console.debug(f"{json_path}: {crowd} iscrowd annotation(s) ignored")
    targets = [torch.tensor(r, dtype=torch.float32).reshape(-1, 5) for r in rows]
    return CocoSplit(json_path, files, sizes, ids, [t[:, 1:].contiguous() for t in targets],
                     [t[:, 0].long() for t in targets], names, category_ids)


def _header(path: Path) -> tuple[str, int, int]:
    """(mode, height, width) from the file's header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode, im.height, im.width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputFileError(f"{path} is not a readable image ({type(e).__name__}); replace it or remove it from "
                             "the annotations") from None


# --------------------------------------------------------------------------------------------------
# Targets


def pad_targets(boxes, labels, max_objects: int):
    """float32 (max_objects, 5): rows ``[label, x1, y1, x2, y2]``, then padding rows ``[-1, 0, 0, 0, 0]``."""
    import torch

    k = len(labels)
    check(k <= max_objects, f"an image holds {k} boxes but the dataset pads to {max_objects}")
    out = torch.zeros(max_objects, 5)
    out[:, 0] = -1
    out[:k, 0] = labels.float()
    out[:k, 1:] = boxes
    return out


def resize_targets(target, old_hw: tuple[int, int], new_hw: tuple[int, int]):
    """``target`` (M, 5) with its boxes scaled from an image of ``old_hw`` to one of ``new_hw``; padding stays."""
    out = target.clone()
    sy, sx = new_hw[0] / old_hw[0], new_hw[1] / old_hw[1]
    valid = out[:, 0] >= 0
    out[valid, 1] *= sx
    out[valid, 3] *= sx
    out[valid, 2] *= sy
    out[valid, 4] *= sy
    return out


def flip_targets(target, width: float):
    """``target`` (M, 5) for the horizontally flipped image: x1' = W - x2, x2' = W - x1; padding stays."""
    out = target.clone()
    valid = out[:, 0] >= 0
    out[valid, 1] = width - target[valid, 3]
    out[valid, 3] = width - target[valid, 1]
    return out


# --------------------------------------------------------------------------------------------------
# The dataset


class DetectionImages:
    """``(image, target)`` items: image float32 (C, H, W) resized to ``size`` and normalised, target (M, 5).

    Pixels come from ``decoded`` (uint8 (N, C, h, w), the JSON's image order) when given, else from the
    files, decoded on access. ``augment``: a random horizontal flip of image and boxes together.
    """

    def __init__(self, split: CocoSplit, size: tuple[int, int], mode: str, mean, std, augment: bool = False,
                 max_objects: int | None = None, decoded=None):
        import torch

        self.split, self.size, self.mode, self.augment, self.decoded = split, tuple(size), mode, augment, decoded
        self.max_objects = max(1, max((len(lab) for lab in split.labels), default=0)) if max_objects is None \
            else max_objects
        h, w = self.size
        self.targets = []  # per image: (k, 5) at the output size
        for boxes, labels, (h0, w0) in zip(split.boxes, split.labels, split.sizes, strict=True):
            t = torch.cat([labels.float()[:, None], boxes], 1)
            self.targets.append(resize_targets(t, (h0, w0), (h, w)) if (h0, w0) != (h, w) else t)
        check(all(len(t) <= self.max_objects for t in self.targets), f"{split.json_path}: an image holds "
              f"{max(len(t) for t in self.targets)} boxes but the dataset pads to {self.max_objects}", InputFileError)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        import torch

        x = self.image(i)
        t = self.targets[i]
        y = pad_targets(t[:, 1:], t[:, 0], self.max_objects)
        if self.augment and torch.rand(()) < 0.5:
            x, y = x.flip(-1), flip_targets(y, self.size[1])
        return (x - self.mean) / self.std, y

    def image(self, i: int):
        """float32 (C, H, W) in [0, 1] at the dataset's size, not normalised."""
        import torch.nn.functional as F

        raw = self.decoded[i] if self.decoded is not None else self._decode(i)
        x = raw.float().div_(255)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return x

    def _decode(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        path, (h, w) = self.split.files[i], self.split.sizes[i]
        fix = f"replace it or remove image {self.split.image_ids[i]} from {self.split.json_path}"
        try:
            with Image.open(path) as im:
                if (im.height, im.width) != (h, w):
                    raise InputFileError(f"{path} is {im.width}x{im.height} but {self.split.json_path} says "
                                         f"{w}x{h}; correct its width/height there")
                arr = np.asarray(im.convert(self.mode))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputFileError(f"{path} is not a readable image ({type(e).__name__}); {fix}") from None
        x = torch.from_numpy(arr.copy())
        return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def default_size(split: CocoSplit) -> tuple[int, int]:
    """The size all images share if they do and it is at most MAX_NATIVE_SIDE a side, else DEFAULT_SIZE."""
    first = split.sizes[0]
    if all(s == first for s in split.sizes) and max(first) <= MAX_NATIVE_SIDE:
        return first
    return DEFAULT_SIZE


def load_coco(split: str, data_dir=None, augment: bool = False, input_size=None, fit=None,
              max_objects: int | None = None, **_):
    """The ``coco`` dataset: (DetectionImages, DatasetInfo) of ``data_dir``'s split (layout: module docstring)."""
    from deploycomp.data import GRAY_MEAN, GRAY_MODES, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, DatasetInfo

    if data_dir is None:
        raise UsageError("--data coco reads your own COCO-format directory: pass --data-dir DIR "
                         "(DIR/annotations/instances_{train,val}.json, images in DIR/train/ and DIR/val/)")
    root = Path(data_dir)
    check(root.is_dir(), f"--data-dir {root} is not a directory", InputFileError)
    json_path, image_dir = coco_paths(root, split)
    parsed = read_coco(json_path, image_dir)
    channels = getattr(fit, "channels", None) or (1 if _header(parsed.files[0])[0] in GRAY_MODES else 3)
    check(channels in (1, 3), f"coco gives 1 (grayscale) or 3 (RGB) channels; the model takes {channels}")
    mean, std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    fit_mean, fit_std = getattr(fit, "mean", None), getattr(fit, "std", None)
    if fit_mean and fit_std and len(fit_mean) == len(fit_std) == channels:
        mean, std = tuple(fit_mean), tuple(fit_std)
    size = tuple(input_size or getattr(fit, "size", None) or default_size(parsed))
    dataset = DetectionImages(parsed, size, "L" if channels == 1 else "RGB", mean, std, augment, max_objects)
    info = DatasetInfo("coco", len(parsed.class_names), (channels, *size), mean, std, parsed.class_names,
                       task="detection")
    return dataset, info


# --------------------------------------------------------------------------------------------------
# fashion-scenes-det: the scenes, written once as a COCO directory, read back by the reader above


def cache_dir() -> Path:
    """``$DEPLOYCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/deploycomp``, else ``~/.cache/deploycomp``."""
    if os.environ.get("DEPLOYCOMP_CACHE_DIR"):
        return Path(os.environ["DEPLOYCOMP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deploycomp"


def scenes_key(split: str, data_dir=None, scenes=None) -> str:
    """A digest of what makes the scenes of ``split``: the generation constants and the garments' source,
    or the content of the given ``scenes``."""
    import hashlib
    import json

    from deploycomp import data
    from deploycomp.tasks import scenes as sc

    h = hashlib.sha256(f"v{SCENES_CACHE_VERSION}/{split}".encode())
    if scenes is not None:
        h.update(scenes.images.numpy().tobytes())
        for boxes, labels in zip(scenes.boxes, scenes.labels, strict=True):
            h.update(boxes.numpy().tobytes())
            h.update(labels.numpy().tobytes())
        return "given-" + h.hexdigest()[:16]
    source = str(Path(data_dir).resolve()) if data_dir else \
        os.environ.get("DEPLOYCOMP_FASHION_MNIST", data.FASHION_MNIST_DIRS[0])
    constants = {k: getattr(sc, k) for k in ("SCENE_SIZE", "SCENES", "SEEDS", "MAX_GARMENTS", "SCALE_RANGE",
                                             "GARMENT_THRESHOLD", "MIN_VISIBLE", "BACKGROUND_LEVEL",
                                             "BACKGROUND_NOISE")}
    h.update(json.dumps({"constants": constants, "source": source}, sort_keys=True, default=list).encode())
    return h.hexdigest()[:16]


def scenes_coco_dir(split: str, data_dir=None, scenes=None, root: Path | None = None) -> Path:
    """The COCO directory holding the scenes of ``split`` (the benchmark's, or ``scenes``), written on first use.

    Written whole in a temporary directory and renamed into place, so that concurrent processes never see
    a partial one (the first rename wins; the others discard theirs).
    """
    import shutil
    import tempfile

    import numpy as np

    from deploycomp import console
    from deploycomp.files import cannot_write, make_dirs
    from deploycomp.tasks.scenes import cached_scenes, write_coco

    name = SPLIT_FILES[split][0]
    key = scenes_key(split, data_dir, scenes)
    final = (Path(root) if root else cache_dir()) / "fashion-scenes-det" / f"{split}-{key}"
    if (final / "annotations" / f"instances_{name}.json").exists():
        return final
    make_dirs(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as e:
        raise cannot_write(final.parent, e) from None
    try:
        with console.status_line(f"writing the fashion-scenes-det {split} scenes as COCO to {final} (once)"):
            s = scenes if scenes is not None else cached_scenes(split, str(data_dir) if data_dir else None)
            (tmp / "annotations").mkdir()
            write_coco(s, tmp / name, tmp / "annotations" / f"instances_{name}.json")
            np.save(tmp / "images.npy", s.images.numpy())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "annotations" / f"instances_{name}.json").exists():  # not another process's win
                raise
    except OSError as e:
        raise cannot_write(final, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.lru_cache(maxsize=4)
def _scenes_split(directory: str, split: str):
    """The parsed split and its decoded pixels (uint8 tensor, or None when images.npy is absent or stale)."""
    import numpy as np
    import torch

    root = Path(directory)
    parsed = read_coco(*coco_paths(root, split))
    decoded = None
    npy = root / "images.npy"
    if npy.exists():
        try:
            array = np.load(npy)
        except (OSError, ValueError):
            array = None  # damaged: the PNGs are decoded instead
        if array is not None and array.ndim == 4 and len(array) == len(parsed.files) and \
                all(tuple(array.shape[2:]) == s for s in set(parsed.sizes)):
            decoded = torch.from_numpy(array)
    return parsed, decoded


def load_scenes_det(split: str, data_dir=None, augment: bool = False, input_size=None, scenes=None,
                    cache_root: Path | None = None, **_):
    """The ``fashion-scenes-det`` dataset: (DetectionImages, DatasetInfo); ``scenes``: use these instead of
    the benchmark's (tests), ``cache_root``: where their COCO directory goes (default :func:`cache_dir`)."""
    from deploycomp.data import FASHION_MNIST_CLASSES, DatasetInfo
    from deploycomp.tasks.scenes import MEAN, SCENE_SIZE, STD

    check(split in SPLIT_FILES, f"split must be 'train' or 'test', got {split!r}")
    directory = scenes_coco_dir(split, data_dir, scenes, cache_root)
    parsed, decoded = _scenes_split(str(directory), split)
    expected = list(range(1, len(FASHION_MNIST_CLASSES) + 1))
    check(parsed.category_ids == expected, f"{parsed.json_path} is not a fashion-scenes-det file (categories "
          f"{parsed.category_ids}); delete {directory} to have it written again", InputFileError)
    size = tuple(input_size) if input_size else (SCENE_SIZE, SCENE_SIZE)
    dataset = DetectionImages(parsed, size, "L", MEAN, STD, augment, SCENES_MAX_OBJECTS, decoded)
    info = DatasetInfo("fashion-scenes-det", len(FASHION_MNIST_CLASSES), (1, *size), MEAN, STD,
                       list(FASHION_MNIST_CLASSES), task="detection")
    return dataset, info
