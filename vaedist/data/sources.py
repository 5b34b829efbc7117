"""The MNIST source files: local IDX (gzip or raw) checked by content md5, or torchvision's download."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib

import numpy as np

from vaedist.config import MNIST_DIR_ENV
from vaedist.data.common import IMAGE_SHAPE, MNIST_NUM_SAMPLES, DataError, _check_split

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Of the decompressed content: a recompressed .gz holds the same data under a different md5.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


# ---------------------------------------------------------------------------------------------
# The MNIST source: a local directory of IDX files, or a torchvision download.

def _read_idx_file(mnist_dir: str, name: str) -> tuple[bytes, str]:
    """The decompressed bytes of `name` (raw) or `name.gz` in mnist_dir, and the path read."""
    raw, gz = os.path.join(mnist_dir, name), os.path.join(mnist_dir, name + ".gz")
    path = raw if os.path.isfile(raw) else gz if os.path.isfile(gz) else None
    if path is None:
        raise DataError(f"MNIST file {name} (raw or .gz) not found in {mnist_dir}")
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"MNIST file {path}: cannot read or decompress it ({e})") from None
    return data, path


def _parse_idx(data: bytes, path: str, dims_expected: tuple[int, ...]) -> np.ndarray:
    """An IDX array of unsigned bytes (LeCun's format: magic 0x0000 08 <ndim>, big-endian dims, data)."""
    ndim = len(dims_expected)
    magic = bytes([0, 0, 0x08, ndim])
    if data[:4] != magic:
        raise DataError(f"MNIST file {path}: magic number {data[:4].hex()}, expected {magic.hex()} "
                        f"(uint8, {ndim}-d)")
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4)) if len(data) >= header else ()
    if dims != dims_expected:
        raise DataError(f"MNIST file {path}: dimensions {dims}, expected {dims_expected}")
    expected_len = header + int(np.prod(dims))
    if len(data) != expected_len:
        raise DataError(f"MNIST file {path}: {len(data)} bytes decompressed, expected {expected_len} "
                        "(truncated or trailing data)")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _check_md5(data: bytes, path: str, name: str) -> str:
    digest = hashlib.md5(data).hexdigest()
    if digest != MNIST_MD5[name]:
        raise DataError(f"MNIST file {path}: md5 of the decompressed content is {digest}, expected "
                        f"{MNIST_MD5[name]} (corrupt or not the official {name})")
    return digest


def _load_idx_dir(split: str, mnist_dir: str, kind: str) -> tuple[np.ndarray, np.ndarray, dict]:
    image_name, label_name = MNIST_FILES[split]
    n = MNIST_NUM_SAMPLES[split]
    data, path = _read_idx_file(mnist_dir, image_name)
    images = _parse_idx(data, path, (n, *IMAGE_SHAPE))
    files = {image_name: _check_md5(data, path, image_name)}
    data, path = _read_idx_file(mnist_dir, label_name)
    labels = _parse_idx(data, path, (n,))
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"MNIST file {path}: label {labels[bad]} at index {bad} is outside 0..9")
    files[label_name] = _check_md5(data, path, label_name)
    return images, labels, {"kind": kind, "files": files}


def load_mnist(split: str, mnist_dir: str | None = None,
               download_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 [N, 28, 28], labels uint8 [N], source info) for one split.

    With mnist_dir: parse its IDX files (raw or .gz) and check magic, dims, counts, labels and the
    decompressed md5. Without: download with torchvision into download_dir, then parse the same way.
    Source info: {"kind": "idx" | "torchvision", "files": {file name: decompressed md5}}.
    """
    _check_split(split)
    if mnist_dir is not None:
        if not os.path.isdir(mnist_dir):
            raise DataError(f"MNIST directory {mnist_dir} does not exist")
        return _load_idx_dir(split, mnist_dir, kind="idx")
    hint = f"pass --mnist-dir or set {MNIST_DIR_ENV} to a directory holding the MNIST IDX files"
    if download_dir is None:
        raise DataError(f"no MNIST source given: {hint}, or give a download directory")
    try:
        from torchvision.datasets import MNIST
        raw_folder = MNIST(download_dir, train=split == "train", download=True).raw_folder
    except Exception as e:  # network, mirror and disk failures all leave the user the same fix
        raise DataError(f"torchvision could not download MNIST into {download_dir} "
                        f"({type(e).__name__}: {e}); {hint}") from e
    # torchvision keeps the decompressed IDX files there; parse them with the same checks.
    return _load_idx_dir(split, raw_folder, kind="torchvision")
