"""The built-in datasets' source files: MNIST and Fashion-MNIST as local IDX files (gzip or raw)
checked by content md5, or torchvision's download; mnist8m-style deformations of MNIST are made
from MNIST's files (data.deform).

    info = dataset_info("fashion-mnist")
    images, labels, source = load_idx("fashion-mnist", "train", source_dir="/data/fashion-mnist")
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vaedist.config import DATASET_DIR_ENV, MNIST_DIR_ENV
from vaedist.data.common import MNIST, MNIST_NUM_SAMPLES, DataError, DatasetInfo, _check_split

# The four files of an IDX dataset, per split (MNIST's names; Fashion-MNIST uses the same).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_FILES = IDX_FILES
# Of the decompressed content: a recompressed .gz holds the same data under a different md5
# (Debian's Fashion-MNIST package recompressed its files).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_MNIST = DatasetInfo("fashion-mnist", (28, 28, 1), class_names=(
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"))
MNIST8M = DatasetInfo("mnist8m", (28, 28, 1))

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (MNIST, FASHION_MNIST, MNIST8M)}
# name -> (md5s of the files, torchvision dataset class); mnist8m reads MNIST's files.
IDX_SOURCES = {"mnist": (MNIST_MD5, "MNIST"), "fashion-mnist": (FASHION_MNIST_MD5, "FashionMNIST")}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; built in: {', '.join(DATASETS)}")
    return DATASETS[name]


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


def _check_md5(data: bytes, path: str, name: str, dataset: str = "mnist") -> str:
    digest = hashlib.md5(data).hexdigest()
    expected = IDX_SOURCES[dataset][0][name]
    if digest != expected:
        raise DataError(f"{dataset} file {path}: md5 of the decompressed content is {digest}, expected "
                        f"{expected} (corrupt, or not the official {dataset} {name})")
    return digest


def _load_idx_dir(split: str, source_dir: str, kind: str, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray, dict]:
    image_name, label_name = IDX_FILES[split]
    n = MNIST_NUM_SAMPLES[split]
    h, w, _ = DATASETS[dataset].image_shape
    data, path = _read_idx_file(source_dir, image_name)
    images = _parse_idx(data, path, (n, h, w))
    files = {image_name: _check_md5(data, path, image_name, dataset)}
    data, path = _read_idx_file(source_dir, label_name)
    labels = _parse_idx(data, path, (n,))
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{dataset} file {path}: label {labels[bad]} at index {bad} is outside 0..9")
    files[label_name] = _check_md5(data, path, label_name, dataset)
    return images, labels, {"kind": kind, "files": files}


def load_idx(dataset: str, split: str, source_dir: str | None = None,
             download_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 [N, 28, 28], labels uint8 [N], source info) for one split of an IDX dataset
    (mnist, fashion-mnist).

    With source_dir: parse its IDX files (raw or .gz) and check magic, dims, counts, labels and the
    decompressed md5. Without: download with torchvision into download_dir, then parse the same way.
    Source info: {"kind": "idx" | "torchvision", "files": {file name: decompressed md5}}.
    """
    _check_split(split)
    if dataset not in IDX_SOURCES:
        raise DataError(f"{dataset!r} is not an IDX dataset; those are {', '.join(IDX_SOURCES)}")
    env = DATASET_DIR_ENV[dataset]
    if source_dir is not None:
        if not os.path.isdir(source_dir):
            raise DataError(f"{dataset} directory {source_dir} does not exist")
        return _load_idx_dir(split, source_dir, kind="idx", dataset=dataset)
    title = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}[dataset]
    option = "pass --mnist-dir DIR or " if env == MNIST_DIR_ENV else ""
    hint = (f"{option}set {env}=DIR (or data.{dataset.replace('-', '_')}_dir), DIR holding the four {title} "
            "IDX files, gzip or raw")
    if download_dir is None:
        raise DataError(f"no {title} source given: {hint}")
    try:
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, IDX_SOURCES[dataset][1])
        raw_folder = dataset_class(download_dir, train=split == "train", download=True).raw_folder
    except Exception as e:  # network, mirror and disk failures all leave the user the same fix
        raise DataError(f"torchvision could not download {title} into {download_dir} "
                        f"({type(e).__name__}: {str(e)[:200]}); offline? {hint}") from None
    # torchvision keeps the decompressed IDX files there; parse them with the same checks.
    return _load_idx_dir(split, raw_folder, kind="torchvision", dataset=dataset)


def load_mnist(split: str, mnist_dir: str | None = None,
               download_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """MNIST's split: load_idx("mnist", ...)."""
    return load_idx("mnist", split, mnist_dir, download_dir)


@dataclass
class SplitSource:
    """One split of a dataset, read a slice at a time: read(start, stop) -> (images uint8 in the
    dataset's stored shape [n, H, W(, C)], labels [n]). Lets prepare_shards write a split larger
    than memory shard by shard."""
    info: DatasetInfo
    num_samples: int
    read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def open_split(dataset: str, split: str, source_dir: str | None = None, download_dir: str | None = None,
               variants: int = 20, seed: int = 0) -> tuple[SplitSource, dict]:
    """A split of a built-in dataset and what the manifest records of its source.

    mnist8m's training split is MNIST's 60,000 training images times `variants`: index i is variant
    i // 60000 of MNIST training image i % 60000, variant 0 the original and the others its
    deterministic deformations (data.deform, keyed by (seed, i)); its test split is MNIST's.
    """
    info = dataset_info(dataset)
    base = "mnist" if dataset == "mnist8m" else dataset
    images, labels, source = load_idx(base, split, source_dir, download_dir)
    if dataset != "mnist8m" or split == "test":
        return SplitSource(info, len(labels), lambda a, b: (images[a:b], labels[a:b])), source
    if variants <= 0:
        raise DataError(f"mnist8m needs variants > 0 (data.mnist8m_variants), got {variants}")
    from vaedist.data.deform import DEFORM_SCHEME, deform

    n_base = len(labels)

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(start, stop, dtype=np.int64)
        out = images[index % n_base].copy()
        moved = index >= n_base  # variant 0 is the original image
        if moved.any():
            out[moved] = deform(out[moved], index[moved], seed)
        return out, labels[index % n_base]

    return (SplitSource(info, n_base * variants, read),
            {**source, "mnist8m": {"variants": variants, "seed": seed, "deformation": DEFORM_SCHEME,
                                   "base": "mnist train"}})
