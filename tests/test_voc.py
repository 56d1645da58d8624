"""The VOC reader: a tiny directory in tmp_path; every bad input is one line naming the file, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deploycomp.errors import InputFileError, UsageError
from deploycomp.tasks.voc import load_voc
from tests.conftest import assert_one_line_error


def make_voc(root, n_train=4, n_val=2, size=(20, 16), classes=("background", "disk", "bar")):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(n_train + n_val)]
    w, h = size
    for i, image_id in enumerate(ids):
        mask = np.zeros((h, w), np.uint8)
        mask[2:8, 2:8] = 1 + i % 2
        mask[0, :] = 255  # a border that is not scored
        rgb = (rng.integers(0, 60, (h, w, 3)) + 150 * (mask[..., None] == 1)).astype(np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def test_reads_images_masks_and_classes(tmp_path):
    root = make_voc(tmp_path / "voc")
    ds, info = load_voc("train", root, input_size=(16, 24))
    x, y = ds[0]
    assert info.task == "segmentation" and info.num_classes == 3 and info.ignore_index == 255
    assert info.class_names == ["background", "disk", "bar"] and info.input_shape == (3, 16, 24)
    assert len(ds) == 4 and x.shape == (3, 16, 24) and y.shape == (16, 24)
    assert set(y.unique().tolist()) == {0, 1, 255}  # nearest resize keeps the ids
    assert len(load_voc("test", root)[0]) == 2  # "test" reads val.txt


@pytest.mark.parametrize("damage, fragment", [
    (lambda r: (r / "SegmentationClass" / "img001.png").unlink(), "the mask of image img001 is missing"),
    (lambda r: Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(r / "SegmentationClass" / "img002.png"),
     "is 5x5 but its image is 20x16"),
    (lambda r: Image.fromarray(np.full((16, 20), 7, np.uint8), mode="L").save(r / "SegmentationClass" / "img000.png"),
     "holds class id 7 but there are 3 classes"),
    (lambda r: (r / "JPEGImages" / "img003.jpg").write_bytes(b"not a jpeg"), "cannot be read"),
    (lambda r: (r / "JPEGImages" / "img003.jpg").unlink(), "image img003 listed in the split file is missing"),
    (lambda r: (r / "ImageSets" / "Segmentation" / "train.txt").write_text("\n"), "lists no image"),
    (lambda r: (r / "ImageSets" / "Segmentation" / "train.txt").unlink(), "train.txt not found"),
])
def test_bad_input_is_one_line(tmp_path, damage, fragment):
    root = make_voc(tmp_path / "voc")
    damage(root)
    with pytest.raises(InputFileError, match=fragment.replace("(", r"\(")):
        load_voc("train", root)


def test_voc_needs_a_directory():
    with pytest.raises(UsageError, match="--data-dir DIR"):
        load_voc("train", None)


def test_cli_trains_a_segmenter_on_voc_and_refuses_bad_masks(tmp_path, cli):
    root = make_voc(tmp_path / "voc")
    out = tmp_path / "unet.pt"
    cli("train", "--model", "light_unet", "--data", "voc", "--data-dir", root, "--input-size", "16x16",
        "--epochs", "1", "--batch-size", "2", "-o", out)
    r = cli("eval", "--model", out, "--data-dir", root, "--json")
    assert '"miou_pct"' in r.output and '"pixel_acc_pct"' in r.output
    Image.fromarray(np.full((16, 20), 9, np.uint8), mode="L").save(root / "SegmentationClass" / "img004.png")
    bad = cli("eval", "--model", out, "--data-dir", root, ok=False)
    assert_one_line_error(bad, "img004.png holds class id 9 but there are 3 classes")


def test_cli_refuses_a_segmenter_on_classification_data_and_the_reverse(tmp_path, cli, tiny_checkpoint):
    r = cli("eval", "--model", "light_unet", "--data", "fashion-mnist", ok=False)
    assert_one_line_error(r, "light_unet is a segmentation model but dataset fashion-mnist is for classification")
    r = cli("eval", "--model", tiny_checkpoint, "--data", "fashion-scenes", ok=False)
    assert_one_line_error(r, "is a classification model but dataset fashion-scenes is for segmentation")
    r = cli("prune", "--model", "light_unet", "--data", "fashion-mnist", "--method", "magnitude", "--ratio", "0.3",
            "-o", tmp_path / "p.pt", ok=False)
    assert_one_line_error(r, "segmentation model but dataset fashion-mnist")
    assert not (tmp_path / "p.pt").exists()
