"""The COCO reader (a tiny directory in tmp_path) and fashion-scenes-det (a few scenes, written as COCO)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from deploycomp.data import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, ModelInputs
from deploycomp.errors import InputFileError, UsageError
from deploycomp.tasks.coco import (
    DEFAULT_SIZE,
    DetectionImages,
    coco_paths,
    flip_targets,
    load_coco,
    load_scenes_det,
    read_coco,
    resize_targets,
    scenes_coco_dir,
    scenes_key,
)
from tests.conftest import needs_fmnist

W, H = 20, 16
PAD = [-1.0, 0.0, 0.0, 0.0, 0.0]


def _png(path, seed, mode="RGB", size=(W, H)):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode=mode).save(path)


def make_coco(root, mode="RGB"):
    """train: 3 images (2 boxes, 1 box + a crowd region, none); val: 2 images; categories 42, 3, 7 (unsorted)."""
    cats = [{"id": 42, "name": "c42"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
    splits = {"train": [[(42, [1, 2, 4, 6]), (3, [10.5, 0, 5, 3.5])], [(7, [0, 8, 20, 8]), (3, [2, 2, 3, 3], 1)], []],
              "val": [[(7, [3, 3, 2, 2])], [(42, [0, 0, 20, 16])]]}
    (root / "annotations").mkdir(parents=True)
    for split, images in splits.items():
        (root / split).mkdir()
        doc = {"images": [], "annotations": [], "categories": cats}
        for i, anns in enumerate(images):
            name = f"{split}{i}.png"
            _png(root / split / name, len(doc["images"]) + 10 * (split == "val"), mode)
            doc["images"].append({"id": 100 + i, "file_name": name, "width": W, "height": H})
            for cat, box, *crowd in anns:
                doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": 100 + i,
                                           "category_id": cat, "bbox": box, "iscrowd": crowd[0] if crowd else 0})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def _edit(root, split, fn):
    path = root / "annotations" / f"instances_{split}.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------------
# Your data


def test_reads_exact_targets_labels_in_id_order_and_padding(tmp_path):
    root = make_coco(tmp_path / "coco")
    before = _listing(root)
    ds, info = load_coco("train", root)
    assert info.task == "detection" and info.name == "coco" and info.num_classes == 3
    assert info.class_names == ["c3", "c7", "c42"]  # ascending category id -> 0, 1, 2
    assert info.input_shape == (3, H, W) and info.mean == IMAGENET_MEAN and info.std == IMAGENET_STD
    assert len(ds) == 3 and ds.max_objects == 2  # the crowd region does not count
    x0, y0 = ds[0]
    assert x0.shape == (3, H, W) and x0.dtype == torch.float32 and y0.dtype == torch.float32
    assert y0.tolist() == [[2, 1, 2, 5, 8], [0, 10.5, 0, 15.5, 3.5]]  # COCO xywh -> xyxy, x2 = x + w
    assert ds[1][1].tolist() == [[1, 0, 8, 20, 16], PAD]  # iscrowd=1 ignored
    assert ds[2][1].tolist() == [PAD, PAD]  # an image without boxes is a negative
    pixels = np.asarray(Image.open(root / "train" / "train0.png")).astype(np.float32) / 255
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / \
        torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(x0, expected, atol=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch[0].shape == (3, 3, H, W) and batch[1].shape == (3, 2, 5)  # default collate stacks
    assert _listing(root) == before  # nothing written


def test_test_split_reads_val_then_test_and_images_folder(tmp_path):
    root = make_coco(tmp_path / "coco")
    ds, info = load_coco("test", root)
    assert len(ds) == 2 and ds.max_objects == 1 and ds[0][1].tolist() == [[1, 3, 3, 5, 5]]
    assert ds[1][1].tolist() == [[2, 0, 0, 20, 16]]
    (root / "annotations" / "instances_val.json").rename(root / "annotations" / "instances_test.json")
    (root / "val").rename(root / "images")  # no DIR/test/: DIR/images/
    assert coco_paths(root, "test") == (root / "annotations" / "instances_test.json", root / "images")
    assert load_coco("test", root)[0][0][1].tolist() == [[1, 3, 3, 5, 5]]


def test_grayscale_images_give_one_channel(tmp_path):
    root = make_coco(tmp_path / "coco", mode="L")
    ds, info = load_coco("train", root)
    assert info.input_shape == (1, H, W) and info.mean == GRAY_MEAN and info.std == GRAY_STD
    pixels = torch.from_numpy(np.asarray(Image.open(root / "train" / "train1.png")).astype(np.float32) / 255)
    assert torch.allclose(ds[1][0][0], (pixels - GRAY_MEAN[0]) / GRAY_STD[0], atol=1e-6)
    ds3, info3 = load_coco("train", root, fit=ModelInputs(channels=3))  # a model taking RGB: converted to it
    assert info3.input_shape == (3, H, W) and info3.mean == IMAGENET_MEAN
    assert torch.allclose(ds3[1][0][2], (pixels - IMAGENET_MEAN[2]) / IMAGENET_STD[2], atol=1e-6)


def test_resize_scales_boxes(tmp_path):
    root = make_coco(tmp_path / "coco")
    ds, info = load_coco("train", root, input_size=(32, 60))  # H x2, W x3
    assert info.input_shape == (3, 32, 60) and ds[0][0].shape == (3, 32, 60)
    assert ds[0][1].tolist() == [[2, 3, 4, 15, 16], [0, 31.5, 0, 46.5, 7]]
    assert ds[2][1].tolist() == [PAD, PAD]
    t = torch.tensor([[4.0, 2, 4, 10, 8], PAD])
    assert resize_targets(t, (16, 20), (8, 40)).tolist() == [[4, 4, 2, 20, 4], PAD]


def test_mixed_sizes_default_to_320(tmp_path):
    root = make_coco(tmp_path / "coco")
    _png(root / "train" / "train2.png", 3, size=(40, 10))
    _edit(root, "train", lambda d: d["images"][2].update(width=40, height=10))
    ds, info = load_coco("train", root)
    assert info.input_shape == (3, *DEFAULT_SIZE)
    assert ds[0][1].tolist() == [[2, 16, 40, 80, 160], [0, 168, 0, 248, 70]]  # x16, y20
    assert ds[2][0].shape == (3, *DEFAULT_SIZE)


def test_flip_augmentation_flips_boxes_exactly(tmp_path):
    root = make_coco(tmp_path / "coco")
    plain, _ = load_coco("train", root)
    ds, _ = load_coco("train", root, augment=True)
    x, y = plain[0]
    seen = set()
    for _ in range(20):
        xa, ya = ds[0]
        flipped = not torch.equal(xa, x)
        seen.add(flipped)
        if flipped:
            assert torch.equal(xa, x.flip(-1))
            assert ya.tolist() == [[2, W - 5, 2, W - 1, 8], [0, W - 15.5, 0, W - 10.5, 3.5]]
        else:
            assert torch.equal(ya, y)
    assert seen == {True, False}
    assert flip_targets(torch.tensor([PAD]), W).tolist() == [PAD]  # padding stays padding


def test_boxes_outside_the_image_are_clipped_or_dropped_with_one_warning_each(tmp_path, capsys):
    root = make_coco(tmp_path / "coco")

    def damage(doc):
        anns = doc["annotations"]
        anns[0]["bbox"] = [-2, 10, 6, 10]  # clipped to [0, 10, 4, 16]
        anns[1]["bbox"] = [30, 0, 5, 5]  # wholly outside: dropped
        anns.append({"id": 9, "image_id": 102, "category_id": 3, "bbox": [1, 1, 0, 4]})  # zero width: dropped
        anns.append({"id": 10, "image_id": 102, "category_id": 3, "bbox": [1, 1, 4, -1]})  # negative: dropped

    _edit(root, "train", damage)
    ds, _ = load_coco("train", root)
    assert ds[0][1].tolist() == [[2, 0, 10, 4, 16]] and ds.max_objects == 1
    assert ds[2][1].tolist() == [PAD]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2
    assert "2 box(es) with zero or negative width or height dropped" in warnings[0]
    assert "2 box(es) reach outside their image: 1 clipped to it, 1 with nothing inside dropped" in warnings[1]
    assert "instances_train.json" in warnings[0] and "instances_train.json" in warnings[1]


def _drop(key):
    return lambda d: d.pop(key)


@pytest.mark.parametrize("damage, fragment", [
    (_drop("categories"), "is not a COCO instances file: its 'categories' list is missing"),
    (_drop("annotations"), "is not a COCO instances file: its 'annotations' list is missing"),
    (_drop("images"), "is not a COCO instances file: its 'images' list is missing"),
    (lambda d: d.update(images={}), "its 'images' list is not a list"),
    (lambda d: d.update(categories=[]), "lists no category"),
    (lambda d: d.update(images=[]), "lists no image"),
    (lambda d: d["annotations"][0].update(image_id=99), "annotation 1 names image id 99, which its 'images' list "
                                                        "lacks"),
    (lambda d: d["annotations"][0].update(category_id=5), "annotation 1 names category id 5"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation 1 has a malformed 'bbox' [1, 2, 3]"),
    (lambda d: d["images"][1].update(id=100), "image id 100 is listed twice"),
    (lambda d: d["categories"].append({"id": 3, "name": "again"}), "category id 3 is listed twice"),
    (lambda d: d["images"][0].pop("file_name"), "image 100 has no valid 'file_name'"),
    (lambda d: d["images"][2].update(file_name="gone.png"), "the file of image 102 does not exist"),
])
def test_bad_json_is_one_line_naming_the_file(tmp_path, damage, fragment):
    root = make_coco(tmp_path / "coco")
    _edit(root, "train", damage)
    before = _listing(root)
    with pytest.raises(InputFileError) as e:
        load_coco("train", root)
    message = str(e.value)
    assert fragment in message and "instances_train.json" in message and "\n" not in message
    assert _listing(root) == before


@pytest.mark.parametrize("damage, error, fragment", [
    (lambda r: (r / "annotations" / "instances_train.json").write_text("[1, 2]"), InputFileError,
     "it holds a JSON list, not an object"),
    (lambda r: (r / "annotations" / "instances_train.json").write_text("{oops"), InputFileError, "cannot read JSON"),
    (lambda r: (r / "annotations" / "instances_train.json").unlink(), InputFileError,
     "instances_train.json not found"),
    (lambda r: (r / "train").rename(r / "elsewhere"), InputFileError, "no image folder for instances_train.json"),
])
def test_bad_layout_is_one_line(tmp_path, damage, error, fragment):
    root = make_coco(tmp_path / "coco")
    damage(root)
    with pytest.raises(error) as e:
        load_coco("train", root)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_no_data_dir_says_how(tmp_path):
    with pytest.raises(UsageError, match="pass --data-dir DIR"):
        load_coco("train", None)
    with pytest.raises(InputFileError, match="is not a directory"):
        load_coco("train", tmp_path / "nowhere")


def test_unreadable_image_is_one_line_when_decoded(tmp_path):
    root = make_coco(tmp_path / "coco")
    (root / "train" / "train1.png").write_bytes(b"not a png")
    ds, _ = load_coco("train", root)  # width/height in the JSON: decoded on access
    ds[0]
    with pytest.raises(InputFileError) as e:
        ds[1]
    assert "train1.png is not a readable image (UnidentifiedImageError)" in str(e.value)
    assert "remove image 101 from" in str(e.value) and "\n" not in str(e.value)
    _edit(root, "train", lambda d: [im.pop("width") for im in d["images"]])  # no size: read from the header at load
    with pytest.raises(InputFileError, match="train1.png is not a readable image"):
        load_coco("train", root)


def test_image_of_another_size_than_its_json_is_one_line(tmp_path):
    root = make_coco(tmp_path / "coco")
    _png(root / "train" / "train2.png", 0, size=(8, 8))
    ds, _ = load_coco("train", root)
    with pytest.raises(InputFileError, match=r"train2.png is 8x8 but .*instances_train.json says 20x16"):
        ds[2]


# --------------------------------------------------------------------------------------------------
# fashion-scenes-det


@pytest.fixture(scope="module")
def scenes():
    from deploycomp.tasks.scenes import make_scenes

    return make_scenes("test", n=12)  # the first 12 scenes of the benchmark's 1,000 (generation is sequential)


def _expected(scenes, i, max_objects=3):
    rows = [[float(c - 1), *b] for b, c in zip(scenes.boxes[i].tolist(), scenes.labels[i].tolist(), strict=True)]
    return rows + [PAD] * (max_objects - len(rows))


@needs_fmnist
def test_scenes_det_targets_and_pixels_equal_the_scenes(scenes, tmp_path):
    from deploycomp.data import FASHION_MNIST_CLASSES
    from deploycomp.tasks.scenes import MEAN, STD

    ds, info = load_scenes_det("test", scenes=scenes, cache_root=tmp_path)
    assert info.name == "fashion-scenes-det" and info.task == "detection" and info.num_classes == 10
    assert info.class_names == FASHION_MNIST_CLASSES and info.input_shape == (1, 64, 64)
    assert (info.mean, info.std) == (MEAN, STD) and ds.max_objects == 3 and len(ds) == 12
    assert {len(lab) for lab in scenes.labels} == {1, 2, 3}  # padding of 0, 1 and 2 rows is exercised
    for i in range(12):
        x, y = ds[i]
        assert y.tolist() == _expected(scenes, i)
        assert torch.equal(x, (scenes.images[i].float() / 255 - MEAN[0]) / STD[0])
    assert ds.decoded is not None  # pixels from images.npy; the boxes came from the JSON
    # the benchmark's own first scene (generation is sequential: make_scenes(n=12) are its first 12 of 1,000)
    assert ds[0][1].tolist() == [[9, 13, 18, 40, 40], [9, 15, 31, 47, 64], [9, 19, 24, 54, 61]]
    assert scenes_key("test") != scenes_key("test", scenes=scenes)


@needs_fmnist
def test_scenes_det_boxes_are_the_masks_tight_boxes(scenes):
    """Every garment whose class is alone in its scene: its box is the tight box of its class's mask pixels."""
    checked = 0
    for i in range(len(scenes.labels)):
        labels = scenes.labels[i].tolist()
        for box, c in zip(scenes.boxes[i].tolist(), labels, strict=True):
            if labels.count(c) > 1:
                continue  # two garments of one class share their mask value
            ys, xs = torch.nonzero(scenes.masks[i] == c, as_tuple=True)
            assert box == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            checked += 1
    assert checked >= len(scenes.labels)


@needs_fmnist
def test_coco_round_trip_reads_back_the_scenes(scenes, tmp_path):
    directory = scenes_coco_dir("test", scenes=scenes, root=tmp_path)
    json_path, image_dir = coco_paths(directory, "test")
    assert json_path.name == "instances_val.json" and image_dir == directory / "val"
    parsed = read_coco(json_path, image_dir)
    for i in range(12):
        assert torch.equal(parsed.boxes[i], scenes.boxes[i]) and torch.equal(parsed.labels[i], scenes.labels[i] - 1)
    from_png = DetectionImages(parsed, (64, 64), "L", (0.0,), (1.0,))  # decodes the PNGs: same bytes as the npy
    assert torch.equal(torch.stack([from_png[i][0] for i in range(12)]), scenes.images.float() / 255)
    ds, info = load_scenes_det("test", scenes=scenes, cache_root=tmp_path, input_size=(32, 128))
    assert info.input_shape == (1, 32, 128) and ds[0][0].shape == (1, 32, 128)
    assert ds[0][1].tolist() == [[c, x1 * 2, y1 / 2, x2 * 2, y2 / 2] for c, x1, y1, x2, y2 in _expected(scenes, 0)]


@needs_fmnist
def test_scenes_det_is_written_once_atomically(scenes, tmp_path, monkeypatch):
    import deploycomp.tasks.scenes as sc

    monkeypatch.setenv("DEPLOYCOMP_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(sc, "cached_scenes", lambda split, data_dir: calls.append(split) or scenes)
    first = scenes_coco_dir("test")
    assert first == tmp_path / "cache" / "fashion-scenes-det" / f"test-{scenes_key('test')}"
    stamp = os.stat(first / "annotations" / "instances_val.json").st_mtime_ns
    ds, _ = load_scenes_det("test")
    assert scenes_coco_dir("test") == first and calls == ["test"]  # generated and written once
    assert os.stat(first / "annotations" / "instances_val.json").st_mtime_ns == stamp
    assert ds[0][1].tolist() == _expected(scenes, 0)
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary directory left
    monkeypatch.setattr(sc, "MIN_VISIBLE", sc.MIN_VISIBLE + 1)
    assert scenes_key("test") != first.name.split("-", 1)[1]  # another generation, another directory


@needs_fmnist
def test_concurrent_writer_that_loses_the_rename_uses_the_winners(scenes, tmp_path, monkeypatch):
    import shutil

    import deploycomp.tasks.coco as coco

    rename = os.rename

    def other_process_wins(src, dst):
        shutil.copytree(src, dst)  # another process renamed its complete copy into place first
        rename(src, dst)  # ours then fails: the directory exists and is not empty

    monkeypatch.setattr(coco.os, "rename", other_process_wins)
    directory = scenes_coco_dir("test", scenes=scenes, root=tmp_path)
    assert (directory / "annotations" / "instances_val.json").exists()
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # ours was discarded
