"""Hardening, datasets: a corrupted or partial dataset ends in one line that names the file.

Fashion-MNIST-style IDX files (plain and gzipped) with a garbled header, truncated data, a label
count that does not match the images, impossible labels, an empty or missing file; image folders
that are empty, hold no images, or hold a file that is not an image.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from tests.harden_util import PNG, invoke

N = 20  # images in the small test split written here
IMAGES, LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def idx(array: np.ndarray) -> bytes:
    """The IDX encoding (big-endian header: 0, 0, type 0x08 = unsigned byte, ndim; one uint32 per dim)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def good() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {IMAGES: idx(rng.integers(0, 256, (N, 28, 28))), LABELS: idx(np.arange(N) % 10)}


def write(d: Path, files: dict[str, bytes | None], gz: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (d / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return d


def _garbled_magic(f):
    f[IMAGES] = b"\xde\xad\xbe\xef" + f[IMAGES][4:]


def _garbled_ndim(f):
    f[IMAGES] = f[IMAGES][:3] + b"\x07" + f[IMAGES][4:]


def _header_promises_more(f):
    f[IMAGES] = f[IMAGES][:4] + (10**6).to_bytes(4, "big") + f[IMAGES][8:]


def _truncated_images(f):
    f[IMAGES] = f[IMAGES][: len(f[IMAGES]) // 2]


def _truncated_header(f):
    f[IMAGES] = f[IMAGES][:6]


def _empty_images(f):
    f[IMAGES] = b""


def _fewer_labels(f):
    f[LABELS] = idx(np.arange(N - 1) % 10)


def _impossible_labels(f):
    f[LABELS] = idx(np.full(N, 12))


def _missing_labels(f):
    f[LABELS] = None


IDX_CASES = [
    (_garbled_magic, IMAGES, "garbled header"),
    (_garbled_ndim, IMAGES, "garbled IDX header: 7 dimensions where 3 are expected"),
    (_header_promises_more, IMAGES, "promises"),
    (_truncated_images, IMAGES, "truncated"),
    (_truncated_header, IMAGES, "truncated inside its IDX header"),
    (_empty_images, IMAGES, "is empty"),
    (_fewer_labels, LABELS, f"holds {N} images but"),
    (_impossible_labels, LABELS, "labels up to 12"),
    (_missing_labels, "data", "Fashion-MNIST files not found"),
]


def one_error(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def evaluate(d: Path, data: str = "fashion-mnist"):
    return invoke("eval", "--model", "light_resnet18", "--data", data, "--data-dir", d, "--samples", "4")


def test_the_small_dataset_itself_is_fine(tmp_path):
    result = evaluate(write(tmp_path / "d", good()))
    assert result.exit_code == 0 and "(4 images)" in result.output, result.output


@pytest.mark.parametrize("gz", [False, True], ids=["idx", "idx.gz"])
@pytest.mark.parametrize("corrupt, named, fragment", IDX_CASES, ids=[c[0].__name__[1:] for c in IDX_CASES])
def test_corrupted_idx_files(tmp_path, corrupt, named, fragment, gz):
    files = good()
    corrupt(files)
    d = write(tmp_path / "data", files, gz=gz)
    error = one_error(evaluate(d))
    assert fragment in error and named in error, error


@pytest.mark.parametrize("damage, fragment", [
    (lambda data: data[: len(data) // 2], "truncated or damaged"),
    (lambda data: data[:-12] + b"\x00" * 12, "truncated or damaged"),  # CRC and length trailer garbled
    (lambda data: gzip.decompress(data), "truncated or damaged"),  # named .gz, but not gzip at all
])
def test_damaged_gzip(tmp_path, damage, fragment):
    d = write(tmp_path / "data", good(), gz=True)
    target = d / f"{IMAGES}.gz"
    target.write_bytes(damage(target.read_bytes()))
    error = one_error(evaluate(d))
    assert fragment in error and f"{IMAGES}.gz" in error, error


def test_a_directory_where_the_images_file_should_be(tmp_path):
    files = good()
    d = write(tmp_path / "data", {LABELS: files[LABELS]})
    (d / IMAGES).mkdir()
    error = one_error(evaluate(d))
    assert "is a directory" in error and IMAGES in error, error


def test_data_dir_that_does_not_exist(tmp_path):
    error = one_error(evaluate(tmp_path / "nowhere"))
    assert "not found in" in error and "nowhere" in error, error


@pytest.mark.parametrize("layout, fragment, named", [
    ({}, "val is not a directory", "val"),
    ({"val": None}, "holds no images", "val"),
    ({"val/cat": None}, "holds no images", "val"),
    ({"val/cat/x.png": b"\x89PNG\r\n\x1a\nnot really"}, "is not a readable image", "x.png"),
    ({"val/cat/x.jpg": b""}, "is not a readable image", "x.jpg"),
])
def test_broken_image_folders(tmp_path, layout, fragment, named):
    d = tmp_path / "images"
    d.mkdir()
    for rel, data in layout.items():
        p = d / rel
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    error = one_error(evaluate(d, "imagefolder"))
    assert fragment in error and named in error, error


def test_a_good_image_folder_works(tmp_path):
    for split in ("val",):
        for cls in ("a", "b"):
            p = tmp_path / "images" / split / cls
            p.mkdir(parents=True)
            (p / "x.png").write_bytes(PNG)
    result = invoke("eval", "--model", "light_resnet18", "--num-classes", "2", "--data", "imagefolder",
                    "--data-dir", tmp_path / "images", "--samples", "2")
    assert result.exit_code == 0, result.output


def test_a_broken_image_read_by_a_dataloader_worker(tmp_path):
    """The error raised in a worker process comes back as the same one line, not the worker's traceback."""
    for split in ("train", "val"):
        p = tmp_path / "images" / split / "a"
        p.mkdir(parents=True)
        (p / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = invoke("train", "--model", "light_resnet18", "--num-classes", "1", "--data", "imagefolder",
                    "--data-dir", tmp_path / "images", "--epochs", "1", "--workers", "1", "-o", tmp_path / "m.pt")
    error = one_error(result)
    assert error.startswith("Error: ") and "x.png is not a readable image" in error, error
    assert "Traceback" not in error and not (tmp_path / "m.pt").exists()
